"""Where a run's checkpoints and results live: a local directory or a URI that pyarrow.fs understands
(file://, s3://, gs://, hdfs://, abfs://, ...). One code path for both: a local path is pyarrow's
LocalFileSystem.

A location is a `Path` (local) or a `str` URI; `join` keeps the kind, so a local run's checkpoints stay
`Path`s for callers that open them directly. Query parameters of a URI (s3://b/x?region=eu-west-1)
stay at its end.
"""

import os
import sys
import zlib
from pathlib import Path
from typing import Optional, Union

import pyarrow.fs as pafs

Location = Union[Path, str]


def is_uri(where: Union[str, os.PathLike]) -> bool:
    return isinstance(where, str) and "://" in where


def location(where: Union[str, os.PathLike]) -> Location:
    """A URI stays a string; anything else becomes an absolute local Path."""
    return str(where) if is_uri(str(where)) else Path(where).resolve()


def resolve(where: Union[str, os.PathLike]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it). Raises what pyarrow raises for a URI it does not understand."""
    if is_uri(str(where)):
        return pafs.FileSystem.from_uri(str(where))
    return pafs.LocalFileSystem(), os.path.abspath(where)


def join(where: Location, *parts: str) -> Location:
    if not is_uri(str(where)):
        return Path(where).joinpath(*parts)
    base, q, query = str(where).partition("?")
    rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
    return base.rstrip("/") + ("/" + rel if rel else "") + q + query


def name_of(where: Location, fs_path: str) -> Location:
    """How to name `fs_path` (a path on `where`'s filesystem, e.g. a Ray checkpoint's .path) to a user:
    the path itself for a local location, a URI beside `where`'s otherwise."""
    if not is_uri(str(where)):
        return Path(fs_path)
    _, base = resolve(where)
    base = base.rstrip("/")
    if fs_path.rstrip("/") == base:
        return str(where)
    if fs_path.startswith(base + "/"):
        return join(where, fs_path[len(base) + 1:])
    return fs_path


# ---------------------------------------------------------------- files on a (filesystem, path)


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def crc32(fs: pafs.FileSystem, path: str) -> int:
    crc = 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def list_files(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """Every file under `root` (one listing, not a request per file), by path relative to it."""
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:]: i for i in infos if i.type == pafs.FileType.File and i.path.startswith(root + "/")}


# ---------------------------------------------------------------- whole files at a location


def exists(where: Location) -> bool:
    fs, path = resolve(where)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(where: Location) -> Optional[str]:
    """The file's text, or None if there is no such file."""
    fs, path = resolve(where)
    if not is_file(fs, path):
        return None
    return read_bytes(fs, path).decode()


def write_bytes(where: Location, data: bytes) -> None:
    """Replace the file at `where`; readers never see a half-written file (a local file is written beside
    and renamed; an object store publishes an object only when its upload completes)."""
    fs, path = resolve(where)
    parent = path.rstrip("/").rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def copy_quietly(src: Location, dst: Location) -> None:
    """copy_file, but a failure is a warning: a storage hiccup must not fail training or hide its outcome."""
    try:
        copy_file(src, dst)
    except Exception as e:
        print(f"warning: could not copy {src} to {dst}: {e}", file=sys.stderr, flush=True)


def copy_file(src: Location, dst: Location) -> bool:
    """Copy one file between locations; False (and nothing written) if `src` does not exist."""
    fs, path = resolve(src)
    if not is_file(fs, path):
        return False
    write_bytes(dst, read_bytes(fs, path))
    return True
