"""Detached CAdES-T signatures (``.p7s``) for files that are neither DICOM nor PDF (R-SIG-4).

A CMS ``SignedData`` (RFC 5652 §5) without encapsulated content, with the
CAdES baseline signed attributes (content-type, message-digest, signing-time,
signing-certificate-v2: ETSI EN 319 122-1 §5.2) and the signature-time-stamp
unsigned attribute (id-aa-signatureTimeStampToken, RFC 3161 Appendix A;
ETSI EN 319 122-1 §5.3), produced by pyHanko's ``async_sign_general_data``.
The timestamp comes through :class:`signing.tsa.SekishoTimeStamper`, so its
nonce, imprint, signature and TSA chain are checked before it is embedded.

``openssl cms -verify -binary -content FILE -inform DER -in FILE.p7s`` verifies
the result; :func:`verify_detached` reports integrity, signer, hcRole, chain
and revocation at the timestamp time, and the timestamp (R-SIG-8).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import IO

from asn1crypto import cms
from pyhanko.sign.general import SigningError as PyHankoSigningError
from pyhanko.sign.timestamps import TimestampRequestError
from pyhanko.sign.validation import async_validate_detached_cms
from pyhanko.sign.validation.errors import SignatureValidationError

from pki.errors import SigningError, TimestampError, VerificationError
from signing.cms_status import describe_signer_and_timestamp
from signing.policy import RecordPolicy, check_signer
from signing.report import SignatureReport
from signing.signers import SekishoSigner
from signing.trust import TrustConfig
from signing.tsa import SekishoTimeStamper

__all__ = ["signature_timestamp_tokens", "sign_detached", "verify_detached"]


async def sign_detached(
    data: bytes | IO[bytes],
    signer: SekishoSigner,
    timestamper: SekishoTimeStamper | None,
) -> bytes:
    """DER of a detached CAdES-T signature over ``data`` (CAdES-B without timestamper)."""
    try:
        ci = await signer.pyhanko.async_sign_general_data(
            data, "sha256", detached=True, use_cades=True, timestamper=timestamper
        )
    except TimestampError:
        raise
    except TimestampRequestError as exc:
        raise TimestampError(f"signature timestamp failed: {exc}") from exc
    except PyHankoSigningError as exc:
        raise SigningError(f"CAdES signing failed: {exc}") from exc
    return ci.dump()


def signature_timestamp_tokens(p7s: bytes) -> list[bytes]:
    """DER of each signature-time-stamp token in the (single) SignerInfo."""
    sd = cms.ContentInfo.load(p7s)["content"]
    out: list[bytes] = []
    for si in sd["signer_infos"]:
        for attr in si["unsigned_attrs"] or []:
            if attr["type"].native == "signature_time_stamp_token":
                out.extend(v.dump() for v in attr["values"])
    return out


async def verify_detached(
    data: bytes | IO[bytes],
    p7s: bytes,
    trust: TrustConfig,
    *,
    policy: RecordPolicy | None = None,
) -> list[SignatureReport]:
    """Verify a detached CMS/CAdES signature over ``data`` (R-SIG-8)."""
    policy = policy or RecordPolicy(record_type="unspecified")
    try:
        ci = cms.ContentInfo.load(p7s)
        if ci["content_type"].native != "signed_data":
            raise VerificationError(".p7s does not hold a CMS SignedData")
        sd = ci["content"]
        sd["signer_infos"].native  # noqa: B018 - refuse malformed structures now
    except (ValueError, TypeError, KeyError) as exc:
        raise VerificationError(f".p7s is not a readable CMS signature: {exc}") from exc
    report = SignatureReport(kind="cades", intact=False)
    raw = data if isinstance(data, bytes) else data.read()
    report.coverage = {"content_sha256": hashlib.sha256(raw).hexdigest(), "detached": True}
    try:
        status = await async_validate_detached_cms(
            raw,
            sd,
            signer_validation_context=trust.signer_context(),
            ts_validation_context=trust.tsa_context(),
        )
    except SignatureValidationError as exc:
        report.integrity_problem = f"signature invalid: {exc}"
        return [report]
    report.intact = bool(status.intact and status.valid)
    if not report.intact:
        report.integrity_problem = "file content does not match the signature"
    cert = status.signing_cert
    describe_signer_and_timestamp(report, status)
    at = report.signing_time or datetime.now(UTC)
    check = await check_signer(policy, cert, at, trust.signer_context(at))
    report.chain_ok = check.chain_ok
    report.revocation = check.revocation
    report.details["signer_check"] = {
        "ok": check.ok,
        "codes": sorted(check.codes),
        "reasons": list(check.reasons),
    }
    if not check.chain_ok:
        report.chain_problem = "; ".join(check.reasons) or "no path to a trust anchor"
    return [report]
