"""Development PKI generator: every certificate Sekisho's tests and demos need.

STYLE §5 ("generated test PKI, never committed keys"): one call builds three
independent hierarchies (the partner/TLS hierarchy, a separate HPKI-style
hierarchy and an *unknown* root that no trust store contains), the good and the
deliberately broken end-entity certificates, CRLs and PKCS#12 bundles, and a
``manifest.json`` that tells tests where everything is.

Profiles follow RFC 5280 (§4.2.1.1/2 key identifiers, §4.2.1.3 key usage,
§4.2.1.9 basic constraints, §4.2.1.12 EKU, §4.2.1.13 CRL distribution points,
§4.2.2.1 AIA, §5 CRLs), RFC 3161 §2.3 for the TSA (critical timeStamping EKU),
RFC 6960 §4.2.2.2 for the OCSP responder (id-kp-OCSPSigning, ocsp-nocheck) and
the MHLW HPKI profile for signers (nonRepudiation, hcRole, see :mod:`pki.hpki`).

Private keys are written with :func:`pki.certs.write_private_key` (mode 0600
from creation) inside a 0700 directory.  These keys are for development only;
production keys live on tokens (R-SIG-7) or are provisioned by the hospital.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.certs import (
    fingerprint_sha256,
    load_private_key,
    write_private_key,
    write_public_file,
    write_secret_file,
)
from pki.errors import ConfigurationError
from pki.hpki import hc_role_extension

__all__ = [
    "HPKI_SIGNER_ROLES",
    "MANIFEST_NAME",
    "PARTNER_ROLES",
    "ROLES",
    "STAFF_ROLES",
    "DevKey",
    "DevPki",
    "fingerprint_sha256",
    "generate",
    "load",
    "write_private_key",
]

#: The key types the dev PKI generates (RSA-2048, EC P-256).
DevKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_DEMO_HOSPITAL = "Sekisho Demo Hospital"
_DEV_PKI = "Sekisho Development PKI"
_CLIENT = (ExtendedKeyUsageOID.CLIENT_AUTH,)
_STAFF = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION)
_CA_USAGE = frozenset({"key_cert_sign", "crl_sign", "digital_signature"})
_SIGNER_USAGE = frozenset({"digital_signature", "content_commitment"})


@dataclass(frozen=True)
class _Spec:
    """How one role's certificate is built (internal; see the module table)."""

    role: str
    issuer: str | None  # None: self-signed
    org: str
    cn: str
    purpose: str
    key_usage: frozenset[str]
    eku: tuple[x509.ObjectIdentifier, ...] | None = None
    eku_critical: bool = False
    ca: bool = False
    path_length: int | None = None
    ec_key: bool = False
    validity: str = "default"  # root | ca | default | expired | not-yet-valid
    hc_role: str | None = None
    san_dns: tuple[str, ...] = ()
    san_email: tuple[str, ...] = ()
    p12: bool = False


# fmt: off
def _partner(role: str, org: str, cn: str, **kw: Any) -> _Spec:
    kw.setdefault("eku", _CLIENT)
    kw.setdefault("issuer", "intermediate-ca")
    return _Spec(role=role, org=org, cn=cn, purpose="partner-client",
                 key_usage=frozenset({"digital_signature"}), san_dns=(cn,), **kw)


def _staff(role: str, user: str) -> _Spec:
    return _Spec(role=role, issuer="intermediate-ca", org=_DEMO_HOSPITAL, cn=user,
                 purpose="staff-client", key_usage=frozenset({"digital_signature"}),
                 eku=_STAFF, san_email=(f"{user}@demo-hospital.example",))


def _signer(role: str, cn: str, hc: str | None, **kw: Any) -> _Spec:
    kw.setdefault("key_usage", _SIGNER_USAGE)
    return _Spec(role=role, issuer="hpki-root-ca", org=_DEMO_HOSPITAL, cn=cn,
                 purpose="hpki-signer", hc_role=hc, p12=True, **kw)


