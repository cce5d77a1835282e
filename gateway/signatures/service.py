"""``sekisho sign`` and ``sekisho verify``: the signing library with every outcome audited.

:func:`sign_and_audit` wraps :func:`signing.cli.cmd_sign` (policy first, then
signature and timestamp, output written atomically) and
:func:`verify_and_audit` wraps :func:`signing.cli.cmd_verify`.  Around them the
gateway does what the library must not (STYLE "thin edges"):

* it names the signer before signing (certificate subject, SHA-256 and hcRole),
  so that a refusal is audited with who was refused (R-SIG-2);
* it audits success and refusal alike (R-SIG-8, R-AUD-1): record type, kind,
  outcome, signer and operator, and for DICOM the patient ID and study, never
  the patient's name;
* a TSA whose genTime differs from the local clock beyond the bound raises a
  Security Alert (R-AUD-5);
* if the success cannot be audited, the signed output is removed: an action
  that cannot be audited does not happen.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from gateway.audit import events as ev
from gateway.audit.trail import AuditTrail
from gateway.signatures.config import load_signing_settings
from gateway.signatures.events import clock_skew_alert, signature_event, verification_event
from pki import hpki
from pki.errors import AuditWriteError, SekishoError
from signing.cli import Kind, cmd_sign, cmd_verify
from signing.report import VerificationReport
from signing.signers import PinPrompt, SignerSpec, open_signer
from signing.verify import detect_kind

__all__ = [
    "RecordFacts",
    "SignerIdentity",
    "dicom_facts",
    "sign_and_audit",
    "signer_identity",
    "verify_and_audit",
]

_FACT_TAGS = ("PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SOPInstanceUID")


@dataclass(frozen=True)
class RecordFacts:
    """What the audit record says about the record's subject (no names)."""

    patient_id: str | None = None
    patient_issuer: str | None = None
    study_uid: str | None = None
    sop_uid: str | None = None


