"""The TLS factory's policy and the handshake-failure vocabulary (R-TLS-1, 2, 5).

``handshake_failure_reason`` is checked against the exceptions OpenSSL really
raises: each case runs a full handshake in memory (``ssl.MemoryBIO``) between
``pki.tls.server_context`` and a client built from the session's development
PKI, so a change in OpenSSL's wording (which once turned "wrong EKU" into a
generic refusal) fails here.
"""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from pki.devpki import DevPki
from pki.errors import ConfigurationError
from pki.tls import (
    TLS12_CIPHERS,
    TlsEndpointSettings,
    client_context,
    handshake_failure_reason,
    server_context,
)


def endpoint(pki: DevPki, **kw: object) -> TlsEndpointSettings:
    values: dict[str, object] = {
        "certificate": pki.cert_path("gateway-server"),
        "private_key": pki.key_path("gateway-server"),
        "trust_anchors": (pki.cert_path("root-ca"),),
        "intermediates": (pki.cert_path("intermediate-ca"),),
    }
    values.update(kw)
    return TlsEndpointSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(dev_pki: DevPki) -> ssl.SSLContext:
    return server_context(endpoint(dev_pki))


def client(
    pki: DevPki,
    role: str | None = "partner-valid-1",
    *,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.cert_path("root-ca")))
    if role is not None:
        ctx.load_cert_chain(str(pki.cert_path(role)), str(pki.key_path(role)))
    if ciphers:
        ctx.set_ciphers(ciphers)
    if versions:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
            ctx.minimum_version, ctx.maximum_version = versions
    return ctx


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[ssl.SSLError | None, ssl.SSLObject]:
    """Run a TLS handshake in memory; return the server's exception (or None)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    cli = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server_error: ssl.SSLError | None = None
    server_done = client_done = False
    for _ in range(50):
        if not client_done:
            try:
                cli.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                client_done = True
        if data := c_out.read():
            s_in.write(data)
        if not server_done:
            try:
                srv.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                server_error, server_done = exc, True
        data = s_out.read()
        if data:
            c_in.write(data)
        if server_done and client_done and not data:
            break
    else:  # pragma: no cover - a stuck handshake is a test bug
        raise AssertionError("handshake did not finish")
    return server_error, srv


# ----------------------------------------------------------------- policy
def test_server_context_policy(server: ssl.SSLContext, dev_pki: DevPki) -> None:
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.maximum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.options & ssl.OP_NO_COMPRESSION
    assert server.options & ssl.OP_NO_RENEGOTIATION
    tls12 = {c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(TLS12_CIPHERS.split(":"))
    for name in tls12:
        assert name.startswith("ECDHE-") and "-GCM-" in name
    tls13 = {c["name"] for c in server.get_ciphers() if c["protocol"] == "TLSv1.3"}
    assert tls13 and all("GCM" in n or "POLY1305" in n for n in tls13)
    # Only the configured anchors, never the OS store.
    subjects = {c["subject"] for c in server.get_ca_certs()}
    assert len(subjects) == 2


def test_tls13_only_setting(dev_pki: DevPki) -> None:
    ctx = server_context(endpoint(dev_pki, min_version="1.3"))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    error, _ = handshake(
        ctx, client(dev_pki, versions=(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2))
    )
    assert error is not None
    assert handshake_failure_reason(error)[0] == "protocol-version"


def test_valid_partner_completes_tls13_and_tls12(server: ssl.SSLContext, dev_pki: DevPki) -> None:
    error, srv = handshake(server, client(dev_pki))
    assert error is None and srv.version() == "TLSv1.3"
    assert srv.getpeercert(binary_form=True) == dev_pki.cert("partner-valid-1").public_bytes(
        Encoding.DER
    )
    error, srv = handshake(
        server, client(dev_pki, versions=(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2))
    )
    assert error is None and srv.version() == "TLSv1.2"
    assert srv.cipher()[0] in TLS12_CIPHERS.split(":")


def test_revoked_certificate_passes_the_handshake(server: ssl.SSLContext, dev_pki: DevPki) -> None:
    """Revocation is the validator's job after the handshake (pki.peer), by design."""
    error, _ = handshake(server, client(dev_pki, "partner-revoked"))
    assert error is None