_SPECS: tuple[_Spec, ...] = (
    _Spec("root-ca", None, _DEV_PKI, "Sekisho Dev Root CA", "ca", _CA_USAGE,
          ca=True, validity="root"),
    _Spec("intermediate-ca", "root-ca", _DEV_PKI, "Sekisho Dev Issuing CA", "ca", _CA_USAGE,
          ca=True, path_length=0, validity="ca"),
    _Spec("unknown-root-ca", None, "Unknown Development PKI", "Unknown Dev Root CA", "ca",
          _CA_USAGE, ca=True, validity="root"),
    _Spec("hpki-root-ca", None, "HPKI Development Root", "HPKI Dev Root CA", "hpki-ca",
          _CA_USAGE, ca=True, validity="root"),
    _Spec("gateway-server", "intermediate-ca", _DEMO_HOSPITAL, "Sekisho Gateway", "tls-server",
          frozenset({"digital_signature", "key_encipherment"}),
          eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)),
    _partner("partner-valid-1", "Regional Hospital A", "partner-a.example"),
    _partner("partner-valid-2", "Regional Hospital B", "partner-b.example"),
    _partner("partner-valid-ec", "Regional Clinic C", "partner-c.example", ec_key=True),
    _partner("partner-expired", "Regional Hospital D", "partner-expired.example",
             validity="expired"),
    _partner("partner-not-yet-valid", "Regional Hospital E", "partner-future.example",
             validity="not-yet-valid"),
    _partner("partner-revoked", "Regional Hospital F", "partner-revoked.example"),
    _partner("partner-wrong-eku", "Regional Hospital G", "partner-wrong-eku.example",
             eku=(ExtendedKeyUsageOID.EMAIL_PROTECTION,)),
    _partner("partner-unknown-ca", "Unknown Hospital", "partner-unknown.example",
             issuer="unknown-root-ca"),
    _Spec("storage-provider", "intermediate-ca", "Example Storage Provider", "storage.example",
          "storage-client", frozenset({"digital_signature"}), eku=_CLIENT,
          san_dns=("storage.example",)),
    _staff("staff-reception-1", "reception01"),
    _staff("staff-operator-1", "operator01"),
    _staff("staff-admin-1", "admin01"),
    _staff("staff-auditor-1", "auditor01"),
    _signer("hpki-signer", "Yamada Taro", "Medical Doctor"),
    _signer("hpki-signer-technologist", "Suzuki Hanako", "Radiological Technologist"),
    _signer("hpki-signer-no-role", "Sato Jiro", None),
    _signer("hpki-signer-expired", "Tanaka Ichiro", "Medical Doctor", validity="expired"),
    _signer("hpki-signer-revoked", "Ito Saburo", "Medical Doctor"),
    _signer("hpki-signer-no-nonrep", "Watanabe Shiro", "Medical Doctor",
            key_usage=frozenset({"digital_signature"})),
    _Spec("tsa", "root-ca", _DEV_PKI, "Sekisho Dev TSA", "tsa",
          frozenset({"digital_signature", "content_commitment"}),
          eku=(ExtendedKeyUsageOID.TIME_STAMPING,), eku_critical=True),
    _Spec("ocsp-responder", "intermediate-ca", _DEV_PKI, "Sekisho Dev OCSP Responder",
          "ocsp-responder", frozenset({"digital_signature"}),
          eku=(ExtendedKeyUsageOID.OCSP_SIGNING,)),
)

# fmt: on
#: Every role, issuers before the certificates they issue.
ROLES: tuple[str, ...] = tuple(s.role for s in _SPECS)
PARTNER_ROLES: tuple[str, ...] = tuple(s.role for s in _SPECS if s.purpose == "partner-client")
STAFF_ROLES: tuple[str, ...] = tuple(s.role for s in _SPECS if s.purpose == "staff-client")
HPKI_SIGNER_ROLES: tuple[str, ...] = tuple(s.role for s in _SPECS if s.purpose == "hpki-signer")
#: CRL issuer -> roles it revokes (RFC 5280 §5).  unknown-root-ca publishes none.
_CRLS: dict[str, tuple[str, ...]] = {
    "root-ca": (),
    "intermediate-ca": ("partner-revoked",),
    "hpki-root-ca": ("hpki-signer-revoked",),
}
_TRUST = {"partners": ["root-ca"], "hpki": ["hpki-root-ca"], "tsa": ["root-ca"]}


