"""Long-term validity: when to renew, how, and verification at a given time (R-SIG-6).

Seed 000 付録2 §14①2(2): signatures must stay verifiable for the legal
retention period.  What protects a signed record is its *newest* timestamp;
that protection ends when the TSA certificate behind it ends or when one of
its algorithms is deprecated (dates from configuration, e.g. CRYPTREC's list).
Before that, with a configured margin, the record is renewed:

* PDF (PAdES B-LTA, ETSI EN 319 142-1 §5.5): validation data for the newest
  document timestamp goes into the DSS and a new document timestamp covers the
  whole file (pyHanko ``PdfTimeStamper.async_update_archival_timestamp_chain``
  via :func:`signing.pades.renew_archive_timestamp`);
* DICOM: a new chain in the object's RFC 4998 Evidence Record
  (:mod:`signing.evidence`), with fresh validation data of the timestamps it
  protects.

A renewal whose new timestamp would not protect longer than the old one (the
TSA's own certificate ends too soon) is refused as ineffective, so that the
renewal job stays idempotent and the operator is told.

:func:`verify_dicom_long_term` and :func:`verify_pdf_long_term` answer "is
this record still proven at ``now``?": the signatures as of their signing time
(:mod:`signing.dicom_sig`, :mod:`signing.pades`) plus the timestamp chain up
to ``now`` (the Evidence Record, or pyHanko's ETSI EN 319 102-1 §5.6.3 LTA
validation for PDFs), using captured validation data and no network unless
asked for.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pydicom
from asn1crypto import cms
from asn1crypto import crl as asn1_crl
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation.ades import ades_lta_validation
from pyhanko.sign.validation.policy_decl import (
    LocalKnowledge,
    PdfSignatureValidationSpec,
    RevinfoOnlineFetchingRule,
    RevocationInfoGatheringSpec,
    SignatureValidationSpec,
)
from pyhanko_certvalidator.context import CertValidationPolicySpec
from pyhanko_certvalidator.ltv.types import ValidationTimingInfo
from pyhanko_certvalidator.policy_decl import (
    CertRevTrustPolicy,
    RevocationCheckingPolicy,
    RevocationCheckingRule,
)
from pyhanko_certvalidator.registry import SimpleTrustManager
from pyhanko_certvalidator.revinfo.archival import CRLContainer

from pki.errors import SigningError, VerificationError
from signing import dicom_sig, pades
from signing.evidence import (
    AlgorithmPolicy,
    EvidenceReport,
    archive_timestamps,
    create_evidence,
    key_algorithm_name,
    load_record,
    renew_evidence,
    verify_evidence,
)
from signing.policy import RecordPolicy
from signing.trust import RevocationMode, TrustConfig
from signing.tsa import SekishoTimeStamper, TsaClient, verify_token
from signing.validation_data import (
    ValidationData,
    collect_validation_data,
    token_signer,
    with_validation_data,
)
from signing.verify import judge

__all__ = [
    "LongTermReport",
    "Protection",
    "RenewalPolicy",
    "dicom_protection",
    "pdf_protection",
    "renew_dicom",
    "renew_pdf",
    "verify_dicom_long_term",
    "verify_pdf_long_term",
]


@dataclass(frozen=True)
class RenewalPolicy:
    """How early to renew and with which hash (configuration ``[renewal]``)."""

    margin: timedelta = timedelta(days=180)
    algorithms: AlgorithmPolicy = field(default_factory=AlgorithmPolicy)
    hash_algorithm: str = "sha256"


@dataclass(frozen=True)
class Protection:
    """What the newest timestamp of a record protects, and until when."""

    kind: Literal["dicom", "pdf"]
    newest_time: datetime
    tsa: str
    tsa_not_after: datetime
    hash_algorithm: str
    tsa_key: str
    expires: datetime
    reason: str
    timestamps: int

    def due(self, now: datetime, margin: timedelta) -> bool:
        return self.expires - margin <= now

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("newest_time", "tsa_not_after", "expires"):
            out[key] = out[key].isoformat()
        return out


def _token_facts(token_der: bytes) -> tuple[datetime, str, str, Any]:
    """genTime, hash algorithm, TSA subject and certificate of a token (not validated)."""
    try:
        sd = cms.ContentInfo.load(token_der)["content"]
        info = sd["encap_content_info"]["content"].parsed
        algo = info["message_imprint"]["hash_algorithm"]["algorithm"].native
        when: datetime = info["gen_time"].native
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"timestamp token is malformed: {exc}") from exc
    cert, _ = token_signer(token_der)
    return when, algo, cert.subject.human_friendly, cert


def _protection(
    kind: Literal["dicom", "pdf"], tokens: list[bytes], policy: RenewalPolicy
) -> Protection:
    if not tokens:
        raise VerificationError("the record carries no timestamp to renew")
    facts = [_token_facts(t) for t in tokens]
    # Newest by time; among equal times (1 s accuracy) the one added last.
    _index, (when, algo, tsa, cert) = max(enumerate(facts), key=lambda f: (f[1][0], f[0]))
    key = key_algorithm_name(cert)
    not_after: datetime = cert.not_valid_after
    expires, reason = not_after, f"TSA certificate of {tsa} ends {not_after:%Y-%m-%d}"
    deprecated = policy.algorithms.expiry(algo, key)
    if deprecated is not None and deprecated < expires:
        name = algo if policy.algorithms.expiry(algo) == deprecated else key
        expires, reason = deprecated, f"{name} is deprecated from {deprecated:%Y-%m-%d}"
    return Protection(kind, when, tsa, not_after, algo, key, expires, reason, len(tokens))


def _certified_timestamps(data: bytes) -> tuple[pydicom.Dataset, list[bytes]]:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types on malformed input
        raise VerificationError(f"not a readable DICOM object: {exc}") from exc
    tokens = [
        bytes(item.CertifiedTimestamp)
        for item in ds.get("DigitalSignaturesSequence", [])
        if "CertifiedTimestamp" in item
    ]
    return ds, tokens


def dicom_protection(data: bytes, evidence: bytes | None, policy: RenewalPolicy) -> Protection:
    """Protection of a DICOM object: its Evidence Record, else its Certified Timestamps."""
    if evidence is not None:
        return _protection("dicom", archive_timestamps(evidence), policy)
    return _protection("dicom", _certified_timestamps(data)[1], policy)


def _pdf_tokens(data: bytes) -> list[bytes]:
    reader = PdfFileReader(io.BytesIO(data), strict=False)
    tokens = [
        cms.ContentInfo({"content_type": "signed_data", "content": emb.signed_data}).dump()
        for emb in reader.embedded_timestamp_signatures
    ]
    if tokens:
        return tokens
    for emb in reader.embedded_regular_signatures:  # B-T/B-LT: the signature timestamp
        for attr in emb.signer_info["unsigned_attrs"] or []:
            if attr["type"].native == "signature_time_stamp_token":
                tokens += [v.dump() for v in attr["values"]]
    return tokens


def pdf_protection(data: bytes, policy: RenewalPolicy) -> Protection:
    """Protection of a PAdES PDF: its newest document (or signature) timestamp."""
    return _protection("pdf", _pdf_tokens(data), policy)


def _ensure_effective(before: Protection, after: Protection) -> None:
    if after.expires <= before.expires:
        raise SigningError(
            f"renewal ineffective: the new timestamp's protection ends {after.expires:%Y-%m-%d}"
            f" ({after.reason}), not later than the current one ({before.expires:%Y-%m-%d});"
            " the TSA certificate or algorithm must be renewed first"
        )


async def renew_dicom(
    data: bytes,
    evidence: bytes | None,
    trust: TrustConfig,
    tsa: TsaClient,
    policy: RenewalPolicy,
    *,
    at: datetime | None = None,
) -> bytes:
    """The object's Evidence Record with one more chain (or a first one).

    Fresh validation data is collected at ``at`` (default: now) for the
    timestamps the new chain protects; they must still be valid then.
    """
    at = at or datetime.now(UTC)
    before = dicom_protection(data, evidence, policy)
    if before.tsa_not_after <= at:
        raise SigningError(
            f"too late to renew: {before.reason}; the record's timestamp protection has lapsed"
        )
    if evidence is None:
        _ds, tokens = _certified_timestamps(data)
        fresh = await collect_validation_data(trust, at=at, tokens=tokens)
        new = await create_evidence(data, fresh, tsa, hash_algorithm=policy.hash_algorithm)
    else:
        record = load_record(evidence)
        last_chain = record["archive_time_stamp_sequence"][-1]
        tokens = [ats["time_stamp"].dump() for ats in last_chain]
        fresh = await collect_validation_data(trust, at=at, tokens=tokens)
        new = await renew_evidence(evidence, data, fresh, tsa, hash_algorithm=policy.hash_algorithm)
    _ensure_effective(before, dicom_protection(data, new, policy))
    return new


async def renew_pdf(
    data: bytes, trust: TrustConfig, tsa: TsaClient, policy: RenewalPolicy
) -> bytes:
    """The PDF with validation data for its newest timestamp and a new document timestamp."""
    before = pdf_protection(data, policy)
    if before.tsa_not_after <= datetime.now(UTC):
        raise SigningError(f"too late to renew: {before.reason}")
    new = await pades.renew_archive_timestamp(data, trust, SekishoTimeStamper(tsa))
    _ensure_effective(before, pdf_protection(new, policy))
    return new


# ------------------------------------------------------------------ verification at a time
@dataclass
class LongTermReport:
    """Is the record still proven at ``checked_at``? (R-SIG-6, R-SIG-8)."""

    kind: str
    checked_at: datetime
    problems: list[str] = field(default_factory=list)
    signatures: list[dict[str, Any]] = field(default_factory=list)
    evidence: dict[str, Any] | None = None
    protected_until: datetime | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.signatures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "verdict": "valid" if self.ok else "invalid",
            "checked_at": self.checked_at.isoformat(),
            "protected_until": self.protected_until.isoformat() if self.protected_until else None,
            "problems": list(self.problems),
            "signatures": self.signatures,
            "evidence": self.evidence,
        }


async def verify_dicom_long_term(
    data: bytes,
    evidence: bytes | None,
    trust: TrustConfig,
    *,
    policy: RecordPolicy | None = None,
    now: datetime | None = None,
    algorithms: AlgorithmPolicy | None = None,
    fetch_current: bool | None = None,
) -> LongTermReport:
    """Verify a signed DICOM object and its Evidence Record as of ``now``."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    policy = policy or RecordPolicy(record_type="unspecified")
    algorithms = algorithms or AlgorithmPolicy()
    report = LongTermReport(kind="dicom", checked_at=now)
    ds, tokens = _certified_timestamps(data)
    ev: EvidenceReport | None = None
    if evidence is not None:
        ev = await verify_evidence(
            evidence, data, trust, now=now, algorithms=algorithms, fetch_current=fetch_current
        )
        report.evidence = ev.to_dict()
        report.problems += [f"evidence record: {p}" for p in ev.problems]
        report.protected_until = ev.protected_until
        checking = with_validation_data(trust, ev.validation_data)
        protected_at = ev.first_time or now
    else:
        fetch = trust.allow_fetching if fetch_current is None else fetch_current
        checking = with_validation_data(trust, ValidationData(), allow_fetching=fetch)
        protected_at = now
    sigs = await dicom_sig.verify_dataset(ds, checking, policy=policy)
    if not sigs:
        report.problems.append("the object carries no DICOM Digital Signature")
    for sig in sigs:
        problems = judge(sig, policy)
        mac = str(sig.details.get("mac_algorithm", "")).lower()
        problems += algorithms.failures([mac], protected_at)
        sig.problems = problems
        report.signatures.append(sig.to_dict())
        report.problems += [f"signature {sig.details.get('uid', '')}: {p}" for p in problems]
    # Each Certified Timestamp must still have been valid when first protected.
    for token in tokens:
        try:
            tok = await verify_token(token, checking, at=protected_at)
            if ev is None:
                report.protected_until = tok.tsa_certificate.not_valid_after
        except SigningError as exc:
            what = (
                "now" if ev is None else f"when the evidence record began ({protected_at:%Y-%m-%d})"
            )
            report.problems.append(f"certified timestamp not valid {what}: {exc.message}")
    return report


