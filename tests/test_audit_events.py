"""The PS3.15 A.5 vocabulary and AuditEvent validation (R-AUD-3)."""

from __future__ import annotations

import pytest

from gateway.audit import AuditEvent, Outcome, application_activity, security_alert
from gateway.audit import events as ev


def test_event_ids_match_cid_400() -> None:
    expected = {
        "110100": "Application Activity",
        "110101": "Audit Log Used",
        "110102": "Begin Transferring DICOM Instances",
        "110103": "DICOM Instances Accessed",
        "110104": "DICOM Instances Transferred",
        "110105": "DICOM Study Deleted",
        "110106": "Export",
        "110107": "Import",
        "110108": "Network Entry",
        "110109": "Order Record",
        "110110": "Patient Record",
        "110111": "Procedure Record",
        "110112": "Query",
        "110113": "Security Alert",
        "110114": "User Authentication",
    }
    assert {k: c.meaning for k, c in ev.EVENT_IDS.items()} == expected
    assert all(c.scheme == "DCM" for c in ev.EVENT_IDS.values())


def test_event_type_and_role_codes_match_ps3_16() -> None:
    assert ev.APPLICATION_START.value == "110120" and ev.LOGOUT.value == "110123"
    assert ev.NODE_AUTHENTICATION == ("110126", "DCM", "Node Authentication")
    assert ev.OBJECT_SECURITY_ATTRIBUTES_CHANGED.value == "110135"  # CID 403
    assert ev.SECURITY_ROLES_CHANGED.value == "110136"
    assert ev.AUDIT_RECORDING_STOPPED.value == "110133"
    assert (ev.ROLE_APPLICATION.value, ev.ROLE_APPLICATION_LAUNCHER.value) == ("110150", "110151")
    assert (ev.ROLE_DESTINATION.value, ev.ROLE_SOURCE.value) == ("110152", "110153")
    assert [o.value for o in Outcome] == [0, 4, 8, 12]
    assert [a.value for a in ev.Action] == ["C", "R", "U", "D", "E"]


def test_security_alert_helper() -> None:
    alert = security_alert(
        "revoked",
        "client certificate revoked",
        source_address="192.0.2.5",
        cert_sha256="AB:" * 31 + "AB",
    )
    assert alert.event_id == ev.SECURITY_ALERT
    assert alert.outcome == Outcome.MINOR_FAILURE
    assert alert.actor_cert_sha256 == "ab" * 32  # normalised
    assert alert.actor == "cert-sha256:" + "ab" * 32
    anonymous = security_alert("protocol_version", "TLS 1.0 refused", source_address="192.0.2.6")
    assert anonymous.actor == "192.0.2.6"
    assert security_alert("x", "y").actor == "unknown peer"


def test_round_trip_through_dict() -> None:
    event = security_alert(
        "wrong_ae_title",
        "calling AE not registered",
        actor="partner-a",
        extra={"calling_ae": "EVIL"},
    )
    again = AuditEvent.from_dict(event.to_dict())
    assert again == event
    assert dict(again.extra) == {"calling_ae": "EVIL"}
    assert application_activity("stop").event_type_codes == (ev.APPLICATION_STOP,)


@pytest.mark.parametrize(
    "changes",
    [
        {"event_id": ev.Code("999999", "DCM", "Made up")},
        {"action": "X"},
        {"outcome": 3},
        {"actor": ""},
        {"actor_kind": "robot"},
        {"patient_issuer": "HOSP"},
        {"instance_count": -1},
        {"actor_cert_sha256": "not-hex"},
        {"extra": {"k": 1}},
    ],
)
def test_invalid_events_are_refused(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "event_id": ev.QUERY,
        "action": "E",
        "outcome": 0,
        "actor": "a",
        "actor_kind": "partner",
    }
    fields.update(changes)
    with pytest.raises(ValueError):
        AuditEvent(**fields)  # type: ignore[arg-type]
