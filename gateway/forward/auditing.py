"""Audit records for outbound transfers (R-XCH-7, R-AUD-3) and stopped jobs (R-XCH-4).

Each job whose state changed to ``sent``/``committed`` or ``failed`` carries an
``audited = 0`` mark; :func:`sweep` turns marked jobs into PS3.15 A.5.3.4
"DICOM Instances Transferred" records, one per destination and study, and
clears the mark afterwards.  A crash between the two repeats a record rather
than losing it.  The gateway is the source (EventActionCode ``R``, RoleID
110153 Source) and the destination is named with its AE title and address
(RoleID 110152 Destination), so sender and receiver of every transfer are
identified.  A stopped job also gets a Security Alert (A.5.3.11) so that the
stop is an alert and not only a line in a list (METI 7.6.8(4)).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

from gateway.audit import events as ev
from gateway.forward.destinations import DestinationSettings
from gateway.forward.queue import ForwardQueue, Job

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("sekisho.forward")

#: Private code (PS3.16 8.2: coding schemes starting with "99" are local) for the
#: Security Alert type of a stopped forwarding job; CID 403 has no closer code.
FORWARD_STOPPED = ev.Code("SKS-FWD-STOP", "99SEKISHO", "Store-and-forward job stopped")


def destination_extra(gw: Gateway, name: str) -> dict[str, str]:
    """Who the receiver is: name, role, transport, AE title and address."""
    dest: DestinationSettings | None = gw.settings.destinations.get(name)
    out = {"destination_name": name, "calling_ae": _calling_ae(gw, dest)}
    if dest is not None:
        out.update(
            destination_role=dest.role,
            transport=dest.transport,
            destination_address=dest.address(),
        )
        if dest.transport == "dimse":
            out["destination_ae"] = dest.called_ae
    return out


def _calling_ae(gw: Gateway, dest: DestinationSettings | None) -> str:
    if dest is not None and dest.calling_ae:
        return dest.calling_ae
    return gw.settings.instance.ae_title


def _patient(gw: Gateway, sop_uid: str) -> tuple[str | None, str | None]:
    inst = gw.store.find_instance(sop_uid)
    if inst is None:
        return None, None
    return inst.patient_id, inst.issuer or None


def transfer_events(gw: Gateway, destination: str, study_uid: str, jobs: list[Job]) -> list[
    ev.AuditEvent
]:
    """The audit records for one destination and study (pure apart from the patient lookup)."""
    patient_id, issuer = _patient(gw, jobs[0].sop_uid)
    extra = destination_extra(gw, destination)
    requested = sorted({j.created_by for j in jobs})
    extra["requested_by"] = ",".join(requested)[:200]
    actor = gw.settings.instance.name
    events: list[ev.AuditEvent] = []
    ok = [j for j in jobs if j.state in ("sent", "committed")]
    failed = [j for j in jobs if j.state == "failed"]
    if ok:
        committed = sum(1 for j in ok if j.state == "committed")
        how = "confirmed by the destination"
        if committed:
            how += f"; {committed} committed by Storage Commitment"
        events.append(
            ev.instances_transferred(
                actor=actor,
                actor_kind="system",
                action=ev.Action.READ,
                patient_id=patient_id,
                patient_issuer=issuer,
                study_uids=[study_uid],
                instance_count=len(ok),
                destination=destination,
                description=f"{len(ok)} instance(s) sent to {destination}; {how}",
                extra={**extra, "confirmed": ok[0].confirmed[:200]},
            )
        )
    if failed:
        reasons = "; ".join(sorted({j.last_error for j in failed}))[:500]
        attempts = max(j.attempts for j in failed)
        text = (
            f"forwarding of {len(failed)} instance(s) to {destination} stopped after "
            f"{attempts} attempt(s): {reasons}"
        )
        events.append(
            ev.instances_transferred(
                actor=actor,
                actor_kind="system",
                action=ev.Action.READ,
                outcome=ev.Outcome.SERIOUS_FAILURE,
                patient_id=patient_id,
                patient_issuer=issuer,
                study_uids=[study_uid],
                instance_count=len(failed),
                destination=destination,
                description=text,
                reason_code="forward-stopped",
                extra={**extra, "job_ids": ",".join(str(j.id) for j in failed)[:500]},
            )
        )
        events.append(
            ev.security_alert(
                "forward-stopped",
                text + " (resume with `sekisho queue retry`)",
                actor=actor,
                actor_kind="system",
                event_type=FORWARD_STOPPED,
                outcome=ev.Outcome.SERIOUS_FAILURE,
                extra=extra,
            )
        )
    return events


def sweep(gw: Gateway, queue: ForwardQueue, *, limit: int = 500) -> int:
    """Audit every job marked for it; returns how many jobs were covered."""
    jobs = queue.unaudited(limit)
    if not jobs:
        return 0
    groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
    for job in jobs:
        groups[(job.destination, job.study_uid)].append(job)
    for (destination, study_uid), group in groups.items():
        for event in transfer_events(gw, destination, study_uid, group):
            gw.audit.record(event)
        if any(j.state == "failed" for j in group):
            log.warning(
                "forwarding to %s stopped for %d instance(s); see `sekisho queue list "
                "--state failed`", destination, sum(j.state == "failed" for j in group)
            )
        queue.mark_audited([j.id for j in group])
    return len(jobs)
