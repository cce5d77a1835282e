"""One verification entry point for every signed artifact (R-SIG-8, R-SIG-1).

:func:`verify_file` recognises a DICOM Part 10 file (``DICM`` after the
preamble, PS3.10 §7.1), a PDF (``%PDF-``, ISO 32000-2 §7.5.2) or any other file
with its detached ``.p7s`` and returns a :class:`~signing.report.VerificationReport`
whose verdict applies the record type's signing policy:

* every signature intact; for PDFs no change after signing other than
  validation data and timestamps (pyHanko's difference analysis);
* chain to a configured anchor, not revoked at signing time, signer acceptable
  to the policy (hcRole present/allowed, nonRepudiation, valid then);
* a valid timestamp where the policy requires one;
* DICOM: the chosen profile's required attributes are covered;
* at least one signature where the policy requires a signature.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from pki.errors import VerificationError
from signing import cades, dicom_sig, pades
from signing.policy import RecordPolicy
from signing.report import SignatureReport, VerificationReport
from signing.trust import TrustConfig

__all__ = ["detect_kind", "judge", "verify_file"]

_ACCEPTED_PDF_CHANGES = {"NONE", "LTA_UPDATES", None}
_CODE_TEXT = {
    "no-role": "signer has no hcRole (HPKI qualification)",
    "role-not-allowed": "signer's hcRole is not allowed for this record type",
    "no-nonrepudiation": "signer certificate lacks nonRepudiation",
    "expired": "signer certificate was expired at signing time",
    "not-yet-valid": "signer certificate was not yet valid at signing time",
    "not-trusted": "signer certificate does not chain to a configured HPKI anchor",
    "revoked": "signer certificate was revoked at signing time",
    "revocation-unknown": "revocation status at signing time unknown",
    "key-usage": "signer certificate key usage not permitted",
    "weak-algorithm": "weak algorithm in the signer's chain",
}


def detect_kind(path: Path) -> str:
    """``"dicom"``, ``"pdf"`` or ``"other"`` from the first bytes of the file."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.lstrip()[:5] == b"%PDF-":
        return "pdf"
    return "other"


def judge(sig: SignatureReport, policy: RecordPolicy) -> list[str]:
    """Every reason ``sig`` fails ``policy`` (empty: it passes)."""
    problems: list[str] = []
    if not sig.intact:
        problems.append(f"integrity: {sig.integrity_problem or 'signature does not verify'}")
    if sig.kind == "pades":
        level = sig.details.get("modification_level")
        if level not in _ACCEPTED_PDF_CHANGES:
            problems.append(f"document modified after signing ({level})")
    if sig.kind == "document-timestamp":
        if not sig.chain_ok:
            problems.append(f"document timestamp: {sig.chain_problem}")
        return problems
    codes = set(sig.details.get("signer_check", {}).get("codes", []))
    for code in sorted(codes):
        problems.append(_CODE_TEXT.get(code, f"signer check failed: {code}"))
    if not sig.chain_ok and "not-trusted" not in codes:
        problems.append(f"chain: {sig.chain_problem or 'not trusted'}")
    if sig.revocation == "revoked" and "revoked" not in codes:
        problems.append(_CODE_TEXT["revoked"])
    bad_ts = [t.problem for t in sig.timestamps if not t.ok]
    if policy.timestamp_required and not sig.timestamp_ok:
        detail = f": {bad_ts[0]}" if bad_ts else ""
        problems.append(f"no valid timestamp{detail}")
    elif bad_ts:
        problems.append(f"timestamp invalid: {bad_ts[0]}")
    uncovered = sig.coverage.get("profile_uncovered")
    if uncovered:
        problems.append(f"{sig.coverage.get('profile')} profile attributes not signed: {uncovered}")
    return problems


async def verify_file(
    path: Path | str,
    *,
    p7s: Path | str | None = None,
    trust: TrustConfig,
    policy: RecordPolicy | None = None,
) -> VerificationReport:
    """Verify the signatures of ``path`` and judge them against ``policy``.

    Raises :class:`VerificationError` only when the file cannot be read as the
    kind it claims to be; a bad signature is a report with problems.
    """
    path = Path(path)
    policy = policy or RecordPolicy(record_type="unspecified")
    record = None if policy.record_type == "unspecified" else policy.record_type
    try:
        kind = await asyncio.to_thread(detect_kind, path)
    except OSError as exc:
        raise VerificationError(f"cannot read {path}: {exc.strerror}") from exc
    if kind == "dicom":
        try:
            ds = await asyncio.to_thread(pydicom.dcmread, path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise VerificationError(f"{path} is not a readable DICOM file: {exc}") from exc
        sigs = await dicom_sig.verify_dataset(ds, trust, policy=policy)
        report = VerificationReport(path=str(path), artifact="dicom", record_type=record)
    elif kind == "pdf":
        data = await asyncio.to_thread(path.read_bytes)
        sigs = await pades.verify_pdf(data, trust, policy=policy)
        report = VerificationReport(path=str(path), artifact="pdf", record_type=record)
    else:
        sig_path = Path(p7s) if p7s else path.with_name(path.name + ".p7s")
        report = VerificationReport(path=str(path), artifact="file+p7s", record_type=record)
        if not sig_path.is_file():
            if policy.signature_required:
                report.problems.append(f"no detached signature {sig_path.name}")
            return report
        data = await asyncio.to_thread(path.read_bytes)
        sig = await asyncio.to_thread(sig_path.read_bytes)
        sigs = await cades.verify_detached(data, sig, trust, policy=policy)
        report.details["signature_file"] = str(sig_path)
    for sig_report in sigs:
        sig_report.problems = judge(sig_report, policy)
    report.signatures = sigs
    signer_sigs = [s for s in sigs if s.kind != "document-timestamp"]
    if policy.signature_required and not signer_sigs:
        report.problems.append("no signature, but the signing policy requires one")
    return report