def test_client_context_verifies_the_server(dev_pki: DevPki, server: ssl.SSLContext) -> None:
    partner = endpoint(
        dev_pki,
        certificate=dev_pki.cert_path("partner-valid-1"),
        private_key=dev_pki.key_path("partner-valid-1"),
        intermediates=(),
    )
    ctx = client_context(partner)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    error, srv = handshake(server, ctx)
    assert error is None and srv.version() == "TLSv1.3"


def test_factory_refuses_a_mismatched_key(dev_pki: DevPki) -> None:
    with pytest.raises(ConfigurationError, match="does not match"):
        server_context(endpoint(dev_pki, private_key=dev_pki.key_path("partner-valid-1")))


def test_factory_refuses_missing_files(dev_pki: DevPki, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        server_context(endpoint(dev_pki, trust_anchors=(tmp_path / "nope.pem",)))


# ---------------------------------------------------------------- reasons
TLS12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)


@pytest.mark.parametrize(
    ("role", "versions", "ciphers", "reason"),
    [
        ("partner-expired", None, None, "expired"),
        ("partner-not-yet-valid", None, None, "not-yet-valid"),
        ("partner-unknown-ca", None, None, "unknown-ca"),
        ("partner-wrong-eku", None, None, "wrong-eku"),
        (None, None, None, "no-certificate"),
        (None, TLS12, None, "no-certificate"),
        (
            "partner-valid-1",
            (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1),
            "DEFAULT@SECLEVEL=0",
            "protocol-version",
        ),
        (
            "partner-valid-1",
            (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1),
            "DEFAULT@SECLEVEL=0",
            "protocol-version",
        ),
        ("partner-valid-1", TLS12, "ECDHE-RSA-AES128-SHA256", "cipher"),
        ("partner-valid-1", TLS12, "AES128-GCM-SHA256", "cipher"),
        ("partner-valid-1", TLS12, "ECDHE-RSA-CHACHA20-POLY1305", "cipher"),
    ],
)
def test_real_handshake_failures_map_to_their_reason(
    server: ssl.SSLContext,
    dev_pki: DevPki,
    role: str | None,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None,
    ciphers: str | None,
    reason: str,
) -> None:
    error, _ = handshake(server, client(dev_pki, role, versions=versions, ciphers=ciphers))
    assert error is not None
    got, words = handshake_failure_reason(error)
    assert got == reason, (error, got)
    assert words and "client" in words


def test_plain_http_maps_to_not_tls(server: ssl.SSLContext) -> None:
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    s_in.write(b"GET /dicomweb/studies HTTP/1.1\r\nHost: localhost\r\n\r\n")
    with pytest.raises(ssl.SSLError) as info:
        srv.do_handshake()
    assert handshake_failure_reason(info.value)[0] == "not-tls"


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "handshake-timeout"),
        (ConnectionResetError(), "connection-closed"),
        (BrokenPipeError(), "connection-closed"),
        (EOFError(), "connection-closed"),
        (ConnectionAbortedError(), "connection-closed"),
        # What asyncio's ssl_handshake_timeout really raises.
        (
            ConnectionAbortedError(
                "SSL handshake is taking longer than 10.0 seconds: aborting the connection"
            ),
            "handshake-timeout",
        ),
        (RuntimeError("odd"), "handshake-failed"),
        (ssl.SSLError(1, "[SSL: SOMETHING_NEW] something new"), "handshake-failed"),
    ],
)
def test_non_certificate_failures(exc: BaseException, reason: str) -> None:
    assert handshake_failure_reason(exc)[0] == reason


def test_unknown_verification_failure_is_generic_but_says_why() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed: path length constraint")
    exc.verify_message = "path length constraint exceeded"
    exc.verify_code = 25
    reason, words = handshake_failure_reason(exc)
    assert reason == "invalid-certificate"
    assert "path length constraint exceeded" in words
