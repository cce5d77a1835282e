"""PAdES signatures for scanned records: B-LTA signing and verification (R-SIG-4, R-SIG-6).

Signing (ETSI EN 319 142-1 §6.3 baseline levels) with pyHanko's async API:

* B-B/B-T: a CMS signature (``ETSI.CAdES.detached``) with a signature
  timestamp (RFC 3161 token in the ``signature-time-stamp`` unsigned
  attribute, ETSI EN 319 122-1 §5.3) from the configured TSA;
* B-LT: the validation data for the signer's and the TSA's chains (the
  certificates, CRLs and OCSP responses gathered while validating them at
  signing time) go into the Document Security Store (ISO 32000-2 §12.8.4.3);
* B-LTA: a document timestamp (``ETSI.RFC3161``) covers everything above.

The signer's certificate is validated *before* anything is written, so an
untrusted or revoked certificate or an unreachable TSA never leaves a
half-signed file (the caller writes to a temporary file and renames).

Verification reports, per signature and document timestamp, integrity (the
byte ranges and whether they cover the whole file), signer and hcRole, chain
and revocation at signing time using the embedded DSS, and the timestamps.
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime
from typing import Any

from pyhanko.pdf_utils.decode_limits import DecodePurpose
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.fields import SigSeedSubFilter
from pyhanko.sign.general import SigningError as PyHankoSigningError
from pyhanko.sign.signers import PdfSignatureMetadata, PdfSigner, PdfTimeStamper
from pyhanko.sign.timestamps import TimestampRequestError
from pyhanko.sign.validation import (
    DocumentSecurityStore,
    async_validate_pdf_signature,
    async_validate_pdf_timestamp,
)
from pyhanko.sign.validation.errors import SignatureValidationError
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathValidationError

from pki.errors import SigningError, TimestampError, VerificationError
from signing.cms_status import describe_signer_and_timestamp
from signing.policy import RecordPolicy, check_signer
from signing.report import SignatureReport, TimestampReport
from signing.signers import SekishoSigner
from signing.trust import TrustConfig, reason_for_exception, reason_for_subindication
from signing.tsa import SekishoTimeStamper

__all__ = ["renew_archive_timestamp", "sign_pdf", "verify_pdf"]

DEFAULT_FIELD = "SekishoSignature"


def _signing_context(trust: TrustConfig) -> ValidationContext:
    """One context trusting the HPKI and TSA anchors: pyHanko validates the
    signer and the TSA with it and embeds what it used (B-LT)."""
    return ValidationContext(
        trust_roots=[*trust.signer_anchors, *trust.tsa_anchors],
        other_certs=list(trust.intermediates),
        crls=list(trust.crls),
        allow_fetching=trust.allow_fetching,
        revocation_mode=trust.revocation.value,
    )


async def sign_pdf(
    data: bytes,
    signer: SekishoSigner,
    trust: TrustConfig,
    timestamper: SekishoTimeStamper,
    *,
    field_name: str = DEFAULT_FIELD,
    reason: str | None = None,
    location: str | None = None,
    lta: bool = True,
) -> bytes:
    """Sign ``data`` (a PDF) as PAdES B-LTA (``lta=False``: B-LT) and return the new PDF.

    pyHanko failures are mapped to :class:`SigningError`/:class:`TimestampError`.
    """
    meta = PdfSignatureMetadata(
        field_name=field_name,
        md_algorithm="sha256",
        subfilter=SigSeedSubFilter.PADES,
        embed_validation_info=True,
        use_pades_lta=lta,
        validation_context=_signing_context(trust),
        reason=reason,
        location=location,
    )
    pdf_signer = PdfSigner(meta, signer=signer.pyhanko, timestamper=timestamper)
    out = io.BytesIO()
    try:
        writer = IncrementalPdfFileWriter(io.BytesIO(data), strict=True)
        await pdf_signer.async_sign_pdf(writer, output=out)
    except TimestampError:
        raise
    except TimestampRequestError as exc:
        raise TimestampError(f"timestamp for PAdES signature failed: {exc}") from exc
    except (PathBuildingError, PathValidationError) as exc:
        reason = reason_for_exception(exc)
        raise SigningError(f"signer or TSA certificate refused by validation: {reason}") from exc
    except (PyHankoSigningError, PdfError, ValueError) as exc:
        cause = exc.__cause__
        if isinstance(cause, PathBuildingError | PathValidationError):
            reason = reason_for_exception(cause)
            raise SigningError(f"signer certificate refused by validation: {reason}") from exc
        raise SigningError(f"PAdES signing failed: {exc}") from exc
    return out.getvalue()


async def renew_archive_timestamp(
    data: bytes, trust: TrustConfig, timestamper: SekishoTimeStamper
) -> bytes:
    """Add validation data for the last document timestamp and a new one (R-SIG-6).

    ETSI EN 319 142-1 §5.5 (B-LTA): run before the TSA certificate or the hash
    algorithm of the newest timestamp expires, for the whole retention period.
    """
    out = io.BytesIO()
    try:
        reader = PdfFileReader(io.BytesIO(data), strict=True)
        await PdfTimeStamper(timestamper).async_update_archival_timestamp_chain(
            reader, _signing_context(trust), in_place=False, output=out
        )
    except TimestampError:
        raise
    except TimestampRequestError as exc:
        raise TimestampError(f"archive timestamp failed: {exc}") from exc
    except (PyHankoSigningError, PdfError, ValueError, SignatureValidationError) as exc:
        raise SigningError(f"archive timestamp renewal failed: {exc}") from exc
    return out.getvalue()


def _dss_material(reader: PdfFileReader) -> tuple[list[Any], list[Any], list[Any]]:
    try:
        dss = DocumentSecurityStore.read_dss(reader)
    except Exception:  # noqa: BLE001 - no DSS (or unreadable) means no embedded revinfo
        return [], [], []
    certs = list(dss.load_certs())
    crls = [ref.get_object().read_data(DecodePurpose.CRL) for ref in dss.crls]
    ocsps = [ref.get_object().read_data(DecodePurpose.OCSP_RESPONSE) for ref in dss.ocsps]
    return certs, crls, ocsps


def _coverage(emb: Any, file_size: int) -> dict[str, Any]:
    byte_range = [int(x) for x in emb.sig_object["/ByteRange"]]
    end = byte_range[2] + byte_range[3]
    return {
        "byte_range": byte_range,
        "covered_bytes": byte_range[1] + byte_range[3],
        "revision_end": end,
        "file_size": file_size,
        "covers_whole_file": end == file_size,
    }


async def verify_pdf(
    data: bytes, trust: TrustConfig, *, policy: RecordPolicy | None = None
) -> list[SignatureReport]:
    """Verify every signature and document timestamp in a PDF (R-SIG-8)."""
    policy = policy or RecordPolicy(record_type="unspecified")
    try:
        reader = PdfFileReader(io.BytesIO(data), strict=False)
        embedded = list(reader.embedded_signatures)
    except (PdfError, ValueError) as exc:
        raise VerificationError(f"not a readable PDF: {exc}") from exc
    dss_certs, dss_crls, dss_ocsps = _dss_material(reader)
    reports: list[SignatureReport] = []
    for emb in embedded:
        if emb.sig_object_type == "/DocTimeStamp":
            reports.append(await _verify_doc_ts(emb, trust, len(data), dss_certs, dss_crls))
            continue
        reports.append(
            await _verify_signature(emb, trust, policy, len(data), dss_certs, dss_crls, dss_ocsps)
        )
    return reports


async def _verify_doc_ts(
    emb: Any, trust: TrustConfig, size: int, certs: list[Any], crls: list[Any]
) -> SignatureReport:
    report = SignatureReport(kind="document-timestamp", intact=False)
    report.coverage = _coverage(emb, size)
    report.details["field"] = emb.field_name
    vc = trust.tsa_context(other_certs=certs, crls=crls)
    try:
        status = await async_validate_pdf_timestamp(emb, validation_context=vc)
    except SignatureValidationError as exc:
        report.integrity_problem = f"document timestamp invalid: {exc}"
        return report
    report.intact = bool(status.intact and status.valid)
    if not report.intact:
        report.integrity_problem = "document timestamp does not match the document"
    cert = status.signing_cert
    report.signer_subject = cert.subject.human_friendly
    report.signer_sha256 = hashlib.sha256(cert.dump()).hexdigest()
    report.chain_ok = status.trusted
    if not status.trusted:
        report.chain_problem = f"TSA {reason_for_subindication(status.trust_problem_indic)}"
    report.signing_time = status.timestamp
    report.timestamps.append(
        TimestampReport(
            kind="document",
            ok=status.trusted,
            time=status.timestamp,
            tsa=report.signer_subject,
            problem=report.chain_problem,
        )
    )
    report.revocation = "good" if status.trusted else "unchecked"
    return report


async def _verify_signature(
    emb: Any,
    trust: TrustConfig,
    policy: RecordPolicy,
    size: int,
    certs: list[Any],
    crls: list[Any],
    ocsps: list[Any],
) -> SignatureReport:
    report = SignatureReport(kind="pades", intact=False)
    report.coverage = _coverage(emb, size)
    report.details["field"] = emb.field_name
    report.details["subfilter"] = str(emb.sig_object.get("/SubFilter", ""))
    vc = trust.signer_context(other_certs=certs, crls=crls, ocsps=ocsps)
    ts_vc = trust.tsa_context(other_certs=certs, crls=crls, ocsps=ocsps)
    try:
        status = await async_validate_pdf_signature(
            emb, signer_validation_context=vc, ts_validation_context=ts_vc
        )
    except SignatureValidationError as exc:
        report.integrity_problem = f"signature invalid: {exc}"
        return report
    report.intact = bool(status.intact and status.valid)
    if not report.intact:
        report.integrity_problem = "signed byte ranges do not match the signature"
    report.details["coverage_level"] = status.coverage.name if status.coverage else None
    report.details["modification_level"] = (
        status.modification_level.name if status.modification_level else None
    )
    cert = status.signing_cert
    describe_signer_and_timestamp(report, status)
    at = report.signing_time or datetime.now(UTC)
    check = await check_signer(
        policy, cert, at, trust.signer_context(at, other_certs=certs, crls=crls, ocsps=ocsps)
    )
    report.chain_ok = check.chain_ok
    report.revocation = check.revocation
    report.details["signer_check"] = {
        "ok": check.ok,
        "codes": sorted(check.codes),
        "reasons": list(check.reasons),
    }
    report.details["embedded_validation_data"] = {"crls": len(crls), "ocsps": len(ocsps)}
    if not check.chain_ok:
        report.chain_problem = "; ".join(check.reasons) or "no path to a trust anchor"
    return report