def _validity(kind: str, now: datetime) -> tuple[datetime, datetime]:
    start = now - timedelta(days=1)
    if kind == "root":
        return start, start + timedelta(days=3652)
    if kind == "ca":
        return start, start + timedelta(days=1826)
    if kind == "expired":
        return now - timedelta(days=366), now - timedelta(days=1)
    if kind == "not-yet-valid":
        begin = now + timedelta(days=30)
        return begin, begin + timedelta(days=730)
    return start, start + timedelta(days=730)


def _new_key(spec: _Spec) -> DevKey:
    if spec.ec_key:
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(spec: _Spec) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, spec.org),
            x509.NameAttribute(NameOID.COMMON_NAME, spec.cn),
        ]
    )


#: x509.KeyUsage's keyword arguments, in RFC 5280 §4.2.1.3 bit order.
_KU_FLAGS = tuple(
    "digital_signature content_commitment key_encipherment data_encipherment key_agreement"
    " key_cert_sign crl_sign encipher_only decipher_only".split()
)


def _key_usage(names: frozenset[str]) -> x509.KeyUsage:
    if names - set(_KU_FLAGS):
        raise ValueError(f"unknown key usage {sorted(names - set(_KU_FLAGS))}")
    return x509.KeyUsage(**{flag: flag in names for flag in _KU_FLAGS})


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class _Options:
    now: datetime
    dns: tuple[str, ...]
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    crl_url_base: str | None
    ocsp_url: str | None


def _build_cert(
    spec: _Spec,
    key: DevKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: DevKey,
    opts: _Options,
) -> x509.Certificate:
    not_before, not_after = _validity(spec.validity, opts.now)
    subject = _name(spec)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    if issuer_cert is None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        issuer_name = subject
    else:
        issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value)
        issuer_name = issuer_cert.subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=spec.ca, path_length=spec.path_length), critical=True
        )
        .add_extension(_key_usage(spec.key_usage), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )
    if spec.eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(spec.eku)), critical=spec.eku_critical
        )
    san: list[x509.GeneralName] = []
    if spec.role == "gateway-server":
        san += [x509.DNSName(d) for d in opts.dns] + [x509.IPAddress(ip) for ip in opts.ips]
    san += [x509.DNSName(d) for d in spec.san_dns]
    san += [x509.RFC822Name(e) for e in spec.san_email]
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if spec.hc_role is not None:
        builder = builder.add_extension(hc_role_extension(spec.hc_role), critical=False)
    if spec.issuer in _CRLS and opts.crl_url_base:
        url = f"{opts.crl_url_base}/{spec.issuer}.crl"
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    if spec.role == "ocsp-responder":
        builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
    elif spec.issuer is not None and opts.ocsp_url:
        access = x509.AccessDescription(
            x509.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(opts.ocsp_url)
        )
        builder = builder.add_extension(x509.AuthorityInformationAccess([access]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _build_crl(
    issuer_cert: x509.Certificate,
    issuer_key: DevKey,
    revoked: Sequence[x509.Certificate],
    now: datetime,
) -> x509.CertificateRevocationList:
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(now - timedelta(hours=1))
        .next_update(now + timedelta(days=7))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
            critical=False,
        )
    )
    for cert in revoked:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - timedelta(hours=1))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(issuer_key, hashes.SHA256())


def _p12(
    role: str,
    key: DevKey,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    password: bytes,
) -> bytes:
    """PKCS#12 (RFC 7292) with PBES2/AES-256 and a SHA-256 MAC (OpenSSL 3 default)."""
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(10000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(role.encode(), key, cert, chain, encryption)


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigurationError(f"dev PKI output {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise ConfigurationError(
                f"refusing to write a dev PKI into {out_dir}: it is not empty and has no "
                f"{MANIFEST_NAME} (choose an empty or new directory)"
            )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)


