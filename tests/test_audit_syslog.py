"""Forwarding audit records to an ATNA repository: RFC 5424 over TLS (RFC 5425), R-AUD-3.

The integration tests run a real rsyslogd (imtcp + gtls, client certificate
required) on loopback with a throwaway PKI generated here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.audit import (
    AuditTrail,
    SyslogTlsForwarder,
    application_activity,
    instances_transferred,
    security_alert,
)
from gateway.audit.chain import AuditRecord
from gateway.audit.syslog import BOM, format_syslog_message, frame

RSYSLOGD = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
needs_rsyslog = pytest.mark.skipif(
    RSYSLOGD is None, reason="rsyslogd is not installed (apt-get install rsyslog rsyslog-gnutls)"
)


# -- throwaway PKI -------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(directory: Path) -> dict[str, Path]:
    """CA, server (localhost / 127.0.0.1, serverAuth) and client (clientAuth) PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Sekisho test audit CA"))
        .issuer_name(_name("Sekisho test audit CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, eku: x509.ObjectIdentifier, san: list[x509.GeneralName] | None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client, client_key = leaf("sekisho-gateway", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    files = {
        "ca": (directory / "ca.pem", _pem(ca)),
        "server": (directory / "server.pem", _pem(server)),
        "server_key": (directory / "server.key", _pem(server_key)),
        "client": (directory / "client.pem", _pem(client)),
        "client_key": (directory / "client.key", _pem(client_key)),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {name: path for name, (path, _) in files.items()}


def client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    """Stands in for the pki TLS factory: TLS 1.2+, our CA only, client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki["ca"])
    ctx.load_cert_chain(pki["client"], pki["client_key"])
    return ctx


# -- rsyslogd as the audit record repository -------------------------------------


@dataclass
class Collector:
    port: int
    output: Path
    process: subprocess.Popen[bytes]

    def lines(self) -> list[str]:
        if not self.output.exists():
            return []
        return self.output.read_text(encoding="utf-8").splitlines()

    def wait_for(self, count: int, timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.lines()
            if len(got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"collector received {len(self.lines())} of {count} messages")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


@pytest.fixture
def start_collector(tmp_path: Path, pki: dict[str, Path]) -> Iterator[Callable[[int], Collector]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int = 0) -> Collector:
        work = tmp_path / f"rsyslog-{len(started)}"
        work.mkdir()
        port_file, output = work / "port", work / "audit.log"
        conf = work / "rsyslog.conf"
        conf.write_text(
            f"""
global(
  workDirectory="{work}"
  maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{pki["ca"]}"
  defaultNetstreamDriverCertFile="{pki["server"]}"
  defaultNetstreamDriverKeyFile="{pki["server_key"]}"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{port}" listenPortFileName="{port_file}")
template(name="audit" type="string"
         string="%app-name% %msgid% %structured-data% %msg%\\n")
action(type="omfile" file="{output}" template="audit")
"""
        )
        assert RSYSLOGD is not None
        proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(conf), "-i", str(work / "pid")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        started.append(proc)
        deadline = time.monotonic() + 15
        while (actual := _listening_port(port, port_file)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()
                out, _ = proc.communicate(timeout=10)
                raise AssertionError(f"rsyslogd did not start listening: {out.decode()}")
            time.sleep(0.05)
        return Collector(actual, output, proc)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening_port(port: int, port_file: Path) -> int | None:
    """The port rsyslogd listens on, once it does (it writes the file only for port 0)."""
    if port == 0:
        text = port_file.read_text().strip() if port_file.exists() else ""
        return int(text) if text else None
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return None
    return port


def parse_line(line: str) -> tuple[str, str, str, ET.Element]:
    app, msgid, sd, msg = line.split(" ", 3)
    assert msg.startswith("\ufeff")  # RFC 5424 §6.4 BOM before UTF-8 MSG
    return app, msgid, sd, ET.fromstring(msg[1:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- unit tests of the wire format ---------------------------------------------


def _records(tmp_path: Path, count: int) -> tuple[AuditTrail, list[AuditRecord]]:
    trail = AuditTrail(tmp_path / "audit.db")
    for i in range(count):
        trail.record(security_alert("expired", f"certificate expired #{i}", actor=f"p{i}"))
    return trail, list(trail.iter_records())


def test_rfc5424_header_and_octet_counting(tmp_path: Path) -> None:
    trail, (alert,) = _records(tmp_path, 1)
    trail.record(application_activity("start"))
    ok = list(trail.iter_records())[1]
    msg = format_syslog_message(alert, b"<AuditMessage/>", hostname="gw 1.example", procid="42")
    header, _, body = msg.partition(b" " + BOM)
    fields = header.decode("ascii").split(" ")
    assert fields[0] == "<84>1"  # facility 10 * 8 + warning (4): the event failed
    assert fields[1] == alert.occurred_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert fields[2:] == ["gw1.example", "sekisho", "42", "IHE+RFC-3881", "-"]
    assert body == b"<AuditMessage/>"
    success = format_syslog_message(ok, b"x", hostname="h", bom=False)
    assert success.startswith(b"<85>1 ") and success.endswith(b" - x")
    framed = frame(msg)
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest) == len(msg) and rest == msg


def test_forwarder_requires_an_ssl_context() -> None:
    with pytest.raises(TypeError, match="SSLContext"):
        SyslogTlsForwarder("127.0.0.1", 6514, object())  # type: ignore[arg-type]


def test_full_queue_counts_unsent_records_which_stay_in_trail(tmp_path: Path) -> None:
    trail, records = _records(tmp_path, 3)
    forwarder = SyslogTlsForwarder(
        "127.0.0.1", free_port(), ssl.create_default_context(), queue_size=2
    )  # not started: nothing leaves the queue
    assert [forwarder.submit(r) for r in records] == [True, True, False]
    stats = forwarder.stats()
    assert (stats.pending, stats.dropped, stats.lowest_unsent_seq) == (2, 1, 3)
    final = forwarder.close(timeout=0.1)
    assert (final.sent, final.dropped, final.lowest_unsent_seq, final.pending) == (0, 3, 1, 0)
    assert [r.seq for r in trail.iter_records(after_seq=final.lowest_unsent_seq - 1)] == [1, 2, 3]


# -- against a real rsyslogd ---------------------------------------------------


@needs_rsyslog
@pytest.mark.peer
def test_three_events_reach_rsyslog_over_mutual_tls(
    tmp_path: Path, pki: dict[str, Path], start_collector: Callable[[int], Collector]
) -> None:
    collector = start_collector(0)
    trail = AuditTrail(tmp_path / "audit.db")
    forwarder = SyslogTlsForwarder(
        "127.0.0.1", collector.port, client_context(pki), server_hostname="localhost"
    ).start()
    forwarder.attach(trail)
    trail.record(
        security_alert("revoked", "client certificate revoked", source_address="192.0.2.7")
    )
    trail.record(application_activity("start"))
    trail.record(
        instances_transferred(
            actor="partner-a",
            patient_id="P1",
            patient_issuer="HOSP",
            study_uids=["1.2.392.9"],
            instance_count=4,
        )
    )
    lines = collector.wait_for(3)
    stats = forwarder.close()
    assert (stats.sent, stats.dropped, stats.last_sent_seq) == (3, 0, 3)
    parsed = [parse_line(line) for line in lines]
    assert {(app, msgid, sd) for app, msgid, sd, _ in parsed} == {("sekisho", "IHE+RFC-3881", "-")}
    event_ids = [m.find("EventIdentification/EventID").get("csd-code") for *_, m in parsed]  # type: ignore[union-attr]
    assert event_ids == ["110113", "110100", "110104"]
    alert = parsed[0][3]
    assert alert.findtext("EventIdentification/EventOutcomeDescription") == (
        "client certificate revoked"
    )
    patient = parsed[2][3].find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']")
    assert patient is not None and patient.get("ParticipantObjectID") == "P1^^^HOSP"


@needs_rsyslog
@pytest.mark.peer
def test_forwarder_retries_until_repository_is_up_and_replays_from_trail(
    tmp_path: Path, pki: dict[str, Path], start_collector: Callable[[int], Collector]
) -> None:
    port = free_port()
    trail, records = _records(tmp_path, 3)
    forwarder = SyslogTlsForwarder(
        "127.0.0.1",
        port,
        client_context(pki),
        server_hostname="localhost",
        queue_size=1,
        initial_backoff=0.05,
        max_backoff=0.2,
    ).start()
    assert forwarder.submit(records[0]) is True
    deadline = time.monotonic() + 10
    while forwarder.stats().last_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = forwarder.stats()
    assert stats.sent == 0 and stats.last_error and "ConnectionRefused" in stats.last_error
    assert stats.pending == 1  # record 1 is held for the retry, the queue is empty
    assert forwarder.submit(records[1]) is True  # fills the queue
    assert forwarder.submit(records[2]) is False  # queue full while the repository is down
    assert forwarder.stats().lowest_unsent_seq == 3

    collector = start_collector(port)  # the repository comes back on the same port
    collector.wait_for(2)
    lost_from = forwarder.stats().lowest_unsent_seq
    assert lost_from == 3
    assert forwarder.replay(trail.iter_records(after_seq=lost_from - 1), timeout=5) == 1
    lines = collector.wait_for(3)
    final = forwarder.close()
    assert final.sent == 3
    descriptions = [
        m.findtext("EventIdentification/EventOutcomeDescription")
        for *_, m in map(parse_line, lines)
    ]
    assert descriptions == [f"certificate expired #{i}" for i in range(3)]
