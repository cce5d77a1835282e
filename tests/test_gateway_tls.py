"""Mutual TLS on the DICOMweb port, proved with real clients (R-TLS-1, 2, 3, 5).

One gateway (``sekisho serve`` as a subprocess) serves the whole module; each
case connects with ``curl`` or ``openssl s_client`` and a certificate from the
instance's development PKI.  Every refusal must leave a Security Alert
(110113) in the audit trail with its own stable reason.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from gateway.audit.chain import AuditRecord
from pki.tls import TLS12_CIPHERS
from tests.gateway_helpers import (
    GatewayProcess,
    Instance,
    create_instance,
    curl,
    running_gateway,
    s_client,
)

NODE_AUTHENTICATION = "110126"
ALERT_WAIT = 15.0
HANDSHAKE_TIMEOUT = 3
WAIT_CLOSE = 30.0


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Instance:
    return create_instance(
        tmp_path_factory.mktemp("tls") / "gw",
        {"https": {"handshake_timeout_seconds": HANDSHAKE_TIMEOUT}},
    )


@pytest.fixture(scope="module")
def gateway(instance: Instance) -> Iterator[GatewayProcess]:
    with running_gateway(instance) as gw:
        yield gw


def wait_for_alert(instance: Instance, after_seq: int, reason: str) -> AuditRecord:
    """The Security Alert with ``reason`` recorded after ``after_seq``.

    A refused handshake is audited right after the socket is closed, so the
    client may return first: poll, within a bound.
    """
    deadline = time.monotonic() + ALERT_WAIT
    seen: list[str | None] = []
    while time.monotonic() < deadline:
        alerts = instance.security_alerts(after_seq)
        seen = [a.event.reason_code for a in alerts]
        for alert in alerts:
            if alert.event.reason_code == reason:
                return alert
        time.sleep(0.05)
    raise AssertionError(f"no Security Alert {reason!r} after record {after_seq}; saw {seen}")


def negotiated(stderr: str) -> tuple[str, str]:
    """(protocol, cipher) from ``curl -v``'s "SSL connection using ..." line."""
    m = re.search(r"SSL connection using (\S+) / (\S+)", stderr)
    assert m, stderr[-2000:]
    return m.group(1), m.group(2)


def sha256_of_cert(instance: Instance, role: str) -> str:
    return instance.pki.fingerprint(role)


# ------------------------------------------------------------------ accepted
@pytest.mark.parametrize(
    ("versions", "protocol"),
    [(["--tlsv1.2", "--tls-max", "1.2"], "TLSv1.2"), (["--tlsv1.3"], "TLSv1.3")],
)
def test_registered_partner_is_served_over_tls12_and_tls13(
    instance: Instance, gateway: GatewayProcess, versions: list[str], protocol: str
) -> None:
    before = instance.audit_head()
    r = curl(instance, "/dicomweb/studies", args=[*versions, "-v"])
    assert r.exit_code == 0, r.stderr[-2000:]
    # Nothing is shared with partner-a yet: an empty QIDO result, not a refusal.
    assert r.status == 204
    got_protocol, cipher = negotiated(r.stderr)
    assert got_protocol == protocol
    if protocol == "TLSv1.2":
        assert cipher in TLS12_CIPHERS.split(":")
    assert not [a for a in instance.security_alerts(before)]
    queries = instance.audit_records(after_seq=before, event_id="110112")
    assert queries and queries[-1].event.actor == "partner-a"
    assert queries[-1].event.actor_cert_sha256 == sha256_of_cert(instance, "partner-valid-1")


@pytest.mark.parametrize("cipher", ["ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-GCM-SHA256"])
def test_tls12_ecdhe_aes_gcm_suites_are_accepted(
    instance: Instance, gateway: GatewayProcess, cipher: str
) -> None:
    result = s_client(instance, "-tls1_2", "-cipher", cipher)
    assert result.protocol == "TLSv1.2", result.output[-2000:]
    assert result.cipher == cipher
    assert result.http_status_line == "HTTP/1.1 204 No Content"


def test_tls12_client_offering_everything_gets_an_allowed_suite(
    instance: Instance, gateway: GatewayProcess
) -> None:
    result = s_client(instance, "-tls1_2", "-cipher", "ALL:@SECLEVEL=0")
    assert result.protocol == "TLSv1.2", result.output[-2000:]
    assert result.cipher in TLS12_CIPHERS.split(":")


# ------------------------------------------------------------------ refusals
REFUSED_CERTIFICATES = [
    # (role, reason): refused in the handshake or right after it.
    ("partner-expired", "expired"),
    ("partner-not-yet-valid", "not-yet-valid"),
    ("partner-revoked", "revoked"),
    ("partner-unknown-ca", "unknown-ca"),
    ("partner-wrong-eku", "wrong-eku"),
]


@pytest.mark.parametrize(("role", "reason"), REFUSED_CERTIFICATES)
def test_bad_client_certificate_is_refused_with_its_reason(
    instance: Instance, gateway: GatewayProcess, role: str, reason: str
) -> None:
    before = instance.audit_head()
    r = curl(instance, "/dicomweb/studies", role=role)
    if reason == "revoked":
        # The chain is fine for OpenSSL; the CRL check after the handshake
        # refuses it with a readable answer.
        assert r.status == 403
        assert r.json()["reason"] == "revoked"
    else:
        assert r.status == 0, (r.status, r.body[:200])
        assert r.exit_code != 0
    alert = wait_for_alert(instance, before, reason)
    assert alert.event.outcome == 4
    assert [c.value for c in alert.event.event_type_codes] == [NODE_AUTHENTICATION]
    assert alert.event.source_address == "127.0.0.1"
    assert alert.event.description
    if reason == "revoked":
        assert alert.event.actor_cert_sha256 == sha256_of_cert(instance, role)


