"""Forwarding over DICOM TLS to real peers: DCMTK ``storescp +tls`` and a pynetdicom
Storage Commitment SCP (R-XCH-4, R-XCH-5, R-XCH-6, R-XCH-7, R-TLS-1).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, RLELossless
from test_forward_peers import (
    STORESCP,
    CommitmentScp,
    commitment_listener,
    dataset_sha,
    dimse_destination,
    free_port,
    ingest,
    make_study,
    open_gateway,
    received_datasets,
    sop_uid_of,
    storescp,
    wait_for,
    write_config,
)

from gateway import cli
from gateway.audit.dicom_xml import audit_message_bytes
from gateway.forward import queue as queue_module
from gateway.forward.commands import enqueue_study
from gateway.forward.queue import open_queue
from gateway.forward.worker import Forwarder
from gateway.service import Gateway
from pki import devpki

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(not os.path.exists(STORESCP), reason="DCMTK storescp not installed"),
]


@pytest.fixture
def pki(dev_pki: devpki.DevPki) -> devpki.DevPki:
    return dev_pki


def _load(gw: Gateway, *studies: object) -> None:
    for study in studies:
        for data in study.files:  # type: ignore[attr-defined]
            ingest(gw, data)


async def _drain(gw: Gateway) -> Forwarder:
    fw = Forwarder(gw)
    await fw.run_until_idle()
    await fw.stop()
    return fw


def _states(gw: Gateway, destination: str | None = None) -> dict[str, str]:
    q = open_queue(gw.settings.store.database)
    return {j.sop_uid: j.state for j in q.list_jobs(destination=destination)}


async def test_forward_to_storescp_arrives_byte_identical_and_is_audited(
    tmp_path: Path, pki: devpki.DevPki
) -> None:
    """R-XCH-5/R-XCH-7: what DCMTK wrote is what was stored; sender and receiver audited."""
    study = make_study(2, 3)
    with storescp(pki, tmp_path / "recv") as (port, _proc):
        gw = open_gateway(write_config(tmp_path / "gw", pki, dimse_destination("pacs", pki, port)))
        try:
            _load(gw, study)
            assert enqueue_study(gw, study.study_uid, "pacs", "staff01") == (6, 0, 0)
            await _drain(gw)
            assert set(_states(gw).values()) == {"sent"}
            expected = {sop_uid_of(f): dataset_sha(f) for f in study.files}
            assert wait_for(lambda: len(received_datasets(tmp_path / "recv")) == 6)
            assert received_datasets(tmp_path / "recv") == expected
            jobs = open_queue(gw.settings.store.database).list_jobs()
            assert {j.sop_uid: j.dataset_sha256 for j in jobs} == expected
            assert all(j.confirmed == "C-STORE success (0x0000)" for j in jobs)
            records = [r for r in gw.audit.iter_records()
                       if r.event.event_id.value == "110104" and r.event.destination == "pacs"]
            (rec,) = records
            e = rec.event
            assert (e.action, e.outcome, e.instance_count) == ("R", 0, 6)
            assert e.patient_id == "P-001" and e.study_uids == (study.study_uid,)
            assert e.extra["destination_ae"] == "DEST" and e.extra["calling_ae"] == "SEKISHO"
            assert e.extra["requested_by"] == "staff01"
            xml = audit_message_bytes(rec).decode()
            assert 'UserID="pacs"' in xml and "110152" in xml and "110153" in xml
        finally:
            gw.close()


async def test_compressed_instance_is_never_transcoded(tmp_path: Path, pki: devpki.DevPki) -> None:
    """R-XCH-6: RLE Lossless goes as RLE or not at all, with the reason in plain words."""
    study = make_study(1, 2, syntax=RLELossless)
    with storescp(pki, tmp_path / "plain") as (plain, _p1), \
            storescp(pki, tmp_path / "all", extra=("+xa",)) as (accepts_all, _p2):
        config = write_config(tmp_path / "gw", pki, dimse_destination("plain", pki, plain)
                              + dimse_destination("all", pki, accepts_all))
        gw = open_gateway(config)
        try:
            _load(gw, study)
            enqueue_study(gw, study.study_uid, "plain", "t")
            enqueue_study(gw, study.study_uid, "all", "t")
            await _drain(gw)
            q = open_queue(gw.settings.store.database)
            refused = q.list_jobs(destination="plain")
            assert {j.state for j in refused} == {"failed"}
            assert all(j.attempts == 1 for j in refused)
            assert refused[0].last_error.startswith(
                "destination accepts no lossless transfer syntax for CT Image Storage")
            assert not any((tmp_path / "plain").iterdir())
            assert {j.state for j in q.list_jobs(destination="all")} == {"sent"}
            assert wait_for(lambda: len(received_datasets(tmp_path / "all")) == 2)
            assert received_datasets(tmp_path / "all") == {
                sop_uid_of(f): dataset_sha(f) for f in study.files}
        finally:
            gw.close()


async def test_implicit_only_destination_gets_a_lossless_conversion(
    tmp_path: Path, pki: devpki.DevPki
) -> None:
    """Explicit VR LE may become Implicit VR LE (lossless); the sent bytes' hash is recorded."""
    study = make_study(1, 1)
    with storescp(pki, tmp_path / "recv", extra=("+xi",)) as (port, _proc):
        gw = open_gateway(write_config(tmp_path / "gw", pki, dimse_destination("old", pki, port)))
        try:
            _load(gw, study)
            enqueue_study(gw, study.study_uid, "old", "t")
            await _drain(gw)
            (job,) = open_queue(gw.settings.store.database).list_jobs()
            assert job.state == "sent" and job.sent_syntax == ImplicitVRLittleEndian
            assert wait_for(lambda: len(list((tmp_path / "recv").iterdir())) == 1)
            (path,) = list((tmp_path / "recv").iterdir())
            data = path.read_bytes()
            assert dataset_sha(data) == job.dataset_sha256
            received = pydicom.dcmread(io.BytesIO(data))
            original = pydicom.dcmread(io.BytesIO(study.files[0]))
            assert received.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            assert received.PixelData == original.PixelData
        finally:
            gw.close()


