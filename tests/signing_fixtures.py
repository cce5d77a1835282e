"""Shared fixtures for the signing tests: dev PKI, loopback TSA and CRL server, SoftHSM2.

The TSA is a real RFC 3161 implementation (``openssl ts -reply``) behind a tiny
threaded HTTP wrapper on 127.0.0.1 (STYLE §6: real peers in integration
tests).  Besides ``/tsa`` (well-behaved) the wrapper offers misbehaving
endpoints that still answer with genuine, correctly signed OpenSSL tokens, but
for a request altered on the way: ``/tsa/wrong-nonce`` and
``/tsa/wrong-imprint``; plus ``/tsa/reject`` (asks for an unsupported policy, so
OpenSSL answers PKIStatus rejection),
``/tsa/http500`` and ``/tsa/slow``.  ``/crl/<issuer>.crl`` serves the dev PKI's
CRLs (the certificates' CRL distribution points point there).

Import the fixtures into a test module with ``from tests.signing_fixtures import *``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from asn1crypto import tsp

from pki import devpki
from pki.certs import write_secret_file
from signing.signers import SignerSpec
from signing.trust import RevocationMode, TrustConfig

__all__ = [
    "LoopbackTsa",
    "make_pdf",
    "make_sc_dataset",
    "p12_spec",
    "SoftHsmToken",
    "signing_pki",
    "loopback_tsa",
    "require_tool",
    "softhsm_token",
    "tsa_server",
    "trust",
]

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def require_tool(name: str) -> str:
    """Path of an external tool, or skip the test saying which one is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"external tool {name!r} is not installed")
    return path


