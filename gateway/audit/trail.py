"""The append-only, hash-chained audit trail on SQLite (R-AUD-1, R-AUD-2).

Writing: :meth:`AuditTrail.record` appends one event inside ``BEGIN
IMMEDIATE``, so threads (serialised by a lock) and separate processes
(serialised by SQLite's write lock) sharing one database file all extend one
chain with strictly consecutive sequence numbers.  After each commit the
external head checkpoint is advanced (see :mod:`.checkpoint`).  If anything
fails, :class:`~pki.errors.AuditWriteError` is raised and the caller must refuse
the action it was about to audit.

Evidence: :meth:`AuditTrail.seal` has an RFC 3161 Time-Stamp Authority sign
the current head hash (the timestamper is injected by the composition root),
so that even a complete, consistent rewrite of the chain is detected later.
:meth:`AuditTrail.verify` recomputes the whole chain in a streaming pass.

Triggers refuse ``UPDATE`` and ``DELETE`` on both tables.  Someone with write
access to the file can drop them; that is exactly the case the chain, the
checkpoint and the seals exist for.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pki.errors import AuditIntegrityError, AuditWriteError

from .chain import (
    GENESIS_HASH,
    ROW_COLUMNS,
    AuditRecord,
    ChainVerifier,
    Checkpoint,
    SealRef,
    StoredRow,
    VerifyReport,
    build_row,
    compute_hash,
    format_time,
    parse_time,
)
from .checkpoint import read_checkpoint, write_checkpoint
from .events import AuditEvent, Code, security_alert

_log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
#: Takes the bytes to timestamp (the 32-byte head hash), returns a DER
#: ``TimeStampToken`` (RFC 3161 §2.4.2).  Provided by the signing package.
Timestamper = Callable[[bytes], bytes]
Subscriber = Callable[[AuditRecord], object]

_COLS = ", ".join(ROW_COLUMNS)
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit_log (
        seq INTEGER PRIMARY KEY,
        occurred_at TEXT NOT NULL,
        event_id TEXT NOT NULL,
        action TEXT NOT NULL,
        outcome INTEGER NOT NULL,
        actor TEXT NOT NULL,
        actor_kind TEXT NOT NULL,
        patient_id TEXT,
        patient_issuer TEXT,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        record_hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_log_patient"
    " ON audit_log (patient_id, patient_issuer, occurred_at)",
    "CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log (occurred_at)",
    "CREATE INDEX IF NOT EXISTS audit_log_event ON audit_log (event_id, occurred_at)",
    "CREATE INDEX IF NOT EXISTS audit_log_actor ON audit_log (actor, occurred_at)",
    """CREATE TABLE IF NOT EXISTS audit_seals (
        id INTEGER PRIMARY KEY,
        sealed_at TEXT NOT NULL,
        head_seq INTEGER NOT NULL,
        head_hash TEXT NOT NULL,
        token BLOB NOT NULL)""",
    *(
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb} BEFORE {verb.upper()} ON {table}"
        f" BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        for table in ("audit_log", "audit_seals")
        for verb in ("update", "delete")
    ),
)


def utc_now() -> datetime:
    """Default clock: the system clock in UTC (kept synchronised by NTP, R-AUD-5)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Seal:
    """An RFC 3161 timestamp token over the chain head at ``head_seq``."""

    seal_id: int
    sealed_at: datetime
    head_seq: int
    head_hash: str
    token: bytes