async def test_destination_down_backs_off_then_delivers(tmp_path: Path, pki: devpki.DevPki) -> None:
    """R-XCH-4: a refused connection is retried with backoff; nothing is marked sent."""
    study = make_study(1, 3)
    port = free_port()
    config = write_config(tmp_path / "gw", pki, dimse_destination(
        "pacs", pki, port, retry="max_attempts = 5\nbackoff_base_seconds = 0.5\n"))
    gw = open_gateway(config)
    try:
        _load(gw, study)
        enqueue_study(gw, study.study_uid, "pacs", "t")
        await _drain(gw)
        jobs = open_queue(gw.settings.store.database).list_jobs()
        assert {j.state for j in jobs} == {"queued"} and {j.attempts for j in jobs} == {1}
        assert jobs[0].last_error.startswith(f"cannot connect to 127.0.0.1:{port}")
        assert jobs[0].next_attempt_at > time.time()  # scheduled later, not hammered
        fw = Forwarder(gw)
        assert await fw.run_batch("pacs") == 0  # still backing off
        with storescp(pki, tmp_path / "recv", port=port):
            await asyncio.sleep(0.6)
            await fw.run_until_idle()
            await fw.stop()
            assert set(_states(gw).values()) == {"sent"}
            assert wait_for(lambda: len(received_datasets(tmp_path / "recv")) == 3)
    finally:
        gw.close()


