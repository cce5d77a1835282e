"""The external head checkpoint of the audit chain (R-AUD-2).

Deleting the *last* records of a hash chain leaves a shorter chain that is
still perfectly consistent.  So after every commit the trail writes the new
head ``{seq, record_hash}`` to a small file next to the database (or wherever
the operator points it, ideally another volume).  Verification compares the
table with it: a table shorter than the checkpoint means records were removed.

The file is replaced atomically (temporary file, fsync, rename, fsync of the
directory), and only ever moves forward: several processes append to the same
trail, and a slower one must not overwrite a newer head with an older one.
An ``fcntl`` lock on ``<head>.lock`` serialises the read-compare-write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from pki.errors import AuditWriteError

from .chain import UNREADABLE_CHECKPOINT, Checkpoint

_FORMAT = "sekisho-audit-head/1"


def read_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint in ``path``; ``None`` if the file does not exist.

    A file that exists but cannot be parsed is reported as a checkpoint with
    ``record_hash`` :data:`UNREADABLE_CHECKPOINT`, which never matches a real record, so
    verification fails instead of silently ignoring the damage.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        seq, digest = data["seq"], data["record_hash"]
        if data.get("format") != _FORMAT or not isinstance(seq, int) or not isinstance(digest, str):
            raise ValueError("unexpected content")
        return Checkpoint(seq, digest)
    except (ValueError, KeyError, TypeError):
        return Checkpoint(0, UNREADABLE_CHECKPOINT)


def write_checkpoint(path: Path, seq: int, record_hash: str) -> None:
    """Advance the checkpoint to ``(seq, record_hash)`` unless it is already further.

    Raises :class:`AuditWriteError` if the file cannot be written.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            current = read_checkpoint(path)
            if current is not None and current.seq >= seq:
                return
            _replace_atomically(path, {"format": _FORMAT, "seq": seq, "record_hash": record_hash})
    except OSError as exc:
        raise AuditWriteError(
            "the audit head checkpoint could not be written", detail=f"{path}: {exc}"
        ) from exc


def _replace_atomically(path: Path, content: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = json.dumps(content, sort_keys=True).encode("utf-8") + b"\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
