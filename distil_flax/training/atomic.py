"""Whole or not at all: the one way this project writes a file or a folder.

A writer writes under a temporary name beside its target and renames it into place when it is
complete, so a reader (or a later run) sees the old version or the new one, never half of one:

    config.json.tmp4242-node7        what process 4242 on host node7 is writing
    config.json                      renamed over the old one when complete (`os.replace`)

The temporary name carries the writer's pid and host, so that a later run tells what a killed
process left (same host, no such process: removed by `remove_stale`) from what a live writer is
still writing, maybe on another host that shares the directory (left alone). Every writer removes
the litter of its own target before it writes (`clean=True`); a preparation of many shards
removes that of its whole directory once, at its start. A folder is renamed into place the same
way, an existing one first renamed aside (`{name}.old{pid}-{host}`) and deleted after.

On object storage (`gs://...`) objects are written whole by the store: files are written
directly, with no temporary name.
"""

import contextlib
import json
import os
import re
import shutil
import socket
from typing import Any, Iterator

from etils import epath

from distil_flax.training.processes import process_alive

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"
# `{name}.tmp{pid}-{host}` (then a suffix a library insists on: `.npy`, `.onnx`, or `.model`
# for the model folder an ONNX export stages), `{name}.old{pid}-{host}`; also the names of
# earlier versions: `{name}.tmp{pid}`, `{name}.tmp.npy`, and exports'
# `.{name}.tmp-{pid}-{8 hex}` / `.{name}.old-{pid}-{8 hex}` / `{name}.{pid}-{8 hex}.tmp`.
SUFFIXES = (".npy", ".onnx", ".model")
_TEMP = re.compile(r"(?P<target>.+)\.(?:tmp|old)(?P<pid>\d*)(?:-(?P<host>[A-Za-z0-9-]+))?"
                   r"(?:\.npy|\.onnx|\.model)?")
_EARLIER = (re.compile(r"\.(?P<target>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}"),
            re.compile(r"(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp"))


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def temp_path(path: str | os.PathLike, suffix: str = "", kind: str = "tmp") -> str:
    """The name this process writes `path` under before renaming it into place.

    Args:
      path: the final path.
      suffix: appended last, one of SUFFIXES (".npy", which `np.save` would append otherwise).
      kind: "tmp", or "old" for a folder moved aside.
    """
    return f"{os.fspath(path)}.{kind}{os.getpid()}-{HOST}{suffix}"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_stale(directory: str | os.PathLike, target: str | None = None) -> list[str]:
    """Removes what killed writers on this host left in `directory`; returns the names.

    Args:
      directory: where to look.
      target: only the litter of this file or folder name; None: of every name.

    A file of another host, or of a process that still runs, is left alone. Pid-less names
    (`.tmp.npy`) were only written by earlier versions, which a rerun replaces: removed.
    """
    directory = os.fspath(directory)
    removed = []
    if is_remote(directory) or not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        # A name may parse several ways (a pid-less `.tmp` ending, say): any that names
        # `target` counts.
        match = next((m for m in (p.fullmatch(name) for p in (_TEMP, *_EARLIER))
                      if m and target in (None, m["target"])), None)
        if match is None:
            continue
        if match.groupdict().get("host") not in (None, HOST):
            continue
        if match["pid"] and process_alive(int(match["pid"])):
            continue
        _remove(os.path.join(directory, name))
        removed.append(name)
    return removed


def commit(tmp: str, path: str | os.PathLike) -> None:
    """Renames a finished temporary file or folder to `path`.

    An existing folder at `path` is renamed aside first and deleted after, so `path` is never
    missing a part and never mixes two versions.
    """
    path = os.fspath(path)
    old = None
    if os.path.isdir(tmp) and os.path.lexists(path):
        old = temp_path(path, kind="old")
        os.rename(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replaced(path: str | os.PathLike, *, suffix: str = "", folder: bool = False,
             clean: bool = True) -> Iterator[str]:
    """Yields the temporary path to write `path` under; commits it when the block ends.

    If the block raises (or is interrupted), the temporary file or folder is removed and `path`
    is left as it was.

    Args:
      path: the final file or folder (local).
      suffix: as `temp_path`.
      folder: create the temporary path as an empty folder first.
      clean: first remove what killed writers of `path` left beside it (`remove_stale`).
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    if clean:
        remove_stale(directory, name)
    tmp = temp_path(path, suffix)
    if folder:
        os.mkdir(tmp)  # Not mkdtemp: its 0o700 would survive the rename; mkdir honours the umask.
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Writes `text` (UTF-8) to `path` whole; `fsync`: on disk before the rename."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    with replaced(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` whole."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)
        return
    with replaced(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_new(path: str | os.PathLike, text: str) -> bool:
    """Creates `path` holding `text`, whole, only if nothing is there; False if it exists.

    Local files are linked into place (atomic, and it fails if `path` exists); on object storage
    the check and the write are two steps (objects offer no exclusive create).
    """
    if is_remote(path):
        target = epath.Path(path)
        if target.exists():
            return False
        target.write_text(text)
        return True
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)
    return True


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2,
               fsync: bool = False) -> None:
    """`write_text` of `value` as JSON (keys sorted, a final newline)."""
    write_text(path, json.dumps(value, indent=indent, sort_keys=True) + "\n", fsync=fsync)
