"""Validation data captured while certificates are valid, for long-term validity (R-SIG-6).

Seed 000 付録2 §14①2(2) asks that signatures stay verifiable for the legal
retention period, after the signer's and the TSA's certificates expired and
after the CA stopped publishing CRLs and answering OCSP.  The evidence for
that is the validation data itself, taken while it was current:

* :func:`collect_validation_data` validates the signer certificate (RFC 5280
  §6, nonRepudiation) and each TSA certificate (timeStamping EKU) at a given
  time and keeps the path's certificates and the CRLs and OCSP responses the
  validator used (the configured files or, where fetching is allowed, the CA's
  answers right now);
* :class:`ValidationData` carries them as DER; :func:`to_attributes` and
  :func:`from_attributes` encode them as the CAdES ``certValues`` and
  ``revocationValues`` attribute values (ETSI EN 319 122-1 §5.5.2/5.5.3, RFC
  5126 ``id-aa-ets-certValues``/``id-aa-ets-revocationValues``), which
  :mod:`signing.evidence` keeps in an Evidence Record's ``cryptoInfos``;
* :func:`with_validation_data` builds the :class:`EvidenceTrust` a later
  verification uses: the configured anchors plus the captured certificates,
  CRLs and OCSP responses, with network fetching off unless asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asn1crypto import cms, core, ocsp
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors

from pki.errors import SigningError, TimestampError
from signing.trust import TrustConfig, reason_for_exception

__all__ = [
    "ID_AA_ETS_CERT_VALUES",
    "ID_AA_ETS_REVOCATION_VALUES",
    "ValidationData",
    "collect_validation_data",
    "from_attributes",
    "to_attributes",
    "token_signer",
    "with_validation_data",
]

ID_AA_ETS_CERT_VALUES = "1.2.840.113549.1.9.16.2.23"
ID_AA_ETS_REVOCATION_VALUES = "1.2.840.113549.1.9.16.2.24"


class _CertificateValues(core.SequenceOf):
    _child_spec = asn1_x509.Certificate


class _Crls(core.SequenceOf):
    _child_spec = asn1_crl.CertificateList


class _BasicOcsps(core.SequenceOf):
    _child_spec = ocsp.BasicOCSPResponse


class _RevocationValues(core.Sequence):
    """CAdES ``RevocationValues`` (ETSI EN 319 122-1 A.1; EXPLICIT tags)."""

    _fields = [
        ("crl_vals", _Crls, {"explicit": 0, "optional": True}),
        ("ocsp_vals", _BasicOcsps, {"explicit": 1, "optional": True}),
        ("other_rev_vals", core.Any, {"explicit": 2, "optional": True}),
    ]


@dataclass(frozen=True)
class ValidationData:
    """Certificates, CRLs and OCSP responses (DER), captured while they were current."""

    certificates: tuple[bytes, ...] = ()
    crls: tuple[bytes, ...] = ()
    #: DER ``BasicOCSPResponse`` values (the signed part of an OCSP response).
    ocsps: tuple[bytes, ...] = ()

    def items(self) -> list[bytes]:
        """Every item once, in a stable order (the members of the hashed group)."""
        return list(dict.fromkeys([*self.certificates, *self.crls, *self.ocsps]))

    def merged(self, other: ValidationData) -> ValidationData:
        return ValidationData(
            tuple(dict.fromkeys([*self.certificates, *other.certificates])),
            tuple(dict.fromkeys([*self.crls, *other.crls])),
            tuple(dict.fromkeys([*self.ocsps, *other.ocsps])),
        )

    def __len__(self) -> int:
        return len(self.items())

    def ocsp_responses(self) -> list[ocsp.OCSPResponse]:
        """The OCSP items wrapped back into ``OCSPResponse`` (RFC 6960 §4.2.1)."""
        return [
            ocsp.OCSPResponse(
                {
                    "response_status": "successful",
                    "response_bytes": {
                        "response_type": "basic_ocsp_response",
                        "response": ocsp.BasicOCSPResponse.load(der),
                    },
                }
            )
            for der in self.ocsps
        ]


def to_attributes(vd: ValidationData) -> list[tuple[str, bytes]]:
    """``(attribute type, DER value)`` pairs: CAdES certValues and revocationValues."""
    out: list[tuple[str, bytes]] = []
    if vd.certificates:
        certs = _CertificateValues([asn1_x509.Certificate.load(c) for c in vd.certificates])
        out.append((ID_AA_ETS_CERT_VALUES, certs.dump()))
    if vd.crls or vd.ocsps:
        rev: dict[str, Any] = {}
        if vd.crls:
            rev["crl_vals"] = _Crls([asn1_crl.CertificateList.load(c) for c in vd.crls])
        if vd.ocsps:
            rev["ocsp_vals"] = _BasicOcsps([ocsp.BasicOCSPResponse.load(o) for o in vd.ocsps])
        out.append((ID_AA_ETS_REVOCATION_VALUES, _RevocationValues(rev).dump()))
    return out


def from_attributes(attributes: Iterable[tuple[str, bytes]]) -> ValidationData:
    """Inverse of :func:`to_attributes`; other attribute types are ignored."""
    certs: list[bytes] = []
    crls: list[bytes] = []
    ocsps: list[bytes] = []
    for oid, raw in attributes:
        if oid == ID_AA_ETS_CERT_VALUES:
            certs += [c.dump() for c in _CertificateValues.load(raw)]
        elif oid == ID_AA_ETS_REVOCATION_VALUES:
            rv = _RevocationValues.load(raw)
            if not isinstance(rv["crl_vals"], core.Void):
                crls += [c.dump() for c in rv["crl_vals"]]
            if not isinstance(rv["ocsp_vals"], core.Void):
                ocsps += [o.dump() for o in rv["ocsp_vals"]]
    return ValidationData(tuple(certs), tuple(crls), tuple(ocsps))


def with_validation_data(
    trust: TrustConfig, vd: ValidationData, *, allow_fetching: bool = False
) -> TrustConfig:
    """``trust`` extended by ``vd``; fetching off by default (the CA may be gone)."""
    return dataclasses.replace(
        trust,
        intermediates=(
            *trust.intermediates,
            *(asn1_x509.Certificate.load(c) for c in vd.certificates),
        ),
        crls=(*trust.crls, *vd.crls),
        ocsps=(*trust.ocsps, *vd.ocsp_responses()),
        allow_fetching=allow_fetching,
    )


def token_signer(token_der: bytes) -> tuple[asn1_x509.Certificate, list[asn1_x509.Certificate]]:
    """The TSA certificate of an RFC 3161 token and the other certificates it carries."""
    try:
        sd = cms.ContentInfo.load(token_der)["content"]
        sid = sd["signer_infos"][0]["sid"]
        certs = [c.chosen for c in sd["certificates"] or [] if c.name == "certificate"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise TimestampError(f"timestamp token is malformed: {exc}") from exc
    for cert in certs:
        if sid.name == "issuer_and_serial_number":
            chosen = sid.chosen
            if (
                cert.issuer == chosen["issuer"]
                and cert.serial_number == chosen["serial_number"].native
            ):
                return cert, [c for c in certs if c is not cert]
        elif cert.key_identifier == sid.chosen.native:
            return cert, [c for c in certs if c is not cert]
    raise TimestampError("timestamp token does not contain the TSA certificate")


async def _validate_path(
    cert: asn1_x509.Certificate,
    others: Sequence[asn1_x509.Certificate],
    vc: ValidationContext,
    usage: set[str],
    eku: set[str] | None,
) -> ValidationData:
    validator = CertificateValidator(cert, intermediate_certs=list(others), validation_context=vc)
    try:
        path = await validator.async_validate_usage(usage, extended_key_usage=eku)
    except (cv_errors.PathBuildingError, cv_errors.PathValidationError) as exc:
        reason = reason_for_exception(exc)
        raise SigningError(
            f"cannot capture validation data: {cert.subject.human_friendly} {reason}"
        ) from exc
    finally:
        await vc.aclose()  # the fetchers' HTTP session, if the context opened one
    chain = [c.dump() for c in path.iter_certs(include_root=True)]
    issuers = {asn1_x509.Certificate.load(c).subject.dump() for c in chain}
    crls = [c.dump() for c in vc.crls if c.issuer.dump() in issuers]
    ocsps = [
        o["response_bytes"]["response"].parsed.dump()
        for o in vc.ocsps
        if o["response_status"].native == "successful"
    ]
    return ValidationData(tuple(chain), tuple(dict.fromkeys(crls)), tuple(ocsps))


async def collect_validation_data(
    trust: TrustConfig,
    *,
    at: datetime,
    signer: asn1_x509.Certificate | None = None,
    signer_chain: Sequence[asn1_x509.Certificate] = (),
    tokens: Iterable[bytes] = (),
) -> ValidationData:
    """Validate the signer's and the TSAs' certificates at ``at`` and keep what was used.

    CRLs and OCSP responses come from the configured files or, where the
    configuration allows fetching, from the CA's services right now; this is
    the moment to capture them (R-SIG-6 "captured while valid").
    """
    vd = ValidationData()
    if signer is not None:
        vc = trust.signer_context(at)
        vd = vd.merged(await _validate_path(signer, signer_chain, vc, {"non_repudiation"}, None))
    for token in tokens:
        tsa_cert, others = token_signer(token)
        vc = trust.tsa_context(at)
        got = await _validate_path(tsa_cert, others, vc, {"digital_signature"}, {"time_stamping"})
        vd = vd.merged(got)
    return vd
