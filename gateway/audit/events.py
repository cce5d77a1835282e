"""DICOM PS3.15 A.5 audit vocabulary and the :class:`AuditEvent` value (R-AUD-1, R-AUD-3).

Codes are copied from PS3.16 (the context groups that PS3.15 A.5.2 refers to) so
that a reader can check them line by line:

* CID 400 Audit Event ID (EventID, PS3.15 A.5.2.1);
* CID 401/403 Audit Event Type / Security Alert Type (EventTypeCode);
* CID 402 Audit Active Participant Role ID (RoleIDCode, A.5.2.2);
* CID 404 Audit Participant Object ID Type (ParticipantObjectIDTypeCode, A.5.2.5).

EventOutcomeIndicator (0/4/8/12) and EventActionCode (C/R/U/D/E) come from
PS3.15 A.5.2.1 (originally RFC 3881 §5.1).

An :class:`AuditEvent` says *what happened*; the trail adds *when* (``occurred_at``)
and its place in the hash chain.  Descriptions are plain words meant for an
auditor; they must not carry patient data (that goes in the patient fields,
which only the protected trail holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Any, Literal, NamedTuple


class Code(NamedTuple):
    """A coded entry: (code value, coding scheme designator, code meaning).

    In the PS3.15 A.5.1 XML schema these are the ``csd-code``,
    ``codeSystemName`` and ``originalText`` attributes.
    """

    value: str
    scheme: str
    meaning: str


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


# --- EventID, CID 400 (PS3.15 A.5.2.1) ---------------------------------------
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
BEGIN_TRANSFERRING_INSTANCES = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
EXPORT = _dcm("110106", "Export")
IMPORT = _dcm("110107", "Import")
NETWORK_ENTRY = _dcm("110108", "Network Entry")
ORDER_RECORD = _dcm("110109", "Order Record")
PATIENT_RECORD = _dcm("110110", "Patient Record")
PROCEDURE_RECORD = _dcm("110111", "Procedure Record")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")

EVENT_IDS: Mapping[str, Code] = MappingProxyType(
    {
        c.value: c
        for c in (
            APPLICATION_ACTIVITY,
            AUDIT_LOG_USED,
            BEGIN_TRANSFERRING_INSTANCES,
            INSTANCES_ACCESSED,
            INSTANCES_TRANSFERRED,
            STUDY_DELETED,
            EXPORT,
            IMPORT,
            NETWORK_ENTRY,
            ORDER_RECORD,
            PATIENT_RECORD,
            PROCEDURE_RECORD,
            QUERY,
            SECURITY_ALERT,
            USER_AUTHENTICATION,
        )
    }
)

# --- EventTypeCode, CID 401 / CID 403 -----------------------------------------
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
ATTACH = _dcm("110124", "Attach")
DETACH = _dcm("110125", "Detach")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
EMERGENCY_OVERRIDE_STARTED = _dcm("110127", "Emergency Override Started")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
HARDWARE_CONFIGURATION = _dcm("110130", "Hardware Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = _dcm("110133", "Audit Recording Stopped")
AUDIT_RECORDING_STARTED = _dcm("110134", "Audit Recording Started")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = _dcm("110135", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User Security Attributes Changed")
EMERGENCY_OVERRIDE_STOPPED = _dcm("110138", "Emergency Override Stopped")
AUTHENTICATION_DECISION = _dcm("110143", "Authentication Decision")
AUTHORIZATION_DECISION = _dcm("110144", "Authorization Decision")

# --- RoleIDCode, CID 402 (PS3.15 A.5.2.2) -------------------------------------
ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")
ROLE_DESTINATION_MEDIA = _dcm("110154", "Destination Media")
ROLE_SOURCE_MEDIA = _dcm("110155", "Source Media")

# --- ParticipantObjectIDTypeCode, CID 404 and RFC 3881 §5.5.4 -----------------
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")


class Outcome(IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.2.1; RFC 3881 §5.1.4)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class Action(StrEnum):
    """EventActionCode (PS3.15 A.5.2.1; RFC 3881 §5.1.2)."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


ActorKind = Literal["partner", "user", "system", "provider"]
ACTOR_KINDS: frozenset[str] = frozenset({"partner", "user", "system", "provider"})
_HEX = frozenset("0123456789abcdef")


def normalise_fingerprint(value: str | None) -> str | None:
    """SHA-256 certificate fingerprint as 64 lower-case hex digits (colons removed)."""
    if value is None:
        return None
    fp = value.replace(":", "").lower()
    if len(fp) != 64 or not set(fp) <= _HEX:
        raise ValueError("a certificate SHA-256 fingerprint must be 64 hexadecimal digits")
    return fp


