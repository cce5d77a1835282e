"""DICOM Digital Signatures: create and verify (PS3.15 Annex C, PS3.3 C.12.1; R-SIG-3).

:func:`sign_dataset` adds one item to the MAC Parameters Sequence (4FFE,0001)
and one to the Digital Signatures Sequence (FFFA,FFFA) at the top level:

* MAC ID Number, MAC Calculation Transfer Syntax UID (Explicit VR Little
  Endian), MAC Algorithm ``SHA256`` and Data Elements Signed (0400,0020);
* Digital Signature UID, DateTime, Certificate Type ``X509_1993_SIG``,
  Certificate of Signer, Signature = RSASSA-PKCS1-v1_5 over the SHA-256 MAC of
  the stream of :mod:`signing.dicom_stream` (ECDSA for EC keys);
* Digital Signature Purpose Code Sequence (0400,0401) with an ASTM E1762
  purpose (coding scheme ``ASTM-sigpurpose``, code values "1".."18");
* Certified Timestamp Type ``CMS_TSP`` and Certified Timestamp (0400,0310): an
  RFC 3161 token whose imprint is the SHA-256 of the Signature bytes.

Nothing is added until signature and timestamp both exist, so a failure leaves
the dataset as it was, and the signed attributes themselves are never touched
(the object is normalised to Explicit VR Little Endian first, so the stored
bytes are exactly the signed bytes).  :func:`verify_dataset` recomputes the
stream and reports, per signature, integrity, covered attributes, signer,
hcRole, chain and revocation at signing time, and the timestamp (R-SIG-8).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import pydicom
from asn1crypto import x509 as asn1_x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from pki.errors import SigningError, TimestampError
from signing.cms_status import describe_signer
from signing.dicom_stream import (
    EXPLICIT_VR_LE,
    PROFILE_REQUIRED,
    build_signature_stream,
    eligible_tags,
    profile_required_tags,
)
from signing.policy import DicomProfile, RecordPolicy, check_signer
from signing.report import SignatureReport, TimestampReport
from signing.signers import SekishoSigner
from signing.trust import TrustConfig
from signing.tsa import TsaClient, verify_token

__all__ = [
    "CERTIFICATE_TYPE",
    "DicomSignatureReport",
    "PURPOSES",
    "TIMESTAMP_TYPE",
    "normalize",
    "sign_dataset",
    "verify_dataset",
]

#: One DICOM signature's report: a :class:`SignatureReport` with ``kind="dicom"``,
#: ``coverage["covered_attributes"]`` and ``details`` (UID, MAC ID, MAC algorithm
#: and transfer syntax, purpose, location of the signed item).
DicomSignatureReport = SignatureReport

CERTIFICATE_TYPE = "X509_1993_SIG"
TIMESTAMP_TYPE = "CMS_TSP"
_PURPOSE_SCHEME = "ASTM-sigpurpose"
#: ASTM E1762-95(2013) signature purposes as DICOM codes (PS3.16 CID 7007).
PURPOSES: dict[str, str] = {
    "1": "Author's Signature",
    "2": "Coauthor's Signature",
    "3": "Co-participant's Signature",
    "4": "Transcriptionist/Recorder Signature",
    "5": "Verification Signature",
    "6": "Validation Signature",
    "7": "Consent Signature",
    "8": "Signature Witness Signature",
    "9": "Event Witness Signature",
    "10": "Identity Witness Signature",
    "11": "Consent Witness Signature",
    "12": "Interpreter Signature",
    "13": "Review Signature",
    "14": "Source Signature",
    "15": "Addendum Signature",
    "16": "Modification Signature",
    "17": "Administrative (Error/Edit) Signature",
    "18": "Timestamp Signature",
}
_MAC_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
    "SHA1": hashes.SHA1,
}


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def normalize(ds: Dataset) -> FileDataset:
    """Re-encode ``ds`` as a Part 10 object in Explicit VR Little Endian.

    Encapsulated (compressed) objects keep their transfer syntax, which then
    is also the MAC Calculation Transfer Syntax.  The result is parsed from the
    written bytes, so signing covers exactly what will be stored.
    """
    meta = FileMetaDataset(getattr(ds, "file_meta", FileMetaDataset()))
    ts = UID(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    if not ts.is_compressed:
        ts = ExplicitVRLittleEndian
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise SigningError("dataset lacks SOP Class UID or SOP Instance UID")
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    body = Dataset(ds)
    body.file_meta = meta
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, body, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError) as exc:
        raise SigningError(f"dataset cannot be encoded: {exc}") from exc
    buf.seek(0)
    return pydicom.dcmread(buf)


def _mac_transfer_syntax(ds: FileDataset) -> str:
    ts = UID(ds.file_meta.TransferSyntaxUID)
    return str(ts) if ts.is_compressed else EXPLICIT_VR_LE


def _now_dt(now: datetime | None) -> str:
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y%m%d%H%M%S.%f") + "+0000"


def _parse_dt(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = pydicom.valuerep.DT(str(value))
    except (ValueError, TypeError):
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _next_mac_id(ds: Dataset) -> int:
    used = {
        int(item.MACIDNumber)
        for seq in ("MACParametersSequence", "DigitalSignaturesSequence")
        for item in ds.get(seq, [])
        if "MACIDNumber" in item
    }
    return next(i for i in range(0x10000) if i not in used)


def _select_tags(ds: FileDataset, profile: DicomProfile, tags: Iterable[int] | None) -> list[int]:
    required = profile_required_tags(profile.value, ds)
    if profile is not DicomProfile.ALL:
        missing = [t for t in PROFILE_REQUIRED if t not in ds]
        if missing:
            names = ", ".join(keyword_for_tag(t) or _tag_text(t) for t in sorted(missing))
            raise SigningError(f"{profile.value} RSA profile requires {names}")
    if tags is None:
        return [int(t) for t in eligible_tags(ds)]
    chosen = {int(t) for t in tags} | set(required)
    return sorted(chosen)


def _unpadded(signature: bytes) -> bytes:
    """An ECDSA ``Ecdsa-Sig-Value`` (DER) without the pad byte PS3.5 §7.1.1 adds to an
    odd-length OB value; RSA signatures (even length) are returned unchanged."""
    if len(signature) % 2 == 0 and len(signature) > 2 and signature[0] == 0x30:
        first = signature[1]
        if first < 0x80:
            total = 2 + first
        else:
            count = first & 0x7F
            total = 2 + count + int.from_bytes(signature[2 : 2 + count], "big")
        if total == len(signature) - 1 and signature[-1] == 0:
            return signature[:-1]
    return signature


def _verify_raw(cert: asn1_x509.Certificate, signature: bytes, data: bytes, algo: str) -> bool:
    key = serialization.load_der_public_key(cert.public_key.dump())
    h = _MAC_HASHES[algo]()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), h)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(h))
        else:
            return False
    except InvalidSignature:
        return False
    return True


async def sign_dataset(
    ds: Dataset,
    signer: SekishoSigner,
    profile: DicomProfile | str = DicomProfile.CREATOR,
    purpose: str | None = "1",
    timestamper: TsaClient | None = None,
    *,
    tags: Iterable[int] | None = None,
    now: datetime | None = None,
) -> FileDataset:
    """Return a copy of ``ds`` with one more PS3.15 Annex C signature.

    ``profile`` selects the Creator/Authorization RSA profile requirements (or
    ``"all"``); without ``tags`` every eligible attribute is signed, with
    ``tags`` those plus the profile's required-if-present attributes.
    ``purpose`` is an ASTM code value ("1" = Author's Signature) or ``None``.
    With ``timestamper`` a Certified Timestamp is obtained; if that fails
    :class:`TimestampError` propagates and nothing is signed.
    """
    profile = DicomProfile(profile)
    if purpose is not None and purpose not in PURPOSES:
        raise SigningError(f"unknown signature purpose {purpose!r} (ASTM codes 1..18)")
    work = await asyncio.to_thread(normalize, ds)
    selected = _select_tags(work, profile, tags)
    if not selected:
        raise SigningError("nothing to sign: no eligible attribute in the dataset")

    item = Dataset()
    item.MACIDNumber = _next_mac_id(work)
    item.DigitalSignatureUID = generate_uid()
    item.DigitalSignatureDateTime = _now_dt(now)
    item.CertificateType = CERTIFICATE_TYPE
    item.CertificateOfSigner = signer.certificate.dump()
    if purpose is not None:
        code = Dataset()
        code.CodeValue = purpose
        code.CodingSchemeDesignator = _PURPOSE_SCHEME
        code.CodeMeaning = PURPOSES[purpose]
        item.DigitalSignaturePurposeCodeSequence = [code]

    stream, encoded = await asyncio.to_thread(build_signature_stream, work, selected, item)
    signature = await signer.sign_raw(stream, "sha256")
    if not await asyncio.to_thread(_verify_raw, signer.certificate, signature, stream, "SHA256"):
        raise SigningError("the signer produced a signature that does not verify")
    item.Signature = signature
    if timestamper is not None:
        result = await timestamper.timestamp(signature)
        item.CertifiedTimestampType = TIMESTAMP_TYPE
        item.CertifiedTimestamp = result.token.der

    mac = Dataset()
    mac.MACIDNumber = item.MACIDNumber
    mac.MACCalculationTransferSyntaxUID = _mac_transfer_syntax(work)
    mac.MACAlgorithm = "SHA256"
    mac.DataElementsSigned = [BaseTag(t) for t in encoded]
    if "MACParametersSequence" not in work:
        work.MACParametersSequence = []
    if "DigitalSignaturesSequence" not in work:
        work.DigitalSignaturesSequence = []
    work.MACParametersSequence.append(mac)
    work.DigitalSignaturesSequence.append(item)
    return work


def _signature_items(ds: Dataset, where: str = "") -> Iterable[tuple[str, Dataset, Dataset]]:
    """(location, container, signature item) for every signature, nested ones included,
    skipping superseded signatures kept in Original Attributes Sequence (PS3.3 C.12.1.1.9)."""
    for item in ds.get("DigitalSignaturesSequence", []):
        yield (where or "main dataset", ds, item)
    for elem in ds:
        if elem.VR != "SQ" or elem.tag in (0xFFFAFFFA, 0x4FFE0001, 0x04000561):
            continue
        for i, sub in enumerate(elem.value):
            yield from _signature_items(sub, f"{where}{elem.keyword or elem.tag}[{i}].")


async def _verify_one(
    where: str,
    container: Dataset,
    item: Dataset,
    trust: TrustConfig,
    policy: RecordPolicy,
    little_endian_raw: bool,
) -> SignatureReport:
    report = SignatureReport(kind="dicom", intact=False)
    uid = str(item.get("DigitalSignatureUID", ""))
    mac_id = item.get("MACIDNumber")
    report.details.update(uid=uid, mac_id=mac_id, location=where.rstrip("."))
    report.claimed_time = _parse_dt(item.get("DigitalSignatureDateTime"))
    purpose = item.get("DigitalSignaturePurposeCodeSequence")
    if purpose:
        report.details["purpose"] = {
            "code": str(purpose[0].get("CodeValue", "")),
            "scheme": str(purpose[0].get("CodingSchemeDesignator", "")),
            "meaning": str(purpose[0].get("CodeMeaning", "")),
        }
    mac = next(
        (m for m in container.get("MACParametersSequence", []) if m.get("MACIDNumber") == mac_id),
        None,
    )
    try:
        cert = asn1_x509.Certificate.load(bytes(item.CertificateOfSigner))
        cert.subject.native  # noqa: B018 - parse what we rely on (not hcRole: pki.hpki does)
        cert.public_key.native  # noqa: B018
    except (AttributeError, ValueError, TypeError):
        report.integrity_problem = "no readable Certificate of Signer"
        return report
    describe_signer(report, cert)
    if item.get("CertificateType") != CERTIFICATE_TYPE:
        report.details["certificate_type"] = str(item.get("CertificateType"))
    signature = bytes(item.get("Signature", b""))
    if cert.public_key.algorithm == "ec":
        signature = _unpadded(signature)
    if mac is None or not signature:
        report.integrity_problem = "no MAC Parameters item or no Signature for this signature"
        return report
    algo = str(mac.get("MACAlgorithm", ""))
    ts_uid = str(mac.get("MACCalculationTransferSyntaxUID", ""))
    tags = [int(t) for t in mac.get("DataElementsSigned", [])]
    report.details.update(mac_algorithm=algo, mac_transfer_syntax=ts_uid)
    present = {int(t) for t in container.keys()}
    report.coverage = {
        "covered_attributes": [
            {"tag": _tag_text(t), "keyword": keyword_for_tag(t) or ""} for t in tags
        ],
        "listed_but_absent": [_tag_text(t) for t in tags if t not in present],
    }
    required = profile_required_tags(policy.dicom_profile.value, container)
    report.coverage["profile"] = policy.dicom_profile.value
    report.coverage["profile_uncovered"] = sorted(_tag_text(t) for t in required - set(tags))
    if algo not in _MAC_HASHES:
        report.integrity_problem = f"unsupported MAC algorithm {algo!r}"
    elif ts_uid != EXPLICIT_VR_LE and not UID(ts_uid).is_compressed:
        report.integrity_problem = f"unsupported MAC transfer syntax {ts_uid}"
    else:
        try:
            stream, _ = await asyncio.to_thread(
                build_signature_stream, container, tags, item, little_endian_raw=little_endian_raw
            )
            report.intact = await asyncio.to_thread(_verify_raw, cert, signature, stream, algo)
            if not report.intact:
                report.integrity_problem = "signature does not match the signed attributes"
        except SigningError as exc:
            report.integrity_problem = exc.message

    if "CertifiedTimestamp" in item:
        ts_type = str(item.get("CertifiedTimestampType", ""))
        if ts_type != TIMESTAMP_TYPE:
            report.timestamps.append(
                TimestampReport(kind="certified", ok=False, problem=f"timestamp type {ts_type!r}")
            )
        else:
            try:
                tok = await verify_token(bytes(item.CertifiedTimestamp), trust, data=signature)
                report.timestamps.append(
                    TimestampReport(
                        kind="certified", ok=True, time=tok.gen_time, tsa=tok.tsa_subject
                    )
                )
            except TimestampError as exc:
                report.timestamps.append(
                    TimestampReport(kind="certified", ok=False, problem=exc.message)
                )
    good_ts = [t.time for t in report.timestamps if t.ok and t.time]
    report.signing_time = good_ts[0] if good_ts else report.claimed_time
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
    return report


async def verify_dataset(
    ds: Dataset, trust: TrustConfig, *, policy: RecordPolicy | None = None
) -> list[DicomSignatureReport]:
    """Verify every DICOM Digital Signature in ``ds`` (R-SIG-3, R-SIG-8).

    ``policy`` (default: signature and timestamp expected, no role required)
    decides which profile's coverage is checked and the signer requirements;
    the verdict itself is drawn by :mod:`signing.verify`.
    """
    policy = policy or RecordPolicy(record_type="unspecified")
    little = bool(getattr(ds, "original_encoding", (False, True))[1] is not False)
    reports = []
    for where, container, item in list(_signature_items(ds)):
        reports.append(await _verify_one(where, container, item, trust, policy, little))
    return reports