async def test_attempt_limit_stops_with_an_alert_and_retry_resumes(
    tmp_path: Path, pki: devpki.DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    """METI 7.6.8(4): stop after the limit, alert, list, resume on request."""
    study = make_study(1, 2)
    port = free_port()
    config = write_config(tmp_path / "gw", pki, dimse_destination(
        "pacs", pki, port, retry="max_attempts = 2\nbackoff_base_seconds = 0.1\n"))
    gw = open_gateway(config)
    try:
        _load(gw, study)
        enqueue_study(gw, study.study_uid, "pacs", "t")
        fw = Forwarder(gw)
        await fw.run_until_idle()
        await asyncio.sleep(0.25)
        await fw.run_until_idle()
        await fw.stop()
        assert set(_states(gw).values()) == {"failed"}
        alerts = [r.event for r in gw.audit.iter_records() if r.event.event_id.value == "110113"
                  and r.event.reason_code == "forward-stopped"]
        assert len(alerts) == 1 and "after 2 attempt(s): cannot connect" in alerts[0].description
        failures = [r.event for r in gw.audit.iter_records()
                    if r.event.event_id.value == "110104" and r.event.outcome == 8]
        assert failures and failures[0].instance_count == 2

        assert cli.main(["queue", "list", "--config", str(config), "--state", "failed",
                         "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert len(listed["jobs"]) == 2 and listed["counts"] == {"pacs": {"failed": 2}}
        assert "cannot connect" in listed["jobs"][0]["last_error"]
        assert cli.main(["queue", "list", "--config", str(config)]) == 0
        assert "pacs: failed=2" in capsys.readouterr().out

        assert cli.main(["queue", "retry", "--config", str(config), "--destination", "pacs",
                         "--by", "admin01"]) == 0
        assert set(_states(gw).values()) == {"queued"}
        with storescp(pki, tmp_path / "recv", port=port):
            await _drain(gw)
        assert set(_states(gw).values()) == {"sent"}
    finally:
        gw.close()


async def test_storage_commitment_on_the_same_association(
    tmp_path: Path, pki: devpki.DevPki
) -> None:
    """PS3.4 J.3: committed per instance; a Failed SOP Sequence entry fails that job."""
    study = make_study(1, 3)
    with CommitmentScp(pki, mode="same") as scp:
        scp.fail.add(sop_uid_of(study.files[1]))
        config = write_config(tmp_path / "gw", pki, dimse_destination(
            "archive", pki, scp.port, called_ae="ARCHIVE", commitment=True,
            extra="commitment_timeout_seconds = 5"))
        gw = open_gateway(config)
        try:
            _load(gw, study)
            enqueue_study(gw, study.study_uid, "archive", "t")
            await _drain(gw)
            states = _states(gw)
            assert sorted(states.values()) == ["committed", "committed", "failed"]
            (bad,) = open_queue(gw.settings.store.database).list_jobs(state="failed")
            assert bad.sop_uid == sop_uid_of(study.files[1])
            assert bad.last_error == "Storage Commitment failed: no such object instance (0x0112)"
            assert len(scp.requests) == 1 and int(scp.report_status.Status) == 0
            assert {j.commitment_uid for j in open_queue(gw.settings.store.database)
                    .list_jobs()} == {scp.requests[0]}
            assert any(r.event.reason_code == "forward-stopped" for r in gw.audit.iter_records())
        finally:
            gw.close()


async def test_storage_commitment_on_a_separate_association_survives_a_restart(
    tmp_path: Path, pki: devpki.DevPki
) -> None:
    """The provider reports later on its own association; the pending Transaction UID is
    kept in the database, so a restarted gateway applies the report."""
    study = make_study(1, 2)
    gw_port = free_port()
    with CommitmentScp(pki, mode="separate", report_to=("127.0.0.1", gw_port, "SEKISHO")) as scp:
        scp.hold.clear()
        config = write_config(tmp_path / "gw", pki, dimse_destination(
            "archive", pki, scp.port, called_ae="ARCHIVE", commitment=True,
            extra="commitment_timeout_seconds = 0.5"))
        gw = open_gateway(config)
        try:
            _load(gw, study)
            enqueue_study(gw, study.study_uid, "archive", "t")
            await _drain(gw)
            assert set(_states(gw).values()) == {"sent"}
        finally:
            gw.close()
        queue_module._QUEUES.clear()  # a new process: nothing cached
        gw2 = open_gateway(config)
        try:
            with commitment_listener(gw2, port=gw_port):
                scp.hold.set()
                assert wait_for(lambda: set(_states(gw2).values()) == {"committed"}, 20)
            assert int(scp.report_status.Status) == 0
        finally:
            gw2.close()