def _code_list(codes: Iterable[Code]) -> list[list[str]]:
    return [[c.value, c.scheme, c.meaning] for c in codes]


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One auditable fact (R-AUD-1): who, what, which patient, outcome, from where.

    ``actor`` is the requestor: a partner name, a staff user id, or ``"sekisho"``
    for the gateway itself.  ``occurred_at`` is not here on purpose: the trail
    stamps it from its clock when the event is recorded (R-AUD-5).
    """

    event_id: Code
    action: str
    outcome: int
    actor: str
    actor_kind: ActorKind
    event_type_codes: tuple[Code, ...] = ()
    actor_cert_sha256: str | None = None
    source_address: str | None = None
    destination: str | None = None
    patient_id: str | None = None
    patient_issuer: str | None = None
    study_uids: tuple[str, ...] = ()
    instance_count: int = 0
    description: str = ""
    reason_code: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.event_id, Code) or self.event_id.value not in EVENT_IDS:
            raise ValueError(f"event_id must be a CID 400 code, got {self.event_id!r}")
        if self.action not in {a.value for a in Action}:
            raise ValueError(f"action must be one of C/R/U/D/E, got {self.action!r}")
        if self.outcome not in {o.value for o in Outcome}:
            raise ValueError(f"outcome must be 0, 4, 8 or 12, got {self.outcome!r}")
        if not isinstance(self.actor, str) or not self.actor:
            raise ValueError("actor must be a non-empty string")
        if self.actor_kind not in ACTOR_KINDS:
            raise ValueError(f"actor_kind must be one of {sorted(ACTOR_KINDS)}")
        if self.patient_issuer is not None and self.patient_id is None:
            raise ValueError("patient_issuer given without patient_id")
        if not isinstance(self.instance_count, int) or self.instance_count < 0:
            raise ValueError("instance_count must be a non-negative integer")
        codes = tuple(self.event_type_codes)
        if not all(isinstance(c, Code) for c in codes):
            raise ValueError("event_type_codes must be Code tuples")
        uids = tuple(self.study_uids)
        if not all(isinstance(u, str) and u for u in uids):
            raise ValueError("study_uids must be non-empty strings")
        extra = dict(self.extra)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise ValueError("extra must map strings to strings")
        fp = normalise_fingerprint(self.actor_cert_sha256)
        object.__setattr__(self, "event_type_codes", codes)
        object.__setattr__(self, "study_uids", uids)
        object.__setattr__(self, "extra", MappingProxyType(extra))
        object.__setattr__(self, "actor_cert_sha256", fp)
        object.__setattr__(self, "action", str(Action(self.action).value))
        object.__setattr__(self, "outcome", int(self.outcome))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, used for storage and for the record hash."""
        return {
            "event_id": self.event_id.value,
            "action": self.action,
            "outcome": self.outcome,
            "actor": self.actor,
            "actor_kind": self.actor_kind,
            "event_type_codes": _code_list(self.event_type_codes),
            "actor_cert_sha256": self.actor_cert_sha256,
            "source_address": self.source_address,
            "destination": self.destination,
            "patient_id": self.patient_id,
            "patient_issuer": self.patient_issuer,
            "study_uids": list(self.study_uids),
            "instance_count": self.instance_count,
            "description": self.description,
            "reason_code": self.reason_code,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditEvent:
        """Inverse of :meth:`to_dict`; raises ``ValueError``/``KeyError`` on bad data."""
        event_id = EVENT_IDS[str(data["event_id"])]
        return cls(
            event_id=event_id,
            action=data["action"],
            outcome=data["outcome"],
            actor=data["actor"],
            actor_kind=data["actor_kind"],
            event_type_codes=tuple(Code(*c) for c in data.get("event_type_codes", ())),
            actor_cert_sha256=data.get("actor_cert_sha256"),
            source_address=data.get("source_address"),
            destination=data.get("destination"),
            patient_id=data.get("patient_id"),
            patient_issuer=data.get("patient_issuer"),
            study_uids=tuple(data.get("study_uids", ())),
            instance_count=data.get("instance_count", 0),
            description=data.get("description", ""),
            reason_code=data.get("reason_code"),
            extra=data.get("extra") or {},
        )


# --- helper constructors ------------------------------------------------------


def security_alert(
    reason_code: str,
    description: str,
    *,
    actor: str | None = None,
    actor_kind: ActorKind = "partner",
    source_address: str | None = None,
    cert_sha256: str | None = None,
    event_type: Code = NODE_AUTHENTICATION,
    outcome: int = Outcome.MINOR_FAILURE,
    extra: Mapping[str, str] | None = None,
) -> AuditEvent:
    """A refused handshake or authorization (R-TLS-5; PS3.15 A.5.3.11 Security Alert).

    ``reason_code`` is the stable machine reason (``expired``, ``revoked``,
    ``unknown_ca``, ``wrong_ae_title``, ``protocol_version``...), ``description``
    the same in plain words.  When the peer's name is unknown, the actor is its
    certificate fingerprint or address.
    """
    cert_sha256 = normalise_fingerprint(cert_sha256)
    who = actor or (f"cert-sha256:{cert_sha256}" if cert_sha256 else None)
    return AuditEvent(
        event_id=SECURITY_ALERT,
        action=Action.EXECUTE,
        outcome=outcome,
        event_type_codes=(event_type,),
        actor=who or source_address or "unknown peer",
        actor_kind=actor_kind,
        actor_cert_sha256=cert_sha256,
        source_address=source_address,
        description=description,
        reason_code=reason_code,
        extra=extra or {},
    )


def instances_transferred(
    *,
    actor: str,
    patient_id: str | None,
    study_uids: Iterable[str],
    instance_count: int,
    actor_kind: ActorKind = "partner",
    action: str = Action.CREATE,
    outcome: int = Outcome.SUCCESS,
    patient_issuer: str | None = None,
    source_address: str | None = None,
    destination: str | None = None,
    cert_sha256: str | None = None,
    description: str = "",
    reason_code: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> AuditEvent:
    """Instances stored into (``C``) or sent from (``R``) the gateway (PS3.15 A.5.3.4).

    ``destination`` names the receiving node when it is not the requestor
    (C-MOVE to a third AE, outbound push); sender and receiver are then both
    recorded (R-XCH-7).
    """
    return AuditEvent(
        event_id=INSTANCES_TRANSFERRED,
        action=action,
        outcome=outcome,
        actor=actor,
        actor_kind=actor_kind,
        actor_cert_sha256=cert_sha256,
        source_address=source_address,
        destination=destination,
        patient_id=patient_id,
        patient_issuer=patient_issuer,
        study_uids=tuple(study_uids),
        instance_count=instance_count,
        description=description,
        reason_code=reason_code,
        extra=extra or {},
    )


def query(
    *,
    actor: str,
    actor_kind: ActorKind = "partner",
    outcome: int = Outcome.SUCCESS,
    source_address: str | None = None,
    cert_sha256: str | None = None,
    patient_id: str | None = None,
    patient_issuer: str | None = None,
    sop_class_uid: str | None = None,
    query_text: str | None = None,
    description: str = "",
    extra: Mapping[str, str] | None = None,
) -> AuditEvent:
    """A C-FIND or QIDO-RS query (PS3.15 A.5.3.13; EventActionCode E).

    ``query_text`` is the query as received (e.g. the QIDO query string); it
    becomes ParticipantObjectQuery in the XML form.
    """
    more = dict(extra or {})
    if sop_class_uid:
        more["sop_class_uid"] = sop_class_uid
    if query_text is not None:
        more["query"] = query_text
    return AuditEvent(
        event_id=QUERY,
        action=Action.EXECUTE,
        outcome=outcome,
        actor=actor,
        actor_kind=actor_kind,
        actor_cert_sha256=cert_sha256,
        source_address=source_address,
        patient_id=patient_id,
        patient_issuer=patient_issuer,
        description=description,
        extra=more,
    )


def import_event(
    *,
    actor: str,
    patient_id: str,
    study_uids: Iterable[str],
    instance_count: int,
    patient_issuer: str | None = None,
    actor_kind: ActorKind = "user",
    outcome: int = Outcome.SUCCESS,
    media_label: str | None = None,
    media_type: str | None = None,
    source_facility: str | None = None,
    description: str = "",
    reason_code: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> AuditEvent:
    """Instances imported from patient-brought media (R-PDI-5; PS3.15 A.5.3.8 Import).

    ``actor`` is the staff member responsible for the import; ``media_type`` is
    ``"CD"``, ``"DVD"`` or ``"USB"`` (PS3.16 CID 405 in the XML form).
    """
    more = dict(extra or {})
    for key, value in (
        ("media_label", media_label),
        ("media_type", media_type),
        ("source_facility", source_facility),
    ):
        if value:
            more[key] = value
    return AuditEvent(
        event_id=IMPORT,
        action=Action.CREATE,
        outcome=outcome,
        actor=actor,
        actor_kind=actor_kind,
        patient_id=patient_id,
        patient_issuer=patient_issuer,
        study_uids=tuple(study_uids),
        instance_count=instance_count,
        description=description,
        reason_code=reason_code,
        extra=more,
    )


def application_activity(
    kind: Literal["start", "stop"],
    *,
    actor: str = "sekisho",
    actor_kind: ActorKind = "system",
    outcome: int = Outcome.SUCCESS,
    description: str = "",
    extra: Mapping[str, str] | None = None,
) -> AuditEvent:
    """Gateway start or stop (PS3.15 A.5.3.1 Application Activity)."""
    types = {"start": APPLICATION_START, "stop": APPLICATION_STOP}
    if kind not in types:
        raise ValueError("kind must be 'start' or 'stop'")
    return AuditEvent(
        event_id=APPLICATION_ACTIVITY,
        action=Action.EXECUTE,
        outcome=outcome,
        event_type_codes=(types[kind],),
        actor=actor,
        actor_kind=actor_kind,
        description=description or f"application {kind}",
        extra=extra or {},
    )