def dicom_facts(path: Path) -> RecordFacts:
    """Patient ID, issuer, study and SOP instance UID from a DICOM header, if readable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_FACT_TAGS))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the signer/verifier
        return RecordFacts()

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value).strip() or None if value is not None else None

    return RecordFacts(
        text("PatientID"),
        text("IssuerOfPatientID"),
        text("StudyInstanceUID"),
        text("SOPInstanceUID"),
    )


@dataclass(frozen=True)
class SignerIdentity:
    """The signer as its certificate names it (R-SIG-2)."""

    subject: str
    sha256: str
    hc_role: str | None


async def signer_identity(spec: SignerSpec, prompt: PinPrompt | None) -> SignerIdentity:
    """Open the signer once to read its certificate (the key is not used)."""
    async with await open_signer(spec, pin_prompt=prompt) as signer:
        cert = signer.certificate
        try:
            role = hpki.hc_role(cert)
        except SekishoError:
            role = None  # a malformed hcRole is refused, with its reason, by the policy check
        return SignerIdentity(
            cert.subject.human_friendly, hashlib.sha256(cert.dump()).hexdigest(), role
        )


class _PromptOnce:
    """Ask for the PIN once although the token is opened twice (identity, then signing)."""

    def __init__(self, ask: PinPrompt) -> None:
        self._ask = ask
        self._pin: str | None = None

    def __call__(self, text: str) -> str:
        if self._pin is None:
            self._pin = self._ask(text)
        return self._pin


async def _record(trail: AuditTrail, event: ev.AuditEvent) -> None:
    await asyncio.to_thread(trail.record, event)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


async def sign_and_audit(
    trail: AuditTrail,
    settings: Any,
    *,
    kind: Kind,
    inp: Path,
    out: Path,
    signer: str | SignerSpec,
    purpose: str | None,
    record_type: str,
    operator: str,
    pin_prompt: PinPrompt | None = None,
) -> dict[str, Any]:
    """Sign ``inp`` into ``out`` under the record type's policy; audit the outcome.

    ``settings`` is the gateway's :class:`~gateway.settings.Settings`.  Raises
    the library's :class:`SekishoError` after auditing a refusal; ``out`` then
    does not exist.
    """
    facts = await asyncio.to_thread(dicom_facts, inp) if kind == "dicom" else RecordFacts()
    identity: SignerIdentity | None = None
    common: dict[str, Any] = {
        "actor": operator,
        "kind": kind,
        "record_type": record_type,
        "patient_id": facts.patient_id,
        "patient_issuer": facts.patient_issuer,
    }
    try:
        signing = load_signing_settings(settings)
        spec = SignerSpec.parse(signer) if isinstance(signer, str) else signer
        prompt: PinPrompt | None = None
        if spec.kind == "pkcs11" and spec.pin_file is None:
            prompt = _PromptOnce(pin_prompt or getpass.getpass)
        identity = await signer_identity(spec, prompt)
        result = await cmd_sign(
            kind, inp, out, spec, purpose, record_type, signing, pin_prompt=prompt
        )
    except Exception as exc:
        failure = exc if isinstance(exc, SekishoError) else None
        await _record(
            trail,
            signature_event(
                **common,
                study_uid=facts.study_uid,
                outcome=failure.audit_outcome if failure else ev.Outcome.SERIOUS_FAILURE,
                description=f"{kind} signature refused",
                signer_sha256=identity.sha256 if identity else None,
                reason_code=failure.code.lower() if failure else "internal-error",
                extra={
                    "signer": identity.subject if identity else "",
                    "hc_role": identity.hc_role if identity else "",
                    "reason": failure.message if failure else type(exc).__name__,
                    "codes": failure.detail if failure else "",
                    "input": inp.name,
                    "sop_uid": facts.sop_uid,
                },
            ),
        )
        raise
    assert identity is not None  # set before cmd_sign
    stamp = result["timestamps"][0] if result["timestamps"] else {}
    try:
        await _record(
            trail,
            signature_event(
                **common,
                study_uid=facts.study_uid,
                outcome=ev.Outcome.SUCCESS,
                description=f"{kind} signed",
                signer_sha256=identity.sha256,
                extra={
                    "signer": result["signer"],
                    "hc_role": result["hc_role"],
                    "purpose": result["purpose"]["code"],
                    "backend": result["backend"],
                    "output": out.name,
                    "output_sha256": result["output_sha256"],
                    "sop_uid": facts.sop_uid,
                    "signature_uid": result.get("signature_uid"),
                    "timestamp": stamp.get("gen_time"),
                    "tsa": stamp.get("tsa"),
                },
            ),
        )
    except AuditWriteError:
        await asyncio.to_thread(out.unlink, missing_ok=True)
        raise
    await _skew_alerts(trail, result["timestamps"], signing.max_clock_skew.total_seconds(), kind)
    return result


async def _skew_alerts(
    trail: AuditTrail, stamps: list[dict[str, Any]], bound: float, kind: str
) -> None:
    for stamp in stamps:
        if stamp.get("skew_alert"):
            await _record(
                trail,
                clock_skew_alert(
                    tsa=str(stamp.get("tsa", "")),
                    skew_seconds=float(stamp["clock_skew_seconds"]),
                    bound_seconds=bound,
                    during=f"{kind} signing",
                ),
            )


_VERDICT_OUTCOME: dict[int, int] = {
    0: ev.Outcome.SUCCESS,
    1: ev.Outcome.MINOR_FAILURE,
    2: ev.Outcome.SERIOUS_FAILURE,
}


def _summary(report: dict[str, Any]) -> dict[str, object]:
    sigs = report.get("signatures", [])
    signers = sorted({s.get("signer_subject") or "" for s in sigs} - {""})
    problems = [*report.get("problems", []), *(p for s in sigs for p in s.get("problems", []))]
    return {
        "verdict": report.get("verdict", ""),
        "signatures": str(len(sigs)),
        "signers": " | ".join(signers),
        "problems": "; ".join(problems),
    }


async def verify_and_audit(
    trail: AuditTrail,
    settings: Any,
    *,
    path: Path,
    p7s: Path | None,
    record_type: str | None,
    operator: str,
) -> tuple[int, dict[str, Any]]:
    """Verify ``path`` (and its ``.p7s``); audit the verdict; return (exit code, report).

    The exit code is 0 when valid under the policy, 1 when not, 2 when the
    file cannot be read as what it claims to be.
    """
    artifact = "file"
    facts = RecordFacts()
    common: dict[str, Any] = {"actor": operator, "record_type": record_type}
    try:
        artifact = await asyncio.to_thread(detect_kind, path)
    except OSError:
        artifact = "unreadable"  # cmd_verify reports why, with exit code 2
    if artifact == "dicom":
        facts = await asyncio.to_thread(dicom_facts, path)
    try:
        signing = load_signing_settings(settings)
        code, report = await cmd_verify(path, settings=signing, record_type=record_type, p7s=p7s)
    except Exception as exc:
        failure = exc if isinstance(exc, SekishoError) else None
        await _record(
            trail,
            verification_event(
                **common,
                artifact=artifact,
                outcome=failure.audit_outcome if failure else ev.Outcome.SERIOUS_FAILURE,
                description="verification refused",
                patient_id=facts.patient_id,
                patient_issuer=facts.patient_issuer,
                study_uid=facts.study_uid,
                reason_code=failure.code.lower() if failure else "internal-error",
                extra={
                    "reason": failure.message if failure else type(exc).__name__,
                    "file": path.name,
                },
            ),
        )
        raise
    data = report.to_dict() if isinstance(report, VerificationReport) else dict(report)
    evidence = path.with_name(path.name + ".ers")
    if artifact == "dicom" and code != 2 and evidence.is_file():
        # R-SIG-6: follow the Evidence Record kept beside the object.
        from signing.renew import verify_dicom_long_term

        long_term = await verify_dicom_long_term(
            await asyncio.to_thread(path.read_bytes),
            await asyncio.to_thread(evidence.read_bytes),
            signing.trust,
            policy=signing.policy.for_record(record_type) if record_type else None,
        )
        data["long_term"] = long_term.to_dict()
        if not long_term.ok and code == 0:
            code = 1
            data["verdict"] = "invalid"
    sha = await asyncio.to_thread(_file_sha256, path) if code != 2 else ""
    await _record(
        trail,
        verification_event(
            **common,
            artifact=str(data.get("artifact", artifact)),
            outcome=_VERDICT_OUTCOME.get(code, ev.Outcome.SERIOUS_FAILURE),
            description=f"signatures verified: {data.get('verdict', 'unreadable')}",
            patient_id=facts.patient_id,
            patient_issuer=facts.patient_issuer,
            study_uid=facts.study_uid,
            reason_code=None if code == 0 else f"verdict-{data.get('verdict', 'unreadable')}",
            extra={
                "file": path.name,
                "file_sha256": sha,
                "sop_uid": facts.sop_uid,
                **_summary(data),
            },
        ),
    )
    return code, data