def openssl_cms_verify(
    data: Path, p7s: Path, ca: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``openssl cms -verify`` of a detached DER signature over ``data``, trusting ``ca``.

    OpenSSL is a required peer: a missing ``openssl`` fails the test, it does not skip it.
    """
    return subprocess.run(
        [
            "openssl", "cms", "-verify", "-binary", "-content", str(data),
            "-inform", "DER", "-in", str(p7s), "-CAfile", str(ca), *extra, "-out", "/dev/null",
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip


_TS_CONFIG = """\
[ tsa ]
default_tsa = sekisho_test_tsa

[ sekisho_test_tsa ]
dir = {dir}
serial = $dir/tsaserial
crypto_device = builtin
signer_cert = {cert}
certs = {chain}
signer_key = {key}
signer_digest = sha256
default_policy = 1.2.392.200999.1.1
other_policies = 1.2.392.200999.1.2
digests = sha256, sha384, sha512
accuracy = secs:1
ordering = yes
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


class _TsaServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (the timeout tests) is not an error worth a traceback."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    config_path: Path
    work_dir: Path
    crl_dir: Path | None
    requests_seen: int


def _run_openssl_reply(server: _TsaServer, query: bytes) -> bytes:
    with tempfile.TemporaryDirectory(dir=server.work_dir) as tmp:
        q, r = Path(tmp) / "q.tsq", Path(tmp) / "r.tsr"
        q.write_bytes(query)
        proc = subprocess.run(
            [
                "openssl",
                "ts",
                "-reply",
                "-config",
                str(server.config_path),
                "-queryfile",
                str(q),
                "-out",
                str(r),
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0 or not r.exists():
            raise RuntimeError(f"openssl ts -reply failed: {proc.stderr.decode(errors='replace')}")
        return r.read_bytes()


def _altered_query(query: bytes, mode: str) -> bytes:
    req = tsp.TimeStampReq.load(query)
    if mode == "wrong-nonce":
        req["nonce"] = (req["nonce"].native or 0) + 1
    elif mode == "wrong-imprint":
        mi = req["message_imprint"]
        digest = bytearray(mi["hashed_message"].native)
        digest[0] ^= 0xFF
        mi["hashed_message"] = bytes(digest)
    elif mode == "reject":  # a policy the TSA does not offer: OpenSSL answers "rejection"
        req["req_policy"] = "1.2.392.200999.9.9"
    return tsp.TimeStampReq(req.native).dump() if mode != "as-is" else query


class _Handler(BaseHTTPRequestHandler):
    server: _TsaServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        return

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.startswith("/crl/") and self.server.crl_dir is not None:
            name = self.path.removeprefix("/crl/").replace("/", "")
            issuer = name.removesuffix(".crl")
            path = self.server.crl_dir / f"{issuer}.crl.der"
            if path.is_file():
                self._send(200, path.read_bytes(), "application/pkix-crl")
                return
        self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        length = int(self.headers.get("Content-Length", "0"))
        query = self.rfile.read(length)
        self.server.requests_seen += 1
        mode = self.path.removeprefix("/tsa").strip("/") or "as-is"
        if mode == "http500":
            self._send(500, b"broken", "text/plain")
            return
        if mode == "slow":
            time.sleep(3)
            mode = "as-is"
        try:
            reply = _run_openssl_reply(self.server, _altered_query(query, mode))
        except Exception as exc:  # noqa: BLE001 - report any failure to the client
            self._send(500, str(exc).encode(), "text/plain")
            return
        self._send(200, reply, "application/timestamp-reply")


@dataclass
class LoopbackTsa:
    """The running loopback TSA/CRL server."""

    base_url: str
    server: _TsaServer

    @property
    def url(self) -> str:
        return f"{self.base_url}/tsa"

    def mode_url(self, mode: str) -> str:
        return f"{self.base_url}/tsa/{mode}"

    def configure(self, pki: devpki.DevPki) -> None:
        work = self.server.work_dir
        cfg = work / "ts.cnf"
        (work / "tsaserial").write_text("01\n")
        cfg.write_text(
            _TS_CONFIG.format(
                dir=work,
                cert=pki.cert_path("tsa"),
                chain=pki.cert_path("root-ca"),
                key=pki.key_path("tsa"),
            )
        )
        self.server.config_path = cfg
        self.server.crl_dir = pki.root


@pytest.fixture(scope="session")
def tsa_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackTsa]:
    work = tmp_path_factory.mktemp("tsa")
    server = _TsaServer(("127.0.0.1", 0), _Handler)
    server.work_dir = work
    server.crl_dir = None
    server.requests_seen = 0
    thread = threading.Thread(target=server.serve_forever, name="loopback-tsa", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield LoopbackTsa(f"http://{host}:{port}", server)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def signing_pki(tmp_path_factory: pytest.TempPathFactory, tsa_server: LoopbackTsa) -> devpki.DevPki:
    """One development PKI per test session; CRL DPs point at the loopback server."""
    pki = devpki.generate(
        tmp_path_factory.mktemp("devpki") / "pki", crl_url_base=f"{tsa_server.base_url}/crl"
    )
    tsa_server.configure(pki)
    return pki


@pytest.fixture(scope="session")
def loopback_tsa(tsa_server: LoopbackTsa, signing_pki: devpki.DevPki) -> LoopbackTsa:
    """The configured loopback TSA (requires ``openssl``)."""
    if shutil.which("openssl") is None:
        pytest.skip("external tool 'openssl' is not installed")
    return tsa_server


@pytest.fixture(scope="session")
def trust(signing_pki: devpki.DevPki) -> TrustConfig:
    """HPKI and TSA anchors of the dev PKI, with its CRLs preloaded, hard-fail."""
    return TrustConfig.from_paths(
        signer_anchors=signing_pki.trust_anchor_paths("hpki"),
        tsa_anchors=signing_pki.trust_anchor_paths("tsa"),
        crls=[signing_pki.crl_path(r, der=True) for r in ("root-ca", "hpki-root-ca")],
        revocation=RevocationMode.HARD_FAIL,
    )


@dataclass(frozen=True)
class SoftHsmToken:
    """A SoftHSM2 token holding the ``hpki-signer`` key and certificate."""

    module: str
    label: str
    pin_file: Path
    key_id: bytes
    key_label: str
    env: dict[str, str]


def _store_certificate(
    module: str, label: str, pin: str, key_id: bytes, cert_path: Path, env: dict[str, str]
) -> None:
    """Put the signer's certificate on the token next to its key (same CKA_ID).

    Done by OpenSC's ``pkcs11-tool`` in its own process, so the test process's
    PKCS#11 library state (initialised once per process) plays no part.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    tool = require_tool("pkcs11-tool")
    der = cert_path.with_suffix(".der")
    der.write_bytes(
        x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    )
    subprocess.run(
        [
            tool, "--module", module, "--token-label", label, "--login", "--pin", pin,
            "--write-object", str(der), "--type", "cert", "--id", key_id.hex(),
            "--label", "hpki-signer",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="session")
def softhsm_token(
    tmp_path_factory: pytest.TempPathFactory, signing_pki: devpki.DevPki
) -> Iterator[SoftHsmToken]:
    """Initialise a fresh SoftHSM2 token and import the hpki-signer key into it.

    ``SOFTHSM2_CONF`` points at a configuration in tmp; the process environment
    is set for the session (the PKCS#11 module reads it when first loaded) and
    restored afterwards.
    """
    util = require_tool("softhsm2-util")
    module = next((m for m in SOFTHSM_MODULE_CANDIDATES if os.path.exists(m)), None)
    if module is None:
        pytest.skip("SoftHSM2 PKCS#11 module libsofthsm2.so is not installed")
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    pin, so_pin, label = "246810", "13579111", "sekisho-test"
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    key_id = bytes.fromhex("a1b2c3d4")
    subprocess.run(
        [
            util,
            "--import",
            str(signing_pki.key_path("hpki-signer")),
            "--token",
            label,
            "--label",
            "hpki-signer",
            "--id",
            key_id.hex(),
            "--pin",
            pin,
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    pin_file = base / "token.pin"
    write_secret_file(pin_file, pin.encode() + b"\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the module at C_Initialize
    cert_copy = base / "hpki-signer.crt.pem"
    cert_copy.write_bytes(signing_pki.cert_path("hpki-signer").read_bytes())
    _store_certificate(module, label, pin, key_id, cert_copy, env)
    try:
        yield SoftHsmToken(module, label, pin_file, key_id, "hpki-signer", env)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


def p12_spec(pki: devpki.DevPki, role: str = "hpki-signer") -> SignerSpec:
    """PKCS#12 signer spec for a dev PKI signer role (password from its 0600 file)."""
    return SignerSpec(
        kind="pkcs12",
        pkcs12=pki.p12_path(role),
        password_file=pki.root / pki.entry(role)["p12_pass"],
    )


def make_sc_dataset(path: Path | None = None, *, rows: int = 32, cols: int = 32):
    """A digitized-film Secondary Capture object (R-DIG-1) with nested sequences."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Yamada^Hanako"
    ds.PatientID = "P-0001"
    ds.Modality = "OT"
    ds.ConversionType = "DF"
    ds.InstitutionName = "Sekisho Demo Hospital"
    ds.ImageComments = "digitized film"
    code = Dataset()
    code.CodeValue = "FILMD"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Film Digitizer"
    equipment = Dataset()
    equipment.Manufacturer = "Scanner Co"
    equipment.OperatorsName = "Operator^One"
    equipment.PurposeOfReferenceCodeSequence = [code]
    ds.ContributingEquipmentSequence = [equipment]
    ds.ReferencedImageSequence = []
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4096).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


def make_pdf(text: str = "Referral letter (scanned)") -> bytes:
    """A one-page PDF written by pyHanko's writer (a scanned record stand-in)."""
    import io

    from pyhanko.pdf_utils import generic
    from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter

    n = generic.pdf_name
    w = PdfFileWriter()
    content = w.add_object(
        generic.StreamObject(stream_data=f"BT /F1 14 Tf 72 760 Td ({text}) Tj ET".encode())
    )
    font = w.add_object(
        generic.DictionaryObject(
            {n("/Type"): n("/Font"), n("/Subtype"): n("/Type1"), n("/BaseFont"): n("/Helvetica")}
        )
    )
    resources = generic.DictionaryObject({n("/Font"): generic.DictionaryObject({n("/F1"): font})})
    w.insert_page(PageObject(contents=content, media_box=[0, 0, 595, 842], resources=resources))
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()