def _lta_spec(trust: TrustConfig, crls: list[bytes], fetch: bool) -> PdfSignatureValidationSpec:
    rule = {
        RevocationMode.HARD_FAIL: RevocationCheckingRule.CHECK_IF_DECLARED,
        RevocationMode.SOFT_FAIL: RevocationCheckingRule.CHECK_IF_DECLARED_SOFT,
        RevocationMode.REQUIRE: RevocationCheckingRule.CRL_OR_OCSP_REQUIRED,
    }[trust.revocation]
    cert_policy = CertValidationPolicySpec(
        trust_manager=SimpleTrustManager.build(
            trust_roots=[*trust.signer_anchors, *trust.tsa_anchors]
        ),
        revinfo_policy=CertRevTrustPolicy(
            RevocationCheckingPolicy(ee_certificate_rule=rule, intermediate_ca_cert_rule=rule)
        ),
    )
    knowledge = LocalKnowledge(
        known_crls=[CRLContainer(asn1_crl.CertificateList.load(c)) for c in [*trust.crls, *crls]],
        known_certs=list(trust.intermediates),
    )
    online = (
        RevinfoOnlineFetchingRule.NO_HISTORICAL_FETCH
        if fetch
        else RevinfoOnlineFetchingRule.LOCAL_ONLY
    )
    return PdfSignatureValidationSpec(
        SignatureValidationSpec(
            cert_validation_policy=cert_policy,
            revinfo_gathering_policy=RevocationInfoGatheringSpec(online_fetching_rule=online),
            local_knowledge=knowledge,
        )
    )


