"""Signing policy per record type and the signer check at signing time (R-SIG-1, R-SIG-2).

The hospital decides, per record type (digitized film, scanned referral letter,
imported record, ...), whether a signature is required, whether the signer
must hold an HPKI qualification (hcRole) and which roles are allowed, and
whether an RFC 3161 timestamp is required (seed 000 §5.2(1)②, 付録2 §14①).
The policy is configuration, so it is a set of frozen dataclasses built by
``from_config`` that refuses unknown keys and names the key path (STYLE §3).

:func:`check_signer` combines the certificate-local HPKI checks of
:mod:`pki.hpki` (nonRepudiation, validity, hcRole) with RFC 5280 §6 path
validation and revocation checking at the signing time by
pyhanko-certvalidator.  It never raises for a refusal: it returns every
reason, each with a stable code, so that the caller can audit and report them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from asn1crypto import x509 as asn1_x509
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors

from pki import hpki
from pki.errors import ConfigurationError, SigningError
from signing.trust import reason_for_exception

__all__ = [
    "DicomProfile",
    "RecordPolicy",
    "SignerCheck",
    "SigningPolicy",
    "check_signer",
]


class DicomProfile(enum.Enum):
    """Which attributes a DICOM signature covers (PS3.15 Annex C)."""

    #: Creator RSA Digital Signature Profile (PS3.15 C.2) over every eligible attribute.
    CREATOR = "creator"
    #: Authorization RSA Digital Signature Profile (PS3.15 C.3) over every eligible attribute.
    AUTHORIZATION = "authorization"
    #: Base RSA Digital Signature Profile (PS3.15 C.1): every eligible attribute.
    ALL = "all"


def _expect(value: Any, kind: type | tuple[type, ...], path: str, what: str) -> Any:
    if not isinstance(value, kind):
        raise ConfigurationError(f"{path}: expected {what}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class RecordPolicy:
    """What R-SIG-1 demands of one record type."""

    record_type: str
    signature_required: bool = True
    hpki_role_required: bool = False
    #: ``None`` accepts any stated role; otherwise a role must be in the set.
    allowed_roles: frozenset[str] | None = None
    timestamp_required: bool = True
    dicom_profile: DicomProfile = DicomProfile.CREATOR
    #: Default ASTM E1762 signature purpose (DICOM code value "1" .. "18").
    default_purpose: str = "1"

    _KEYS = frozenset(
        {
            "signature_required",
            "hpki_role_required",
            "allowed_roles",
            "timestamp_required",
            "dicom_profile",
            "default_purpose",
        }
    )

    @classmethod
    def from_config(cls, record_type: str, mapping: Mapping[str, Any], path: str) -> RecordPolicy:
        """Build from ``mapping``; every unknown key is refused with its full path."""
        _expect(mapping, Mapping, path, "a mapping")
        for key in mapping:
            if key not in cls._KEYS:
                raise ConfigurationError(f"{path}.{key}: unknown key")
        kwargs: dict[str, Any] = {"record_type": record_type}
        for key in ("signature_required", "hpki_role_required", "timestamp_required"):
            if key in mapping:
                kwargs[key] = _expect(mapping[key], bool, f"{path}.{key}", "true or false")
        if "allowed_roles" in mapping:
            roles = mapping["allowed_roles"]
            if roles is not None:
                _expect(roles, list, f"{path}.allowed_roles", "a list of role names")
                for i, role in enumerate(roles):
                    _expect(role, str, f"{path}.allowed_roles[{i}]", "a role name")
                roles = frozenset(roles)
            kwargs["allowed_roles"] = roles
        if "dicom_profile" in mapping:
            raw = mapping["dicom_profile"]
            try:
                kwargs["dicom_profile"] = DicomProfile(raw)
            except ValueError as exc:
                allowed = ", ".join(p.value for p in DicomProfile)
                raise ConfigurationError(
                    f"{path}.dicom_profile: {raw!r} is not one of {allowed}"
                ) from exc
        if "default_purpose" in mapping:
            purpose = str(_expect(mapping["default_purpose"], (str, int), path, "a purpose code"))
            if not purpose.isdigit() or not 1 <= int(purpose) <= 18:
                raise ConfigurationError(
                    f"{path}.default_purpose: {purpose!r} is not an ASTM signature purpose 1..18"
                )
            kwargs["default_purpose"] = purpose
        policy = cls(**kwargs)
        no_role_allowed = policy.allowed_roles is not None and not policy.allowed_roles
        if no_role_allowed and policy.hpki_role_required:
            raise ConfigurationError(f"{path}.allowed_roles: empty list allows no signer at all")
        return policy


@dataclass(frozen=True)
class SigningPolicy:
    """The R-SIG-1 table: one :class:`RecordPolicy` per configured record type."""

    records: Mapping[str, RecordPolicy] = field(default_factory=dict)

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any], path: str = "signing.policy") -> SigningPolicy:
        """``mapping`` is ``{record_type: {key: value}}``."""
        _expect(mapping, Mapping, path, "a mapping of record types")
        records: dict[str, RecordPolicy] = {}
        for name, sub in mapping.items():
            _expect(name, str, path, "record type names")
            records[name] = RecordPolicy.from_config(name, sub, f"{path}.{name}")
        return cls(records)

    def for_record(self, record_type: str) -> RecordPolicy:
        """The policy for ``record_type``; an unconfigured type is refused."""
        try:
            return self.records[record_type]
        except KeyError:
            known = ", ".join(sorted(self.records)) or "none configured"
            raise SigningError(
                f"record type {record_type!r} has no signing policy (known: {known})"
            ) from None


@dataclass(frozen=True)
class SignerCheck:
    """Outcome of :func:`check_signer`.

    ``codes`` are stable machine-readable reasons (``no-role``,
    ``role-not-allowed``, ``no-nonrepudiation``, ``expired``, ``not-yet-valid``,
    ``not-trusted``, ``revoked``, ``revocation-unknown``, ``key-usage``,
    ``weak-algorithm``); ``reasons`` the matching human sentences.
    """

    ok: bool
    reasons: tuple[str, ...]
    codes: frozenset[str]
    role: str | None
    chain_ok: bool
    revocation: str  # "good", "revoked", "unknown", "unchecked"
    subject: str

    def raise_if_refused(self) -> None:
        """Raise :class:`SigningError` naming every reason when not ``ok``."""
        if not self.ok:
            raise SigningError(
                f"signer {self.subject} refused: " + "; ".join(self.reasons),
                detail=",".join(sorted(self.codes)),
            )


def _hpki_code(reason: str) -> str:
    if "no hcRole" in reason:
        return "no-role"
    if "not allowed" in reason:
        return "role-not-allowed"
    if "nonRepudiation" in reason:
        return "no-nonrepudiation"
    if "expired" in reason:
        return "expired"
    if "not valid before" in reason:
        return "not-yet-valid"
    return "hpki-profile"


async def check_signer(
    policy: RecordPolicy,
    cert: asn1_x509.Certificate,
    at: datetime,
    validation_context: ValidationContext,
    *,
    intermediates: tuple[asn1_x509.Certificate, ...] = (),
) -> SignerCheck:
    """Is ``cert`` acceptable to sign a record of ``policy`` at time ``at``?

    ``validation_context`` must carry the HPKI trust roots, CRLs (or fetching)
    and ``moment=at``; see :meth:`signing.trust.TrustConfig.signer_context`.
    """
    subject = cert.subject.human_friendly
    local = hpki.check_signing_certificate(
        cert,
        allowed_roles=policy.allowed_roles,
        require_role=policy.hpki_role_required,
        at=at,
    )
    reasons = list(local.reasons)
    codes = {_hpki_code(r) for r in local.reasons}

    chain_ok = False
    revocation = "unchecked"
    validator = CertificateValidator(
        cert, intermediate_certs=list(intermediates), validation_context=validation_context
    )
    try:
        await validator.async_validate_usage({"non_repudiation"})
        chain_ok = True
        has_revinfo = bool(validation_context.crls) or validation_context.fetching_allowed
        revocation = "good" if has_revinfo else "unchecked"
    except (cv_errors.ValidationError, cv_errors.PathBuildingError) as exc:
        reason = reason_for_exception(exc)
        code = reason.replace(" ", "-")
        if reason == "revoked":
            revocation = "revoked"
        elif reason == "revocation unknown":
            revocation = "unknown"
        if code not in codes:  # expiry is usually reported by both layers
            codes.add(code)
            reasons.append(f"certificate {reason}: {exc}")
        if reason in ("expired", "not yet valid", "key usage", "revoked"):
            chain_ok = await _chain_builds(validation_context, cert)
    return SignerCheck(
        ok=not reasons,
        reasons=tuple(reasons),
        codes=frozenset(codes),
        role=local.role,
        chain_ok=chain_ok,
        revocation=revocation,
        subject=subject,
    )


async def _chain_builds(vc: ValidationContext, cert: asn1_x509.Certificate) -> bool:
    """Whether a path to an anchor exists at all (to tell "expired" from "not trusted")."""
    try:
        paths = await vc.path_builder.async_build_paths(cert)
    except cv_errors.PathBuildingError:
        return False
    return bool(paths)
