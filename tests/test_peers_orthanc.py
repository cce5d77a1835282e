"""The Orthanc peer helper starts a real Orthanc behind nginx (mutual TLS) and stops it.

STOW-RS of one instance through nginx with a partner certificate, then QIDO-RS
finds it; nginx refuses a client without a certificate and a revoked one (CRL);
with DICOM TLS on, a pynetdicom C-ECHO over TLS is accepted.  After ``stop()``
both processes are gone and the temporary directory is removed.
"""

from __future__ import annotations

import io
import json
import secrets
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from pki import devpki
from pki.devpki import DevPki
from pki.tls import TlsEndpointSettings, client_context
from tests.peers.orthanc import (
    DicomTlsOptions,
    HttpsFront,
    OrthancOptions,
    OrthancPeer,
    missing_tools,
    orthanc_version,
)

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(bool(missing_tools()), reason=f"Orthanc peer missing: {missing_tools()}"),
]

SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return devpki.generate(tmp_path_factory.mktemp("orthanc-pki"))


def _partner_context(pki: DevPki, role: str) -> ssl.SSLContext:
    return client_context(
        TlsEndpointSettings(
            certificate=pki.cert_path(role),
            private_key=pki.key_path(role),
            trust_anchors=(pki.cert_path("root-ca"),),
            intermediates=(pki.cert_path("intermediate-ca"),),
        )
    )


def _instance() -> tuple[bytes, str, str]:
    """A small Part 10 file: (bytes, StudyInstanceUID, SOPInstanceUID)."""
    study, sop = generate_uid(), generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PEER0001"
    ds.PatientName = "PEER^TEST"
    ds.StudyDate = "20260401"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(128))
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue(), study, sop


def _request(
    url: str, ctx: ssl.SSLContext, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    method = "POST" if body is not None else "GET"
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _stow_body(data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = secrets.token_hex(16)
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    return body, headers


def test_orthanc_behind_nginx_stores_by_stow_and_finds_by_qido_over_mutual_tls(
    pki: DevPki,
) -> None:
    assert orthanc_version() >= (1, 9)
    peer = OrthancPeer(OrthancOptions(https=HttpsFront.from_devpki(pki)))
    peer.start()
    workdir = peer.workdir
    try:
        root = peer.https_url + peer.dicomweb_root
        partner = _partner_context(pki, "partner-valid-1")
        data, study, sop = _instance()
        body, headers = _stow_body(data)

        status, raw = _request(f"{root}/studies", partner, body, headers)
        assert status == 200, raw[:300]
        stored = json.loads(raw)["00081199"]["Value"]
        assert [item["00081155"]["Value"][0] for item in stored] == [sop]

        status, raw = _request(
            f"{root}/studies?StudyInstanceUID={study}&includefield=00201208", partner
        )
        assert status == 200
        (found,) = json.loads(raw)
        assert found["0020000D"]["Value"] == [study]
        assert int(found["00201208"]["Value"][0]) == 1

        # ssl_verify_client on: no certificate, or a revoked one, gets nothing through.
        anonymous = ssl.create_default_context(cafile=str(pki.cert_path("root-ca")))
        revoked = _partner_context(pki, "partner-revoked")
        for ctx in (anonymous, revoked):
            status, _ = _request(f"{root}/studies", ctx, body, headers)
            assert status == 400
        assert peer.statistics()["CountInstances"] == 1
    finally:
        peer.stop()
    assert peer.orthanc is not None and not peer.orthanc.alive()
    assert peer.nginx is not None and not peer.nginx.alive()
    assert workdir is not None and not Path(workdir).exists()


def test_orthanc_dicom_tls_accepts_an_echo_from_a_trusted_partner(pki: DevPki) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    options = OrthancOptions(aet="ORTHANC_TLS", dicom_tls=DicomTlsOptions.from_devpki(pki))
    with OrthancPeer(options) as peer:
        ae = AE(ae_title="PARTNER_A")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        ctx = _partner_context(pki, "partner-valid-1")
        assoc = ae.associate(
            "127.0.0.1", peer.dicom_port, ae_title=peer.aet, tls_args=(ctx, "localhost")
        )
        try:
            assert assoc.is_established
            status = assoc.send_c_echo()
            assert status.Status == 0x0000
        finally:
            assoc.release()
