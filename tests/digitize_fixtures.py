"""Fixtures for the digitization and renewal tests (R-DIG-1..5, R-SIG-6).

Built on :mod:`tests.signing_fixtures` (dev PKI, loopback ``openssl ts`` TSA
that also serves the CRLs):

* :func:`make_scan` writes film scans with Pillow (16-bit or 8-bit PNG/TIFF);
* :func:`start_tsa` runs one more loopback TSA (same wrapper, own config) --
  ``renewal_tsa`` signs with a *second* TSA certificate, issued by the same
  root and valid for five years, as a TSA operator's renewed certificate would
  be: archive timestamps made with it outlive the first TSA certificate;
* :func:`crl_at` issues a CRL dated at a frozen future moment, signed by the
  dev CA, i.e. what a verifier would fetch from the (still running) CA then;
* :func:`digitization_config` is the configuration a digitizing gateway needs.

Import with ``from tests.digitize_fixtures import *``.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import devpki
from pki.certs import write_private_key
from tests.signing_fixtures import _TS_CONFIG, LoopbackTsa, _Handler, _TsaServer

__all__ = [
    "crl_at",
    "digitization_config",
    "make_scan",
    "renewal_tsa",
    "signer_arg",
    "start_ca_services",
    "start_tsa",
    "stop_tsa",
]


def make_scan(
    path: Path, *, bits: int = 12, shape: tuple[int, int] = (96, 80), container: int = 16
) -> Path:
    """A film-like gradient with ``bits`` significant bits, saved by Pillow."""
    from PIL import Image

    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    top = (1 << bits) - 1
    values = ((y * cols + x) * 37 % (top + 1)).astype(np.uint32)
    if container == 8:
        Image.fromarray(values.astype(np.uint8), mode="L").save(path)
    else:
        Image.fromarray(values.astype(np.uint16)).save(path)
    return path


def signer_arg(pki: devpki.DevPki, role: str = "hpki-signer") -> str:
    """The ``--signer`` value for a dev-PKI PKCS#12 signer."""
    entry = pki.entry(role)
    return f"pkcs12:{pki.root / entry['p12']},password-file={pki.root / entry['p12_pass']}"


def start_tsa(work: Path, cert: Path, key: Path, chain: Path, crl_dir: Path) -> LoopbackTsa:
    """A loopback TSA (``openssl ts -reply``) with its own certificate; also serves CRLs."""
    work.mkdir(parents=True, exist_ok=True)
    server = _TsaServer(("127.0.0.1", 0), _Handler)
    server.work_dir, server.crl_dir, server.requests_seen = work, crl_dir, 0
    (work / "tsaserial").write_text("01\n")
    config = work / "ts.cnf"
    config.write_text(_TS_CONFIG.format(dir=work, cert=cert, chain=chain, key=key))
    server.config_path = config
    threading.Thread(target=server.serve_forever, name="tsa", daemon=True).start()
    host, port = server.server_address[:2]
    return LoopbackTsa(f"http://{host}:{port}", server)


class _OcspHandler(_Handler):
    """The loopback TSA/CRL handler plus an OCSP responder on ``/ocsp`` (RFC 6960).

    Responses are signed by a delegated responder of each CA (RFC 6960 §4.2.2.2:
    id-kp-OCSPSigning, id-pkix-ocsp-nocheck), as production CAs do; a
    certificate listed on its issuer's CRL is "revoked".
    """

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if self.path.rstrip("/") != "/ocsp":
            super().do_POST()
            return
        from cryptography.x509 import ocsp

        length = int(self.headers.get("Content-Length", "0"))
        pki: devpki.DevPki = self.server.pki  # type: ignore[attr-defined]
        self.server.ocsp_requests += 1  # type: ignore[attr-defined]
        try:
            req = ocsp.load_der_ocsp_request(self.rfile.read(length))
            issuer = next(
                role
                for role in ("root-ca", "intermediate-ca", "hpki-root-ca")
                if _key_hash(pki.cert(role), req.hash_algorithm) == req.issuer_key_hash
            )
            ca = pki.cert(issuer)
            responder, responder_key = self.server.responders[issuer]  # type: ignore[attr-defined]
            revoked = {r.serial_number for r in pki.crl(issuer)}
            now = datetime.now(UTC).replace(microsecond=0)
            status = (
                ocsp.OCSPCertStatus.REVOKED
                if req.serial_number in revoked
                else ocsp.OCSPCertStatus.GOOD
            )
            builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
                issuer_name_hash=req.issuer_name_hash,
                issuer_key_hash=req.issuer_key_hash,
                serial_number=req.serial_number,
                algorithm=req.hash_algorithm,
                cert_status=status,
                this_update=now - timedelta(minutes=5),
                next_update=now + timedelta(days=7),
                revocation_time=now - timedelta(hours=1) if status.name == "REVOKED" else None,
                revocation_reason=None,
            )
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
            response = builder.certificates([responder]).sign(responder_key, hashes.SHA256())
            assert ca.subject == responder.issuer
            body = response.public_bytes(serialization.Encoding.DER)
        except Exception as exc:  # noqa: BLE001 - report any failure to the client
            self._send(500, str(exc).encode(), "text/plain")
            return
        self._send(200, body, "application/ocsp-response")


