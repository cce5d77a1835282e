"""Small certificate and key-file helpers shared by every layer.

Everything here is about files an operator hands to Sekisho: certificates
(PEM or DER, RFC 7468 / X.690), PKCS#8 private keys (RFC 5958) and the
permissions those key files must have.  Start-up code uses them to refuse to run
with a key that does not match its certificate or that other users can read
(R-TLS-1, R-TLS-7, STYLE "One TLS factory"); the admin tooling uses
:func:`fingerprint_sha256` to show trust anchors' fingerprints (R-TLS-7).

Failures are raised as :class:`pki.errors.ConfigurationError` naming the file,
never leaking key material.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)

from pki.errors import ConfigurationError

__all__ = [
    "check_private_key_permissions",
    "fingerprint_sha256",
    "key_matches_certificate",
    "load_certificate",
    "load_pem_certificates",
    "load_private_key",
    "write_private_key",
    "write_public_file",
    "write_secret_file",
]

_PEM_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
#: Permission bits that must be clear on a private key or secret file: no
#: access at all for group or others (the OpenSSH rule, stricter than "no read").
_FORBIDDEN_KEY_MODE = stat.S_IRWXG | stat.S_IRWXO


def fingerprint_sha256(cert: x509.Certificate | bytes) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding (R-TLS-7).

    ``cert`` is a :class:`cryptography.x509.Certificate` or its DER bytes.  This
    is the value partners are pinned by (R-TLS-3) and that the admin tooling
    shows for trust anchors.
    """
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {what} {path}: {exc.strerror or exc.__class__.__name__}"
        ) from exc


def load_pem_certificates(path: Path | str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (RFC 7468 §5), in file order.

    Raises :class:`ConfigurationError` if the file is unreadable, malformed or
    holds no certificate.
    """
    data = _read(Path(path), "certificate file")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigurationError(f"{path} is not a valid PEM certificate bundle: {exc}") from exc
    if not certs:
        raise ConfigurationError(f"{path} contains no certificate")
    return certs


def load_certificate(path: Path | str) -> x509.Certificate:
    """The single certificate in ``path`` (PEM, RFC 7468, or DER, X.690).

    A PEM file must contain exactly one certificate, so a bundle passed where a
    leaf is expected is refused instead of silently using its first entry.
    """
    data = _read(Path(path), "certificate file")
    if _PEM_CERT_MARKER in data:
        certs = load_pem_certificates(path)
        if len(certs) != 1:
            raise ConfigurationError(
                f"{path} contains {len(certs)} certificates where exactly one is expected"
            )
        return certs[0]
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigurationError(f"{path} is neither a PEM nor a DER certificate: {exc}") from exc


def check_private_key_permissions(path: Path | str) -> None:
    """Refuse a private key (or PIN/password file) that others may access.

    The file must be a regular file with no permission bit for group or other
    (mode ``0o600`` or ``0o400``); MHLW guideline 6.11 and STYLE §3 ("keys and
    PINs come from files with restricted permissions").  Raises
    :class:`ConfigurationError` naming the file and its mode otherwise.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot access key file {p}: {exc.strerror or exc.__class__.__name__}"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(f"key file {p} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & _FORBIDDEN_KEY_MODE:
        raise ConfigurationError(
            f"key file {p} has mode {mode:04o}; group and others must have no access "
            f"(run: chmod 600 {p})"
        )


def load_private_key(path: Path | str, password: bytes | None = None) -> PrivateKeyTypes:
    """Load a PEM or DER private key (PKCS#8, RFC 5958, or traditional form)."""
    data = _read(Path(path), "private key file")
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_private_key(data, password=password)
        return serialization.load_der_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        # Never echo the key bytes; the library message names only the problem.
        raise ConfigurationError(f"{path} is not a usable private key: {exc}") from exc


def key_matches_certificate(
    key_path: Path | str, cert_path: Path | str, password: bytes | None = None
) -> bool:
    """Whether the private key in ``key_path`` belongs to the certificate's public key.

    Compares the DER SubjectPublicKeyInfo (RFC 5280 §4.1.2.7) derived from the
    key with the certificate's.  ``cert_path`` may be a chain file: its first
    certificate is the leaf (RFC 8446 §4.4.2 order, as ``ssl.load_cert_chain``
    expects).  Unreadable or malformed files raise :class:`ConfigurationError`;
    a well-formed mismatch returns ``False``.
    """
    key = load_private_key(key_path, password)
    if _PEM_CERT_MARKER in _read(Path(cert_path), "certificate file"):
        cert = load_pem_certificates(cert_path)[0]
    else:
        cert = load_certificate(cert_path)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def write_public_file(path: Path | str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (certificates, CRLs, manifests).

    Written to a temporary sibling and renamed (POSIX ``rename`` is atomic), so a
    concurrent reader never sees a half-written certificate.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_secret_file(path: Path | str, data: bytes) -> None:
    """Write ``data`` so that it is never readable by group or others, even briefly.

    The bytes go to a fresh temporary file created with ``os.open(..., 0o600)``
    and ``O_EXCL`` in the same directory, are flushed to disk and then renamed
    over ``path`` (atomic on POSIX), so a reader sees either the old file or the
    complete new one with mode ``0o600``.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)  # umask only removes bits; make the mode exact
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private_key(
    path: Path | str, key: CertificateIssuerPrivateKeyTypes, password: bytes | None = None
) -> None:
    """Write ``key`` as PEM PKCS#8 (RFC 5958 / RFC 7468 §10) with mode ``0o600``.

    With ``password`` the key is encrypted with the best algorithm the library
    offers; without it the file is protected by its permissions only (suitable
    for development and for keys whose directory is itself ``0o700``).
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_secret_file(path, pem)
