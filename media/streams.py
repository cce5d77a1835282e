"""Byte streams over files of a medium: capped, buffered, never re-openable by name.

Split from :mod:`media.source`; see there for the safety rules (R-PDI-8).
"""

from __future__ import annotations

import io
from typing import Any

from pki.errors import PayloadTooLargeError


class CappedReader(io.RawIOBase):
    """A read-only stream that refuses to deliver more than ``cap`` bytes."""

    def __init__(self, inner: Any, cap: int, name: str, on_close: Any = None) -> None:
        super().__init__()
        self._inner = inner
        self._cap = cap
        self._name = name
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inner.read(len(view))
        n = len(data)
        view[:n] = data
        if self._inner.tell() > self._cap:
            raise PayloadTooLargeError(
                f"{self._name} grew beyond the per-file limit while it was read"
            )
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._inner.seek(offset, whence))

    def tell(self) -> int:
        return int(self._inner.tell())

    def close(self) -> None:
        if not self.closed:
            try:
                if self._on_close is not None:
                    self._on_close()
                else:
                    self._inner.close()
            finally:
                super().close()


class MediaStream:
    """A buffered, read-only, seekable stream over one file of a medium.

    Deliberately *not* an ``io.BufferedReader`` and without a ``name``:
    pydicom re-opens a ``BufferedReader`` by its name for deferred reads,
    which would read from the host file system instead of the medium.
    """

    name = None

    def __init__(self, raw: CappedReader, buffer_size: int) -> None:
        self._buffered = io.BufferedReader(raw, buffer_size=buffer_size)

    def read(self, size: int | None = -1) -> bytes:
        return self._buffered.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._buffered.seek(offset, whence)

    def tell(self) -> int:
        return self._buffered.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._buffered.closed

    def close(self) -> None:
        self._buffered.close()

    def __enter__(self) -> MediaStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