def generate(
    out_dir: Path,
    *,
    now: datetime | None = None,
    server_names: Sequence[str] = ("localhost",),
    server_ips: Sequence[str] = ("127.0.0.1", "::1"),
    crl_url_base: str | None = None,
    ocsp_url: str | None = None,
) -> DevPki:
    """Generate the whole development PKI into ``out_dir`` and return it.

    ``now`` pins the clock (timezone-aware; default: the current UTC time).  An
    existing ``out_dir`` must be empty or hold a previous dev PKI (it is then
    regenerated in place).  Keys are fresh on every call.
    """
    out_dir = Path(out_dir)
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    if moment.tzinfo is None:
        raise ConfigurationError("dev PKI 'now' must be timezone-aware")
    try:
        ips = tuple(ipaddress.ip_address(ip) for ip in server_ips)
    except ValueError as exc:
        raise ConfigurationError(f"invalid server IP address: {exc}") from exc
    opts = _Options(
        now=moment,
        dns=tuple(dict.fromkeys(["localhost", *server_names])),
        ips=ips,
        crl_url_base=crl_url_base.rstrip("/") if crl_url_base else None,
        ocsp_url=ocsp_url,
    )
    _prepare_dir(out_dir)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        keys = dict(zip(ROLES, pool.map(_new_key, _SPECS), strict=True))
    by_role = {s.role: s for s in _SPECS}
    certs: dict[str, x509.Certificate] = {}
    for spec in _SPECS:
        issuer = spec.issuer
        certs[spec.role] = _build_cert(
            spec,
            keys[spec.role],
            certs[issuer] if issuer else None,
            keys[issuer or spec.role],
            opts,
        )

    def chain_of(role: str) -> list[x509.Certificate]:
        """Issuing CA certificates above ``role`` up to, excluding, the root."""
        out: list[x509.Certificate] = []
        issuer = by_role[role].issuer
        while issuer is not None and by_role[issuer].issuer is not None:
            out.append(certs[issuer])
            issuer = by_role[issuer].issuer
        return out

    entries: list[dict[str, Any]] = []
    for spec in _SPECS:
        cert = certs[spec.role]
        cert_name, key_name = f"{spec.role}.crt.pem", f"{spec.role}.key.pem"
        write_public_file(out_dir / cert_name, _pem(cert))
        write_private_key(out_dir / key_name, keys[spec.role])
        entry: dict[str, Any] = {
            "role": spec.role,
            "cert": cert_name,
            "key": key_name,
            "issuer_role": spec.issuer or spec.role,
            "subject": cert.subject.rfc4514_string(),
            "sha256": fingerprint_sha256(cert),
            "serial": format(cert.serial_number, "x"),
            "not_before": _iso(cert.not_valid_before_utc),
            "not_after": _iso(cert.not_valid_after_utc),
            "purpose": spec.purpose,
            "key_type": "ec-p256" if spec.ec_key else "rsa-2048",
        }
        if not spec.ca:
            chain_name = f"{spec.role}.chain.pem"
            write_public_file(
                out_dir / chain_name, b"".join(_pem(c) for c in [cert, *chain_of(spec.role)])
            )
            entry["chain"] = chain_name
        if spec.hc_role is not None:
            entry["hc_role"] = spec.hc_role
        if spec.p12:
            password = secrets.token_urlsafe(24).encode("ascii")
            ca_chain = [*chain_of(spec.role), certs["hpki-root-ca"]]
            write_secret_file(
                out_dir / f"{spec.role}.p12",
                _p12(spec.role, keys[spec.role], cert, ca_chain, password),
            )
            write_secret_file(out_dir / f"{spec.role}.p12.pass", password)
            entry["p12"], entry["p12_pass"] = f"{spec.role}.p12", f"{spec.role}.p12.pass"
        entries.append(entry)

    crls: list[dict[str, Any]] = []
    for issuer, revoked_roles in _CRLS.items():
        crl = _build_crl(certs[issuer], keys[issuer], [certs[r] for r in revoked_roles], moment)
        pem_name, der_name = f"{issuer}.crl.pem", f"{issuer}.crl.der"
        write_public_file(out_dir / pem_name, crl.public_bytes(serialization.Encoding.PEM))
        write_public_file(out_dir / der_name, crl.public_bytes(serialization.Encoding.DER))
        crls.append(
            {
                "issuer_role": issuer,
                "pem": pem_name,
                "der": der_name,
                "revoked_roles": list(revoked_roles),
            }
        )

    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "generated_at": _iso(moment),
        "certificates": entries,
        "crls": crls,
        "trust": {k: list(v) for k, v in _TRUST.items()},
    }
    write_public_file(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")
    return DevPki(root=out_dir, manifest=manifest)


def load(out_dir: Path) -> DevPki:
    """Open a dev PKI previously written by :func:`generate`."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read dev PKI manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise ConfigurationError(f"{path} is not a version {MANIFEST_VERSION} dev PKI manifest")
    return DevPki(root=Path(out_dir), manifest=manifest)


@dataclass(frozen=True)
class DevPki:
    """A generated development PKI: its directory and its manifest."""

    root: Path
    manifest: dict[str, Any]

    @property
    def roles(self) -> list[str]:
        return [e["role"] for e in self.manifest["certificates"]]

    def entry(self, role: str) -> dict[str, Any]:
        for e in self.manifest["certificates"]:
            if e["role"] == role:
                return dict(e)
        raise KeyError(f"no role {role!r} in the dev PKI at {self.root}")

    def cert_path(self, role: str) -> Path:
        return self.root / self.entry(role)["cert"]

    def key_path(self, role: str) -> Path:
        return self.root / self.entry(role)["key"]

    def chain_path(self, role: str) -> Path:
        """PEM of the leaf followed by its intermediates (what a TLS peer sends)."""
        entry = self.entry(role)
        if "chain" not in entry:
            raise KeyError(f"role {role!r} is a CA and has no chain file")
        return self.root / entry["chain"]

    def cert(self, role: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path(role).read_bytes())

    def private_key(self, role: str) -> DevKey:
        key = load_private_key(self.key_path(role))
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{self.key_path(role)} is not an RSA or EC key")
        return key

    def fingerprint(self, role: str) -> str:
        """Lower-case hex SHA-256 of the certificate's DER (R-TLS-3, R-TLS-7)."""
        return fingerprint_sha256(self.cert(role))

    def serial(self, role: str) -> int:
        return int(self.entry(role)["serial"], 16)

    def crl_path(self, issuer_role: str, *, der: bool = False) -> Path:
        for c in self.manifest["crls"]:
            if c["issuer_role"] == issuer_role:
                return self.root / c["der" if der else "pem"]
        raise KeyError(f"no CRL for {issuer_role!r} in the dev PKI at {self.root}")

    def crl(self, issuer_role: str) -> x509.CertificateRevocationList:
        return x509.load_der_x509_crl(self.crl_path(issuer_role, der=True).read_bytes())

    def p12_path(self, role: str) -> Path:
        entry = self.entry(role)
        if "p12" not in entry:
            raise KeyError(f"role {role!r} has no PKCS#12 bundle")
        return self.root / entry["p12"]

    def p12_password(self, role: str) -> bytes:
        entry = self.entry(role)
        if "p12_pass" not in entry:
            raise KeyError(f"role {role!r} has no PKCS#12 bundle")
        return (self.root / entry["p12_pass"]).read_bytes().strip()

    def trust_anchor_paths(self, purpose: str) -> list[Path]:
        """Trust anchors for ``partners``, ``hpki`` or ``tsa`` (R-TLS-3, R-SIG-2)."""
        return [self.cert_path(r) for r in self.manifest["trust"][purpose]]
