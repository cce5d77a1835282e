"""DICOM audit messages (PS3.15 A.5.1 schema) for the trail's records (R-AUD-3).

One :class:`~gateway.audit.chain.AuditRecord` becomes one ``AuditMessage``:

* ``EventIdentification`` (A.5.2.1): EventActionCode, EventDateTime,
  EventOutcomeIndicator, ``EventID``, ``EventTypeCode`` and the plain-words
  ``EventOutcomeDescription``;
* ``ActiveParticipant`` (A.5.2.2): the requestor (``UserIsRequestor="true"``,
  with its network access point), the gateway itself, and the destination or
  source media when there is one, each with its ``RoleIDCode`` as PS3.15
  A.5.3 prescribes for the event;
* ``AuditSourceIdentification`` (A.5.2.3);
* ``ParticipantObjectIdentification`` (A.5.2.5): the patient (type 1, role 1,
  RFC 3881 ID type 2 "Patient Number", the ID in HL7 CX form ``id^^^issuer``
  as IHE ATNA does), each study (type 2, role 3, 110180 Study Instance UID),
  the query (110181 SOP Class UID with ``ParticipantObjectQuery``) and, for a
  Security Alert, the alert subject (A.5.3.11).

Coded values use the current schema's ``csd-code`` / ``codeSystemName`` /
``originalText`` attributes.  The same single-message form is the MSG of the
syslog forwarder (RFC 5424 / IHE ATNA).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import IO

from . import events as ev
from .chain import AuditRecord
from .events import AuditEvent, Code

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
#: PS3.16 CID 405 Media Type Code, by the short names the importer uses.
_MEDIA_TYPES = {
    "USB": Code("110030", "DCM", "USB Disk Emulation"),
    "CD": Code("110032", "DCM", "CD"),
    "DVD": Code("110033", "DCM", "DVD"),
}
_TRANSFERS = {ev.INSTANCES_TRANSFERRED.value, ev.BEGIN_TRANSFERRING_INSTANCES.value}


def _clean(text: str) -> str:
    """Drop characters XML 1.0 cannot carry (they would make the message unparsable)."""
    return _NOT_XML.sub("", text)


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _clean(code.value),
            "codeSystemName": _clean(code.scheme),
            "originalText": _clean(code.meaning),
        },
    )


def _access_point(address: str) -> tuple[str, str]:
    """(NetworkAccessPointID, NetworkAccessPointTypeCode): 2 = IP address, 1 = name."""
    try:
        return str(ipaddress.ip_address(address.strip("[]"))), "2"
    except ValueError:
        return address, "1"


def _roles(event: AuditEvent) -> tuple[Code | None, Code | None]:
    """RoleIDCode of (requestor, gateway) for this event, per PS3.15 A.5.3."""
    eid = event.event_id.value
    if eid in _TRANSFERS:  # A.5.3.2 / A.5.3.4
        if event.destination:
            return None, ev.ROLE_SOURCE
        if event.action == ev.Action.CREATE:
            return ev.ROLE_SOURCE, ev.ROLE_DESTINATION
        return ev.ROLE_DESTINATION, ev.ROLE_SOURCE
    if eid == ev.QUERY.value:  # A.5.3.13
        return ev.ROLE_SOURCE, ev.ROLE_DESTINATION
    if eid == ev.IMPORT.value:  # A.5.3.8: the importing process is the destination
        return None, ev.ROLE_DESTINATION
    if eid == ev.EXPORT.value:  # A.5.3.7: the exporting process is the source
        return None, ev.ROLE_SOURCE
    if eid == ev.APPLICATION_ACTIVITY.value:  # A.5.3.1
        return (ev.ROLE_APPLICATION_LAUNCHER if event.actor_kind == "user" else None), (
            ev.ROLE_APPLICATION
        )
    return None, None


def _participant(
    parent: ET.Element,
    user_id: str,
    *,
    requestor: bool,
    role: Code | None,
    address: str | None = None,
    alternative: str | None = None,
) -> ET.Element:
    attrs = {"UserID": _clean(user_id)}
    if alternative:
        attrs["AlternativeUserID"] = _clean(alternative)
    attrs["UserIsRequestor"] = "true" if requestor else "false"
    if address:
        nap_id, nap_type = _access_point(address)
        attrs["NetworkAccessPointID"] = _clean(nap_id)
        attrs["NetworkAccessPointTypeCode"] = nap_type
    element = ET.SubElement(parent, "ActiveParticipant", attrs)
    if role is not None:
        _code(element, "RoleIDCode", role)
    return element


def _detail(parent: ET.Element, kind: str, value: str) -> None:
    encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
    ET.SubElement(parent, "ParticipantObjectDetail", {"type": kind, "value": encoded})


def _object(
    parent: ET.Element, object_id: str, type_code: str, role: str, id_type: Code
) -> ET.Element:
    element = ET.SubElement(
        parent,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": _clean(object_id),
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    return element


def audit_message(
    record: AuditRecord,
    *,
    source_id: str = "sekisho",
    enterprise_site_id: str | None = None,
    gateway_address: str | None = None,
) -> ET.Element:
    """The PS3.15 A.5.1 ``AuditMessage`` element for one record.

    ``source_id`` is the AuditSourceID and the gateway's UserID;
    ``gateway_address`` its own network access point, if wanted.
    """
    event = record.event
    message = ET.Element("AuditMessage")
    when = record.occurred_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ident = ET.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": when,
            "EventOutcomeIndicator": str(event.outcome),
        },
    )
    _code(ident, "EventID", event.event_id)
    for type_code in event.event_type_codes:
        _code(ident, "EventTypeCode", type_code)
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _clean(event.description)

    actor_role, gateway_role = _roles(event)
    calling_ae = event.extra.get("calling_ae")
    alternative = f"AETITLES={calling_ae}" if calling_ae else None
    if alternative is None and event.actor_cert_sha256:
        alternative = f"cert-sha256:{event.actor_cert_sha256}"
    if event.actor == source_id:
        _participant(
            message,
            source_id,
            requestor=True,
            role=gateway_role or actor_role,
            address=gateway_address,
        )
    else:
        _participant(
            message,
            event.actor,
            requestor=True,
            role=actor_role,
            address=event.source_address,
            alternative=alternative,
        )
        _participant(
            message, source_id, requestor=False, role=gateway_role, address=gateway_address
        )
    if event.destination and event.destination != event.actor:
        _participant(message, event.destination, requestor=False, role=ev.ROLE_DESTINATION)
    media_label = event.extra.get("media_label")
    if event.event_id == ev.IMPORT and media_label:
        media = _participant(message, media_label, requestor=False, role=ev.ROLE_SOURCE_MEDIA)
        media_type = _MEDIA_TYPES.get(event.extra.get("media_type", "").upper())
        if media_type is not None:
            _code(ET.SubElement(media, "MediaIdentifier"), "MediaType", media_type)

    source = ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if enterprise_site_id:
        source.set("AuditEnterpriseSiteID", enterprise_site_id)
    # RFC 3881 §5.4.3 type 4: application server process tier.
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})

    for uid in event.study_uids:
        study = _object(message, uid, "2", "3", ev.STUDY_INSTANCE_UID)
        if event.instance_count and len(event.study_uids) == 1:
            _detail(study, "NumberOfInstances", str(event.instance_count))
    if event.patient_id is not None:
        cx = event.patient_id
        if event.patient_issuer:
            cx = f"{cx}^^^{event.patient_issuer}"
        _object(message, cx, "1", "1", ev.PATIENT_NUMBER)
    if event.event_id == ev.QUERY and ("query" in event.extra or "sop_class_uid" in event.extra):
        query = _object(
            message, event.extra.get("sop_class_uid", "unknown"), "2", "3", ev.SOP_CLASS_UID
        )
        raw = event.extra.get("query", "").encode("utf-8")
        ET.SubElement(query, "ParticipantObjectQuery").text = base64.b64encode(raw).decode("ascii")
    if event.event_id == ev.SECURITY_ALERT:  # A.5.3.11 alert subject
        subject_id = event.source_address or event.actor
        subject = _object(message, subject_id, "2", "13", ev.NODE_ID)
        _detail(subject, "Alert Description", event.description)
        if event.reason_code:
            _detail(subject, "Reason", event.reason_code)
        if event.actor_cert_sha256:
            _detail(subject, "Certificate SHA-256", event.actor_cert_sha256)
    return message


def audit_message_bytes(
    record: AuditRecord,
    *,
    source_id: str = "sekisho",
    enterprise_site_id: str | None = None,
    gateway_address: str | None = None,
) -> bytes:
    """One ``AuditMessage`` as compact UTF-8 XML without declaration (the syslog MSG)."""
    element = audit_message(
        record,
        source_id=source_id,
        enterprise_site_id=enterprise_site_id,
        gateway_address=gateway_address,
    )
    return ET.tostring(element, encoding="unicode").encode("utf-8")


def export_dicom_xml(
    records: Iterable[AuditRecord],
    fp: IO[bytes],
    *,
    source_id: str = "sekisho",
    enterprise_site_id: str | None = None,
    gateway_address: str | None = None,
) -> int:
    """Write ``records`` as ``<AuditMessages>`` of PS3.15 A.5.1 messages; return the count.

    Streams: one message is in memory at a time, so a whole year can be exported.
    """
    fp.write(b'<?xml version="1.0" encoding="UTF-8"?>\n<AuditMessages>\n')
    count = 0
    for record in records:
        fp.write(
            audit_message_bytes(
                record,
                source_id=source_id,
                enterprise_site_id=enterprise_site_id,
                gateway_address=gateway_address,
            )
        )
        fp.write(b"\n")
        count += 1
    fp.write(b"</AuditMessages>\n")
    return count
