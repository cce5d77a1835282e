"""Forwarding to Orthanc and restoring from it (R-XCH-5, R-EXT-1, R-EXT-3, R-TLS-1).

Orthanc (Debian package) is the destination twice: by DICOM over TLS (its own
DICOM TLS, C-STORE in, C-GET out) and by DICOMweb behind nginx with mutual TLS
(STOW-RS in, WADO-RS out).  What Orthanc stores is compared byte for byte (the
dataset after the File Meta Information) with what the gateway stored.  A
restore verifies every instance against the hash recorded when it was sent, and
an instance altered at the destination (overwritten through Orthanc's own REST
API, as a careless or malicious administrator could) is flagged, quarantined and
never stored.
"""

from __future__ import annotations

import asyncio
import io
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from test_forward_peers import (
    dataset_sha,
    dimse_destination,
    ingest,
    make_study,
    open_gateway,
    sop_uid_of,
    tls_table,
    write_config,
)

from gateway import cli
from gateway.forward.commands import enqueue_study
from gateway.forward.queue import open_queue
from gateway.forward.restore import restore_study
from gateway.forward.worker import Forwarder
from gateway.service import Gateway
from pki.devpki import DevPki
from tests.peers.orthanc import (
    DicomTlsOptions,
    HttpsFront,
    OrthancOptions,
    OrthancPeer,
    missing_tools,
)

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(bool(missing_tools()), reason=f"Orthanc peer missing: {missing_tools()}"),
]


@pytest.fixture(scope="module")
def orthanc(dev_pki: DevPki) -> Iterator[OrthancPeer]:
    options = OrthancOptions(
        dicom_tls=DicomTlsOptions.from_devpki(dev_pki),
        https=HttpsFront.from_devpki(dev_pki),
        extra_config={"DicomAlwaysAllowStore": True, "DicomAlwaysAllowGet": True,
                      "OverwriteInstances": True},
    )
    with OrthancPeer(options) as peer:
        yield peer


@pytest.fixture
def gateway(tmp_path: Path, dev_pki: DevPki, orthanc: OrthancPeer) -> Iterator[Gateway]:
    web = (f'[destinations.web]\nrole = "external-storage"\ntransport = "dicomweb"\n'
           f'url = "{orthanc.https_url}{orthanc.dicomweb_root}"\n'
           f"[destinations.web.tls]\n{tls_table(dev_pki)}\n")
    dimse = dimse_destination("orthanc", dev_pki, orthanc.dicom_port, called_ae=orthanc.aet)
    gw = open_gateway(write_config(tmp_path / "gw", dev_pki, dimse + web))
    yield gw
    gw.close()


def _orthanc_files(peer: OrthancPeer) -> dict[str, bytes]:
    out = {}
    for oid in peer.rest("GET", "/instances"):
        with urllib.request.urlopen(f"{peer.http_url}/instances/{oid}/file") as resp:  # noqa: S310
            data = resp.read()
        out[sop_uid_of(data)] = data
    return out


def _tamper(peer: OrthancPeer, original: bytes) -> None:
    """Overwrite an instance at the destination with altered content, same UIDs."""
    ds = pydicom.dcmread(io.BytesIO(original))
    ds.InstanceNumber = int(ds.InstanceNumber) + 1000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    req = urllib.request.Request(f"{peer.http_url}/instances", data=buf.getvalue(),
                                 method="POST")
    with urllib.request.urlopen(req) as resp:  # noqa: S310 - loopback
        assert resp.status == 200


async def _send(gw: Gateway, study_uid: str, destination: str) -> None:
    enqueue_study(gw, study_uid, destination, "staff01")
    fw = Forwarder(gw)
    await fw.run_until_idle()
    await fw.stop()


async def test_dicom_tls_forward_and_cget_restore(
    gateway: Gateway, orthanc: OrthancPeer, capsys: pytest.CaptureFixture[str]
) -> None:
    study = make_study(2, 3, patient_id="ORTH-1")
    for data in study.files:
        ingest(gateway, data)
    await _send(gateway, study.study_uid, "orthanc")
    jobs = open_queue(gateway.settings.store.database).list_jobs(destination="orthanc")
    assert {j.state for j in jobs} == {"sent"}
    stored = _orthanc_files(orthanc)
    for data in study.files:  # Orthanc holds exactly the bytes the gateway stored
        assert dataset_sha(stored[sop_uid_of(data)]) == dataset_sha(data)

    # The local copy of one instance is lost: the restore writes it back, verified.
    lost = jobs[0]
    gateway.files.object_path(lost.sha256).unlink()
    report = await restore_study(gateway, "orthanc", study.study_uid, "staff01")
    assert report.ok and len(report.verified) == 6 and report.written == 1
    assert gateway.files.verify(lost.sha256)

    # Altered at the destination: flagged, quarantined, never stored (R-EXT-3).
    victim = study.files[2]
    _tamper(orthanc, victim)
    config = str(gateway.settings.base_dir / "sekisho.toml")
    code = await asyncio.to_thread(cli.main, [
        "restore", "--config", config, "--study", study.study_uid, "--from", "orthanc",
        "--by", "staff02"])
    assert code == 3
    assert "1 MISMATCHED" in capsys.readouterr().out
    rows = open_queue(gateway.settings.store.database).list_restores(study.study_uid)
    last = [r for r in rows if r["restored_by"] == "staff02"]
    assert sorted(r["outcome"] for r in last) == ["mismatch"] + ["verified"] * 5
    (bad,) = [r for r in last if r["outcome"] == "mismatch"]
    assert bad["sop_uid"] == sop_uid_of(victim) and Path(bad["quarantine_path"]).is_file()
    assert bad["expected_sha256"] == dataset_sha(victim) != bad["received_sha256"]
    local = gateway.store.find_instance(sop_uid_of(victim))
    assert local is not None and gateway.files.verify(local.sha256)
    events = [r.event for r in gateway.audit.iter_records()]
    imports = [e for e in events if e.event_id.value == "110107"]
    assert [e.actor for e in imports] == ["staff01", "staff02"]
    assert imports[0].description.startswith("restore from orthanc: 6 verified")
    assert imports[1].outcome == 8 and imports[1].extra["destination_name"] == "orthanc"
    assert any(e.reason_code == "restore-hash-mismatch" for e in events)


async def test_stow_over_mutual_tls_and_wado_restore(
    gateway: Gateway, orthanc: OrthancPeer
) -> None:
    study = make_study(1, 3, patient_id="ORTH-2")
    for data in study.files:
        ingest(gateway, data)
    await _send(gateway, study.study_uid, "web")
    jobs = open_queue(gateway.settings.store.database).list_jobs(destination="web")
    assert {j.state for j in jobs} == {"sent"}
    assert all(j.confirmed.startswith("STOW-RS HTTP 200") for j in jobs)
    stored = _orthanc_files(orthanc)
    assert all(dataset_sha(stored[sop_uid_of(d)]) == dataset_sha(d) for d in study.files)

    report = await restore_study(gateway, "web", study.study_uid, "staff01")
    assert report.ok and len(report.verified) == 3

    _tamper(orthanc, study.files[0])
    report = await restore_study(gateway, "web", study.study_uid, "staff01")
    assert report.mismatched == [sop_uid_of(study.files[0])] and len(report.verified) == 2
