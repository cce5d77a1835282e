"""Content-addressed instance files with atomic, durable writes (R-XCH-5).

An instance is written to a temporary file in the store's own ``tmp``
directory (same file system), hashed with SHA-256 on the way, fsynced and then
renamed to ``objects/ab/<sha256>``; the directory is fsynced too.  Only
after that, and after the metadata commit, is the instance acknowledged.  A
crash at any point leaves either nothing visible or a complete file whose name
is its hash: a file no metadata row references is invisible and harmless.

One level of 256 directories, all made when the store is opened: creating a
directory is the dearest step of a commit (a new inode, placed by ext4 in
another block group, whose bitmaps may have to be read first), and a second
level of 65,536 would make nearly every instance of a young store pay it, on
the path to its acknowledgement.  ext4's hashed directories keep lookups
fast at millions of entries each, so 256 hold billions of instances.
Temporary files are created read-only (``0o400``; the writer holds them
open for writing), so a stored file needs no ``chmod``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pki.errors import PayloadTooLargeError, StoreError

CHUNK = 1024 * 1024
#: Zeros written by :meth:`HashingWriter.preallocate`, a slice at a time.
_ZEROS = memoryview(bytes(CHUNK))


@dataclass(frozen=True)
class StagedFile:
    """A fully written temporary file and its digest."""

    path: Path
    sha256: str
    size: int


class HashingWriter:
    """Writes chunks to a temporary file, hashing and counting them."""

    def __init__(self, tmp_dir: Path, max_bytes: int) -> None:
        fd, self.path = _create_temporary(tmp_dir)
        self._fh: BinaryIO = os.fdopen(fd, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self.size = 0
        self._max = max_bytes
        self._preallocated = 0

    def preallocate(self, nbytes: int) -> None:
        """Fill the file with ``nbytes`` zeros now, then write from its start again.

        Putting new pages into the page cache is most of what writing a new
        file costs (on a virtual machine, several times the copy itself);
        overwriting pages already there is cheap.  A writer that will receive
        data of a foreseeable size is prepared this way while nobody waits
        for it, so that the writes that follow cost only the copy.
        :meth:`finish` cuts the file to what was written.
        """
        if self.size or nbytes <= 0:
            return
        self._preallocated = nbytes  # finish() cuts the file even if filling fails
        left = nbytes
        while left > 0:
            left -= self._fh.write(_ZEROS[: min(left, CHUNK)]) or 0
        self._fh.seek(0)

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            raise PayloadTooLargeError(
                f"instance larger than the configured limit of {self._max} bytes"
            )
        self._hash.update(chunk)
        self._fh.write(chunk)

    def finish(self, fsync: bool) -> StagedFile:
        try:
            if self._preallocated > self.size:
                self._fh.truncate(self.size)
            if fsync:
                # fdatasync also flushes the size, which is all a reader needs.
                os.fdatasync(self._fh.fileno())
        finally:
            self._fh.close()
        return StagedFile(self.path, self._hash.hexdigest(), self.size)

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            self.path.unlink(missing_ok=True)


class FileStore:
    """The local content store."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.fsync = fsync
        for d in (self.root, self.objects, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if len(os.listdir(self.objects)) < 256:  # a new store (every open costs 3 ms else)
            for n in range(256):
                (self.objects / f"{n:02x}").mkdir(exist_ok=True, mode=0o700)

    def writer(self, max_bytes: int) -> HashingWriter:
        return HashingWriter(self.tmp, max_bytes)

    def object_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise StoreError("invalid object name")
        return self.objects / sha256[:2] / sha256

    def commit(self, staged: StagedFile, *, sync_dir: bool = True) -> Path:
        """Move a staged file to its content address, durably.

        With ``sync_dir=False`` the caller fsyncs the directories itself (see
        :meth:`sync_dirs`) before acknowledging, so that many renames share a
        batch of directory syncs.
        """
        final = self.object_path(staged.sha256)
        try:
            if final.exists():
                # Same hash, same bytes: keep the stored file untouched.
                staged.path.unlink(missing_ok=True)
                return final
            try:
                os.replace(staged.path, final)
            except FileNotFoundError:
                if not staged.path.exists():
                    raise
                # Its directory was removed from under the store: make it again.
                final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.replace(staged.path, final)
            if self.fsync and sync_dir:
                _fsync_dir(final.parent)
        except OSError as exc:
            raise StoreError(f"could not store instance file: {exc.strerror}") from exc
        return final

    def sync_dirs(self, paths: list[Path]) -> None:
        """fsync the directories holding ``paths`` (each directory once)."""
        if not self.fsync:
            return
        for d in sorted({p.parent for p in paths}):
            _fsync_dir(d)

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.object_path(sha256), "rb")
        except OSError as exc:
            raise StoreError(f"stored instance file missing or unreadable: {exc.strerror}") from exc

    def iter_chunks(self, sha256: str, chunk: int = CHUNK) -> Iterator[bytes]:
        with self.open(sha256) as fh:
            while block := fh.read(chunk):
                yield block

    def verify(self, sha256: str) -> bool:
        h = hashlib.sha256()
        for block in self.iter_chunks(sha256):
            h.update(block)
        return h.hexdigest() == sha256

    def sweep_tmp(self) -> int:
        """Remove partial uploads left by a crash; returns how many."""
        n = 0
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
            n += 1
        return n


def _create_temporary(tmp_dir: Path) -> tuple[int, Path]:
    """A new, empty, read-only file in ``tmp_dir``, open for writing: (fd, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        path = tmp_dir / f"in-{secrets.token_hex(8)}.part"
        try:
            return os.open(path, flags, 0o400), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary name in {tmp_dir}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
