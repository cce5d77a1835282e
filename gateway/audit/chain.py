"""The hash chain, without I/O: canonical encoding, record hashes, verification (R-AUD-2).

Each stored record is one row of ``audit_log``.  Its ``record_hash`` is
SHA-256 over a canonical encoding (sorted-key JSON, no insignificant
whitespace, UTF-8) of the sequence number, the time, every stored field and
``prev_hash``, the hash of the record before it (64 zeros for record 1).
Changing, removing, inserting or reordering a record therefore breaks either
its own hash, its sequence number or the link from its successor.

What the chain alone cannot show is the removal of the *last* records; the
trail keeps an external head checkpoint and RFC 3161 seals for that, and
:class:`ChainVerifier` takes both into account.

The verifier is fed rows one at a time, so a multi-gigabyte trail is checked
in constant memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .events import AuditEvent

GENESIS_HASH = "0" * 64
RECORD_FORMAT = "sekisho-audit/1"
#: Fields kept as their own SQL columns (reports filter on them); every other
#: field of :meth:`AuditEvent.to_dict` lives in the JSON ``details`` column.
COLUMN_FIELDS = (
    "event_id",
    "action",
    "outcome",
    "actor",
    "actor_kind",
    "patient_id",
    "patient_issuer",
)
#: ``record_hash`` of a checkpoint file that exists but cannot be parsed.
UNREADABLE_CHECKPOINT = "unreadable"
_MAX_PROBLEMS = 50
_RENUMBER_SEARCH = 16


def _last(count: int) -> str:
    return "the last record was" if count == 1 else f"the last {count} records were"


def canonical_json(obj: Any) -> bytes:
    """Sorted-key, compact, UTF-8 JSON: the one byte form that is hashed."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def format_time(moment: datetime) -> str:
    """UTC with microseconds, fixed width so that text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class StoredRow(NamedTuple):
    """One ``audit_log`` row, column for column, as read from or written to SQLite."""

    seq: Any
    occurred_at: Any
    event_id: Any
    action: Any
    outcome: Any
    actor: Any
    actor_kind: Any
    patient_id: Any
    patient_issuer: Any
    details: Any
    prev_hash: Any
    record_hash: Any


ROW_COLUMNS = StoredRow._fields


def compute_hash(row: StoredRow, *, seq: Any = None) -> str | None:
    """The hash ``row`` should carry, or ``None`` if its details are not JSON.

    ``seq`` overrides the stored sequence number (used to recognise a record
    that was moved to another position).
    """
    try:
        details = json.loads(row.details)
    except (TypeError, ValueError):
        return None
    event = {name: getattr(row, name) for name in COLUMN_FIELDS}
    event["details"] = details
    doc = {
        "format": RECORD_FORMAT,
        "seq": row.seq if seq is None else seq,
        "occurred_at": row.occurred_at,
        "prev_hash": row.prev_hash,
        "event": event,
    }
    try:
        return hashlib.sha256(canonical_json(doc)).hexdigest()
    except (TypeError, ValueError):
        return None


def build_row(seq: int, occurred_at: str, event: AuditEvent, prev_hash: str) -> StoredRow:
    """The row to insert for ``event`` at position ``seq``, hash included."""
    data = event.to_dict()
    columns = {name: data.pop(name) for name in COLUMN_FIELDS}
    details = canonical_json(data).decode("utf-8")
    row = StoredRow(
        seq=seq,
        occurred_at=occurred_at,
        details=details,
        prev_hash=prev_hash,
        record_hash="",
        **columns,
    )
    digest = compute_hash(row)
    assert digest is not None  # we just serialised the details ourselves
    return row._replace(record_hash=digest)


@dataclass(frozen=True)
class AuditRecord:
    """A recorded event with its place in the chain."""

    seq: int
    occurred_at: datetime
    event: AuditEvent
    prev_hash: str
    record_hash: str

    @classmethod
    def from_row(cls, row: StoredRow) -> AuditRecord:
        """Rebuild the event; raises ``ValueError``/``KeyError`` on a damaged row."""
        data: dict[str, Any] = dict(json.loads(row.details))
        data.update({name: getattr(row, name) for name in COLUMN_FIELDS})
        return cls(
            seq=int(row.seq),
            occurred_at=parse_time(row.occurred_at),
            event=AuditEvent.from_dict(data),
            prev_hash=row.prev_hash,
            record_hash=row.record_hash,
        )


class Checkpoint(NamedTuple):
    """The head as last written outside the database: ``(seq, record_hash)``."""

    seq: int
    record_hash: str


class SealRef(NamedTuple):
    """What verification needs from an ``audit_seals`` row."""

    seal_id: int
    head_seq: int
    head_hash: str
    token: bytes


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a full chain check (R-AUD-2).

    ``problem`` is the first problem in plain words; ``problems`` lists all
    that were found (at most 50).  ``first_bad_seq`` is the lowest record
    number involved, or ``None`` when the problem is not tied to one record.
    """

    ok: bool
    records: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None
    problems: tuple[str, ...] = ()
    seals_checked: int = 0
    checkpoint_seq: int | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)