def test_no_client_certificate_is_refused(instance: Instance, gateway: GatewayProcess) -> None:
    before = instance.audit_head()
    r = curl(instance, "/dicomweb/studies", role=None)
    assert r.status == 0 and r.exit_code != 0
    wait_for_alert(instance, before, "no-certificate")


@pytest.mark.parametrize("role", ["storage-provider", "staff-admin-1"])
def test_valid_but_unregistered_certificate_gets_403_unregistered(
    instance: Instance, gateway: GatewayProcess, role: str
) -> None:
    before = instance.audit_head()
    r = curl(instance, "/dicomweb/studies", role=role)
    assert r.status == 403
    assert r.content_type.startswith("application/json")
    assert r.json() == {
        "code": "PEER_AUTH",
        "reason": "unregistered",
        "message": "the client certificate is valid but not registered to any partner",
    }
    alert = wait_for_alert(instance, before, "unregistered")
    assert alert.event.actor_cert_sha256 == sha256_of_cert(instance, role)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        # Debian's OpenSSL would not even offer TLS 1.0/1.1 at its default level.
        (("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"), "protocol-version"),
        (("-tls1", "-cipher", "DEFAULT@SECLEVEL=0"), "protocol-version"),
        (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256"), "cipher"),  # CBC only
        (("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"), "cipher"),  # CBC, SHA-1 MAC
        (("-tls1_2", "-cipher", "AES128-GCM-SHA256"), "cipher"),  # no ECDHE
        (("-tls1_2", "-cipher", "AES256-GCM-SHA384"), "cipher"),  # no ECDHE
        (("-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256:@SECLEVEL=0"), "cipher"),
        (("-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"), "cipher"),  # not AES-GCM
    ],
    ids=[
        "tls1.1",
        "tls1.0",
        "cbc-sha256",
        "cbc-sha1",
        "rsa-kx-gcm128",
        "rsa-kx-gcm256",
        "dhe",
        "chacha20",
    ],
)
def test_old_protocols_and_weak_suites_are_refused(
    instance: Instance, gateway: GatewayProcess, options: tuple[str, ...], reason: str
) -> None:
    before = instance.audit_head()
    result = s_client(instance, *options)
    assert result.http_status_line is None, result.output[-2000:]
    assert result.cipher in (None, "(NONE)")
    alert = wait_for_alert(instance, before, reason)
    assert alert.event.outcome == 4


def test_plain_http_to_the_tls_port_is_refused(instance: Instance, gateway: GatewayProcess) -> None:
    before = instance.audit_head()
    r = curl(
        instance,
        "/dicomweb/studies",
        role=None,
        url=f"http://127.0.0.1:{instance.https_port}/dicomweb/studies",
    )
    assert r.status == 0 and r.exit_code != 0
    wait_for_alert(instance, before, "not-tls")


def test_refusals_are_counted_in_metrics_and_the_gateway_keeps_serving(
    instance: Instance, gateway: GatewayProcess
) -> None:
    before = instance.audit_head()
    assert curl(instance, "/dicomweb/studies", role="partner-expired").status == 0
    wait_for_alert(instance, before, "expired")
    # /metrics on the plain-HTTP monitoring listener: counts, no patient data (R-OPS-3).
    m = curl(
        instance, "/metrics", role=None, url=f"http://127.0.0.1:{instance.monitoring_port}/metrics"
    )
    assert m.status == 200
    assert re.search(rb'sekisho_tls_refusals_total\{reason="expired"\} [1-9]', m.body), m.body
    assert curl(instance, "/dicomweb/studies").status == 204
    assert gateway.running


def test_idle_peers_neither_block_others_nor_stay_forever(
    instance: Instance, gateway: GatewayProcess
) -> None:
    """R-TLS-6: handshakes run off the accept path, with a timeout that is audited."""
    before = instance.audit_head()
    idle = [
        socket.create_connection(("127.0.0.1", instance.https_port), timeout=WAIT_CLOSE)
        for _ in range(5)
    ]
    try:
        idle[0].sendall(b"\x16\x03\x01\x00\xc8")  # the start of a ClientHello, then silence
        # Other partners are served while those sit there.
        assert curl(instance, "/dicomweb/studies").status == 204
        tls12 = curl(instance, "/dicomweb/studies", args=["--tlsv1.2", "--tls-max", "1.2"])
        assert tls12.status == 204
        # After handshake_timeout_seconds the gateway drops them and says so.
        for sock in idle:
            assert sock.recv(100) == b""
        alert = wait_for_alert(instance, before, "handshake-timeout")
        assert alert.event.source_address == "127.0.0.1"
    finally:
        for sock in idle:
            sock.close()


# -------------------------------------------------------------- TLS 1.3 only
@pytest.fixture(scope="module")
def tls13_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    inst = create_instance(tmp_path_factory.mktemp("tls13") / "gw", {"tls": {"min_version": "1.3"}})
    with running_gateway(inst):
        yield inst


def test_min_version_13_refuses_tls12(tls13_instance: Instance) -> None:
    before = tls13_instance.audit_head()
    r = curl(tls13_instance, "/dicomweb/studies", args=["--tlsv1.2", "--tls-max", "1.2"])
    assert r.status == 0 and r.exit_code != 0
    wait_for_alert(tls13_instance, before, "protocol-version")
    s = s_client(tls13_instance, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384")
    assert s.http_status_line is None


def test_min_version_13_accepts_tls13(tls13_instance: Instance) -> None:
    r = curl(tls13_instance, "/dicomweb/studies", args=["-v"])
    assert r.status == 204
    assert negotiated(r.stderr)[0] == "TLSv1.3"
