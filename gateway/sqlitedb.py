"""One way to open Sekisho's SQLite databases (R-OPS-1).

Every table family (metadata, forwarding queue, import records, digitization
records) shares the same discipline: a connection per thread, WAL journal,
``synchronous=FULL`` so that a commit is durable when it returns (unless
the database is opened ``durable=False``: then ``NORMAL``, which survives a
crash of the process but not of the machine), write
transactions serialised in-process and ``BEGIN IMMEDIATE`` across processes,
and SQLite errors mapped to the project's error vocabulary at this one place.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

from pki.errors import ConflictError, StoreError


class SqliteDatabase:
    """Base class: subclasses set ``SCHEMA`` and ``LABEL`` (used in error messages)."""

    SCHEMA: ClassVar[str] = ""
    #: Words for error messages, e.g. "forwarding queue database".
    LABEL: ClassVar[str] = "database"
    #: Map integrity violations (UNIQUE, CHECK, triggers) to ConflictError.
    INTEGRITY_IS_CONFLICT: ClassVar[bool] = False
    FOREIGN_KEYS: ClassVar[bool] = True

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._synchronous = "FULL" if durable else "NORMAL"
        self._local = threading.local()
        self._write_lock = threading.Lock()
        if self.SCHEMA:
            with self._conn() as conn:
                conn.executescript(self.SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            if self.FOREIGN_KEYS:
                conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._connection()
        except sqlite3.IntegrityError as exc:
            if self.INTEGRITY_IS_CONFLICT:
                raise ConflictError(f"{self.LABEL} refused the change: {exc}") from exc
            raise StoreError(f"{self.LABEL} error: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"{self.LABEL} error: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, durable when the block ends without error."""
        with self._write_lock, self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
