"""Checksums of checkpoint steps: what a garbled, truncated or missing file is told apart by.

Orbax restores a garbled array file as whatever numbers its bytes decode to. So before a step is
committed, every file of its items is listed with its size and CRC-32 in `<step>/checksums.json`,
and every reader checks them first (`verify_step`). Used by the run's checkpoints
(`checkpoint.py`), the best parameters and every params-only reader (a teacher, an export).
"""

import json
import os
import zlib
from typing import Sequence

from etils import epath

from distil_flax.training import atomic

CHECKSUMS = "checksums.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint step whose files are missing, truncated, garbled or unreadable."""


def is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def file_crc32(path: str) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file, read in chunks; zlib releases the GIL while hashing."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def write_checksums(step_dir: str | os.PathLike, items: Sequence[str]) -> int:
    """Lists every file of the step's `items` with its size and CRC-32 in
    `step_dir/checksums.json`.

    Returns:
      How many files were listed.
    """
    step_dir = os.fspath(step_dir)
    files = {}
    for item in items:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in names:
                path = os.path.join(root, name)
                size, crc = file_crc32(path)
                files[os.path.relpath(path, step_dir)] = {"bytes": size, "crc32": crc}
    atomic.write_json(os.path.join(step_dir, CHECKSUMS), {"version": 1, "files": files},
                      indent=1, fsync=True)
    return len(files)


def verify_step(directory: str | os.PathLike, step: int,
                items: Sequence[str] | None = None) -> bool:
    """Checks the files of `items` in checkpoint `step` against its `checksums.json`.

    Args:
      directory: the `checkpoints/` directory.
      step: the step to check.
      items: which items to check (a teacher or an export reads only "params"); None: every
        file the step lists.

    Returns:
      True if every listed file matched; False for a step on object storage, which has no
      checksums, so nothing could be checked.

    Raises:
      CorruptCheckpointError: naming the step and the first file that is missing, has another
        size or another CRC-32, or an unreadable or missing `checksums.json` (on a local file
        system every committed step has one: a step without it was damaged after its commit).
    """
    step_dir = os.path.join(os.fspath(directory), str(step))
    manifest_path = os.path.join(step_dir, CHECKSUMS)
    if not is_local(epath.Path(step_dir)):
        return False
    if not os.path.exists(manifest_path):
        raise CorruptCheckpointError(
            f"checkpoint step {step}: {manifest_path} is missing (every step committed on a local "
            "file system has one, so the step was damaged after its commit)")
    try:
        with open(manifest_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(
            f"checkpoint step {step}: {manifest_path} is unreadable ({error})") from None
    for name, expected in sorted(files.items()):
        if items is not None and name.split(os.sep, 1)[0] not in items:
            continue
        path = os.path.join(step_dir, name)
        where = f"checkpoint step {step}: {path}"
        if not os.path.isfile(path):
            raise CorruptCheckpointError(f"{where} is missing")
        size, crc = file_crc32(path)
        if size != expected["bytes"]:
            raise CorruptCheckpointError(
                f"{where} has {size} bytes, {expected['bytes']} were written (truncated?)")
        if crc != expected["crc32"]:
            raise CorruptCheckpointError(
                f"{where} does not match its CRC-32 (garbled: {crc:#010x} != "
                f"{expected['crc32']:#010x})")
    return True
