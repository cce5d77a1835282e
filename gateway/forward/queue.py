"""The durable forwarding queue in the metadata database (R-XCH-4, R-XCH-5).

One row per (instance, destination), UNIQUE, so enqueuing twice is harmless.
States::

    queued ──claim──▶ sending ──peer confirmed──▶ sent ──N-EVENT-REPORT──▶ committed
      ▲                 │  (C-STORE success / STOW reference)   │
      └──backoff────────┤                                       └──failure──▶ failed
                        └──permanent error or max attempts──────────────────▶ failed

``sent`` is final for destinations without Storage Commitment; with it, the
instance counts as safely stored outside only when ``committed`` (PS3.4 J.3).
``failed`` is the stopped state: it waits for ``sekisho queue retry``.

Crash safety: a claim sets a lease (owner, expiry) and counts the attempt in
the same transaction; a worker renews its lease while it sends.  After a
SIGKILL the lease runs out and any worker may claim the job again.  Nothing is
marked ``sent`` before the peer confirmed it, so the worst case after a crash is
a resend of the same instance (same SOP Instance UID, same bytes), which
receivers treat as a duplicate.  The connection is the queue's own (WAL,
``synchronous=FULL``): a state change is on disk when the call returns.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from gateway.forward.destinations import RetrySettings
from gateway.forward.model import (
    JOB_COLUMNS,
    SCHEMA,
    STATES,
    CommitmentOutcome,
    EnqueueResult,
    Job,
    JobSource,
    UnknownTransactionError,
    job_from_row,
    utcnow,
)
from gateway.sqlitedb import SqliteDatabase

__all__ = [
    "STATES",
    "CommitmentOutcome",
    "EnqueueResult",
    "ForwardQueue",
    "Job",
    "JobSource",
    "UnknownTransactionError",
    "new_owner",
    "open_queue",
    "utcnow",
]


def new_owner() -> str:
    """A worker identity: host, process and a random part (a restarted pid differs)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ForwardQueue(SqliteDatabase):
    """Synchronous, thread-safe access to the queue tables (call from worker threads)."""

    SCHEMA = SCHEMA
    LABEL = "forwarding queue database"
    INTEGRITY_IS_CONFLICT = False
    FOREIGN_KEYS = False

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        super().__init__(path)


    # -- enqueue -------------------------------------------------------------
    def enqueue(
        self, sources: Iterable[JobSource], destination: str, *, created_by: str, reason: str
    ) -> EnqueueResult:
        """Queue instances for a destination; failed jobs are resumed, others left alone."""
        new = requeued = present = 0
        now, stamp = self.clock(), utcnow()
        with self._write() as conn:
            for s in sources:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO forward_jobs (sop_uid, destination, study_uid,"
                    " sop_class_uid, transfer_syntax, sha256, size, next_attempt_at, created_at,"
                    " created_by, reason, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (s.sop_uid, destination, s.study_uid, s.sop_class_uid, s.transfer_syntax,
                     s.sha256, s.size, now, stamp, created_by, reason, stamp),
                )
                if cur.rowcount:
                    new += 1
                    continue
                cur = conn.execute(
                    "UPDATE forward_jobs SET state = 'queued', attempts = 0, next_attempt_at = ?,"
                    " lease_owner = NULL, lease_until = NULL, updated_at = ?"
                    " WHERE sop_uid = ? AND destination = ? AND state = 'failed'",
                    (now, stamp, s.sop_uid, destination),
                )
                if cur.rowcount:
                    requeued += 1
                else:
                    present += 1
        return EnqueueResult(new, requeued, present)

    def route_new_instances(self, destinations: Sequence[str], *, limit: int = 2000) -> int:
        """``[routing] on_receive``: queue instances stored since the last scan.

        A per-destination watermark on the instances table's rowid makes the scan
        incremental; the watermark moves in the same transaction as the inserts.
        """
        if not destinations:
            return 0
        now, stamp = self.clock(), utcnow()
        created = 0
        with self._write() as conn:
            marks = {
                d: (conn.execute(
                    "SELECT last_rowid FROM forward_routing WHERE destination = ?", (d,)
                ).fetchone() or [0])[0]
                for d in destinations
            }
            rows = conn.execute(
                "SELECT rowid, sop_uid, study_uid, sop_class_uid, transfer_syntax, sha256, size"
                " FROM instances WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (min(marks.values()), limit),
            ).fetchall()
            for dest, mark in marks.items():
                top = mark
                for r in rows:
                    if r["rowid"] <= mark:
                        continue
                    top = r["rowid"]
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO forward_jobs (sop_uid, destination, study_uid,"
                        " sop_class_uid, transfer_syntax, sha256, size, next_attempt_at,"
                        " created_at, created_by, reason, updated_at)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (r["sop_uid"], dest, r["study_uid"], r["sop_class_uid"],
                         r["transfer_syntax"], r["sha256"], r["size"], now, stamp, "routing",
                         "routing.on_receive", stamp),
                    )
                    created += cur.rowcount
                if top != mark:
                    conn.execute(
                        "INSERT INTO forward_routing (destination, last_rowid) VALUES (?, ?)"
                        " ON CONFLICT(destination) DO UPDATE SET last_rowid = excluded.last_rowid",
                        (dest, top),
                    )
        return created

    # -- claiming ------------------------------------------------------------
    _DUE = (
        "((state = 'queued' AND next_attempt_at <= :now)"
        " OR (state = 'sending' AND lease_until < :now))"
    )

    def claim(self, destination: str, owner: str, limit: int, lease_seconds: float) -> list[Job]:
        """Take up to ``limit`` due jobs of one study for one association; counts the attempt."""
        now = self.clock()
        args = {"dest": destination, "now": now}
        with self._write() as conn:
            first = conn.execute(
                f"SELECT study_uid FROM forward_jobs WHERE destination = :dest AND {self._DUE}"
                " ORDER BY next_attempt_at, id LIMIT 1",
                args,
            ).fetchone()
            if first is None:
                return []
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM forward_jobs WHERE destination = :dest AND study_uid = :study"
                f" AND {self._DUE} ORDER BY id LIMIT :limit",
                {**args, "study": first[0], "limit": limit},
            )]
            marks = ",".join("?" for _ in ids)
            conn.execute(
                "UPDATE forward_jobs SET state = 'sending', lease_owner = ?, lease_until = ?,"
                f" attempts = attempts + 1, updated_at = ? WHERE id IN ({marks})",
                (owner, now + lease_seconds, utcnow(), *ids),
            )
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM forward_jobs WHERE id IN ({marks}) ORDER BY id", ids
            ).fetchall()
        return [job_from_row(r) for r in rows]

    def renew(self, ids: Sequence[int], owner: str, lease_seconds: float) -> None:
        """Extend the lease of jobs this worker still holds (heartbeat while sending)."""
        if not ids:
            return
        marks = ",".join("?" for _ in ids)
        with self._write() as conn:
            conn.execute(
                f"UPDATE forward_jobs SET lease_until = ? WHERE id IN ({marks})"
                " AND lease_owner = ? AND state IN ('sending', 'sent')",
                (self.clock() + lease_seconds, *ids, owner),
            )

    def release(self, ids: Sequence[int], owner: str) -> None:
        """Give back jobs that were claimed but not attempted (shutdown): no attempt counted."""
        if not ids:
            return
        marks = ",".join("?" for _ in ids)
        with self._write() as conn:
            conn.execute(
                "UPDATE forward_jobs SET state = 'queued', attempts = max(attempts - 1, 0),"
                f" lease_owner = NULL, lease_until = NULL, updated_at = ? WHERE id IN ({marks})"
                " AND state = 'sending' AND lease_owner = ?",
                (utcnow(), *ids, owner),
            )
            conn.execute(
                f"UPDATE forward_jobs SET lease_owner = NULL, lease_until = NULL"
                f" WHERE id IN ({marks}) AND lease_owner = ? AND state <> 'sending'",
                (*ids, owner),
            )

    # -- outcomes ------------------------------------------------------------
    def mark_sent(
        self,
        job_id: int,
        *,
        confirmed: str,
        sent_syntax: str,
        dataset_sha256: str,
        dataset_offset: int,
        meta: bytes | None,
    ) -> bool:
        """The peer confirmed this instance (never called before that)."""
        return bool(self.mark_sent_many([
            (job_id, confirmed, sent_syntax, dataset_sha256, dataset_offset, meta)
        ]))

    def mark_sent_many(
        self, rows: Sequence[tuple[int, str, str, str, int, bytes | None]]
    ) -> int:
        """Several confirmations in one transaction: (job id, confirmed, sent syntax,
        dataset SHA-256, dataset offset, file meta bytes).  Returns how many applied."""
        if not rows:
            return 0
        stamp = utcnow()
        n = 0
        with self._write() as conn:
            for job_id, confirmed, syntax, sha, offset, meta in rows:
                cur = conn.execute(
                    "UPDATE forward_jobs SET state = 'sent', sent_at = ?, sent_syntax = ?,"
                    " confirmed = ?, dataset_sha256 = ?, dataset_offset = ?, meta = ?,"
                    " last_error = '', audited = 0, commitment_uid = NULL,"
                    " commitment_deadline = NULL, updated_at = ?"
                    " WHERE id = ? AND state = 'sending'",
                    (stamp, syntax, confirmed, sha, offset, meta, stamp, job_id),
                )
                n += cur.rowcount
        return n

    def mark_failure(
        self, job_id: int, error: str, retry: RetrySettings, *, permanent: bool = False,
        from_states: tuple[str, ...] = ("sending",),
    ) -> str | None:
        """Record a failed attempt: back off and queue again, or stop (``failed``).

        Returns the new state, or ``None`` if the job was no longer in ``from_states``.
        """
        now = self.clock()
        states = ",".join("?" for _ in from_states)
        with self._write() as conn:
            row = conn.execute(
                f"SELECT attempts FROM forward_jobs WHERE id = ? AND state IN ({states})",
                (job_id, *from_states),
            ).fetchone()
            if row is None:
                return None
            attempts = int(row[0])
            stop = permanent or attempts >= retry.max_attempts
            state = "failed" if stop else "queued"
            conn.execute(
                "UPDATE forward_jobs SET state = ?, last_error = ?, next_attempt_at = ?,"
                " lease_owner = NULL, lease_until = NULL, audited = ?, updated_at = ?"
                " WHERE id = ?",
                (state, error[:1000], now + (0 if stop else retry.delay_after(attempts)),
                 0 if stop else 1, utcnow(), job_id),
            )
        return state

    def finish_batch(self, ids: Sequence[int], owner: str) -> None:
        """Drop this worker's lease on jobs it has finished with."""
        self.release(ids, owner)

    # -- storage commitment (PS3.4 J.3) ---------------------------------------
    def begin_commitment(
        self, transaction_uid: str, destination: str, job_ids: Sequence[int], deadline: float
    ) -> None:
        """Persist the Transaction UID on the jobs *before* the N-ACTION is sent."""
        marks = ",".join("?" for _ in job_ids)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO forward_transactions (transaction_uid, destination, requested_at,"
                " instances) VALUES (?,?,?,?)",
                (transaction_uid, destination, utcnow(), len(job_ids)),
            )
            conn.execute(
                f"UPDATE forward_jobs SET commitment_uid = ?, commitment_deadline = ?"
                f" WHERE id IN ({marks}) AND state = 'sent'",
                (transaction_uid, self.clock() + deadline, *job_ids),
            )

    def transaction_destination(self, transaction_uid: str) -> str:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT destination FROM forward_transactions WHERE transaction_uid = ?",
                (transaction_uid,),
            ).fetchone()
        if row is None:
            raise UnknownTransactionError("no Storage Commitment transaction with this UID")
        return str(row[0])

    def apply_commitment(
        self,
        transaction_uid: str,
        succeeded: Sequence[str],
        failed: Sequence[tuple[str, str]],
    ) -> CommitmentOutcome:
        """Apply an N-EVENT-REPORT: ``succeeded`` SOP Instance UIDs, ``failed`` (uid, reason).

        Success applies to the destination's job for that instance whatever
        transaction it waits for (the instance is committed either way, PS3.4
        J.3.3); a failure applies only to jobs still waiting for *this* transaction.
        Reports are idempotent.
        """
        destination = self.transaction_destination(transaction_uid)
        stamp = utcnow()
        committed: list[int] = []
        failed_ids: list[int] = []
        unknown: list[str] = []
        with self._write() as conn:
            for uid in succeeded:
                row = conn.execute(
                    "SELECT id, state FROM forward_jobs WHERE sop_uid = ? AND destination = ?",
                    (uid, destination),
                ).fetchone()
                if row is None:
                    unknown.append(uid)
                    continue
                if row["state"] != "committed":
                    conn.execute(
                        "UPDATE forward_jobs SET state = 'committed', committed_at = ?,"
                        " last_error = '', updated_at = ? WHERE id = ?",
                        (stamp, stamp, row["id"]),
                    )
                committed.append(int(row["id"]))
            for uid, reason in failed:
                row = conn.execute(
                    "SELECT id FROM forward_jobs WHERE sop_uid = ? AND destination = ?"
                    " AND commitment_uid = ? AND state = 'sent'",
                    (uid, destination, transaction_uid),
                ).fetchone()
                if row is None:
                    unknown.append(uid)
                    continue
                conn.execute(
                    "UPDATE forward_jobs SET state = 'failed', last_error = ?, audited = 0,"
                    " lease_owner = NULL, lease_until = NULL, updated_at = ? WHERE id = ?",
                    (reason[:1000], stamp, row["id"]),
                )
                failed_ids.append(int(row["id"]))
            conn.execute(
                "UPDATE forward_transactions SET reported_at = ?, report = ?"
                " WHERE transaction_uid = ?",
                (stamp, f"{len(committed)} committed, {len(failed_ids)} failed", transaction_uid),
            )
        return CommitmentOutcome(destination, tuple(committed), tuple(failed_ids), tuple(unknown))

    def expire_commitments(self, retry_for: Callable[[str], RetrySettings | None]) -> int:
        """Requeue ``sent`` jobs whose commitment result is overdue, or whose worker died
        between the C-STORE and the N-ACTION (no Transaction UID and an expired lease)."""
        now = self.clock()
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT id, destination, commitment_uid FROM forward_jobs WHERE state = 'sent' AND"
                " ((commitment_uid IS NOT NULL AND commitment_deadline < ?)"
                " OR (commitment_uid IS NULL AND lease_until IS NOT NULL AND lease_until < ?))",
                (now, now),
            ).fetchall()
        n = 0
        for r in rows:
            retry = retry_for(r["destination"])
            if retry is None:
                continue
            if r["commitment_uid"]:
                error = "no Storage Commitment result arrived before the deadline; sending again"
            else:
                error = "the worker stopped before requesting Storage Commitment; sending again"
            if self.mark_failure(r["id"], error, retry, from_states=("sent",)):
                n += 1
        return n

    # -- operations ------------------------------------------------------------
    def list_jobs(
        self,
        *,
        state: str | None = None,
        destination: str | None = None,
        study_uid: str | None = None,
        job_id: int | None = None,
        limit: int = 1000,
    ) -> list[Job]:
        cond: list[str] = []
        args: list[object] = []
        for col, val in (("state", state), ("destination", destination),
                         ("study_uid", study_uid), ("id", job_id)):
            if val is not None:
                cond.append(f"{col} = ?")
                args.append(val)
        sql = (f"SELECT {JOB_COLUMNS} FROM forward_jobs WHERE {' AND '.join(cond) or '1'}"
               " ORDER BY id LIMIT ?")
        with self._conn() as conn:
            return [job_from_row(r) for r in conn.execute(sql, (*args, limit)).fetchall()]

    def counts(self) -> dict[str, dict[str, int]]:
        """{destination: {state: n}} for ``queue list`` and metrics."""
        out: dict[str, dict[str, int]] = {}
        with self._conn() as conn:
            for r in conn.execute(
                "SELECT destination, state, count(*) FROM forward_jobs GROUP BY 1, 2"
            ):
                out.setdefault(r[0], {})[r[1]] = int(r[2])
        return out

    def retry(self, *, job_id: int | None = None, destination: str | None = None) -> int:
        """Resume stopped jobs (``sekisho queue retry``): attempts start again from zero."""
        cond: list[str] = ["state = 'failed'"]
        args: list[object] = []
        if job_id is not None:
            cond.append("id = ?")
            args.append(job_id)
        if destination is not None:
            cond.append("destination = ?")
            args.append(destination)
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE forward_jobs SET state = 'queued', attempts = 0, next_attempt_at = ?,"
                " lease_owner = NULL, lease_until = NULL, audited = 1, updated_at = ?"
                f" WHERE {' AND '.join(cond)}",
                (self.clock(), utcnow(), *args),
            )
            return cur.rowcount

    def unaudited(self, limit: int = 500) -> list[Job]:
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM forward_jobs WHERE audited = 0 ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [job_from_row(r) for r in rows]

    def mark_audited(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        marks = ",".join("?" for _ in ids)
        with self._write() as conn:
            conn.execute(f"UPDATE forward_jobs SET audited = 1 WHERE id IN ({marks})", ids)

    def sent_jobs(self, study_uid: str, destination: str) -> list[Job]:
        """Jobs of a study the destination confirmed at least once (what a restore expects)."""
        with self._conn() as conn:
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS} FROM forward_jobs WHERE study_uid = ? AND destination = ?"
                " AND dataset_sha256 IS NOT NULL ORDER BY id",
                (study_uid, destination),
            ).fetchall()
        return [job_from_row(r) for r in rows]

    # -- restores (R-EXT-3) ------------------------------------------------------
    def record_restores(self, rows: Sequence[dict[str, object]]) -> None:
        if not rows:
            return
        cols = list(rows[0])
        with self._write() as conn:
            conn.executemany(
                f"INSERT INTO restores ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                [tuple(r[c] for c in cols) for r in rows],
            )

    def list_restores(self, study_uid: str | None = None) -> list[dict[str, object]]:
        sql = "SELECT * FROM restores"
        args: tuple[object, ...] = ()
        if study_uid:
            sql += " WHERE study_uid = ?"
            args = (study_uid,)
        with self._conn() as conn:
            return [dict(r) for r in conn.execute(sql + " ORDER BY id", args).fetchall()]


_QUEUES: dict[Path, ForwardQueue] = {}
_QUEUES_LOCK = threading.Lock()


def open_queue(database: Path) -> ForwardQueue:
    """The process-wide queue object for a metadata database file."""
    key = database.resolve()
    with _QUEUES_LOCK:
        queue = _QUEUES.get(key)
        if queue is None:
            queue = _QUEUES[key] = ForwardQueue(key)
        return queue
