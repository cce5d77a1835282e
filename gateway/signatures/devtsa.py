"""A development Time-Stamp Authority on loopback: ``openssl ts -reply`` behind HTTP.

FOR DEMOS AND BENCHMARKS ONLY.  Production timestamps come from an accredited
TSA (seed 000 付録2 §14①2(1); R-SIG-5).  This one answers RFC 3161 §3.4
``application/timestamp-query`` POSTs on ``/tsa`` with a token signed by the
development PKI's ``tsa`` key (critical timeStamping EKU, issued by the dev
root CA), so that ``sekisho sign``, ``sekisho verify`` and ``sekisho audit
seal`` work on a demo instance made by ``sekisho init``::

    sekisho dev-tsa --config instance/sekisho.toml      # serves http://127.0.0.1:3180/tsa

Each request runs one ``openssl ts -reply`` with its own serial-number file
(the serial comes from a counter under a lock), so concurrent requests never
race on OpenSSL's serial file.  The listener binds to loopback unless told
otherwise and caps request bodies.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pki import devpki
from pki.errors import ConfigurationError

__all__ = ["DEFAULT_PORT", "DevTsa"]

DEFAULT_PORT = 3180
#: Policy OID the development TSA stamps under (a private, made-up arc).
DEV_POLICY_OID = "1.2.392.200999.1.1"
_MAX_QUERY_BYTES = 64 * 1024
_CONFIG = """\
[ tsa ]
default_tsa = sekisho_dev_tsa

[ sekisho_dev_tsa ]
serial = $ENV::SEKISHO_TSA_SERIAL
crypto_device = builtin
signer_cert = {cert}
certs = {chain}
signer_key = {key}
signer_digest = sha256
default_policy = {policy}
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tsa: DevTsa


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        return

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.rstrip("/") != "/tsa":
            self._send(404, b"not found", "text/plain")
            return
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip()
        length = int(self.headers.get("Content-Length", "0") or 0)
        if ctype != "application/timestamp-query" or not 0 < length <= _MAX_QUERY_BYTES:
            self._send(400, b"expected an application/timestamp-query body", "text/plain")
            return
        query = self.rfile.read(length)
        try:
            reply = self.server.tsa.reply(query)
        except Exception as exc:  # noqa: BLE001 - report any failure to the client
            self._send(500, str(exc).encode(), "text/plain")
            return
        self._send(200, reply, "application/timestamp-reply")


class DevTsa:
    """The development TSA of the dev PKI in ``pki_dir`` (see :mod:`pki.devpki`)."""

    def __init__(
        self,
        pki_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        work_dir: Path | None = None,
        openssl: str = "openssl",
    ) -> None:
        try:
            pki = devpki.load(Path(pki_dir))
            cert, key = pki.cert_path("tsa"), pki.key_path("tsa")
            chain = pki.cert_path("root-ca")
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigurationError(
                f"{pki_dir} is not a development PKI with a TSA: {exc}"
            ) from exc
        self._tmp = tempfile.TemporaryDirectory(prefix="sekisho-dev-tsa-", dir=work_dir)
        self.work = Path(self._tmp.name)
        self.config = self.work / "ts.cnf"
        self.config.write_text(
            _CONFIG.format(cert=cert, chain=chain, key=key, policy=DEV_POLICY_OID)
        )
        self.openssl = openssl
        self.requests = 0
        self._serial = int(time.time()) << 20  # unique across restarts of the demo TSA
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.tsa = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}/tsa"

    def _next_serial(self) -> int:
        with self._lock:
            self._serial += 1
            self.requests += 1
            return self._serial

    def reply(self, query: bytes) -> bytes:
        """A DER ``TimeStampResp`` for a DER ``TimeStampReq`` (RFC 3161 §2.4)."""
        serial = self._next_serial()
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            q, r, s = Path(tmp) / "q.tsq", Path(tmp) / "r.tsr", Path(tmp) / "serial"
            q.write_bytes(query)
            digits = f"{serial:X}"
            s.write_text(("0" * (len(digits) % 2)) + digits + "\n")  # OpenSSL wants even length
            proc = subprocess.run(
                [
                    self.openssl,
                    "ts",
                    "-reply",
                    "-config",
                    str(self.config),
                    "-queryfile",
                    str(q),
                    "-out",
                    str(r),
                ],
                capture_output=True,
                timeout=30,
                check=False,
                env={**os.environ, "SEKISHO_TSA_SERIAL": str(s)},
            )
            if proc.returncode != 0 or not r.exists():
                raise RuntimeError(
                    "openssl ts -reply failed: " + proc.stderr.decode(errors="replace")
                )
            return r.read_bytes()

    def start(self) -> DevTsa:
        """Serve in a daemon thread; returns ``self``."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sekisho-dev-tsa", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (or an interrupt)."""
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._tmp.cleanup()

    def __enter__(self) -> DevTsa:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
