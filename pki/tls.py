"""The one TLS context factory (R-TLS-1, R-TLS-2; STYLE lesson 4).

Every ``ssl.SSLContext`` Sekisho uses is built here from a policy value.  The
policy follows the CRYPTREC/IPA "TLS暗号設定ガイドライン" high-security type and
DICOM PS3.15 B.12 / BCP 195 (RFC 9325):

* TLS 1.2 minimum, optionally TLS 1.3 only;
* for TLS 1.2 only ECDHE key exchange with AES-GCM (AEAD, forward secrecy);
* no compression, no renegotiation;
* mutual authentication: a server always requires a client certificate and a
  client always verifies the server;
* trust anchors come only from configured files, never from the OS store.

Other modules receive contexts, never paths.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pki.certs import check_private_key_permissions, key_matches_certificate
from pki.errors import ConfigurationError

#: TLS 1.2 suites allowed by R-TLS-2: ECDHE with AES-GCM only.  TLS 1.3 suites
#: are all AEAD with ephemeral key exchange and stay at OpenSSL's defaults.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
    )
)
TLS13_CIPHERSUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")

MinVersion = Literal["1.2", "1.3"]


@dataclass(frozen=True)
class TlsEndpointSettings:
    """Own identity and peer trust for one TLS endpoint (server or client)."""

    certificate: Path
    private_key: Path
    #: Trust anchors for the peer's certificate (PEM files, one or more certs each).
    trust_anchors: tuple[Path, ...]
    #: Extra intermediate certificates the peer may omit from its chain.
    intermediates: tuple[Path, ...] = ()
    min_version: MinVersion = "1.2"

    def __post_init__(self) -> None:
        if not self.trust_anchors:
            raise ValueError("trust_anchors must name at least one file")


def _base_context(protocol: int, settings: TlsEndpointSettings) -> ssl.SSLContext:
    for p in (settings.certificate, settings.private_key, *settings.trust_anchors):
        if not p.is_file():
            raise ConfigurationError(f"TLS file not found: {p}")
    check_private_key_permissions(settings.private_key)
    if not key_matches_certificate(settings.private_key, settings.certificate):
        raise ConfigurationError(
            f"private key {settings.private_key} does not match certificate {settings.certificate}"
        )
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if settings.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    ctx.load_cert_chain(str(settings.certificate), str(settings.private_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Only configured anchors: never load_default_certs().
    for anchor in settings.trust_anchors:
        try:
            ctx.load_verify_locations(cafile=str(anchor))
        except ssl.SSLError as exc:
            raise ConfigurationError(f"cannot load trust anchors from {anchor}: {exc}") from exc
    # Intermediates are loaded as additional verify locations too; OpenSSL only
    # treats self-signed ones as anchors when X509_V_FLAG_PARTIAL_CHAIN is off.
    for inter in settings.intermediates:
        ctx.load_verify_locations(cafile=str(inter))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def server_context(settings: TlsEndpointSettings) -> ssl.SSLContext:
    """A server context that requires and verifies a client certificate.

    ``PROTOCOL_TLS_SERVER`` (not the generic protocol, pynetdicom #709) so that
    OpenSSL checks the client certificate's purpose (clientAuth EKU).
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, settings)
    ctx.post_handshake_auth = False
    return ctx


