"""Per-patient access history and access counts (R-AUD-4)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.audit import (
    AuditTrail,
    access_counts,
    import_event,
    instances_transferred,
    patient_accesses,
    query,
    security_alert,
)
from gateway.audit import events as ev
from gateway.audit.reports import ACCESS_EVENT_IDS

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)


class ScriptedClock:
    """Returns the given times in order (they may go backwards, like a stepped clock)."""

    def __init__(self) -> None:
        self.times: list[datetime] = []

    def __call__(self) -> datetime:
        return self.times.pop(0)


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[AuditTrail]:
    clock = ScriptedClock()
    trail = AuditTrail(tmp_path / "audit.db", clock=clock)

    def at(minutes: float, event: ev.AuditEvent) -> None:
        clock.times.append(T0 + timedelta(minutes=minutes))
        trail.record(event)

    def transfer(actor: str, pid: str, issuer: str = "HOSP") -> ev.AuditEvent:
        return instances_transferred(
            actor=actor,
            patient_id=pid,
            patient_issuer=issuer,
            study_uids=["1.2.3"],
            instance_count=3,
            action=ev.Action.READ,
        )

    at(0, transfer("partner-a", "A"))
    at(5, query(actor="partner-b", patient_id="A", patient_issuer="HOSP"))
    at(10, transfer("partner-a", "B"))
    at(20, security_alert("revoked", "client certificate revoked", source_address="192.0.2.9"))
    at(30, transfer("partner-c", "A"))
    at(25, transfer("partner-a", "A"))  # clock stepped back: time order != seq order
    at(40, transfer("partner-a", "B"))
    at(
        50,
        import_event(
            actor="staff-7",
            patient_id="C",
            patient_issuer="HOSP",
            study_uids=["1.2.4"],
            instance_count=10,
        ),
    )
    at(55, transfer("partner-a", "A", issuer="OTHER-HOSP"))  # same ID, other issuer
    at(120, transfer("partner-a", "A"))  # outside the window used below
    yield trail
    trail.close()


def test_patient_accesses_are_in_time_order(populated: AuditTrail) -> None:
    history = list(patient_accesses(populated, "A", patient_issuer="HOSP"))
    minutes = [(r.occurred_at - T0) / timedelta(minutes=1) for r in history]
    assert minutes == [0, 5, 25, 30, 120]
    assert [r.seq for r in history] == [1, 2, 6, 5, 10]
    assert [r.event.actor for r in history[:2]] == ["partner-a", "partner-b"]
    assert {r.event.patient_issuer for r in history} == {"HOSP"}


def test_patient_accesses_window_and_event_filter(populated: AuditTrail) -> None:
    in_window = list(
        patient_accesses(
            populated,
            "A",
            patient_issuer="HOSP",
            since=T0 + timedelta(minutes=5),
            until=T0 + timedelta(minutes=30),
        )
    )
    assert [r.seq for r in in_window] == [2, 6]  # since inclusive, until exclusive
    queries = list(patient_accesses(populated, "A", event_ids=[ev.QUERY]))
    assert [r.event.event_id for r in queries] == [ev.QUERY]


def test_access_counts_in_window_sorted_by_count(populated: AuditTrail) -> None:
    rows = access_counts(populated, since=T0, until=T0 + timedelta(hours=1))
    summary = [(r.patient_id, r.patient_issuer, r.count) for r in rows]
    assert summary == [("A", "HOSP", 4), ("B", "HOSP", 2), ("A", "OTHER-HOSP", 1), ("C", "HOSP", 1)]
    top = rows[0]
    assert top.first == T0 and top.last == T0 + timedelta(minutes=30)
    assert top.distinct_actors == 3  # partner-a, partner-b, partner-c


def test_access_counts_threshold_filters_and_orders(populated: AuditTrail) -> None:
    busy = access_counts(populated, min_count=3)
    assert [(r.patient_id, r.count) for r in busy] == [("A", 5)]
    transfers_only = access_counts(populated, event_ids=[ev.INSTANCES_TRANSFERRED])
    assert [(r.patient_id, r.patient_issuer, r.count) for r in transfers_only][:2] == [
        ("A", "HOSP", 4),
        ("B", "HOSP", 2),
    ]
    assert all(r.patient_id != "C" for r in transfers_only)  # C was only imported
    by_patient = access_counts(populated, order_by="patient")
    assert [(r.patient_id, r.patient_issuer) for r in by_patient] == [
        ("A", "HOSP"),
        ("A", "OTHER-HOSP"),
        ("B", "HOSP"),
        ("C", "HOSP"),
    ]
    assert sum(r.count for r in access_counts(populated, event_ids=ACCESS_EVENT_IDS)) == 9
    assert access_counts(populated, event_ids=[]) == []
    with pytest.raises(ValueError):
        access_counts(populated, order_by="name")  # type: ignore[arg-type]
