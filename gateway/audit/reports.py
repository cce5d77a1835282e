"""Audit reports for the auditor (R-AUD-4; MHLW guideline 6.8 D-5).

* :func:`patient_accesses`: every record naming one patient, in time order.
* :func:`access_counts`: per patient, how many records fall in a time window,
  when the first and last were and how many distinct actors were involved,
  sortable by count, so that unusual access stands out.

Reports read the table as it is; run :meth:`AuditTrail.verify` first to know
that it has not been tampered with (:func:`patient_accesses` additionally
refuses records whose own hash does not match).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from . import events as ev
from .chain import AuditRecord, format_time, parse_time
from .events import Code
from .trail import AuditTrail

#: Events that are an access to patient data (R-AUD-1), for ``event_ids=``.
ACCESS_EVENT_IDS: tuple[Code, ...] = (
    ev.BEGIN_TRANSFERRING_INSTANCES,
    ev.INSTANCES_ACCESSED,
    ev.INSTANCES_TRANSFERRED,
    ev.STUDY_DELETED,
    ev.EXPORT,
    ev.IMPORT,
    ev.ORDER_RECORD,
    ev.PATIENT_RECORD,
    ev.PROCEDURE_RECORD,
    ev.QUERY,
)

OrderBy = Literal["count", "patient", "first", "last"]
_ORDER_SQL = {
    "count": "n DESC, patient_id, patient_issuer",
    "patient": "patient_id, patient_issuer",
    "first": "first_at, patient_id",
    "last": "last_at DESC, patient_id",
}


@dataclass(frozen=True)
class PatientAccessCount:
    """One row of :func:`access_counts`."""

    patient_id: str
    patient_issuer: str | None
    count: int
    first: datetime
    last: datetime
    distinct_actors: int


def patient_accesses(
    trail: AuditTrail,
    patient_id: str,
    *,
    patient_issuer: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    event_ids: Iterable[Code] | None = None,
) -> Iterator[AuditRecord]:
    """Records naming ``patient_id`` (and ``patient_issuer`` if given) in time order."""
    wanted = None if event_ids is None else {code.value for code in event_ids}
    for record in trail.iter_records(
        patient_id=patient_id, patient_issuer=patient_issuer, since=since, until=until
    ):
        if wanted is None or record.event.event_id.value in wanted:
            yield record


def access_counts(
    trail: AuditTrail,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    event_ids: Iterable[Code] | None = None,
    order_by: OrderBy = "count",
    min_count: int = 1,
    limit: int | None = None,
) -> list[PatientAccessCount]:
    """Per patient (ID + issuer) record counts in ``[since, until)``.

    ``order_by="count"`` puts the most accessed patients first; ``min_count``
    hides patients below a threshold.
    """
    if order_by not in _ORDER_SQL:
        raise ValueError(f"order_by must be one of {sorted(_ORDER_SQL)}")
    clauses = ["patient_id IS NOT NULL"]
    params: list[object] = []
    if since is not None:
        clauses.append("occurred_at >= ?")
        params.append(format_time(since))
    if until is not None:
        clauses.append("occurred_at < ?")
        params.append(format_time(until))
    if event_ids is not None:
        codes = [code.value for code in event_ids]
        clauses.append(f"event_id IN ({', '.join('?' * len(codes))})" if codes else "0")
        params.extend(codes)
    params.append(int(min_count))
    sql = (
        "SELECT patient_id, patient_issuer, COUNT(*) AS n, MIN(occurred_at) AS first_at,"
        " MAX(occurred_at) AS last_at, COUNT(DISTINCT actor)"
        f" FROM audit_log WHERE {' AND '.join(clauses)}"
        " GROUP BY patient_id, patient_issuer HAVING COUNT(*) >= ?"
        f" ORDER BY {_ORDER_SQL[order_by]}"
    )
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    with trail.read_connection() as conn:
        rows = conn.execute(sql, params).fetchall()
    return [
        PatientAccessCount(pid, issuer, n, parse_time(first), parse_time(last), actors)
        for pid, issuer, n, first, last, actors in rows
    ]
