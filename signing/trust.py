"""Trust configuration for signing and verification (R-SIG-2, R-SIG-5, R-SIG-8).

Two separate sets of trust anchors are configured out of band (R-TLS-7): the
HPKI certification authorities that issue signers' certificates and the
certification authorities of the time-stamping authorities.  Neither set ever
comes from the operating-system store.  CRLs may be preloaded from files so that
a gateway without Internet access can still establish revocation status at
signing time; fetching CRLs/OCSP over the network is an explicit option.

This module turns that configuration into pyhanko-certvalidator
``ValidationContext`` objects (RFC 5280 §6 path validation) and maps the
library's failure vocabulary (ETSI EN 319 102-1 §5.1.3 sub-indications and
certvalidator exceptions) to the short, stable reasons Sekisho reports:
``"not trusted"``, ``"revoked"``, ``"expired"``, ``"not yet valid"``,
``"revocation unknown"``, ``"key usage"``, ``"weak algorithm"``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from asn1crypto import crl as asn1_crl
from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator import errors as cv_errors

from pki.errors import ConfigurationError

__all__ = [
    "RevocationMode",
    "TrustConfig",
    "load_asn1_certificates",
    "load_crls",
    "reason_for_exception",
    "reason_for_subindication",
]


class RevocationMode(enum.Enum):
    """How a missing revocation answer is treated (pyhanko-certvalidator modes).

    ``HARD_FAIL`` refuses when revocation information exists but cannot be
    checked; ``REQUIRE`` refuses unless every certificate in the path has
    revocation information; ``SOFT_FAIL`` only refuses a certificate that is
    positively revoked.
    """

    SOFT_FAIL = "soft-fail"
    HARD_FAIL = "hard-fail"
    REQUIRE = "require"


def load_asn1_certificates(path: Path | str) -> list[asn1_x509.Certificate]:
    """Every certificate in a PEM bundle or DER file, as asn1crypto objects."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read certificate file {path}: {exc.strerror}") from exc
    try:
        if pem.detect(data):
            return [
                asn1_x509.Certificate.load(der)
                for kind, _hdr, der in pem.unarmor(data, multiple=True)
                if kind == "CERTIFICATE"
            ]
        cert = asn1_x509.Certificate.load(data)
        cert.subject.native  # noqa: B018 - refuse garbage now (hcRole is parsed by pki.hpki)
        return [cert]
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{path} is not a certificate file: {exc}") from exc


