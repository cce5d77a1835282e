"""The DICOM TLS listener cannot be stalled (R-TLS-6) and limits each source address.

Idle peers connect from 127.0.0.2 (any 127/8 address is loopback on Linux) so
that the per-address limit applies to them and not to the legitimate partner
on 127.0.0.1.  Timings are asserted only as upper bounds that a stalled
accept loop could never meet; the numbers are measured in ``bench/``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.dimse_support import dcmtk_env, tls_args, wait_for
from tests.gateway_helpers import GatewayProcess, Instance, create_instance

pytestmark = pytest.mark.peer

HANDSHAKE_TIMEOUT = 3
PER_ADDRESS = 55
IDLE_SOURCE = "127.0.0.2"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, int]]:
    inst = create_instance(
        tmp_path_factory.mktemp("dimse-isolation") / "gw",
        {"dimse": {"handshake_timeout_seconds": HANDSHAKE_TIMEOUT,
                   "max_connections_per_address": PER_ADDRESS}},
    )
    gw = GatewayProcess(inst).start()
    try:
        yield inst, int(inst.read_config()["dimse"]["port"])
    finally:
        gw.stop()


def _idle(port: int, count: int, stack: ExitStack) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind((IDLE_SOURCE, 0))
        s.connect(("127.0.0.1", port))
        stack.callback(s.close)
        socks.append(s)
    return socks


def _echo(inst: Instance, port: int, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/echoscu", *tls_args(inst.pki, "partner-valid-1"), "-aet", "PARTNER_A",
         "-aec", "SEKISHO", "-to", "5", "-ta", "5", "-td", "5", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=timeout, env=dcmtk_env(),
    )


def test_partner_associates_while_50_idle_connections_are_open(
    gateway: tuple[Instance, int],
) -> None:
    inst, port = gateway
    with ExitStack() as stack:
        _idle(port, 50, stack)
        proc = _echo(inst, port, timeout=5)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_silent_peer_is_dropped_after_the_handshake_timeout_and_audited(
    gateway: tuple[Instance, int],
) -> None:
    inst, port = gateway
    seq = inst.audit_head()
    with ExitStack() as stack:
        (sock,) = _idle(port, 1, stack)
        sock.settimeout(HANDSHAKE_TIMEOUT + 10)
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the gateway
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 5
    assert wait_for(lambda: any(
        r.event.reason_code == "handshake-timeout" and r.event.source_address == IDLE_SOURCE
        for r in inst.security_alerts(seq)
    ))


def test_connections_beyond_the_per_address_limit_are_closed_at_once(
    gateway: tuple[Instance, int],
) -> None:
    inst, port = gateway
    with ExitStack() as stack:
        _idle(port, PER_ADDRESS, stack)
        time.sleep(0.3)  # let the accept loop count them
        (extra,) = _idle(port, 1, stack)
        extra.settimeout(HANDSHAKE_TIMEOUT - 1)
        assert extra.recv(1) == b""  # refused before the handshake timeout
        # Another address is not affected.
        proc = _echo(inst, port, timeout=5)
        assert proc.returncode == 0, proc.stdout + proc.stderr
