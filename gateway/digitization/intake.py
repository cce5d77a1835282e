"""Film intake: receipts, bulk plans and the overdue list (R-DIG-3, R-DIG-5).

* :func:`receive_film` records who received which films for which patient,
  from where and when, with the digitization deadline (business days after
  receipt, :mod:`~gateway.digitization.deadline`), and audits it as a DICOM
  Patient Record event (PS3.15 A.5.3.10, action C);
* :func:`record_plan` records a bulk-digitization plan (seed 000 §5.2(2):
  committee approval including outside experts, external auditor);
* :func:`overdue` lists receipts whose films were not all digitized by the
  deadline and digitizations done after it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydicom.uid import generate_uid

from gateway.audit import events as ev
from gateway.digitization.deadline import business_deadline
from gateway.digitization.records import DigitizationRecords, FilmReceipt, Plan, new_id, utc_iso
from gateway.service import Gateway
from pki.errors import InvalidInputError

__all__ = ["overdue", "parse_time", "receive_film", "record_plan", "records_of"]


def records_of(gw: Gateway) -> DigitizationRecords:
    return DigitizationRecords(gw.settings.store.database)


def parse_time(value: str | None, gw: Gateway) -> datetime:
    """ISO 8601; a time without offset is local time of ``[digitization].timezone``."""
    if not value:
        return datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInputError(f"{value!r} is not an ISO 8601 date-time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=gw.settings.digitization.zone)
    return moment


async def receive_film(
    gw: Gateway,
    *,
    patient_id: str,
    source_facility: str,
    films: int,
    received_by: str,
    issuer: str = "",
    received_at: datetime | None = None,
    study_uid: str = "",
    accession: str = "",
    modality: str = "",
    patient_name: str = "",
    birth_date: str = "",
    sex: str = "",
    note: str = "",
) -> FilmReceipt:
    """Record that films arrived, and when they must be digitized (R-DIG-3)."""
    if not patient_id.strip() or not source_facility.strip():
        raise InvalidInputError("a film receipt needs the patient ID and the source facility")
    if films < 1 or films > 1000:
        raise InvalidInputError("films must be between 1 and 1000")
    s = gw.settings.digitization
    now = datetime.now(UTC)
    received = received_at or now
    if received > now:
        raise InvalidInputError("the receipt time lies in the future")
    known = await gw.run(gw.store.patient, patient_id, issuer) or {}
    deadline = business_deadline(received, s.deadline_business_days, s.holiday_dates, s.zone)
    receipt = FilmReceipt(
        id=new_id("FR", received),
        patient_id=patient_id.strip(),
        issuer=issuer,
        patient_name=patient_name or known.get("name", ""),
        birth_date=birth_date or known.get("birth_date", ""),
        sex=sex or known.get("sex", ""),
        source_facility=source_facility.strip(),
        films=films,
        received_at=utc_iso(received),
        received_by=received_by,
        deadline=utc_iso(deadline),
        study_uid=study_uid or generate_uid(),
        accession=accession,
        modality=modality.upper(),
        note=note,
        created_at=utc_iso(now),
    )
    await gw.run(records_of(gw).add_receipt, receipt)
    await gw.record(
        ev.AuditEvent(
            event_id=ev.PATIENT_RECORD,
            action=ev.Action.CREATE,
            outcome=ev.Outcome.SUCCESS,
            actor=received_by,
            actor_kind="user",
            patient_id=receipt.patient_id,
            patient_issuer=issuer or None,
            study_uids=(receipt.study_uid,),
            description=f"film receipt {receipt.id}: {films} film(s) received",
            extra={
                "receipt": receipt.id,
                "source_facility": receipt.source_facility,
                "deadline": receipt.deadline,
            },
        )
    )
    return receipt


async def record_plan(
    gw: Gateway,
    plan_id: str,
    *,
    description: str,
    committee_approval: str,
    external_auditor: str,
    recorded_by: str,
) -> Plan:
    """A bulk-digitization plan: committee approval and external auditor (seed 000 §5.2(2))."""
    plan = Plan(
        plan_id,
        description,
        committee_approval,
        external_auditor,
        recorded_by,
        utc_iso(datetime.now(UTC)),
    )
    await gw.run(records_of(gw).add_plan, plan)
    await gw.record(
        ev.AuditEvent(
            event_id=ev.APPLICATION_ACTIVITY,
            action=ev.Action.CREATE,
            outcome=ev.Outcome.SUCCESS,
            event_type_codes=(ev.SECURITY_CONFIGURATION,),
            actor=recorded_by,
            actor_kind="user",
            description=f"bulk digitization plan {plan_id} recorded",
            extra={
                "plan": plan_id,
                "committee_approval": committee_approval[:200],
                "external_auditor": external_auditor[:200],
            },
        )
    )
    return plan


def overdue(gw: Gateway, now: datetime | None = None) -> dict[str, Any]:
    """Receipts not digitized by their deadline, and late digitizations (R-DIG-3)."""
    records = records_of(gw)
    moment = now or datetime.now(UTC)
    return {
        "checked_at": utc_iso(moment),
        "overdue_receipts": [r.to_dict() for r in records.open_receipts_past_deadline(moment)],
        "late_digitizations": [d.to_dict() for d in records.digitizations(late_only=True)],
    }
