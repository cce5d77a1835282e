"""確定 (finalization) of imported records (R-PDI-6; 000 §4.1 and 付録1(3)).

The guideline lets a hospital choose: saving the import is its finalization by
the importer (``mode = "on-save"``, the default), or records are finalized
automatically at a set time, e.g. 24:00 of the day, in the name of a
designated responsible person (``mode = "scheduled"``).  :func:`due_at` is the
pure rule for the second case; :func:`finalize_due` applies it to the saved
records and audits each finalization.  ``sekisho media finalize-due`` and a
task in ``sekisho serve`` call it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING

from gateway.audit import events as ev
from gateway.imports.config import FinalizationSettings
from gateway.imports.records import ImportRecord, ImportRecords

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("sekisho.media")


def zone_of(settings: FinalizationSettings) -> tzinfo:
    """The configured time zone, or the host's local zone."""
    if settings.timezone:
        from zoneinfo import ZoneInfo

        return ZoneInfo(settings.timezone)
    local = datetime.now(UTC).astimezone().tzinfo
    assert local is not None
    return local


def due_at(saved_at: datetime, at: str, zone: tzinfo) -> datetime:
    """The first ``at`` (local ``HH:MM``) strictly after ``saved_at``, as an aware UTC moment.

    ``"24:00"`` is midnight at the end of the local day of ``saved_at`` (so an
    import saved at 23:59 is finalized a minute later, one saved at 00:00 the
    next midnight).  Any other time is today's if still ahead, else tomorrow's.
    """
    if saved_at.tzinfo is None:
        raise ValueError("saved_at must be an aware datetime")
    local = saved_at.astimezone(zone)
    hours, minutes = (int(p) for p in at.split(":"))
    if (hours, minutes) == (24, 0):
        day = local.date() + timedelta(days=1)
        candidate = datetime.combine(day, time(0, 0), tzinfo=zone)
    else:
        candidate = datetime.combine(local.date(), time(hours, minutes), tzinfo=zone)
        if candidate <= local:
            candidate = datetime.combine(
                local.date() + timedelta(days=1), time(hours, minutes), tzinfo=zone
            )
    return candidate.astimezone(UTC)


@dataclass(frozen=True)
class FinalizedImport:
    id: int
    finalized_by: str
    finalized_at: datetime


def finalization_event(record: ImportRecord, by_id: str, by_name: str) -> ev.AuditEvent:
    """PS3.15 A.5.3.3 DICOM Instances Accessed, action U: the record's status changed.

    PS3.15 has no event for 確定; the imported instances' legal status is what
    changes, so it is recorded as an update of those instances by the
    designated responsible person.
    """
    studies = sorted(
        {i["study_uid"] for i in record.details.get("stored", []) if i.get("study_uid")}
    )
    return ev.AuditEvent(
        event_id=ev.INSTANCES_ACCESSED,
        action=ev.Action.UPDATE,
        outcome=ev.Outcome.SUCCESS,
        actor=by_id,
        actor_kind="user",
        patient_id=record.local_patient_id,
        patient_issuer=record.local_issuer or None,
        study_uids=tuple(studies),
        instance_count=record.instance_count,
        description=f"media import #{record.id} finalized at the scheduled time (R-PDI-6)",
        extra={
            "import_id": str(record.id),
            "finalization": "scheduled",
            "responsible_name": by_name,
            "importer": record.importer_id,
            "details_sha256": record.details_sha256,
        },
    )


def finalize_due(gw: Gateway, records: ImportRecords, now: datetime) -> list[FinalizedImport]:
    """Finalize every saved import due at ``now`` in the designated person's name (audited).

    The audit event is written before the status changes: if the trail cannot
    be written, the record stays saved and the next run tries again.
    """
    settings = gw.settings.media.finalization
    if settings.mode != "scheduled":
        return []
    done: list[FinalizedImport] = []
    for record in records.due(now):
        gw.audit.record(
            finalization_event(record, settings.responsible_id, settings.responsible_name)
        )
        if records.finalize_scheduled(
            record.id, settings.responsible_id, settings.responsible_name, at=now
        ):
            done.append(FinalizedImport(record.id, settings.responsible_id, now))
    return done


async def finalization_task(gw: Gateway, records: ImportRecords) -> None:
    """Runs in ``sekisho serve``: finalize due imports every ``check_interval_seconds``."""
    interval = gw.settings.media.finalization.check_interval_seconds
    while True:
        try:
            done = await gw.run(finalize_due, gw, records, datetime.now(UTC))
            if done:
                log.info("finalized %d media import(s) at their scheduled time", len(done))
        except asyncio.CancelledError:
            raise
        except Exception:  # keep trying; the records stay saved meanwhile
            log.exception("scheduled finalization of media imports failed")
        await asyncio.sleep(interval)
