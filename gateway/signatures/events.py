"""Audit records of signing, verification and sealing (R-SIG-8, R-AUD-1, R-AUD-2, R-AUD-5).

Vocabulary (PS3.15 A.5, as the digitization workflow uses it):

* a signature added to a record, or refused: EventID *DICOM Instances
  Accessed* (110103), EventActionCode ``U`` (the record gains a signature),
  outcome 0 or the error's audit outcome (``pki.errors``);
* a verification: the same EventID with action ``R``; outcome 0 when the
  artifact is valid under the policy, 4 when it is not, 8 when unreadable;
* a local clock too far from the TSA's (R-AUD-5) and a failed seal of the
  audit chain (R-AUD-2): *Security Alert* (110113) with the reason codes
  ``clock-skew`` and ``audit-seal-failed`` (EventTypeCode Node Authentication:
  the TSA is the remote node whose answer failed or disagreed).

The requestor (``actor``) is the operator; the signer is named by its
certificate subject and SHA-256 fingerprint.  Patient identity goes only in
the patient fields (ID and issuer, never the name); descriptions are plain
words without patient data.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.audit import events as ev

__all__ = [
    "clock_skew_alert",
    "seal_failure_alert",
    "signature_event",
    "verification_event",
]

#: Longest free-text value kept in an audit record's ``extra``.
_MAX_TEXT = 300


def _clean(extra: Mapping[str, object]) -> dict[str, str]:
    """String values only, empty ones dropped, long ones cut."""
    return {k: str(v)[:_MAX_TEXT] for k, v in extra.items() if v not in (None, "")}


def signature_event(
    *,
    actor: str,
    outcome: int,
    kind: str,
    record_type: str,
    description: str,
    patient_id: str | None = None,
    patient_issuer: str | None = None,
    study_uid: str | None = None,
    signer_sha256: str | None = None,
    reason_code: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> ev.AuditEvent:
    """A signature created (outcome 0) or refused (R-SIG-1, R-SIG-4, R-DIG-4)."""
    return ev.AuditEvent(
        event_id=ev.INSTANCES_ACCESSED,
        action=ev.Action.UPDATE,
        outcome=outcome,
        actor=actor,
        actor_kind="user",
        actor_cert_sha256=signer_sha256,
        patient_id=patient_id or None,
        patient_issuer=(patient_issuer or None) if patient_id else None,
        study_uids=(study_uid,) if study_uid else (),
        instance_count=1 if kind == "dicom" and outcome == ev.Outcome.SUCCESS else 0,
        description=description,
        reason_code=reason_code,
        extra=_clean({"kind": kind, "record_type": record_type, **(extra or {})}),
    )


def verification_event(
    *,
    actor: str,
    outcome: int,
    artifact: str,
    record_type: str | None,
    description: str,
    patient_id: str | None = None,
    patient_issuer: str | None = None,
    study_uid: str | None = None,
    reason_code: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> ev.AuditEvent:
    """A verification and its verdict (R-SIG-8)."""
    return ev.AuditEvent(
        event_id=ev.INSTANCES_ACCESSED,
        action=ev.Action.READ,
        outcome=outcome,
        actor=actor,
        actor_kind="user",
        patient_id=patient_id or None,
        patient_issuer=(patient_issuer or None) if patient_id else None,
        study_uids=(study_uid,) if study_uid else (),
        description=description,
        reason_code=reason_code,
        extra=_clean({"artifact": artifact, "record_type": record_type or "", **(extra or {})}),
    )


def clock_skew_alert(
    *, tsa: str, skew_seconds: float, bound_seconds: float, during: str
) -> ev.AuditEvent:
    """The local clock differs from the TSA's genTime beyond the bound (R-AUD-5)."""
    return ev.security_alert(
        "clock-skew",
        f"local clock differs from TSA time by {skew_seconds:+.3f} s "
        f"(bound {bound_seconds:g} s) during {during}",
        actor="sekisho",
        actor_kind="system",
        extra=_clean(
            {"tsa": tsa, "skew_seconds": f"{skew_seconds:.3f}", "bound_seconds": bound_seconds}
        ),
    )


def seal_failure_alert(reason: str, *, actor: str = "sekisho", code: str = "") -> ev.AuditEvent:
    """The audit chain head could not be sealed with an RFC 3161 timestamp (R-AUD-2)."""
    return ev.security_alert(
        "audit-seal-failed",
        "the audit trail could not be sealed with an RFC 3161 timestamp",
        actor=actor,
        actor_kind="user" if actor != "sekisho" else "system",
        outcome=ev.Outcome.SERIOUS_FAILURE,
        extra=_clean({"reason": reason, "error_code": code}),
    )