def client_context(settings: TlsEndpointSettings, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context presenting our certificate and verifying the server."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, settings)
    ctx.check_hostname = check_hostname
    return ctx


def describe(ctx: ssl.SSLContext) -> dict[str, object]:
    """A summary of a context's policy for logs and the admin API."""
    return {
        "minimum_version": ctx.minimum_version.name,
        "maximum_version": ctx.maximum_version.name,
        "ciphers": [c["name"] for c in ctx.get_ciphers()],
        "verify_mode": ctx.verify_mode.name,
    }


def handshake_failure_reason(exc: BaseException) -> tuple[str, str]:
    """Map a failed server-side handshake to (reason code, plain words) (R-TLS-5)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = (exc.verify_message or "").lower()
        code = exc.verify_code
        table: Sequence[tuple[str, str, str]] = (
            ("expired", "expired", "the client certificate has expired"),
            ("not yet valid", "not-yet-valid", "the client certificate is not yet valid"),
            ("revoked", "revoked", "the client certificate has been revoked"),
            # X509_V_ERR_INVALID_PURPOSE: OpenSSL 3 says "unsuitable", 1.x "unsupported".
            (
                "unsuitable certificate purpose",
                "wrong-eku",
                "the client certificate is not allowed for TLS client authentication (EKU)",
            ),
            (
                "unsupported certificate purpose",
                "wrong-eku",
                "the client certificate is not allowed for TLS client authentication (EKU)",
            ),
            ("local issuer", "unknown-ca", "the client certificate was issued by an unknown CA"),
            ("self-signed", "unknown-ca", "the client certificate was issued by an unknown CA"),
            ("self signed", "unknown-ca", "the client certificate was issued by an unknown CA"),
            ("ca md too weak", "weak-key", "the client certificate uses a weak algorithm"),
            ("key too small", "weak-key", "the client certificate's key is too small"),
        )
        for needle, reason, words in table:
            if needle in msg:
                return reason, words
        return "invalid-certificate", f"the client certificate was refused ({msg or code})"
    if isinstance(exc, ssl.SSLError):
        # ``reason`` exists only on errors raised by the _ssl module itself.
        ssl_reason = getattr(exc, "reason", None)
        text = f"{ssl_reason or ''} {exc}".lower()
        table2: Sequence[tuple[str, str, str]] = (
            (
                "peer_did_not_return_a_certificate",
                "no-certificate",
                "the client did not present a certificate",
            ),
            (
                "peer did not return a certificate",
                "no-certificate",
                "the client did not present a certificate",
            ),
            ("certificate required", "no-certificate", "the client did not present a certificate"),
            (
                "unsupported_protocol",
                "protocol-version",
                "the client offered only TLS versions older than allowed",
            ),
            (
                "unsupported protocol",
                "protocol-version",
                "the client offered only TLS versions older than allowed",
            ),
            ("wrong_version_number", "not-tls", "the client did not speak TLS"),
            ("wrong version number", "not-tls", "the client did not speak TLS"),
            ("http_request", "not-tls", "the client sent plain HTTP to the TLS port"),
            ("no_shared_cipher", "cipher", "the client offered no allowed cipher suite"),
            ("no shared cipher", "cipher", "the client offered no allowed cipher suite"),
            (
                "no_suitable_signature_algorithm",
                "cipher",
                "the client offered no allowed signature algorithm",
            ),
            (
                "version too low",
                "protocol-version",
                "the client offered only TLS versions older than allowed",
            ),
            (
                "tlsv1 alert protocol version",
                "protocol-version",
                "the client refused the allowed TLS versions",
            ),
            (
                "unknown ca",
                "unknown-server-ca",
                "the client does not trust the gateway's certificate",
            ),
        )
        for needle, reason, words in table2:
            if needle in text:
                return reason, words
        return "handshake-failed", f"TLS handshake failed ({ssl_reason or exc})"
    # asyncio's ``ssl_handshake_timeout`` aborts with ConnectionAbortedError
    # ("SSL handshake is taking longer than N seconds"), not TimeoutError.
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, ConnectionAbortedError) and "taking longer than" in str(exc)
    ):
        return "handshake-timeout", "the TLS handshake did not complete in time"
    if isinstance(exc, ConnectionError | EOFError):
        return "connection-closed", "the client closed the connection during the TLS handshake"
    return "handshake-failed", f"TLS handshake failed ({type(exc).__name__})"


__all__ = [
    "TLS12_CIPHERS",
    "TlsEndpointSettings",
    "client_context",
    "describe",
    "handshake_failure_reason",
    "server_context",
]
