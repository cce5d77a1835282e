"""Audit events of media imports (R-AUD-1, R-AUD-3; PS3.15 A.5.3.8 and A.5.3.11).

* every import that stored, or tried to store, instances is one DICOM Import
  event (110107) naming the importer as the requestor, the source media
  (label; CD/DVD/USB as PS3.16 CID 405 in the XML form), the local patient and
  the studies (:func:`import_audit_event`);
* malware on a medium is a Security Alert (110113) with a local event type
  code, since CID 403 has none for it (:func:`malware_alert`), followed by the
  failed Import event;
* sending the imported studies to the PACS is a Begin Transferring DICOM
  Instances event (110102) per destination, as ``sekisho send`` records it.

The event's ``extra`` carries the import record's id and the SHA-256 of its
content, which ties the record to the hash-chained trail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from gateway.audit import events as ev
from gateway.imports.records import RecordHeader

#: Local EventTypeCode for a malware finding (PS3.15 A.5.2.1 allows local codes).
MALWARE_DETECTED = ev.Code("MALWARE", "99SEKISHO", "Malware Detected on Imported Media")


def _with_origin(event: ev.AuditEvent, header: RecordHeader) -> ev.AuditEvent:
    """Add the console caller's certificate and address, when the import came from it."""
    if header.importer_cert_sha256 is None and header.source_address is None:
        return event
    return dataclasses.replace(
        event, actor_cert_sha256=header.importer_cert_sha256, source_address=header.source_address
    )


def import_audit_event(
    header: RecordHeader,
    import_id: int,
    *,
    study_uids: Iterable[str],
    instance_count: int,
    outcome: int,
    description: str,
    extra: Mapping[str, str],
) -> ev.AuditEvent:
    """PS3.15 A.5.3.8 Import: the importer (requestor), source media, patient, studies."""
    more = {
        "import_id": str(import_id),
        "importer_name": header.importer_name,
        "station": header.station,
        **extra,
    }
    if header.supersedes is not None:
        more["supersedes"] = str(header.supersedes)
        more["change_reason"] = header.change_reason
    event = ev.import_event(
        actor=header.importer_id,
        actor_kind="user",
        patient_id=header.local_patient_id,
        patient_issuer=header.local_issuer or None,
        study_uids=sorted(set(study_uids)),
        instance_count=instance_count,
        outcome=outcome,
        media_label=header.media_label,
        media_type=header.media_type,
        source_facility=header.source_facility or None,
        description=description,
        extra=more,
    )
    return _with_origin(event, header)


def malware_alert(
    header: RecordHeader, import_id: int, detections: Iterable[tuple[str, str]]
) -> ev.AuditEvent:
    """PS3.15 A.5.3.11 Security Alert: malware found, the import stopped (R-PDI-2)."""
    found = list(detections)
    event = ev.security_alert(
        "malware-detected",
        f"malware found on a medium during media import #{import_id}; nothing was imported",
        actor=header.importer_id,
        actor_kind="user",
        event_type=MALWARE_DETECTED,
        outcome=ev.Outcome.MAJOR_FAILURE,
        extra={
            "import_id": str(import_id),
            "importer_name": header.importer_name,
            "media_label": header.media_label,
            "media_type": header.media_type,
            "signatures": ", ".join(sorted({sig for _p, sig in found}))[:500],
            "files": ", ".join(p for p, _s in found)[:1000],
        },
    )
    return _with_origin(event, header)


def pacs_transfer_event(
    header: RecordHeader,
    import_id: int,
    destination: str,
    study_uids: Iterable[str],
    instance_count: int,
    destination_extra: Mapping[str, str],
) -> ev.AuditEvent:
    """PS3.15 A.5.3.2 Begin Transferring: imported studies queued for the PACS (R-PDI-7)."""
    return ev.AuditEvent(
        event_id=ev.BEGIN_TRANSFERRING_INSTANCES,
        action=ev.Action.EXECUTE,
        outcome=ev.Outcome.SUCCESS,
        actor=header.importer_id,
        actor_kind="user",
        destination=destination,
        patient_id=header.local_patient_id,
        patient_issuer=header.local_issuer or None,
        study_uids=tuple(sorted(set(study_uids))),
        instance_count=instance_count,
        description=f"instances of media import #{import_id} queued for {destination}",
        extra={"import_id": str(import_id), **destination_extra},
    )
