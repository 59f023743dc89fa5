"""MovieLens import on tiny hand-written files of each format."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from data.movielens import convert, detect_format
from data.schema import list_days
from data.sequences import build_sequences, read_sequences
from tests.helpers import iter_log

DAY1 = 978_307_200  # 2001-01-01 00:00:00 UTC
ROWS = [  # (user, item, rating, seconds), in file order
    ("196", "242", 3, DAY1 + 50),
    ("22", "377", 1, DAY1 + 10),
    ("196", "51", 2, DAY1 + 50),  # same second as the first row: item order decides (51 < 242)
    ("196", "1000", 4, DAY1 + 86_400 + 5),  # next day
    ("22", "51", 5, DAY1 + 9),
]


def _expected(tmp_path, log):
    seqs = read_sequences(build_sequences(log, tmp_path / "seq", backend="arrow").out_dir)
    users = pq.read_table(os.path.join(log, "_maps", "user_map.parquet")).to_pylist()
    items = pq.read_table(os.path.join(log, "_maps", "item_map.parquet")).to_pylist()
    original = {r["item_id"]: r["original"] for r in items}
    return seqs, users, items, [[original[i] for i in row] for row in seqs.column("item_ids").to_pylist()]


def test_ml100k_u_data(tmp_path):
    src = tmp_path / "u.data"
    src.write_text("".join(f"{u}\t{i}\t{r}\t{s}\n" for u, i, r, s in ROWS))
    assert detect_format(str(src)) == "ml-100k"
    summary = convert(src, tmp_path / "log")
    assert (summary["events"], summary["users"], summary["items"]) == (5, 2, 4)
    seqs, users, items, by_original = _expected(tmp_path, tmp_path / "log")
    # dense ids, numeric order of the original ids, 0 left for padding
    assert [(r["user_id"], r["original"]) for r in users] == [(1, "22"), (2, "196")]
    assert [(r["item_id"], r["original"]) for r in items] == [(1, "51"), (2, "242"), (3, "377"), (4, "1000")]
    assert by_original == [["51", "377"], ["51", "242", "1000"]]
    assert [d.isoformat() for d in list_days(tmp_path / "log")] == ["2001-01-01", "2001-01-02"]
    ratings = sorted(r for t in iter_log(tmp_path / "log") for r in t.column("rating").to_pylist())
    assert ratings == [1, 2, 3, 4, 5]


def test_ml1m_ratings_dat(tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text("".join(f"{u}::{i}::{r}::{s}\n" for u, i, r, s in ROWS))
    assert detect_format(str(src)) == "ml-1m"
    convert(src, tmp_path / "log")
    assert _expected(tmp_path, tmp_path / "log")[3] == [["51", "377"], ["51", "242", "1000"]]


def test_ml_latest_ratings_csv(tmp_path):
    src = tmp_path / "ratings.csv"  # ml-latest, ml-20m, ml-25m, ml-32m
    src.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r}.5,{s}\n" for u, i, r, s in ROWS))
    assert detect_format(str(src)) == "ml-latest"
    convert(src, tmp_path / "log")
    assert _expected(tmp_path, tmp_path / "log")[3] == [["51", "377"], ["51", "242", "1000"]]


def test_recbole_inter_with_title_tokens(tmp_path):
    src = tmp_path / "ml-100k.inter"
    titles = {"242": "Kolya (1996)", "377": "Heavyweights (1994)", "51": "Legends of the Fall (1994)",
              "1000": 'Lightning Jack "Special" (1994)'}
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{titles[i]}\t{r}\t{s}.0" for u, i, r, s in ROWS]
    src.write_text("\n".join(lines) + "\n")
    assert detect_format(str(src)) == "recbole"
    convert(src, tmp_path / "log")
    seqs, users, items, by_original = _expected(tmp_path, tmp_path / "log")
    assert [r["original"] for r in items] == sorted(titles.values())  # string ids: sorted as strings
    # user 196 at the same second: "Kolya" < "Legends" as strings, so Kolya (smaller dense id) comes first
    assert by_original == [["Legends of the Fall (1994)", "Heavyweights (1994)"],
                           ["Kolya (1996)", "Legends of the Fall (1994)", 'Lightning Jack "Special" (1994)']]


def test_recbole_without_timestamp_is_refused(tmp_path):
    src = tmp_path / "x.inter"
    src.write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(ValueError, match="timestamp"):
        convert(src, tmp_path / "log")


def test_cli(tmp_path):
    src = tmp_path / "u.data"
    src.write_text("".join(f"{u}\t{i}\t{r}\t{s}\n" for u, i, r, s in ROWS))
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "data.movielens", str(src), "--out", str(tmp_path / "log")],
                         capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout)["events"] == 5
    again = subprocess.run([sys.executable, "-m", "data.movielens", str(src), "--out", str(tmp_path / "log")],
                           capture_output=True, text=True, env=env)
    assert again.returncode != 0 and "already holds data" in again.stderr