def _responder(pki: devpki.DevPki, issuer: str) -> tuple[x509.Certificate, Any]:
    """A delegated OCSP responder certificate of ``issuer`` (RFC 6960 §4.2.2.2)."""
    ca, ca_key = pki.cert(issuer), pki.private_key(issuer)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"OCSP {issuer}")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _key_hash(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    from cryptography.hazmat.primitives.serialization import PublicFormat

    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    from asn1crypto import keys

    bits = keys.PublicKeyInfo.load(der)["public_key"].contents[1:]  # BIT STRING without pad
    digest = hashes.Hash(algorithm)
    digest.update(bits)
    return digest.finalize()


def start_ca_services(work: Path) -> tuple[LoopbackTsa, devpki.DevPki]:
    """A fresh dev PKI whose CRL distribution points and OCSP responder URL name a
    server of its own (which is also its TSA).

    Stopping it (:func:`stop_tsa`) is "the CA's CRL and OCSP services are gone".
    """
    work.mkdir(parents=True, exist_ok=True)
    server = _TsaServer(("127.0.0.1", 0), _OcspHandler)
    server.work_dir, server.crl_dir, server.requests_seen = work, None, 0
    server.ocsp_requests = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="ca-services", daemon=True).start()
    host, port = server.server_address[:2]
    services = LoopbackTsa(f"http://{host}:{port}", server)
    pki = devpki.generate(
        work / "pki", crl_url_base=f"{services.base_url}/crl", ocsp_url=f"{services.base_url}/ocsp"
    )
    server.pki = pki  # type: ignore[attr-defined]
    server.responders = {  # type: ignore[attr-defined]
        role: _responder(pki, role) for role in ("root-ca", "intermediate-ca", "hpki-root-ca")
    }
    services.configure(pki)
    return services, pki


def stop_tsa(tsa: LoopbackTsa) -> None:
    tsa.server.shutdown()
    tsa.server.server_close()


def issue_tsa_certificate(
    pki: devpki.DevPki, out: Path, *, crl_url: str, years: int = 5
) -> tuple[Path, Path]:
    """A second TSA certificate from the dev root (critical timeStamping EKU, RFC 3161 §2.3)."""
    root, root_key = pki.cert("root-ca"), pki.private_key("root-ca")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sekisho Development PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Sekisho Dev TSA 2"),
        ]
    )
    point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl_url)], None, None, None)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, True, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), False
        )
        .add_extension(x509.CRLDistributionPoints([point]), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "tsa-2.crt.pem", out / "tsa-2.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(key_path, key)
    return cert_path, key_path


def crl_at(pki: devpki.DevPki, issuer: str, moment: datetime, path: Path) -> Path:
    """An empty CRL of ``issuer`` current at ``moment`` (what the live CA publishes then)."""
    ca, ca_key = pki.cert(issuer), pki.private_key(issuer)
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(moment - timedelta(hours=1))
        .next_update(moment + timedelta(days=7))
        .add_extension(x509.CRLNumber(1000), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(ca_key, hashes.SHA256())
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    return path


@pytest.fixture(scope="session")
def renewal_tsa(
    tmp_path_factory: pytest.TempPathFactory, signing_pki: devpki.DevPki, loopback_tsa: LoopbackTsa
) -> Iterator[LoopbackTsa]:
    """A TSA whose certificate outlives the first TSA's (a renewed TSA certificate)."""
    if shutil.which("openssl") is None:
        pytest.skip("external tool 'openssl' is not installed")
    work = tmp_path_factory.mktemp("tsa-2")
    cert, key = issue_tsa_certificate(
        signing_pki, work / "pki", crl_url=f"{loopback_tsa.base_url}/crl/root-ca.crl"
    )
    tsa = start_tsa(work, cert, key, signing_pki.cert_path("root-ca"), signing_pki.root)
    yield tsa
    stop_tsa(tsa)


def digitization_config(
    pki: devpki.DevPki,
    tsa_url: str,
    *,
    preload_crls: bool = True,
    allow_fetching: bool = False,
    renewal_tsa_url: str = "",
    **digitization: Any,
) -> dict[str, Any]:
    """``[digitization]``, ``[renewal]`` and ``[signing]`` for a digitizing gateway."""
    trust: dict[str, Any] = {
        "signer_anchors": [str(p) for p in pki.trust_anchor_paths("hpki")],
        "tsa_anchors": [str(p) for p in pki.trust_anchor_paths("tsa")],
        "revocation": "hard-fail",
        "allow_fetching": allow_fetching,
    }
    if preload_crls:
        trust["crls"] = [str(pki.crl_path(r, der=True)) for r in ("root-ca", "hpki-root-ca")]
    roles = ["Medical Doctor", "Radiological Technologist"]
    return {
        "digitization": {
            "information_manager": "Kanri^Taro=管理^太郎",
            "digitizer": {"manufacturer": "Film Scan Co", "model": "FS-16"},
            **digitization,
        },
        "renewal": {"margin_days": 30, **({"tsa_url": renewal_tsa_url} if renewal_tsa_url else {})},
        "signing": {
            "tsa_url": tsa_url,
            "max_clock_skew_seconds": 60,
            "trust": trust,
            "policy": {
                "digitized-film": {
                    "hpki_role_required": True,
                    "allowed_roles": roles,
                    "timestamp_required": True,
                },
                "scanned-document": {
                    "hpki_role_required": True,
                    "allowed_roles": roles,
                    "timestamp_required": True,
                },
            },
        },
    }
