"""Helpers for the DICOM TLS tests (``tests/test_dimse_*.py``) and ``bench/dimse_throughput.py``.

* :func:`issue_node_certificate` issues, from an instance's development PKI,
  the certificate of a partner's DICOM node that acts as TLS server *and*
  client (DCMTK ``storescp +tls`` as C-MOVE destination, Orthanc): the dev
  PKI's partner certificates carry only the clientAuth EKU, and a TLS client
  (Sekisho opening the C-MOVE association) rightly refuses a server
  certificate without serverAuth;
* :func:`dcmtk` runs a DCMTK tool by absolute path (a pip package shadows
  ``storescu`` on PATH) with ``TCP_NODELAY=1``;
* :class:`TlsTunnel`: DCMTK 3.6.7's ``movescu`` and ``getscu`` are built
  without TLS (no ``+tls`` option), so they reach the gateway through this
  loopback relay that adds mutual TLS with a partner's certificate, as an
  stunnel in front of a legacy modality would;
* :class:`StoreScp`: DCMTK ``storescp +tls`` as a partner's move destination.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.certs import write_private_key
from pki.devpki import DevPki
from pki.tls import TlsEndpointSettings, client_context
from tests.peers import ManagedProcess, free_port, tcp_open, wait_until

DCMTK = Path("/usr/bin")
CLIENT_TIMEOUT = 60


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str, *args: str | os.PathLike[str], timeout: float = CLIENT_TIMEOUT,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``/usr/bin/<tool>`` and capture its output."""
    return subprocess.run(
        [str(DCMTK / tool), *map(str, args)], capture_output=True, text=True,
        timeout=timeout, env=dcmtk_env(), cwd=cwd,
    )


def tls_args(pki: DevPki, role: str) -> list[str]:
    """DCMTK options: present ``role``'s certificate, trust the dev root CA."""
    return ["+tls", str(pki.key_path(role)), str(pki.cert_path(role)),
            "+cf", str(pki.cert_path("root-ca"))]


def issue_node_certificate(pki: DevPki, name: str, out_dir: Path) -> tuple[Path, Path]:
    """A serverAuth+clientAuth certificate for 127.0.0.1/localhost from the dev issuing CA."""
    ca_cert = pki.cert("intermediate-ca")
    ca_key = pki.private_key("intermediate-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"Partner node {name}"),
            x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{name}.crt.pem", out_dir / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(key_path, key)
    return cert_path, key_path


def dataset_sha256(data: bytes) -> str:
    """SHA-256 of a Part 10 file's data set (everything after the File Meta Information)."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL"
    length = int.from_bytes(data[140:144], "little")
    return hashlib.sha256(data[144 + length:]).hexdigest()


def sop_uid_of(data: bytes) -> str:
    from io import BytesIO

    from pydicom import dcmread

    return str(dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


class TlsTunnel:
    """Loopback TCP -> mutual TLS relay for DCMTK tools without TLS support."""

    def __init__(self, pki: DevPki, role: str, target_port: int) -> None:
        settings = TlsEndpointSettings(
            certificate=pki.cert_path(role), private_key=pki.key_path(role),
            trust_anchors=(pki.cert_path("root-ca"),),
        )
        self.context = client_context(settings, check_hostname=False)
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        """Relay both ways in one thread: an SSL socket must not be read and written at once.

        OpenSSL objects are not thread-safe; with two pump threads, a read that
        processes a TLS 1.3 post-handshake message while the other thread writes
        ends in an "internal error" alert now and then.
        """
        try:
            upstream = self.context.wrap_socket(socket.create_connection(self.target, 10))
        except OSError:
            client.close()
            return
        peers = {client: upstream, upstream: client}
        # Non-blocking reads: a readable socket may carry only a TLS record with no
        # application data (a session ticket), and a blocked read would stall the
        # other direction.
        upstream.setblocking(False)
        try:
            while True:
                ready = [upstream] if upstream.pending() else []
                if not ready:
                    ready, _, _ = select.select(list(peers), [], [], 60)
                    if not ready:
                        return  # idle for a minute: the tool has gone
                for src in ready:
                    try:
                        data = src.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        continue
                    if not data:
                        return
                    dst = peers[src]
                    dst.setblocking(True)
                    dst.sendall(data)
                    dst.setblocking(dst is not upstream)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()


class StoreScp:
    """DCMTK ``storescp +tls`` writing received files bit-preserving into ``out``."""

    def __init__(self, aet: str, cert: Path, key: Path, anchors: Sequence[Path], out: Path,
                 *, extra: Sequence[str] = ()) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.port = free_port()
        args: list[str | Path] = [
            DCMTK / "storescp", "+tls", key, cert, "-aet", aet, "-od", out, "+B", "-dhl",
            *extra,
        ]
        for anchor in anchors:
            args += ["+cf", anchor]
        args.append(str(self.port))
        self.proc = ManagedProcess(
            f"storescp {aet}", args, out.parent / f"storescp-{aet}-{self.port}.log",
            env=dcmtk_env(),
        )
        if not wait_until(lambda: tcp_open(self.port), 15, 0.05):
            raise self.proc.fail("did not listen")

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.stop(timeout=10)


def wait_for(check: object, timeout: float = 10.0) -> bool:
    """Poll ``check()`` until true (audit records are written when associations end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(check())  # type: ignore[operator]
