"""PS3.15 A.5.1 AuditMessage export (R-AUD-3)."""

from __future__ import annotations

import base64
import io
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gateway.audit import (
    AuditTrail,
    application_activity,
    audit_message_bytes,
    export_dicom_xml,
    import_event,
    instances_transferred,
    query,
    security_alert,
)

FP = "ab" * 32


@pytest.fixture
def messages(tmp_path: Path) -> list[ET.Element]:
    with AuditTrail(tmp_path / "audit.db") as trail:
        trail.record(
            security_alert(
                "expired",
                "client certificate expired",
                actor="partner-x",
                source_address="192.0.2.10",
                cert_sha256=FP,
            )
        )
        trail.record(
            instances_transferred(
                actor="partner-a",
                patient_id="P1",
                patient_issuer="HOSP",
                study_uids=["1.2.392.1"],
                instance_count=12,
                source_address="partner-a.example",
                extra={"calling_ae": "PARTNER_A"},
            )
        )
        trail.record(
            query(
                actor="partner-b",
                sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
                query_text="PatientID=P1",
                source_address="2001:db8::1",
            )
        )
        trail.record(
            import_event(
                actor="staff-7",
                patient_id="P2",
                study_uids=["1.2.4", "1.2.5"],
                instance_count=30,
                media_label="CD-42",
                media_type="cd",
                description="imported \x00from CD",
            )
        )
        trail.record(application_activity("start"))
        buf = io.BytesIO()
        assert export_dicom_xml(trail.iter_records(), buf, enterprise_site_id="HOSP") == 5
    root = ET.fromstring(buf.getvalue())
    assert root.tag == "AuditMessages"
    return list(root)


def code(element: ET.Element | None) -> tuple[str | None, ...]:
    assert element is not None
    return (element.get("csd-code"), element.get("codeSystemName"), element.get("originalText"))


def test_security_alert_message(messages: list[ET.Element]) -> None:
    alert = messages[0]
    assert alert.tag == "AuditMessage"
    ident = alert.find("EventIdentification")
    assert ident is not None
    assert code(ident.find("EventID")) == ("110113", "DCM", "Security Alert")
    assert code(ident.find("EventTypeCode")) == ("110126", "DCM", "Node Authentication")
    assert ident.get("EventActionCode") == "E"
    assert ident.get("EventOutcomeIndicator") == "4"
    assert ident.get("EventDateTime", "").endswith("Z")
    assert ident.findtext("EventOutcomeDescription") == "client certificate expired"
    requestor = alert.find("ActiveParticipant[@UserIsRequestor='true']")
    assert requestor is not None
    assert requestor.get("UserID") == "partner-x"
    assert requestor.get("AlternativeUserID") == f"cert-sha256:{FP}"
    assert requestor.get("NetworkAccessPointID") == "192.0.2.10"
    assert requestor.get("NetworkAccessPointTypeCode") == "2"
    source = alert.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "sekisho"
    assert source.get("AuditEnterpriseSiteID") == "HOSP"
    subject = alert.find("ParticipantObjectIdentification")
    assert subject is not None
    assert subject.get("ParticipantObjectTypeCode") == "2"
    assert subject.get("ParticipantObjectTypeCodeRole") == "13"
    details = {
        d.get("type"): base64.b64decode(d.get("value", "")).decode()
        for d in subject.findall("ParticipantObjectDetail")
    }
    assert details == {
        "Alert Description": "client certificate expired",
        "Reason": "expired",
        "Certificate SHA-256": FP,
    }


def test_transfer_message_has_patient_study_and_roles(messages: list[ET.Element]) -> None:
    msg = messages[1]
    assert code(msg.find("EventIdentification/EventID"))[0] == "110104"
    roles = {
        p.get("UserID"): code(p.find("RoleIDCode"))[0] for p in msg.findall("ActiveParticipant")
    }
    assert roles == {"partner-a": "110153", "sekisho": "110152"}  # partner sent, we received
    partner = msg.find("ActiveParticipant[@UserID='partner-a']")
    assert partner is not None
    assert partner.get("AlternativeUserID") == "AETITLES=PARTNER_A"
    assert partner.get("NetworkAccessPointTypeCode") == "1"  # a host name
    objects = msg.findall("ParticipantObjectIdentification")
    study = next(o for o in objects if o.get("ParticipantObjectTypeCode") == "2")
    assert study.get("ParticipantObjectID") == "1.2.392.1"
    assert study.get("ParticipantObjectTypeCodeRole") == "3"
    assert code(study.find("ParticipantObjectIDTypeCode")) == (
        "110180",
        "DCM",
        "Study Instance UID",
    )
    patient = next(o for o in objects if o.get("ParticipantObjectTypeCode") == "1")
    assert patient.get("ParticipantObjectID") == "P1^^^HOSP"
    assert patient.get("ParticipantObjectTypeCodeRole") == "1"
    assert code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")


def test_query_import_and_application_messages(messages: list[ET.Element]) -> None:
    q, imp, start = messages[2], messages[3], messages[4]
    assert code(q.find("EventIdentification/EventID"))[0] == "110112"
    assert (
        q.find("ActiveParticipant[@UserID='partner-b']").get(  # type: ignore[union-attr]
            "NetworkAccessPointTypeCode"
        )
        == "2"
    )
    query_object = q.find("ParticipantObjectIdentification")
    assert query_object is not None
    assert code(query_object.find("ParticipantObjectIDTypeCode"))[0] == "110181"
    assert base64.b64decode(query_object.findtext("ParticipantObjectQuery", "")) == b"PatientID=P1"

    assert code(imp.find("EventIdentification/EventID"))[0] == "110107"
    assert imp.findtext("EventIdentification/EventOutcomeDescription") == "imported from CD"
    media = imp.find("ActiveParticipant[@UserID='CD-42']")
    assert media is not None
    assert code(media.find("RoleIDCode"))[0] == "110155"
    assert code(media.find("MediaIdentifier/MediaType"))[0] == "110032"
    studies = [
        o.get("ParticipantObjectID")
        for o in imp.findall("ParticipantObjectIdentification")
        if o.get("ParticipantObjectTypeCode") == "2"
    ]
    assert studies == ["1.2.4", "1.2.5"]

    participants = start.findall("ActiveParticipant")
    assert len(participants) == 1  # the gateway is both requestor and application
    assert code(participants[0].find("RoleIDCode"))[0] == "110150"
    assert code(start.find("EventIdentification/EventTypeCode"))[0] == "110120"


def test_single_message_is_compact_utf8(tmp_path: Path) -> None:
    with AuditTrail(tmp_path / "a.db") as trail:
        trail.record(security_alert("wrong_ae_title", "呼出AE不一致", source_address="192.0.2.1"))
        record = next(trail.iter_records())
    data = audit_message_bytes(record, source_id="gw-1")
    assert data.startswith(b"<AuditMessage>") and b"\n" not in data
    parsed = ET.fromstring(data)
    assert parsed.findtext("EventIdentification/EventOutcomeDescription") == "呼出AE不一致"
    assert parsed.find("AuditSourceIdentification").get("AuditSourceID") == "gw-1"  # type: ignore[union-attr]