class AuditTrail:
    """Tamper-evident audit log in the SQLite file ``db_path`` (R-AUD-2).

    ``head_path`` is the external head checkpoint (default
    ``<db_path>.audit-head``); put it on another volume where possible.
    ``clock`` must return timezone-aware datetimes.
    """

    def __init__(
        self,
        db_path: Path,
        *,
        head_path: Path | None = None,
        clock: Clock = utc_now,
        busy_timeout: float = 30.0,
    ) -> None:
        self.db_path = Path(db_path)
        self.head_path = (
            Path(head_path)
            if head_path is not None
            else self.db_path.with_name(self.db_path.name + ".audit-head")
        )
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            self._prepare(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise AuditWriteError(
                "the audit trail cannot be opened for writing", detail=f"{self.db_path}: {exc}"
            ) from exc
        self._conn: sqlite3.Connection | None = conn

    # -- connections ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.db_path,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )

    @staticmethod
    def _prepare(conn: sqlite3.Connection) -> None:
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL (journal mode is {mode})")
        # FULL: a commit that returned is on disk, so the checkpoint written
        # after it never runs ahead of the table after a power cut.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def read_connection(self) -> Iterator[sqlite3.Connection]:
        """A separate read-only connection (for reports); closed on exit."""
        conn = self._connect()
        try:
            conn.execute("PRAGMA query_only=ON")
            yield conn
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise AuditWriteError("the audit trail is closed")
        return self._conn

    # -- writing -------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(record)`` after each commit (e.g. a syslog forwarder).

        Callbacks must not block; their exceptions are logged and ignored,
        because the record is already safely in the trail.
        """
        self._subscribers.append(callback)

    def record(self, event: AuditEvent) -> int:
        """Append ``event``; return its sequence number.

        Raises :class:`AuditWriteError` if the record or the head checkpoint
        cannot be written: the caller must then refuse the audited action.
        """
        if not isinstance(event, AuditEvent):
            raise TypeError("record() takes an AuditEvent")
        with self._lock:
            conn = self._writer()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    last = conn.execute(
                        "SELECT seq, record_hash FROM audit_log ORDER BY seq DESC LIMIT 1"
                    ).fetchone()
                    seq, prev = (1, GENESIS_HASH) if last is None else (last[0] + 1, last[1])
                    # Time is taken under the write lock, so seq order is time order.
                    row = build_row(seq, format_time(self._clock()), event, prev)
                    conn.execute(
                        f"INSERT INTO audit_log ({_COLS}) VALUES ({', '.join('?' * len(row))})",
                        row,
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.Error, ValueError) as exc:  # ValueError: a naive clock
                raise AuditWriteError(
                    "the audit record could not be written", detail=f"{self.db_path}: {exc}"
                ) from exc
            write_checkpoint(self.head_path, seq, row.record_hash)
        if self._subscribers:
            stored = AuditRecord.from_row(row)
            for callback in list(self._subscribers):
                try:
                    callback(stored)
                except Exception:  # noqa: BLE001 - the record is committed regardless
                    _log.exception("audit subscriber failed for record %d", seq)
        return seq

    def close_checkpoint_gap(self, actor: str = "sekisho") -> int:
        """Record, at start-up, records a crash left outside the head checkpoint.

        The checkpoint file is rewritten after each commit; a crash between the
        two leaves the newest records uncovered.  This appends a Security Alert
        naming them (which moves the checkpoint past them), so that the gap is
        itself on the record instead of silently accepted.  Returns how many
        records were uncovered.
        """
        checkpoint = read_checkpoint(self.head_path)
        head = self.head()
        base = checkpoint.seq if checkpoint else 0
        gap = head.seq - base
        if gap <= 0:
            return 0
        self.record(
            security_alert(
                "audit-checkpoint-gap",
                f"records {base + 1} to {head.seq} were not covered by the head "
                "checkpoint when the gateway started (unclean stop?)",
                actor=actor,
                actor_kind="system",
            )
        )
        return gap

    def head(self) -> Checkpoint:
        """The current last ``(seq, record_hash)``; ``(0, GENESIS_HASH)`` when empty."""
        with self._lock:
            try:
                last = (
                    self._writer()
                    .execute("SELECT seq, record_hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                    .fetchone()
                )
            except sqlite3.Error as exc:
                raise AuditIntegrityError(
                    "the audit trail cannot be read", detail=str(exc)
                ) from exc
        return Checkpoint(0, GENESIS_HASH) if last is None else Checkpoint(*last)

    def seal(self, timestamper: Timestamper) -> Seal:
        """Timestamp the current head hash (RFC 3161) and store the token.

        The timestamper gets the 32 raw bytes of the head's ``record_hash`` and
        is called outside the write lock (it usually talks to a TSA over the
        network).  Its own exceptions propagate unchanged.
        """
        with self._lock:
            try:
                raw = (
                    self._writer()
                    .execute(f"SELECT {_COLS} FROM audit_log ORDER BY seq DESC LIMIT 1")
                    .fetchone()
                )
            except sqlite3.Error as exc:
                raise AuditWriteError("the audit head cannot be read", detail=str(exc)) from exc
        if raw is None:
            raise AuditWriteError("there is nothing to seal: the audit trail is empty")
        head = StoredRow(*raw)
        if compute_hash(head) != head.record_hash:
            raise AuditIntegrityError(f"record {head.seq} was altered; refusing to seal it")
        token = timestamper(bytes.fromhex(head.record_hash))
        if not isinstance(token, bytes) or not token:
            raise AuditWriteError("the timestamper returned no token")
        with self._lock:
            sealed_at = format_time(self._clock())
            conn = self._writer()
            try:
                cur = conn.execute(
                    "INSERT INTO audit_seals (sealed_at, head_seq, head_hash, token)"
                    " VALUES (?, ?, ?, ?)",
                    (sealed_at, head.seq, head.record_hash, token),
                )
            except sqlite3.Error as exc:
                raise AuditWriteError(
                    "the audit seal could not be stored", detail=str(exc)
                ) from exc
        return Seal(
            int(cur.lastrowid or 0), parse_time(sealed_at), head.seq, head.record_hash, token
        )

    def seals(self) -> list[Seal]:
        with self.read_connection() as conn:
            rows = conn.execute(
                "SELECT id, sealed_at, head_seq, head_hash, token FROM audit_seals ORDER BY id"
            ).fetchall()
        return [Seal(r[0], parse_time(r[1]), r[2], r[3], bytes(r[4])) for r in rows]

    # -- reading -------------------------------------------------------------

    def verify(
        self, *, token_check: Callable[[bytes, bytes], object] | None = None
    ) -> VerifyReport:
        """Recompute the whole chain and compare it with the checkpoint and seals.

        ``token_check(token, head_hash_bytes)`` may also verify each seal's
        RFC 3161 token; it raises if the token is bad.
        """
        checkpoint = read_checkpoint(self.head_path)  # before the snapshot: see ChainVerifier
        try:
            with self.read_connection() as conn:
                conn.execute("BEGIN")
                seals = [
                    SealRef(r[0], r[1], r[2], bytes(r[3]))
                    for r in conn.execute(
                        "SELECT id, head_seq, head_hash, token FROM audit_seals ORDER BY id"
                    )
                ]
                verifier = ChainVerifier(checkpoint, seals, token_check=token_check)
                for raw in conn.execute(f"SELECT {_COLS} FROM audit_log ORDER BY seq, rowid"):
                    verifier.feed(StoredRow(*raw))
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            problem = f"the audit database cannot be read ({exc})"
            return VerifyReport(False, 0, 0, GENESIS_HASH, problem=problem, problems=(problem,))
        return verifier.finish()

    def verify_or_raise(self) -> VerifyReport:
        """:meth:`verify`, raising :class:`AuditIntegrityError` with the problem."""
        report = self.verify()
        if not report.ok:
            raise AuditIntegrityError(f"the audit trail does not verify: {report.problem}")
        return report

    def iter_records(
        self,
        *,
        patient_id: str | None = None,
        patient_issuer: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        event_id: Code | str | None = None,
        actor: str | None = None,
        after_seq: int | None = None,
        limit: int | None = None,
        check_hashes: bool = True,
    ) -> Iterator[AuditRecord]:
        """Records matching every given filter, in time order (then ``seq``).

        ``since`` is inclusive, ``until`` exclusive.  With ``check_hashes`` a
        record whose own hash does not match raises
        :class:`AuditIntegrityError` instead of being reported as if genuine.
        """
        clauses: list[str] = []
        params: list[object] = []
        for column, value in (
            ("patient_id = ?", patient_id),
            ("patient_issuer = ?", patient_issuer),
            ("occurred_at >= ?", format_time(since) if since else None),
            ("occurred_at < ?", format_time(until) if until else None),
            ("event_id = ?", event_id.value if isinstance(event_id, Code) else event_id),
            ("actor = ?", actor),
            ("seq > ?", after_seq),
        ):
            if value is not None:
                clauses.append(column)
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_COLS} FROM audit_log{where} ORDER BY occurred_at, seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self.read_connection() as conn:
            for raw in conn.execute(sql, params):
                row = StoredRow(*raw)
                if check_hashes and compute_hash(row) != row.record_hash:
                    raise AuditIntegrityError(f"record {row.seq} was altered (hash mismatch)")
                try:
                    record = AuditRecord.from_row(row)
                except (ValueError, KeyError, TypeError) as exc:
                    raise AuditIntegrityError(f"record {row.seq} cannot be read") from exc
                yield record
