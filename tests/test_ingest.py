"""data.ingest: CSV, TSV, JSON lines and Parquet -> the day-partitioned log, raw ids kept, bad input named."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.config import DataConfig, VocabConfig
from data.ingest import PRESETS, Source, ingest
from data.prepare import prepare
from data.schema import LogError, list_days
from tests.helpers import ROOT, iter_log

CSV = "uid,sku,t_ms,price\nu1,a,1767225600000,1.5\nu1,b,1767225601000,2.0\nu2,a,1767312000500,1.0\n"


def _log(log_dir) -> list[dict]:
    return pa.concat_tables(list(iter_log(log_dir, raw_ids=True))).to_pylist()


def test_csv_with_named_columns_and_milliseconds(tmp_path):
    src = tmp_path / "events.csv"
    src.write_text(CSV)
    summary = ingest([src], tmp_path / "log", Source("csv", "uid", "sku", "t_ms", "ms"))
    assert summary["events"] == 3 and summary["item_id"] == "str" and summary["days"] == 2
    assert [d.isoformat() for d in list_days(tmp_path / "log")] == ["2026-01-01", "2026-01-02"]
    rows = _log(tmp_path / "log")
    assert [(r["user_id"], r["item_id"], r["price"]) for r in rows] == [("u1", "a", 1.5), ("u1", "b", 2.0),
                                                                        ("u2", "a", 1.0)]
    assert rows[2]["ts"].isoformat() == "2026-01-02T00:00:00.500000+00:00"


def test_tsv_without_header_jsonl_iso_and_parquet(tmp_path):
    tsv = tmp_path / "u.data"
    tsv.write_text("1\t10\t4\t881250949\n2\t20\t3\t881250950\n")
    ingest([tsv], tmp_path / "a", PRESETS["movielens-100k"])
    rows = _log(tmp_path / "a")
    assert [(r["user_id"], r["item_id"], r["rating"]) for r in rows] == [(1, 10, 4), (2, 20, 3)]  # int ids stay int
    jl = tmp_path / "e.jsonl"
    jl.write_text('{"user_id": "x", "item_id": 9007199254740993, "ts": "2026-03-01T10:00:00+02:00"}\n'
                  '{"user_id": "y", "item_id": 5, "ts": "2026-03-01 12:00:00"}\n')
    ingest([jl], tmp_path / "b", Source("jsonl", ts_unit="iso"))
    rows = _log(tmp_path / "b")
    assert [r["item_id"] for r in rows] == [9007199254740993, 5]  # 64-bit ids exactly
    assert [r["ts"].hour for r in rows] == [8, 12]  # the offset applied; no offset means UTC
    pq.write_table(pa.table({"user_id": ["q"], "item_id": ["007"], "ts": [1767225600]}), tmp_path / "p.parquet")
    ingest([tmp_path / "p.parquet"], tmp_path / "c", Source("parquet"))
    assert _log(tmp_path / "c")[0]["item_id"] == "007"  # a token, not the integer 7


def test_ratings_csv_preset_then_the_trainer_data_stage(tmp_path):
    """MovieLens ratings.csv (ml-latest, ml-20m...): imported, then prepared through the vocabulary."""
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(1, 31):
        for k in range(6):
            lines.append(f"{u},{100 + (u + k) % 12},4.0,{1767225600 + 86400 * (k // 2) + u}")
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    ingest([tmp_path / "ratings.csv"], tmp_path / "log", PRESETS["movielens-latest"])
    data = prepare(DataConfig(path=str(tmp_path / "log"), backend="arrow"), tmp_path / "work", query_len=5)
    assert data.vocab is None and data.num_items == 111 and data.num_eval_queries == 30  # dense enough as they are
    forced = prepare(DataConfig(path=str(tmp_path / "log"), backend="arrow", vocab=VocabConfig(build="always")),
                     tmp_path / "work2", query_len=5)
    assert forced.vocab and forced.num_items == 12 and forced.num_eval_queries == 30  # rows 1..12 for 12 movies


@pytest.mark.parametrize("text, source, message", [
    ("uid,sku\nu1,a\n", Source("csv", "uid", "sku", "t"), "missing column 't'"),
    ("user_id,item_id,ts\nu1,a,1\nu2,b\n", Source("csv"), "Expected 3 columns, got 2"),
    ("user_id,item_id,ts\nu1,a,1\n", Source("csv", ts_unit="minutes"), "unknown --ts-unit 'minutes'"),
    ("user_id,item_id,ts\nu1,1.5,1\n", Source("csv"), "column 'item_id' holds floats"),
    ("user_id,item_id,ts\nu1,a,yesterday\n", Source("csv"), "column 'ts' has type string, but --ts-unit s"),
])
def test_bad_input_names_the_file_column_and_value(tmp_path, text, source, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(LogError, match=message) as e:
        ingest([path], tmp_path / "log", source)
    assert str(path) in str(e.value)
    assert not os.path.exists(tmp_path / "log") and not os.path.exists(str(tmp_path / "log") + ".ingest-tmp")


def test_one_kind_of_id_per_column_across_files(tmp_path):
    (tmp_path / "a.csv").write_text("user_id,item_id,ts\n1,10,1\n")
    (tmp_path / "b.csv").write_text("user_id,item_id,ts\n1,sku-x,2\n")
    with pytest.raises(LogError, match="b.csv: column 'item_id' mixes integer ids with text such as 'sku-x'"):
        ingest([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "log", Source("csv"))
    assert not os.path.exists(tmp_path / "log")  # nothing half-written


def test_cli_prints_one_error_line(tmp_path):
    (tmp_path / "e.csv").write_text("user_id,item_id\n1,2\n")
    out = subprocess.run([sys.executable, "-m", "data.ingest", str(tmp_path / "e.csv"), "--out", str(tmp_path / "l")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: ")
    assert "missing column 'ts'" in out.stderr
    (tmp_path / "ok.csv").write_text("user_id,item_id,ts\n1,2,1767225600\n")
    out = subprocess.run([sys.executable, "-m", "data.ingest", str(tmp_path / "ok.csv"), "--out", str(tmp_path / "l")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["events"] == 1


ML_ROWS = [(196, 242, 3, 978_307_250), (22, 377, 1, 978_307_210), (196, 1000, 4, 978_393_605)]  # ml-1m style


def test_movielens_1m_preset_from_the_command_line(tmp_path):
    """ratings.dat (user::item::rating::seconds, no header): the exact command of the docs; the empty fields
    between the two ':' of each '::' are not carried."""
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{s}\n" for u, i, r, s in ML_ROWS))
    out = subprocess.run([sys.executable, "-m", "data.ingest", "ratings.dat", "--out", str(tmp_path / "log"),
                          "--preset", "movielens-1m"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["events"] == 3 and json.loads(out.stdout)["days"] == 2
    rows = _log(tmp_path / "log")
    assert set(rows[0]) == {"user_id", "item_id", "ts", "rating"}
    assert sorted((r["user_id"], r["item_id"], r["rating"], int(r["ts"].timestamp())) for r in rows) == \
        sorted(ML_ROWS)


def test_a_preset_keeps_its_own_dropped_columns_with_drop(tmp_path):
    from data.ingest import main
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{s}\n" for u, i, r, s in ML_ROWS))
    assert main([str(tmp_path / "ratings.dat"), "--out", str(tmp_path / "log"), "--preset", "movielens-1m",
                 "--drop", "rating"]) == 0
    assert set(_log(tmp_path / "log")[0]) == {"user_id", "item_id", "ts"}


def test_recbole_inter_preset(tmp_path):
    """A RecBole atomic file: tab separated, a header of name:type fields (the names become the columns), ids
    are tokens (titles with spaces, commas and quotes are kept as they are)."""
    inter = tmp_path / "ml-1m.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     '7\tToy Story (1995)\t4\t978307250\n'
                     '7\t"Heat", the film\t5\t978307251\n'
                     '9\tToy Story (1995)\t3\t978393605\n')
    summary = ingest([inter], tmp_path / "log", PRESETS["recbole"])
    assert (summary["events"], summary["user_id"], summary["item_id"], summary["days"]) == (3, "int", "str", 2)
    rows = _log(tmp_path / "log")
    assert set(rows[0]) == {"user_id", "item_id", "ts", "rating"}
    assert [(r["user_id"], r["item_id"], r["rating"], int(r["ts"].timestamp())) for r in rows] == [
        (7, "Toy Story (1995)", 4, 978307250), (7, '"Heat", the film', 5, 978307251),
        (9, "Toy Story (1995)", 3, 978393605)]
    bad = tmp_path / "bad.inter"
    bad.write_text("uid:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    with pytest.raises(LogError, match="missing column 'user_id'"):
        ingest([bad], tmp_path / "log2", PRESETS["recbole"])