async def verify_pdf_long_term(
    data: bytes,
    trust: TrustConfig,
    *,
    policy: RecordPolicy | None = None,
    now: datetime | None = None,
    algorithms: AlgorithmPolicy | None = None,
    fetch_current: bool | None = None,
) -> LongTermReport:
    """Verify a PAdES B-LTA PDF as of ``now`` (ETSI EN 319 102-1 §5.6.3 LTA validation)."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    policy = policy or RecordPolicy(record_type="unspecified")
    algorithms = algorithms or AlgorithmPolicy()
    report = LongTermReport(kind="pdf", checked_at=now)
    offline = dataclasses.replace(trust, allow_fetching=False)
    sigs = await pades.verify_pdf(data, offline, policy=policy)
    regular = [s for s in sigs if s.kind != "document-timestamp"]
    if not regular:
        report.problems.append("the PDF carries no signature")
    for sig in regular:
        sig.problems = judge(sig, policy)
        report.signatures.append(sig.to_dict())
        report.problems += [f"signature {sig.details.get('field', '')}: {p}" for p in sig.problems]
    reader = PdfFileReader(io.BytesIO(data), strict=False)
    fetch = trust.allow_fetching if fetch_current is None else fetch_current
    # With fetching, a CA that cannot be reached is retried from the embedded (DSS)
    # and configured data alone: still-current revocation data is an equal answer.
    specs = (
        [_lta_spec(trust, [], True), _lta_spec(trust, [], False)]
        if fetch
        else [_lta_spec(trust, [], False)]
    )
    timing = ValidationTimingInfo(
        validation_time=now, best_signature_time=now, point_in_time_validation=True
    )
    for emb in reader.embedded_regular_signatures:
        results = []
        for spec in specs:
            results.append(await ades_lta_validation(emb, spec, timing_info=timing))
            if getattr(results[-1].ades_subindic, "name", "") == "OK":
                break
        result = results[-1] if len(results) == 1 else results[0]
        indication = getattr(results[-1].ades_subindic, "name", str(results[-1].ades_subindic))
        if indication != "OK":
            report.problems.append(
                f"long-term validation of {emb.field_name} at {now:%Y-%m-%d}: {indication}"
                f" ({result.failure_msg or 'no proof of existence before expiry'})"
            )
    try:
        protection = pdf_protection(data, RenewalPolicy(algorithms=algorithms))
        report.protected_until = protection.expires
        weak = algorithms.failures([protection.hash_algorithm, protection.tsa_key], now)
        report.problems += [f"newest timestamp: {w}" for w in weak]
    except VerificationError as exc:
        report.problems.append(exc.message)
    return report
