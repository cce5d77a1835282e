"""STOW-RS, WADO-RS and QIDO-RS over mutual TLS with curl (R-XCH-1, 2, 3, 5; R-AUD-1).

One gateway serves the module.  partner-a (push, query, retrieve; network
"regional") pushes three studies; consent is recorded with ``sekisho consent``:

* patient P-A1 (two studies) shares with partner-a only;
* patient P-B1 (one study) shares with the network "regional" (partner-a and
  partner-b are members);
* partner-c is registered by the test with query and retrieve but belongs to
  no network and has no consent: it must see nothing, and a direct retrieve
  must answer 404 exactly like an absent study (existence is not revealed);
* partner-b has no retrieve permission: 403 and a Security Alert.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from pydicom.uid import generate_uid

from tests.gateway_helpers import (
    QUERY,
    SECURITY_ALERT,
    GatewayProcess,
    Instance,
    Study,
    build_study,
    create_instance,
    curl,
    parse_multipart,
    qido_values,
    referenced_uids,
    running_gateway,
    sha256,
    stow,
    wado_parts,
)

STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
PATIENT_ID, STUDY_DATE = "00100020", "00080020"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
YAMADA = "YAMADA^TARO=山田^太郎=やまだ^たろう"


@dataclass
class World:
    instance: Instance
    gateway: GatewayProcess
    a1: Study  # P-A1, 20250401, CT x3 + MR x2 (512x512 16-bit)
    a2: Study  # P-A1, 20251010, MR x2
    b1: Study  # P-B1, 20240115, CT x2, accession ACC-B1
    stow_a1: object


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    inst = create_instance(tmp_path_factory.mktemp("dicomweb") / "gw")
    inst.cli_ok(
        "partner",
        "add",
        "partner-c",
        "--certificate",
        str(inst.pki.cert_path("partner-valid-ec")),
        "--ae-title",
        "PARTNER_C",
        "--permission",
        "query",
        "--permission",
        "retrieve",
    )
    a1 = build_study(
        patient_id="P-A1", patient_name=YAMADA, study_date="20250401", accession="ACC-A1"
    )
    a2 = build_study(
        patient_id="P-A1",
        patient_name=YAMADA,
        study_date="20251010",
        series=(("MR", 2),),
        rows=128,
        columns=128,
    )
    b1 = build_study(
        patient_id="P-B1",
        patient_name="SUZUKI^HANAKO",
        study_date="20240115",
        accession="ACC-B1",
        series=(("CT", 2),),
        rows=128,
        columns=128,
    )
    with running_gateway(inst) as gw:
        r_a1 = stow(inst, [i.data for i in a1.instances])
        # The study-scoped form of STOW-RS, too.
        r_a2 = stow(inst, [i.data for i in a2.instances], path=f"/dicomweb/studies/{a2.study_uid}")
        r_b1 = stow(inst, [i.data for i in b1.instances])
        for r in (r_a1, r_a2, r_b1):
            assert r.status == 200, (r.status, r.body[:500])
        inst.cli_ok("consent", "grant", "P-A1", "--partner", "partner-a", "--by", "reception01")
        inst.cli_ok("consent", "grant", "P-B1", "--network", "regional", "--by", "reception01")
        yield World(inst, gw, a1, a2, b1, r_a1)


def qido(world: World, path: str, role: str = "partner-valid-1"):  # noqa: ANN201
    return curl(world.instance, "/dicomweb" + path, role=role)


# ---------------------------------------------------------------------- STOW
def test_stow_acknowledges_every_instance(world: World) -> None:
    r = world.stow_a1
    assert r.content_type.startswith("application/dicom+json")
    assert sorted(referenced_uids(r)) == sorted(i.sop_uid for i in world.a1.instances)
    body = r.json()
    assert "00081198" not in body  # no FailedSOPSequence
    for item in body["00081199"]["Value"]:
        uid = item["00081155"]["Value"][0]
        built = next(i for i in world.a1.instances if i.sop_uid == uid)
        assert item["00081150"]["Value"] == [built.sop_class_uid]
        assert item["00081190"]["Value"][0].endswith(
            f"/dicomweb/studies/{built.study_uid}/series/{built.series_uid}/instances/{uid}"
        )


def test_stow_is_audited_as_instances_transferred(world: World) -> None:
    records = world.instance.audit_records(event_id="110104")
    mine = [r for r in records if world.a1.study_uid in r.event.study_uids]
    assert mine, "no Instances Transferred record for the STOW"
    event = mine[0].event
    assert event.actor == "partner-a"
    assert event.patient_id == "P-A1"
    assert event.instance_count == len(world.a1.instances)
    assert event.outcome == 0
    assert event.source_address == "127.0.0.1"


def test_stored_files_are_the_received_bytes(world: World) -> None:
    indexed = world.instance.indexed_instances()
    files = world.instance.object_files()
    for built in world.a1.instances:
        assert indexed[built.sop_uid] == built.sha256
        assert sha256(files[built.sha256].read_bytes()) == built.sha256
    assert list(world.instance.store_tmp.iterdir()) == []


# ---------------------------------------------------------------------- WADO
def test_wado_study_returns_byte_identical_instances(world: World) -> None:
    r = qido(world, f"/studies/{world.a1.study_uid}")
    assert r.content_type.startswith("multipart/related")
    parts = parse_multipart(r.body, r.content_type)
    sent = Counter(i.sha256 for i in world.a1.instances)
    assert Counter(sha256(content) for _h, content in parts) == sent
    for headers, content in parts:
        assert headers["content-type"].startswith("application/dicom")
        assert f"transfer-syntax={EXPLICIT_VR_LE}" in headers["content-type"]
        assert int(headers["content-length"]) == len(content)


def test_wado_series_returns_exactly_that_series(world: World) -> None:
    for series_uid in world.a1.series_uids:
        r = qido(world, f"/studies/{world.a1.study_uid}/series/{series_uid}")
        got = Counter(sha256(p) for p in wado_parts(r))
        assert got == Counter(i.sha256 for i in world.a1.series(series_uid))


def test_wado_instance_returns_one_identical_part(world: World) -> None:
    for built in world.a1.instances:
        r = qido(
            world, f"/studies/{built.study_uid}/series/{built.series_uid}/instances/{built.sop_uid}"
        )
        parts = wado_parts(r)
        assert len(parts) == 1
        assert parts[0] == built.data


def test_wado_is_audited_with_patient_and_study(world: World) -> None:
    before = world.instance.audit_head()
    wado_parts(qido(world, f"/studies/{world.b1.study_uid}"))
    records = world.instance.audit_records(after_seq=before, event_id="110104")
    assert len(records) == 1
    event = records[0].event
    assert (event.actor, event.patient_id, event.action) == ("partner-a", "P-B1", "R")
    assert event.study_uids == (world.b1.study_uid,)
    assert event.instance_count == len(world.b1.instances)


def test_wado_refuses_a_transcoding_request(world: World) -> None:
    r = curl(
        world.instance,
        f"/dicomweb/studies/{world.a1.study_uid}",
        headers=[
            'Accept: multipart/related; type="application/dicom"; '
            "transfer-syntax=1.2.840.10008.1.2.4.50"
        ],
    )
    assert r.status == 406  # never transcode, least of all to a lossy syntax (R-XCH-6)


def test_metadata_is_dicom_json(world: World) -> None:
    r = qido(world, f"/studies/{world.a1.study_uid}/metadata")
    assert r.status == 200
    assert r.content_type.startswith("application/dicom+json")
    datasets = r.json()
    assert sorted(d[SOP_UID]["Value"][0] for d in datasets) == sorted(
        i.sop_uid for i in world.a1.instances
    )
    for d in datasets:
        assert d[STUDY_UID]["Value"] == [world.a1.study_uid]
        assert d["00100010"]["vr"] == "PN"
        assert d["00100010"]["Value"][0] == {
            "Alphabetic": "YAMADA^TARO",
            "Ideographic": "山田^太郎",
            "Phonetic": "やまだ^たろう",
        }
        assert d["00280010"]["Value"] == [512]
        assert d["00280100"]["Value"] == [16]
        assert "BulkDataURI" in d["7FE00010"]  # no pixel data inline
    one = world.a1.instances[0]
    r = qido(
        world, f"/studies/{one.study_uid}/series/{one.series_uid}/instances/{one.sop_uid}/metadata"
    )
    assert [d[SOP_UID]["Value"][0] for d in r.json()] == [one.sop_uid]


# ---------------------------------------------------------------------- QIDO
def test_qido_studies_for_a_consented_partner(world: World) -> None:
    r = qido(world, "/studies")
    assert r.status == 200
    assert r.content_type.startswith("application/dicom+json")
    by_uid = {d[STUDY_UID]["Value"][0]: d for d in r.json()}
    assert set(by_uid) == {world.a1.study_uid, world.a2.study_uid, world.b1.study_uid}
    a1 = by_uid[world.a1.study_uid]
    assert a1[PATIENT_ID]["Value"] == ["P-A1"]
    assert a1["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries
    assert a1["00201208"]["Value"] == [5]  # NumberOfStudyRelatedInstances
    assert sorted(a1["00080061"]["Value"]) == ["CT", "MR"]
    assert a1["00080050"]["Value"] == ["ACC-A1"]
    assert a1["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{world.a1.study_uid}")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("PatientName=YAMADA*", {"a1", "a2"}),
        ("PatientName=" + quote("山田*"), {"a1", "a2"}),  # ideographic component group
        ("PatientName=*HANAKO", {"b1"}),
        ("PatientName=S?ZUKI*", {"b1"}),
        ("PatientName=TANAKA*", set()),
        ("PatientID=P-A1", {"a1", "a2"}),
        ("StudyDate=20250101-20251231", {"a1", "a2"}),
        ("StudyDate=-20241231", {"b1"}),
        ("StudyDate=20251001-", {"a2"}),
        ("StudyDate=20250401", {"a1"}),
        ("ModalitiesInStudy=MR", {"a1", "a2"}),
        ("ModalitiesInStudy=CT", {"a1", "b1"}),
        ("AccessionNumber=ACC-B1", {"b1"}),
        ("ModalitiesInStudy=CT&StudyDate=20250101-", {"a1"}),
    ],
)
def test_qido_matching_keys(world: World, query: str, expected: set[str]) -> None:
    names = {world.a1.study_uid: "a1", world.a2.study_uid: "a2", world.b1.study_uid: "b1"}
    r = qido(world, f"/studies?{query}")
    assert r.status == (200 if expected else 204), (r.status, r.body[:300])
    assert {names[u] for u in qido_values(r, STUDY_UID)} == expected


def test_qido_limit_and_offset_page_through_results(world: World) -> None:
    # Ordered by study date: b1 (2024), a1 (2025-04), a2 (2025-10).
    order = [world.b1.study_uid, world.a1.study_uid, world.a2.study_uid]
    pages = [qido_values(qido(world, f"/studies?limit=1&offset={n}"), STUDY_UID) for n in range(3)]
    assert pages == [[u] for u in order]
    assert qido_values(qido(world, "/studies?limit=2&offset=1"), STUDY_UID) == order[1:]
    assert qido(world, "/studies?offset=3").status == 204
    assert qido(world, "/studies?limit=0").status == 400


def test_qido_includefield_adds_to_the_default_attributes(world: World) -> None:
    r = qido(world, f"/studies?StudyInstanceUID={world.a1.study_uid}&includefield=StudyDescription")
    [study] = r.json()
    assert study["00081030"]["Value"] == ["Sekisho test study"]
    assert study[STUDY_UID]["Value"] == [world.a1.study_uid]  # default set kept
    series_uid = world.a1.series_uids[0]
    r = qido(
        world,
        f"/studies/{world.a1.study_uid}/series/{series_uid}/instances"
        "?includefield=PatientName&includefield=00100020",
    )
    items = r.json()
    assert len(items) == 3
    for item in items:
        assert item[SOP_UID]["Value"][0] in {i.sop_uid for i in world.a1.series(series_uid)}
        assert item["00100010"]["Value"][0]["Alphabetic"] == "YAMADA^TARO"
        assert item[PATIENT_ID]["Value"] == ["P-A1"]


def test_qido_series_and_instances(world: World) -> None:
    r = qido(world, f"/studies/{world.a1.study_uid}/series")
    series = {d[SERIES_UID]["Value"][0]: d for d in r.json()}
    assert set(series) == set(world.a1.series_uids)
    for uid, d in series.items():
        assert d["00201209"]["Value"] == [len(world.a1.series(uid))]
    assert sorted(d["00080060"]["Value"][0] for d in series.values()) == ["CT", "MR"]
    r = qido(world, f"/studies/{world.a1.study_uid}/series?Modality=MR")
    assert [d["00080060"]["Value"][0] for d in r.json()] == ["MR"]
    r = qido(world, f"/studies/{world.a1.study_uid}/instances?Modality=CT")
    ct = [i.sop_uid for i in world.a1.series(world.a1.series_uids[0])]  # series 1 is CT
    assert sorted(qido_values(r, SOP_UID)) == sorted(ct)
    for uid in world.a1.series_uids:
        r = qido(world, f"/studies/{world.a1.study_uid}/series/{uid}/instances")
        assert sorted(qido_values(r, SOP_UID)) == sorted(i.sop_uid for i in world.a1.series(uid))
        for item in r.json():
            assert item["00083002"]["Value"] == [EXPLICIT_VR_LE]


def test_qido_is_audited_per_patient(world: World) -> None:
    before = world.instance.audit_head()
    assert qido(world, "/studies?PatientID=P-A1").status == 200
    records = world.instance.audit_records(after_seq=before, event_id=QUERY)
    assert [(r.event.actor, r.event.patient_id) for r in records] == [("partner-a", "P-A1")]
    assert set(records[0].event.study_uids) == {world.a1.study_uid, world.a2.study_uid}


def test_bad_query_keys_are_refused(world: World) -> None:
    assert qido(world, "/studies?NoSuchKey=1").status == 400
    assert qido(world, "/studies?StudyDate=2025").status == 400


# ----------------------------------------------------------------- visibility
def test_network_consent_shares_with_network_members_only(world: World) -> None:
    # partner-b is in "regional": it sees P-B1 (network consent), not P-A1 (partner-a only).
    r = qido(world, "/studies", role="partner-valid-2")
    assert qido_values(r, STUDY_UID) == [world.b1.study_uid]


def test_partner_without_consent_sees_nothing(world: World) -> None:
    role = "partner-valid-ec"  # partner-c: query and retrieve, no network, no consent
    assert qido(world, "/studies", role=role).status == 204
    assert qido(world, "/studies?PatientID=P-A1", role=role).status == 204
    assert qido(world, f"/studies/{world.a1.study_uid}/series", role=role).status == 204
    uid = world.a1.series_uids[0]
    assert (
        qido(world, f"/studies/{world.a1.study_uid}/series/{uid}/instances", role=role).status
        == 204
    )
    # The audit trail records an empty query, with no patient.
    records = world.instance.audit_records(event_id=QUERY)
    assert records[-1].event.actor == "partner-c"
    assert records[-1].event.patient_id is None


def test_direct_retrieve_of_an_unshared_study_is_indistinguishable_from_absent(
    world: World,
) -> None:
    role = "partner-valid-ec"
    one = world.a1.instances[0]
    absent = generate_uid()
    for existing, missing in [
        (f"/studies/{one.study_uid}", f"/studies/{absent}"),
        (f"/studies/{one.study_uid}/series/{one.series_uid}", f"/studies/{absent}/series/{absent}"),
        (
            f"/studies/{one.study_uid}/series/{one.series_uid}/instances/{one.sop_uid}",
            f"/studies/{absent}/series/{absent}/instances/{absent}",
        ),
        (f"/studies/{one.study_uid}/metadata", f"/studies/{absent}/metadata"),
    ]:
        hidden = qido(world, existing, role=role)
        nothing = qido(world, missing, role=role)
        assert hidden.status == nothing.status == 404
        assert hidden.json() == nothing.json()


def test_partner_without_retrieve_permission_gets_403_and_an_alert(world: World) -> None:
    before = world.instance.audit_head()
    r = qido(world, f"/studies/{world.b1.study_uid}", role="partner-valid-2")
    assert r.status == 403
    assert r.json()["code"] == "FORBIDDEN"
    alerts = world.instance.audit_records(after_seq=before, event_id=SECURITY_ALERT)
    assert len(alerts) == 1
    event = alerts[0].event
    assert (event.actor, event.reason_code) == ("partner-b", "not-permitted")
    assert event.actor_cert_sha256 == world.instance.pki.fingerprint("partner-valid-2")
    assert [c.value for c in event.event_type_codes] == ["110132"]  # Use of Restricted Function
    # No instances left the gateway for partner-b.
    transferred = world.instance.audit_records(after_seq=before, event_id="110104")
    assert transferred == []
    assert (
        qido(world, f"/studies/{world.b1.study_uid}/metadata", role="partner-valid-2").status == 403
    )


def test_partner_without_push_permission_cannot_stow(world: World) -> None:
    # partner-c has query and retrieve only.
    extra = build_study(patient_id="P-C1", series=(("CT", 1),), rows=32, columns=32)
    r = stow(world.instance, [extra.instances[0].data], role="partner-valid-ec")
    assert r.status == 403
    assert extra.instances[0].sop_uid not in world.instance.indexed_instances()


def test_consent_revocation_hides_the_study_again(world: World) -> None:
    inst = world.instance
    study = build_study(
        patient_id="P-R1", patient_name="KATO^JIRO", series=(("CT", 2),), rows=64, columns=64
    )
    assert stow(inst, [i.data for i in study.instances]).status == 200
    path = f"/studies/{study.study_uid}"
    assert qido(world, "/studies?PatientID=P-R1").status == 204  # pushed, but not shared yet
    assert qido(world, path).status == 404

    inst.cli_ok("consent", "grant", "P-R1", "--partner", "partner-a", "--by", "reception01")
    assert qido_values(qido(world, "/studies?PatientID=P-R1"), STUDY_UID) == [study.study_uid]
    assert len(wado_parts(qido(world, path))) == 2

    out = inst.cli_ok("consent", "revoke", "P-R1", "--partner", "partner-a", "--by", "reception01")
    assert "1 consent record(s) revoked" in out
    assert qido(world, "/studies?PatientID=P-R1").status == 204
    assert qido(world, path).status == 404
    assert qido(world, f"{path}/metadata").status == 404
    listing = inst.cli_ok("consent", "list", "P-R1")
    assert "revoked by reception01" in listing
    # Grant and revoke are in the audit trail as Patient Record events.
    records = [r for r in inst.audit_records(event_id="110110") if r.event.patient_id == "P-R1"]
    assert [r.event.action for r in records] == ["C", "U"]
    assert all(r.event.actor == "reception01" for r in records)


def test_healthz_and_metrics_reveal_no_patient_data(world: World) -> None:
    inst = world.instance
    for path in ("/healthz", "/metrics"):
        r = curl(inst, path, role=None, url=f"http://127.0.0.1:{inst.monitoring_port}{path}")
        assert r.status == 200
        text = r.body.decode()
        for secret in ("P-A1", "P-B1", "YAMADA", "SUZUKI", world.a1.study_uid):
            assert secret not in text
    assert json.loads(
        curl(
            inst, "/healthz", role=None, url=f"http://127.0.0.1:{inst.monitoring_port}/healthz"
        ).body
    ) == {"status": "ok"}
    log = world.gateway.log()
    for secret in ("P-A1", "YAMADA", "SUZUKI", "山田"):
        assert secret not in log


def test_bulk_data_uri_resolves_to_the_stored_pixel_data(world: World) -> None:
    """A BulkDataURI in /metadata retrieves the element's bytes (PS3.18 10.4.1.1.5)."""
    import io

    import pydicom

    one = world.a1.instances[0]
    r = qido(
        world, f"/studies/{one.study_uid}/series/{one.series_uid}/instances/{one.sop_uid}/metadata"
    )
    uri = r.json()[0]["7FE00010"]["BulkDataURI"]
    path = uri[uri.index("/dicomweb") + len("/dicomweb") :]
    got = qido(world, path)
    assert got.status == 200
    parts = parse_multipart(got.body, got.content_type)
    assert len(parts) == 1
    original = pydicom.dcmread(io.BytesIO(one.data))
    assert parts[0][1] == original.PixelData
    missing = qido(world, path.replace("7FE00010", "00091001"))
    assert missing.status == 404