class ChainVerifier:
    """Streaming verifier: :meth:`feed` rows in ``seq`` order, then :meth:`finish`.

    ``checkpoint`` and ``seals`` are read *before* the rows (a concurrent
    append can then only make the table longer than they say, never shorter).
    ``token_check(token, head_hash_bytes)`` may verify each RFC 3161 token
    cryptographically; it raises on a bad token.

    After a problem the verifier re-synchronises on the offending row, so one
    tampering yields one message and independent tamperings are all listed.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | None = None,
        seals: Sequence[SealRef] = (),
        *,
        token_check: Callable[[bytes, bytes], object] | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._seals = tuple(seals)
        self._token_check = token_check
        self._wanted = {s.head_seq for s in self._seals}
        if checkpoint is not None:
            self._wanted.add(checkpoint.seq)
        self._hash_at: dict[int, str] = {}
        self._prev_seq = 0
        self._prev_hash: Any = GENESIS_HASH
        self._prev_flagged = False
        self._renumber_offset = 0
        self._last_move: tuple[int, int] | None = None
        self._count = 0
        self._problems: list[tuple[int | None, str]] = []

    def _report(self, seq: int | None, message: str) -> None:
        if len(self._problems) < _MAX_PROBLEMS:
            self._problems.append((seq, message))

    def feed(self, row: StoredRow) -> None:
        """Check one row against its predecessor."""
        self._count += 1
        seq = row.seq
        expected = self._prev_seq + 1
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            self._report(expected, f"record {expected} has an invalid sequence number ({seq!r})")
            return
        if seq == self._prev_seq:
            self._report(
                seq,
                f"record {seq} appears more than once (a record was inserted with a "
                "duplicated sequence number)",
            )
            return
        flagged = False
        if seq > expected:
            flagged = True
            if seq == expected + 1:
                missing = f"record {expected} is"
            else:
                missing = f"records {expected} to {seq - 1} are"
            if self._prev_seq:
                jump = f"sequence jumps from {self._prev_seq} to {seq}"
            else:
                jump = f"sequence starts at {seq}"
            self._report(expected, f"{missing} missing ({jump})")
        actual = compute_hash(row)
        if actual is None or actual != row.record_hash:
            flagged = self._diagnose_mismatch(row) or flagged
        else:
            self._renumber_offset = 0
            if row.prev_hash != self._prev_hash and not flagged and not self._prev_flagged:
                flagged = True
                if seq == 1:
                    self._report(
                        1, "record 1 was inserted or reordered (previous-hash link broken)"
                    )
                else:
                    self._report(
                        seq - 1,
                        f"record {seq - 1} was replaced, or record {seq} was inserted or "
                        "reordered (previous-hash link broken)",
                    )
        if seq in self._wanted:
            self._hash_at[seq] = str(row.record_hash)
        self._prev_seq = seq
        self._prev_hash = row.record_hash
        self._prev_flagged = flagged

    def _diagnose_mismatch(self, row: StoredRow) -> bool:
        """Name what happened to a row whose hash does not match; True if reported."""
        seq: int = row.seq
        for delta in range(1, _RENUMBER_SEARCH + 1):
            for original in (seq - delta, seq + delta):
                if original >= 1 and compute_hash(row, seq=original) == row.record_hash:
                    offset = seq - original
                    if offset == self._renumber_offset:
                        return True  # same shift as the row before: one incident
                    if self._last_move == (original, seq) and self._problems:
                        # The row before was written here and this one there: a swap.
                        self._problems[-1] = (
                            original,
                            f"record {original} was inserted or reordered (previous-hash "
                            f"link broken; records {original} and {seq} were swapped)",
                        )
                        self._renumber_offset, self._last_move = 0, None
                        return True
                    self._renumber_offset = offset
                    self._last_move = (seq, original)
                    first = min(seq, original)
                    self._report(
                        first,
                        f"record {first} was inserted or reordered (previous-hash link "
                        f"broken; the record now numbered {seq} was written as record "
                        f"{original})",
                    )
                    return True
        self._renumber_offset, self._last_move = 0, None
        self._report(seq, f"record {seq} was altered (hash mismatch)")
        return True

    def finish(self) -> VerifyReport:
        """Compare the chain's end with the checkpoint and the seals; build the report."""
        head_seq, head_hash = self._prev_seq, self._prev_hash
        checkpoint = self._checkpoint
        warnings: list[str] = []
        if checkpoint is None:
            if self._count:
                self._report(
                    None,
                    "the head checkpoint is missing, so removal of the last records "
                    "cannot be ruled out",
                )
        elif checkpoint.record_hash == UNREADABLE_CHECKPOINT:
            self._report(None, "the head checkpoint is unreadable (damaged or replaced)")
        elif checkpoint.seq > head_seq:
            self._report(
                head_seq + 1,
                f"{_last(checkpoint.seq - head_seq)} removed (checkpoint says head is "
                f"{checkpoint.seq})",
            )
        elif checkpoint.seq and self._hash_at.get(checkpoint.seq) != checkpoint.record_hash:
            self._report(
                checkpoint.seq,
                f"record {checkpoint.seq} does not match the head checkpoint (the chain up "
                "to it was rewritten)",
            )
        elif checkpoint.seq < head_seq:
            warnings.append(
                f"records {checkpoint.seq + 1} to {head_seq} are not yet in the head checkpoint"
            )
        for seal in self._seals:
            self._check_seal(seal, head_seq)
        problems = self._problems
        numbered = [seq for seq, _ in problems if seq is not None]
        return VerifyReport(
            ok=not problems,
            records=self._count,
            head_seq=head_seq,
            head_hash=str(head_hash),
            first_bad_seq=min(numbered) if numbered else None,
            problem=problems[0][1] if problems else None,
            problems=tuple(message for _, message in problems),
            seals_checked=len(self._seals),
            checkpoint_seq=checkpoint.seq if checkpoint else None,
            warnings=tuple(warnings),
        )

    def _check_seal(self, seal: SealRef, head_seq: int) -> None:
        if seal.head_seq > head_seq:
            self._report(
                head_seq + 1,
                f"{_last(seal.head_seq - head_seq)} removed (seal {seal.seal_id} covers "
                f"record {seal.head_seq})",
            )
        elif self._hash_at.get(seal.head_seq) != seal.head_hash:
            self._report(
                seal.head_seq,
                f"seal {seal.seal_id} no longer matches the chain (record {seal.head_seq} "
                "changed after it was sealed)",
            )
        elif self._token_check is not None:
            try:
                self._token_check(seal.token, bytes.fromhex(seal.head_hash))
            except Exception as exc:  # noqa: BLE001 - any failure means "bad token"
                self._report(
                    seal.head_seq,
                    f"seal {seal.seal_id} timestamp token does not verify ({exc})",
                )
