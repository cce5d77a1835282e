"""Client certificate validation after the TLS handshake (R-TLS-3).

OpenSSL has already checked the chain against the configured anchors, the
validity period and the certificate purpose during the handshake.  This module
adds what OpenSSL cannot do well on its own: revocation by CRL files, CRL
distribution points and OCSP, with a named soft/hard-fail policy and a result
cache, using pyhanko-certvalidator.  It repeats the chain, validity and EKU
checks so that a certificate is judged the same way however it arrived
(DICOMweb, DIMSE, console).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from asn1crypto import pem as asn1_pem
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors

from pki.errors import ConfigurationError, PeerAuthenticationError

#: Named revocation policies (STYLE lesson 3).
#: ``require``: revocation information must be obtained for every certificate;
#: ``hard-fail``: where a certificate names revocation sources (or a CRL file for
#: its issuer is configured) they must be checked successfully;
#: ``soft-fail``: unreachable revocation sources are tolerated, a revoked status
#: is still refused.
RevocationPolicy = Literal["require", "hard-fail", "soft-fail"]
REVOCATION_REQUIRE: RevocationPolicy = "require"
REVOCATION_HARD_FAIL: RevocationPolicy = "hard-fail"
REVOCATION_SOFT_FAIL: RevocationPolicy = "soft-fail"


@dataclass(frozen=True)
class RevocationSettings:
    policy: RevocationPolicy = "hard-fail"
    crl_files: tuple[Path, ...] = ()
    #: Fetch CRLs from distribution points and ask OCSP responders named in certificates.
    fetch: bool = False
    cache_seconds: int = 300


def load_certificates(paths: Iterable[Path]) -> list[asn1_x509.Certificate]:
    """Load every certificate from PEM (possibly several per file) or DER files."""
    certs: list[asn1_x509.Certificate] = []
    for path in paths:
        data = path.read_bytes()
        if asn1_pem.detect(data):
            for _type, _headers, der in asn1_pem.unarmor(data, multiple=True):
                certs.append(asn1_x509.Certificate.load(der))
        else:
            certs.append(asn1_x509.Certificate.load(data))
    return certs


def _load_crls(paths: Iterable[Path]) -> list[bytes]:
    crls: list[bytes] = []
    for path in paths:
        if not path.is_file():
            raise ConfigurationError(f"CRL file not found: {path}")
        data = path.read_bytes()
        if asn1_pem.detect(data):
            crls.extend(der for _t, _h, der in asn1_pem.unarmor(data, multiple=True))
        else:
            crls.append(data)
    return crls


def _parse_crls(ders: list[bytes]) -> list[x509.CertificateRevocationList]:
    out = []
    for der in ders:
        try:
            out.append(x509.load_der_x509_crl(der))
        except ValueError as exc:
            raise ConfigurationError(f"a configured CRL file cannot be parsed: {exc}") from exc
    return out


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class ValidatedCertificate:
    der: bytes
    sha256: str
    subject: str
    issuer: str
    san: tuple[str, ...]
    not_after: datetime


class PeerCertificateValidator:
    """Validates client certificates for one purpose (partners, staff, ...)."""

    def __init__(
        self,
        trust_anchors: tuple[Path, ...],
        intermediates: tuple[Path, ...],
        revocation: RevocationSettings,
        *,
        extended_key_usage: str = "client_auth",
    ) -> None:
        self._roots = load_certificates(trust_anchors)
        if not self._roots:
            raise ConfigurationError("no trust anchors loaded")
        self._intermediates = load_certificates(intermediates)
        self._revocation = revocation
        self._crls = _load_crls(revocation.crl_files)
        self._crl_objects = _parse_crls(self._crls)
        self._eku = extended_key_usage
        self._cache: dict[str, tuple[float, ValidatedCertificate | PeerAuthenticationError]] = {}

    def reload_crls(self) -> None:
        self._crls = _load_crls(self._revocation.crl_files)
        self._crl_objects = _parse_crls(self._crls)
        self._cache.clear()

    async def validate(
        self, der: bytes, chain: Iterable[bytes] = (), *, moment: datetime | None = None
    ) -> ValidatedCertificate:
        """Return the validated certificate or raise :class:`PeerAuthenticationError`."""
        fp = fingerprint(der)
        now = time.monotonic()
        cached = self._cache.get(fp) if moment is None else None
        if cached and cached[0] > now:
            result = cached[1]
            if isinstance(result, PeerAuthenticationError):
                raise result
            return result
        try:
            result = await self._validate(der, chain, moment)
        except PeerAuthenticationError as exc:
            if moment is None:
                self._cache[fp] = (now + self._revocation.cache_seconds, exc)
            raise
        if moment is None:
            self._cache[fp] = (now + self._revocation.cache_seconds, result)
        return result

    def _check_crl_files(self, der: bytes, moment: datetime | None) -> None:
        issuers = [
            x509.load_der_x509_certificate(c.dump()) for c in (*self._roots, *self._intermediates)
        ]
        check_crl_files(der, self._crl_objects, issuers, self._revocation.policy, moment)

    async def _validate(
        self, der: bytes, chain: Iterable[bytes], moment: datetime | None
    ) -> ValidatedCertificate:
        try:
            cert = asn1_x509.Certificate.load(der)
            cert.native  # noqa: B018 - force a full parse
        except (ValueError, TypeError) as exc:
            raise PeerAuthenticationError(
                "the client certificate could not be parsed", reason="malformed-certificate"
            ) from exc
        others = self._intermediates + [asn1_x509.Certificate.load(c) for c in chain]
        vc = ValidationContext(
            trust_roots=self._roots,
            other_certs=others,
            crls=self._crls,
            allow_fetching=self._revocation.fetch,
            revocation_mode=self._revocation.policy,
            moment=moment,
        )
        validator = CertificateValidator(cert, intermediate_certs=others, validation_context=vc)
        try:
            await asyncio.wait_for(
                validator.async_validate_usage(
                    key_usage=set(), extended_key_usage={self._eku}, extended_optional=True
                ),
                timeout=30,
            )
        except cv_errors.RevokedError as exc:
            raise PeerAuthenticationError(
                "the client certificate has been revoked", reason="revoked", detail=str(exc)
            ) from exc
        except cv_errors.ExpiredError as exc:
            raise PeerAuthenticationError(
                "the client certificate has expired", reason="expired", detail=str(exc)
            ) from exc
        except cv_errors.NotYetValidError as exc:
            raise PeerAuthenticationError(
                "the client certificate is not yet valid", reason="not-yet-valid", detail=str(exc)
            ) from exc
        except cv_errors.InsufficientRevinfoError as exc:
            raise PeerAuthenticationError(
                "the revocation status of the client certificate could not be established",
                reason="revocation-unknown",
                detail=str(exc),
            ) from exc
        except cv_errors.PathBuildingError as exc:
            raise PeerAuthenticationError(
                "the client certificate was issued by an unknown CA",
                reason="unknown-ca",
                detail=str(exc),
            ) from exc
        except cv_errors.InvalidCertificateError as exc:
            text = str(exc)
            reason = "wrong-eku" if "extended key usage" in text.lower() else "invalid-certificate"
            raise PeerAuthenticationError(
                "the client certificate is not allowed for TLS client authentication (EKU)"
                if reason == "wrong-eku"
                else "the client certificate was refused",
                reason=reason,
                detail=text,
            ) from exc
        except (cv_errors.PathValidationError, cv_errors.ValidationError) as exc:
            raise PeerAuthenticationError(
                "the client certificate chain did not validate",
                reason="invalid-chain",
                detail=str(exc),
            ) from exc
        except TimeoutError as exc:
            raise PeerAuthenticationError(
                "revocation checking timed out", reason="revocation-unknown"
            ) from exc
        self._check_crl_files(der, moment)
        san: list[str] = []
        ext = cert.subject_alt_name_value
        if ext is not None:
            for name in ext:
                san.append(f"{name.name}:{name.native}")
        return ValidatedCertificate(
            der=der,
            sha256=fingerprint(der),
            subject=cert.subject.human_friendly,
            issuer=cert.issuer.human_friendly,
            san=tuple(san),
            not_after=cert["tbs_certificate"]["validity"]["not_after"].native,
        )


def _issuer_for(
    crl: x509.CertificateRevocationList, candidates: Iterable[x509.Certificate]
) -> x509.Certificate | None:
    for cand in candidates:
        if cand.subject == crl.issuer:
            try:
                if crl.is_signature_valid(cand.public_key()):  # type: ignore[arg-type]
                    return cand
            except (TypeError, ValueError):
                continue
    return None


def check_crl_files(
    cert_der: bytes,
    crls: Iterable[x509.CertificateRevocationList],
    issuers: Iterable[x509.Certificate],
    policy: RevocationPolicy,
    moment: datetime | None = None,
) -> None:
    """Check a certificate against configured CRL files (RFC 5280 §6.3).

    Configured CRL files are an explicit revocation source: a certificate whose
    issuer has one is checked against it under every policy.  A CRL past its
    nextUpdate fails under ``require`` and ``hard-fail`` and is tolerated with
    ``soft-fail``; a revoked serial is always refused.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    now = moment or datetime.now(UTC)
    issuer_list = list(issuers)
    for crl in crls:
        if crl.issuer != cert.issuer:
            continue
        if _issuer_for(crl, issuer_list) is None:
            raise PeerAuthenticationError(
                "a configured CRL for the certificate's issuer has an invalid signature",
                reason="revocation-unknown",
            )
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now and policy != "soft-fail":
            raise PeerAuthenticationError(
                "the CRL for the client certificate's issuer is out of date",
                reason="revocation-unknown",
                detail=f"CRL nextUpdate {next_update.isoformat()}",
            )
        revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if revoked is not None and revoked.revocation_date_utc <= now:
            raise PeerAuthenticationError(
                "the client certificate has been revoked",
                reason="revoked",
                detail=f"revoked on {revoked.revocation_date_utc.isoformat()} (CRL)",
            )