def load_crls(path: Path | str) -> list[bytes]:
    """DER encodings of the CRLs (RFC 5280 §5) in a PEM or DER file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read CRL file {path}: {exc.strerror}") from exc
    try:
        if pem.detect(data):
            ders = [der for kind, _h, der in pem.unarmor(data, multiple=True) if kind == "X509 CRL"]
        else:
            ders = [data]
        for der in ders:
            asn1_crl.CertificateList.load(der).native  # noqa: B018 - validate now
        return ders
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{path} is not a CRL file: {exc}") from exc


@dataclass(frozen=True, eq=False)
class TrustConfig:
    """Trust anchors, intermediates and revocation data for one gateway.

    ``signer_anchors`` are the HPKI roots (R-SIG-2), ``tsa_anchors`` the roots
    of accepted TSAs (R-SIG-5).  ``crls`` are preloaded CRLs (DER) usable for
    both; ``allow_fetching`` lets the validator download CRLs/OCSP named in
    the certificates.
    """

    signer_anchors: tuple[asn1_x509.Certificate, ...]
    tsa_anchors: tuple[asn1_x509.Certificate, ...]
    intermediates: tuple[asn1_x509.Certificate, ...] = ()
    crls: tuple[bytes, ...] = ()
    revocation: RevocationMode = RevocationMode.HARD_FAIL
    allow_fetching: bool = False
    #: Preloaded OCSP responses (e.g. captured at signing, R-SIG-6).
    ocsps: tuple[Any, ...] = ()
    #: Paths the configuration named, for reports and diagnostics.
    sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    _KEYS = frozenset(
        {"signer_anchors", "tsa_anchors", "intermediates", "crls", "revocation", "allow_fetching"}
    )

    @classmethod
    def from_paths(
        cls,
        *,
        signer_anchors: Iterable[Path | str],
        tsa_anchors: Iterable[Path | str],
        intermediates: Iterable[Path | str] = (),
        crls: Iterable[Path | str] = (),
        revocation: RevocationMode = RevocationMode.HARD_FAIL,
        allow_fetching: bool = False,
    ) -> TrustConfig:
        """Load every file now so that a bad path is refused at start-up (R-OPS-2)."""
        paths = {
            "signer_anchors": tuple(str(p) for p in signer_anchors),
            "tsa_anchors": tuple(str(p) for p in tsa_anchors),
            "intermediates": tuple(str(p) for p in intermediates),
            "crls": tuple(str(p) for p in crls),
        }
        if not paths["signer_anchors"]:
            raise ConfigurationError("signing trust: signer_anchors must name at least one file")
        if not paths["tsa_anchors"]:
            raise ConfigurationError("signing trust: tsa_anchors must name at least one file")

        def certs(key: str) -> tuple[asn1_x509.Certificate, ...]:
            return tuple(c for p in paths[key] for c in load_asn1_certificates(p))

        return cls(
            signer_anchors=certs("signer_anchors"),
            tsa_anchors=certs("tsa_anchors"),
            intermediates=certs("intermediates"),
            crls=tuple(d for p in paths["crls"] for d in load_crls(p)),
            revocation=revocation,
            allow_fetching=allow_fetching,
            sources=paths,
        )

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any], path: str = "signing.trust") -> TrustConfig:
        """Build from a configuration mapping; unknown keys are refused by key path."""
        if not isinstance(mapping, Mapping):
            raise ConfigurationError(f"{path}: expected a mapping")
        for key in mapping:
            if key not in cls._KEYS:
                raise ConfigurationError(f"{path}.{key}: unknown key")

        def paths(key: str) -> list[str]:
            value = mapping.get(key, [])
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigurationError(f"{path}.{key}: expected a list of file paths")
            return value

        rev = mapping.get("revocation", RevocationMode.HARD_FAIL.value)
        try:
            revocation = RevocationMode(rev)
        except ValueError as exc:
            allowed = ", ".join(m.value for m in RevocationMode)
            raise ConfigurationError(f"{path}.revocation: {rev!r} is not one of {allowed}") from exc
        fetch = mapping.get("allow_fetching", False)
        if not isinstance(fetch, bool):
            raise ConfigurationError(f"{path}.allow_fetching: expected true or false")
        return cls.from_paths(
            signer_anchors=paths("signer_anchors"),
            tsa_anchors=paths("tsa_anchors"),
            intermediates=paths("intermediates"),
            crls=paths("crls"),
            revocation=revocation,
            allow_fetching=fetch,
        )

    def _context(
        self,
        anchors: tuple[asn1_x509.Certificate, ...],
        moment: datetime | None,
        other_certs: Iterable[asn1_x509.Certificate],
        crls: Iterable[bytes | asn1_crl.CertificateList],
        ocsps: Iterable[Any],
        revocation: RevocationMode | None,
    ) -> ValidationContext:
        return ValidationContext(
            trust_roots=list(anchors),
            other_certs=[*self.intermediates, *other_certs],
            moment=moment,
            allow_fetching=self.allow_fetching,
            crls=[*self.crls, *crls],
            ocsps=[*self.ocsps, *ocsps],
            revocation_mode=(revocation or self.revocation).value,
        )

    def signer_context(
        self,
        moment: datetime | None = None,
        *,
        other_certs: Iterable[asn1_x509.Certificate] = (),
        crls: Iterable[bytes | asn1_crl.CertificateList] = (),
        ocsps: Iterable[Any] = (),
        revocation: RevocationMode | None = None,
    ) -> ValidationContext:
        """Validation context for HPKI signer certificates at ``moment`` (R-SIG-2)."""
        return self._context(self.signer_anchors, moment, other_certs, crls, ocsps, revocation)

    def tsa_context(
        self,
        moment: datetime | None = None,
        *,
        other_certs: Iterable[asn1_x509.Certificate] = (),
        crls: Iterable[bytes | asn1_crl.CertificateList] = (),
        ocsps: Iterable[Any] = (),
        revocation: RevocationMode | None = None,
    ) -> ValidationContext:
        """Validation context for TSA certificates at ``moment`` (RFC 3161 §2.3)."""
        return self._context(self.tsa_anchors, moment, other_certs, crls, ocsps, revocation)


_SUBINDICATION_REASONS = {
    "NO_CERTIFICATE_CHAIN_FOUND": "not trusted",
    "CERTIFICATE_CHAIN_GENERAL_FAILURE": "not trusted",
    "CHAIN_CONSTRAINTS_FAILURE": "not trusted",
    "NO_SIGNING_CERTIFICATE_FOUND": "not trusted",
    "REVOKED": "revoked",
    "REVOKED_NO_POE": "revoked",
    "REVOKED_CA_NO_POE": "revoked",
    "EXPIRED": "expired",
    "OUT_OF_BOUNDS_NO_POE": "expired",
    "OUT_OF_BOUNDS_NOT_REVOKED": "expired",
    "NOT_YET_VALID": "not yet valid",
    "TRY_LATER": "revocation unknown",
    "REVOCATION_OUT_OF_BOUNDS_NO_POE": "revocation unknown",
    "SIG_CONSTRAINTS_FAILURE": "key usage",
    "CRYPTO_CONSTRAINTS_FAILURE": "weak algorithm",
    "CRYPTO_CONSTRAINTS_FAILURE_NO_POE": "weak algorithm",
    "HASH_FAILURE": "integrity",
    "SIG_CRYPTO_FAILURE": "integrity",
    "FORMAT_FAILURE": "malformed",
}


def reason_for_subindication(indic: object) -> str:
    """Sekisho reason for an ETSI EN 319 102-1 sub-indication (pyHanko enum)."""
    name = getattr(indic, "name", str(indic))
    return _SUBINDICATION_REASONS.get(name, name.lower().replace("_", " "))


def reason_for_exception(exc: BaseException) -> str:
    """Sekisho reason for a pyhanko-certvalidator exception (RFC 5280 §6)."""
    if isinstance(exc, cv_errors.RevokedError):
        return "revoked"
    if isinstance(exc, cv_errors.ExpiredError):
        return "expired"
    if isinstance(exc, cv_errors.NotYetValidError):
        return "not yet valid"
    if isinstance(exc, cv_errors.InsufficientRevinfoError):
        return "revocation unknown"
    if isinstance(exc, cv_errors.DisallowedAlgorithmError):
        return "weak algorithm"
    if isinstance(exc, cv_errors.PathBuildingError):
        return "not trusted"
    if isinstance(exc, cv_errors.InvalidCertificateError):
        return "key usage"
    if isinstance(exc, cv_errors.PathValidationError):
        return "not trusted"
    return exc.__class__.__name__
