"""DICOM over TLS with real peers: DCMTK and Orthanc against ``sekisho serve`` (R-XCH-1/2/3, R-TLS).

One gateway for the module (``sekisho init``, DIMSE enabled) with three
studies stored by DCMTK ``storescu +tls`` from partner-a: S1 of P1 (shared
with partner-a), S2 of P2 (shared with the network "regional", to which
partner-a and partner-b belong) and S3 of P3 (shared with nobody).

DCMTK 3.6.7's ``movescu`` and ``getscu`` have no TLS option; they reach the
gateway through :class:`tests.dimse_support.TlsTunnel` (mutual TLS with the
partner's certificate).  The C-MOVE destination is DCMTK ``storescp +tls``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.dimse_support import (
    StoreScp,
    TlsTunnel,
    dataset_sha256,
    dcmtk,
    issue_node_certificate,
    sop_uid_of,
    tls_args,
    wait_for,
)
from tests.gateway_helpers import (
    INSTANCES_TRANSFERRED,
    QUERY,
    GatewayProcess,
    Instance,
    Study,
    build_study,
    create_instance,
    curl,
    wado_parts,
)

pytestmark = pytest.mark.peer


@dataclass
class Env:
    inst: Instance
    gw: GatewayProcess
    port: int
    studies: dict[str, Study]
    scp_a: StoreScp
    scp_b: StoreScp
    work: Path

    def tls(self, role: str = "partner-valid-1") -> list[str]:
        return tls_args(self.inst.pki, role)


def _dataset_hashes(study: Study) -> dict[str, str]:
    return {i.sop_uid: dataset_sha256(i.data) for i in study.instances}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("dimse")
    inst = create_instance(work / "gw", {"dimse": {"handshake_timeout_seconds": 5}})
    port = int(inst.read_config()["dimse"]["port"])
    with ExitStack() as stack:
        # Started first: its ports are taken before the DCMTK receivers pick free ones.
        gw = GatewayProcess(inst).start()
        stack.callback(gw.stop)
        pki = inst.pki
        cert_a, key_a = issue_node_certificate(pki, "partner-a-node", work / "nodes")
        cert_b, key_b = issue_node_certificate(pki, "partner-b-node", work / "nodes")
        root = pki.cert_path("root-ca")
        scp_a = StoreScp("PARTNER_A_SCP", cert_a, key_a, [root], work / "recv-a")
        stack.callback(scp_a.stop)
        scp_b = StoreScp("PARTNER_B_SCP", cert_b, key_b, [root], work / "recv-b")
        stack.callback(scp_b.stop)
        for name, role, ae, perms, scp in (
            ("partner-a", "partner-valid-1", "PARTNER_A", ("push", "query", "retrieve"), scp_a),
            ("partner-b", "partner-valid-2", "PARTNER_B", ("push", "query"), scp_b),
        ):
            inst.cli_ok("partner", "remove", name)
            args = ["partner", "add", name, "--certificate", str(pki.cert_path(role)),
                    "--ae-title", ae, "--network", "regional",
                    "--move-destination", f"{ae}_SCP=127.0.0.1:{scp.port}"]
            for perm in perms:
                args += ["--permission", perm]
            inst.cli_ok(*args)
        inst.cli_ok("consent", "grant", "P1", "--partner", "partner-a", "--by", "nurse01")
        inst.cli_ok("consent", "grant", "P2", "--network", "regional", "--by", "nurse01")
        studies = {
            "S1": build_study(patient_id="P1", series=(("CT", 3), ("MR", 2)), rows=64,
                              columns=64),
            "S2": build_study(patient_id="P2", patient_name="SUZUKI^HANAKO",
                              series=(("CT", 2),), rows=64, columns=64),
            "S3": build_study(patient_id="P3", patient_name="SATO^JIRO", series=(("MR", 2),),
                              rows=64, columns=64),
        }
        files = work / "sent"
        files.mkdir()
        for key, study in studies.items():
            for n, instance in enumerate(study.instances):
                (files / f"{key}-{n}.dcm").write_bytes(instance.data)
        e = Env(inst, gw, port, studies, scp_a, scp_b, work)
        proc = dcmtk("storescu", *e.tls(), "-aet", "PARTNER_A", "-aec", "SEKISHO",
                     "127.0.0.1", str(port), *sorted(files.iterdir()))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Received instances are audited when the association has ended.
        assert wait_for(lambda: len({
            r.event.patient_id for r in inst.audit_records(event_id=INSTANCES_TRANSFERRED)
        }) == 3)
        yield e


def _find(e: Env, role: str, calling: str, *keys: str, model: str = "-S") -> list[pydicom.Dataset]:
    out = e.work / f"find-{calling}-{len(list(e.work.iterdir()))}"
    out.mkdir()
    args = [*e.tls(role), "-aet", calling, "-aec", "SEKISHO", model, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    proc = dcmtk("findscu", *args, "127.0.0.1", str(e.port))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _alerts_after(e: Env, seq: int, reason: str) -> list[object]:
    return [r for r in e.inst.security_alerts(seq) if r.event.reason_code == reason]


# -- verification and storage ---------------------------------------------------
def test_echo_with_registered_partner_certificate(env: Env) -> None:
    proc = dcmtk("echoscu", *env.tls(), "-aet", "PARTNER_A", "-aec", "SEKISHO",
                 "127.0.0.1", str(env.port))
    assert proc.returncode == 0, proc.stderr


def test_storescu_stores_multi_series_study_as_received(env: Env) -> None:
    """R-XCH-1/5: every instance indexed; the stored data set is the sent one, byte for byte."""
    indexed = env.inst.indexed_instances()
    objects = env.inst.object_files()
    for study in env.studies.values():
        for sop_uid, expected in _dataset_hashes(study).items():
            stored = objects[indexed[sop_uid]].read_bytes()
            assert dataset_sha256(stored) == expected
    s1 = env.studies["S1"]
    assert len(s1.series_uids) == 2
    records = env.inst.audit_records(event_id=INSTANCES_TRANSFERRED)
    p1 = [r.event for r in records if r.event.patient_id == "P1"]
    assert p1 and p1[0].actor == "partner-a" and p1[0].instance_count == 5
    assert p1[0].study_uids == (s1.study_uid,)


def test_wado_retrieves_the_bytes_received_by_c_store(env: Env) -> None:
    s1 = env.studies["S1"]
    parts = wado_parts(curl(env.inst, f"/dicomweb/studies/{s1.study_uid}",
                            headers=["Accept: multipart/related; type=\"application/dicom\""]))
    got = {sop_uid_of(p): dataset_sha256(p) for p in parts}
    assert got == _dataset_hashes(s1)


def test_same_uid_with_different_content_is_refused(env: Env) -> None:
    """The stored instance wins, as on STOW-RS (status 0x0111)."""
    original = env.studies["S1"].instances[0]
    ds = pydicom.dcmread(env.work / "sent" / "S1-0.dcm")
    ds.StudyDescription = "tampered"
    path = env.work / "tampered.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = dcmtk("storescu", "-v", *env.tls(), "-aet", "PARTNER_A", "-aec", "SEKISHO",
                 "127.0.0.1", str(env.port), path)
    assert proc.returncode != 0
    assert re.search(r"0x0?111\b", proc.stdout + proc.stderr), proc.stdout + proc.stderr
    stored = env.inst.object_files()[env.inst.indexed_instances()[original.sop_uid]]
    assert dataset_sha256(stored.read_bytes()) == dataset_sha256(original.data)


# -- refusals (R-TLS-1/3/4/5) ---------------------------------------------------
@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ([], "not-tls"),  # plain TCP, no TLS at all
        (["+tla", "+cf", "ROOT"], "no-certificate"),  # TLS without a client certificate
        (["+tls", "KEY:partner-unknown-ca", "CERT:partner-unknown-ca", "+cf", "ROOT"],
         "unknown-ca"),
    ],
    ids=["plain-tcp", "anonymous-tls", "unknown-ca"],
)
def test_refused_connections_are_audited(env: Env, args: list[str], reason: str) -> None:
    pki = env.inst.pki
    resolved = []
    for a in args:
        if a == "ROOT":
            a = str(pki.cert_path("root-ca"))
        elif a.startswith("KEY:"):
            a = str(pki.key_path(a[4:]))
        elif a.startswith("CERT:"):
            a = str(pki.cert_path(a[5:]))
        resolved.append(a)
    seq = env.inst.audit_head()
    before = len(env.inst.indexed_instances())
    proc = dcmtk("storescu", *resolved, "-aet", "PARTNER_A", "-aec", "SEKISHO", "-to", "10",
                 "127.0.0.1", str(env.port), env.work / "sent" / "S1-0.dcm")
    assert proc.returncode != 0
    assert wait_for(lambda: _alerts_after(env, seq, reason)), [
        r.event.reason_code for r in env.inst.security_alerts(seq)
    ]
    assert len(env.inst.indexed_instances()) == before


def test_calling_ae_not_registered_for_the_certificate_is_rejected(env: Env) -> None:
    """R-TLS-4: partner-a's valid certificate with partner-b's AE title: A-ASSOCIATE-RJ."""
    seq = env.inst.audit_head()
    proc = dcmtk("echoscu", *env.tls(), "-aet", "PARTNER_B", "-aec", "SEKISHO",
                 "127.0.0.1", str(env.port))
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stdout + proc.stderr
    alerts = _alerts_after(env, seq, "wrong-ae-title")
    assert alerts and alerts[0].event.actor == "partner-a"  # type: ignore[attr-defined]
    assert alerts[0].event.event_id.value == "110113"  # type: ignore[attr-defined]
    assert alerts[0].event.extra["calling_ae"] == "PARTNER_B"  # type: ignore[attr-defined]


# -- C-FIND (R-XCH-2) -----------------------------------------------------------
def test_find_returns_only_consented_studies(env: Env) -> None:
    s = env.studies
    keys = ("QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "PatientName",
            "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
    got_a = {str(d.StudyInstanceUID): d for d in _find(env, "partner-valid-1", "PARTNER_A", *keys)}
    assert set(got_a) == {s["S1"].study_uid, s["S2"].study_uid}
    d1 = got_a[s["S1"].study_uid]
    assert d1.PatientID == "P1" and int(d1.NumberOfStudyRelatedInstances) == 5
    assert set(d1.ModalitiesInStudy) == {"CT", "MR"}
    got_b = {str(d.StudyInstanceUID) for d in _find(env, "partner-valid-2", "PARTNER_B", *keys)}
    assert got_b == {s["S2"].study_uid}
    # Asking for the unshared patient by name reveals nothing.
    assert _find(env, "partner-valid-1", "PARTNER_A", "QueryRetrieveLevel=STUDY",
                 "PatientID=P3", "StudyInstanceUID") == []


def test_find_patient_root_series_and_image_levels(env: Env) -> None:
    s1 = env.studies["S1"]
    series = _find(env, "partner-valid-1", "PARTNER_A", "QueryRetrieveLevel=SERIES",
                   "PatientID=P1", f"StudyInstanceUID={s1.study_uid}", "SeriesInstanceUID",
                   "Modality", model="-P")
    assert {str(d.SeriesInstanceUID) for d in series} == set(s1.series_uids)
    images = _find(env, "partner-valid-1", "PARTNER_A", "QueryRetrieveLevel=IMAGE",
                   f"StudyInstanceUID={s1.study_uid}", f"SeriesInstanceUID={s1.series_uids[0]}",
                   "SOPInstanceUID", "InstanceNumber")
    assert {str(d.SOPInstanceUID) for d in images} == {
        i.sop_uid for i in s1.series(s1.series_uids[0])
    }
    patients = _find(env, "partner-valid-1", "PARTNER_A", "QueryRetrieveLevel=PATIENT",
                     "PatientID", "NumberOfPatientRelatedStudies", model="-P")
    assert sorted(str(d.PatientID) for d in patients) == ["P1", "P2"]


def test_find_is_audited_per_patient(env: Env) -> None:
    seq = env.inst.audit_head()
    _find(env, "partner-valid-2", "PARTNER_B", "QueryRetrieveLevel=STUDY", "StudyInstanceUID")
    queries = env.inst.audit_records(after_seq=seq, event_id=QUERY)
    assert [(q.event.actor, q.event.patient_id) for q in queries] == [("partner-b", "P2")]


# -- C-MOVE and C-GET -------------------------------------------------------------
def _move(e: Env, destination: str, study_uid: str) -> str:
    tunnel = TlsTunnel(e.inst.pki, "partner-valid-1", e.port)
    try:
        proc = dcmtk("movescu", "-aet", "PARTNER_A", "-aec", "SEKISHO", "-aem", destination,
                     "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                     "127.0.0.1", str(tunnel.port))
    finally:
        tunnel.close()
    return proc.stdout + proc.stderr


def test_move_to_the_partners_own_ae_delivers_consented_study(env: Env) -> None:
    s1 = env.studies["S1"]
    seq = env.inst.audit_head()
    before = set(env.scp_a.files())
    output = _move(env, "PARTNER_A_SCP", s1.study_uid)
    received = [p for p in env.scp_a.files() if p not in before]
    got = {sop_uid_of(p.read_bytes()): dataset_sha256(p.read_bytes()) for p in received}
    assert got == _dataset_hashes(s1), output
    sent = [r.event for r in env.inst.audit_records(after_seq=seq, event_id=INSTANCES_TRANSFERRED)
            if r.event.action == "R"]
    assert [(e.patient_id, e.instance_count, e.actor) for e in sent] == [("P1", 5, "partner-a")]
    assert sent[0].destination.startswith("PARTNER_A_SCP@127.0.0.1:")


def test_move_of_an_unshared_study_sends_nothing(env: Env) -> None:
    before = set(env.scp_a.files())
    _move(env, "PARTNER_A_SCP", env.studies["S3"].study_uid)
    assert set(env.scp_a.files()) == before


def test_move_to_another_partners_ae_is_refused(env: Env) -> None:
    seq = env.inst.audit_head()
    before = set(env.scp_b.files())
    output = _move(env, "PARTNER_B_SCP", env.studies["S1"].study_uid)
    assert "MoveDestinationUnknown" in output, output
    assert set(env.scp_b.files()) == before
    assert _alerts_after(env, seq, "move-destination-not-registered")


def _get(e: Env, role: str, calling: str, study_uid: str) -> list[Path]:
    out = e.work / f"get-{calling}-{len(list(e.work.iterdir()))}"
    out.mkdir()
    tunnel = TlsTunnel(e.inst.pki, role, e.port)
    try:
        dcmtk("getscu", "-aet", calling, "-aec", "SEKISHO", "-S", "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={study_uid}", "-od", str(out), "127.0.0.1",
              str(tunnel.port))
    finally:
        tunnel.close()
    return sorted(out.iterdir())


def test_get_returns_consented_study_bytes_as_received(env: Env) -> None:
    s1 = env.studies["S1"]
    files = _get(env, "partner-valid-1", "PARTNER_A", s1.study_uid)
    got = {sop_uid_of(p.read_bytes()): dataset_sha256(p.read_bytes()) for p in files}
    assert got == _dataset_hashes(s1)
    assert _get(env, "partner-valid-1", "PARTNER_A", env.studies["S3"].study_uid) == []


def test_get_without_retrieve_permission_is_refused_and_audited(env: Env) -> None:
    seq = env.inst.audit_head()
    assert _get(env, "partner-valid-2", "PARTNER_B", env.studies["S2"].study_uid) == []
    alerts = _alerts_after(env, seq, "not-permitted")
    assert alerts and alerts[0].event.actor == "partner-b"  # type: ignore[attr-defined]


# -- Orthanc as a partner over DICOM TLS -------------------------------------------
@pytest.fixture(scope="module")
def orthanc(env: Env) -> Iterator[object]:
    from tests.peers.orthanc import DicomTlsOptions, OrthancOptions, OrthancPeer, missing_tools

    if missing_tools():
        pytest.skip(f"Orthanc peer unavailable: {missing_tools()}")
    pki = env.inst.pki
    cert, key = issue_node_certificate(pki, "orthanc-node", env.work / "nodes")
    trust = (pki.cert_path("root-ca"), pki.cert_path("intermediate-ca"))
    peer = OrthancPeer(OrthancOptions(
        aet="ORTHANC_P",
        dicom_tls=DicomTlsOptions(certificate=cert, private_key=key, trusted_certificates=trust),
        modalities={"sekisho": {"AET": "SEKISHO", "Host": "127.0.0.1", "Port": env.port,
                                "UseDicomTls": True}},
    )).start()
    try:
        env.inst.cli_ok(
            "partner", "add", "partner-orthanc", "--certificate", str(cert),
            "--ae-title", "ORTHANC_P", "--permission", "query", "--permission", "retrieve",
            "--move-destination", f"ORTHANC_P=127.0.0.1:{peer.dicom_port}",
        )
        env.inst.cli_ok("consent", "grant", "P1", "--partner", "partner-orthanc")
        yield peer
    finally:
        peer.stop()


def test_orthanc_finds_and_moves_only_consented_studies(env: Env, orthanc: object) -> None:
    """Orthanc issues C-FIND and C-MOVE over DICOM TLS; it sees and receives only S1."""
    import urllib.request

    peer: object = orthanc
    rest = peer.rest  # type: ignore[attr-defined]
    query = rest("POST", "/modalities/sekisho/query", {
        "Level": "Study", "Query": {"StudyInstanceUID": "", "PatientID": ""},
    })
    answers = rest("GET", f"/queries/{query['ID']}/answers")
    found = {
        rest("GET", f"/queries/{query['ID']}/answers/{a}/content?simplify")["StudyInstanceUID"]
        for a in answers
    }
    s1 = env.studies["S1"]
    assert found == {s1.study_uid}
    rest("POST", f"/queries/{query['ID']}/retrieve",
         {"TargetAet": "ORTHANC_P", "Synchronous": True})
    got = {}
    for instance_id in rest("GET", "/instances"):
        url = f"{peer.http_url}/instances/{instance_id}/file"  # type: ignore[attr-defined]
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
            data = resp.read()
        got[sop_uid_of(data)] = dataset_sha256(data)
    assert got == _dataset_hashes(s1)
