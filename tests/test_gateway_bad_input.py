"""Hostile and broken STOW-RS input (R-XCH-5, STYLE lessons 8 and 11).

Each case sends a bad request with curl to a running gateway whose caps are
small (``max_body_bytes`` 1 MB, ``max_instance_bytes`` 300 kB) and checks:

* a clear error: a status and a JSON body naming the problem, or a STOW-RS
  response whose FailedSOPSequence carries the PS3.18 failure reason;
* nothing half-written: the store's ``tmp`` directory is empty, the content
  store holds exactly the indexed instances, QIDO and WADO show only the good
  instances;
* the gateway keeps serving: a valid STOW right after succeeds.

Hostile inputs are built with pydicom's own writer and then corrupted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pydicom.uid import generate_uid

from tests.gateway_helpers import (
    BuiltInstance,
    GatewayProcess,
    HttpResult,
    Instance,
    build_dataset,
    build_study,
    create_instance,
    curl,
    dataset_bytes,
    failed_items,
    instance_from,
    multipart_related,
    qido_values,
    referenced_uids,
    running_gateway,
    sha256,
    stow,
    truncate_in_pixel_data,
    wado_parts,
)

MAX_BODY = 1_000_000
MAX_INSTANCE = 300_000
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_DIFFERENT = 0x0111
STUDY_MISMATCH = 0xA900
PATIENT = "P-GOOD"


@dataclass
class World:
    instance: Instance
    gateway: GatewayProcess
    #: SOP Instance UID -> SHA-256 of every instance the gateway acknowledged.
    good: dict[str, str] = field(default_factory=dict)
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    counter: int = 0

    def good_instance(
        self, *, rows: int = 32, sop_uid: str | None = None, seed: int = 0
    ) -> BuiltInstance:
        """A small valid instance of the module's good study."""
        self.counter += 1
        ds = build_dataset(
            patient_id=PATIENT,
            patient_name="GOOD^PATIENT",
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            sop_uid=sop_uid,
            instance_number=self.counter,
            rows=rows,
            columns=rows,
            seed=seed or self.counter,
        )
        return instance_from(ds)

    def acknowledged(self, result: HttpResult, sent: list[BuiltInstance]) -> None:
        by_uid = {i.sop_uid: i for i in sent}
        for uid in referenced_uids(result):
            self.good[uid] = by_uid[uid].sha256


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    inst = create_instance(
        tmp_path_factory.mktemp("bad-input") / "gw",
        {"https": {"max_body_bytes": MAX_BODY, "max_instance_bytes": MAX_INSTANCE}},
    )
    inst.cli_ok("consent", "grant", PATIENT, "--partner", "partner-a", "--by", "reception01")
    with running_gateway(inst) as gw:
        yield World(inst, gw)


@pytest.fixture
def check_clean_and_serving(world: World) -> Iterator[None]:
    """After each case: no partial file, only good instances visible, still serving."""
    yield
    inst = world.instance
    assert list(inst.store_tmp.iterdir()) == [], "partial upload left in the store's tmp"
    assert inst.indexed_instances() == world.good
    assert set(inst.object_files()) == set(world.good.values()), "unreferenced stored bytes"
    if world.good:
        r = curl(inst, f"/dicomweb/studies/{world.study_uid}/series/{world.series_uid}/instances")
        assert sorted(qido_values(r, "00080018")) == sorted(world.good)
        parts = wado_parts(curl(inst, f"/dicomweb/studies/{world.study_uid}"))
        assert sorted(sha256(p) for p in parts) == sorted(world.good.values())
    # A valid request right after the bad one is served.
    fresh = world.good_instance()
    r = stow(inst, [fresh.data])
    assert r.status == 200, (r.status, r.body[:300])
    world.acknowledged(r, [fresh])
    assert world.gateway.running


pytestmark = pytest.mark.usefixtures("check_clean_and_serving")


def post(world: World, body: bytes, content_type: str, **kw: object) -> HttpResult:
    return curl(world.instance, "/dicomweb/studies", data=body, content_type=content_type, **kw)  # type: ignore[arg-type]


def assert_error(r: HttpResult, status: int, code: str, words: str) -> None:
    assert r.status == status, (r.status, r.body[:300])
    body = r.json()
    assert body["code"] == code
    assert words in body["message"]


# ----------------------------------------------------------------- multipart
def test_boundary_missing_from_body(world: World) -> None:
    body = b"this is not a multipart body at all"
    r = post(world, body, 'multipart/related; type="application/dicom"; boundary=abc123')
    assert_error(r, 400, "INVALID_INPUT", "malformed multipart body")


def test_no_boundary_parameter(world: World) -> None:
    good = world.good_instance()
    body, _ = multipart_related([good.data], boundary="xyz")
    r = post(world, body, 'multipart/related; type="application/dicom"')
    assert_error(r, 400, "INVALID_INPUT", "boundary")


def test_body_cut_inside_the_second_part_stores_nothing(world: World) -> None:
    first, second = world.good_instance(), world.good_instance()
    body, ctype = multipart_related([first.data, second.data])
    cut = body[: len(body) - len(second.data) // 2]
    r = post(world, cut, ctype)
    assert_error(r, 400, "INVALID_INPUT", "malformed multipart body")
    # The complete first part is not stored either: the request failed as a whole.
    assert first.sop_uid not in world.instance.indexed_instances()


def test_empty_multipart_body(world: World) -> None:
    body, ctype = multipart_related([])
    assert_error(post(world, body, ctype), 400, "INVALID_INPUT", "no parts")


# ------------------------------------------------------------- content types
@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        "application/json",
        'multipart/related; type="application/dicom+json"; boundary=b1',
        'multipart/related; type="application/octet-stream"; boundary=b1',
        "multipart/form-data; boundary=b1",
        "text/plain",
    ],
)
def test_wrong_content_type_is_415(world: World, content_type: str) -> None:
    good = world.good_instance()
    body, _ = multipart_related([good.data], boundary="b1")
    r = post(world, body, content_type)
    assert_error(r, 415, "UNSUPPORTED_MEDIA_TYPE", "application/dicom")


# ------------------------------------------------------ per-instance failures
def test_non_dicom_part_fails_alone(world: World) -> None:
    good = world.good_instance()
    r = stow(world.instance, [b"%PDF-1.7 definitely not DICOM", good.data])
    assert r.status == 202  # some stored, some failed (PS3.18 10.5.3)
    assert referenced_uids(r) == [good.sop_uid]
    assert failed_items(r) == [(None, CANNOT_UNDERSTAND)]
    world.acknowledged(r, [good])


def test_part_with_another_media_type_fails(world: World) -> None:
    r = stow(world.instance, [(b'{"00100010": {}}', "application/dicom+json")])
    assert r.status == 409  # nothing stored
    assert failed_items(r) == [(None, CANNOT_UNDERSTAND)]


def test_only_non_dicom_parts_is_409(world: World) -> None:
    r = stow(world.instance, [b"\x00" * 200, b"DICM" + b"\xff" * 300])
    assert r.status == 409
    assert failed_items(r) == [(None, CANNOT_UNDERSTAND), (None, CANNOT_UNDERSTAND)]
    assert "00081199" not in r.json()


def test_dicom_truncated_inside_pixel_data(world: World) -> None:
    whole = world.good_instance(rows=64)
    cut = truncate_in_pixel_data(whole.data, keep=1000)
    assert len(cut) < len(whole.data)
    good = world.good_instance()
    r = stow(world.instance, [cut, good.data])
    assert r.status == 202
    assert referenced_uids(r) == [good.sop_uid]
    assert [reason for _uid, reason in failed_items(r)] == [CANNOT_UNDERSTAND]
    world.acknowledged(r, [good])
    assert whole.sop_uid not in world.instance.indexed_instances()


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_instance_without_a_uid_fails(world: World, keyword: str) -> None:
    ds = build_dataset(
        patient_id=PATIENT,
        patient_name="GOOD^PATIENT",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        rows=16,
        columns=16,
    )
    delattr(ds, keyword)
    r = stow(world.instance, [dataset_bytes(ds)])
    assert r.status == 409
    assert [reason for _uid, reason in failed_items(r)] == [CANNOT_UNDERSTAND]


def test_file_meta_uid_disagreeing_with_dataset_fails(world: World) -> None:
    ds = build_dataset(
        patient_id=PATIENT,
        patient_name="GOOD^PATIENT",
        study_uid=world.study_uid,
        series_uid=world.series_uid,
        rows=16,
        columns=16,
    )
    data = dataset_bytes(ds)
    # pydicom keeps the two in step, so corrupt the file meta copy (it comes first).
    uid = str(ds.SOPInstanceUID).encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    at = data.index(uid)
    assert at < data.index(b"\x08\x00\x16\x00")  # before (0008,0016) of the dataset
    corrupted = data[:at] + other + data[at + len(uid) :]
    r = stow(world.instance, [corrupted])
    assert r.status == 409
    assert [reason for _uid, reason in failed_items(r)] == [CANNOT_UNDERSTAND]


def test_instance_of_another_study_than_the_url(world: World) -> None:
    other = build_study(patient_id=PATIENT, series=(("CT", 1),), rows=16, columns=16)
    r = stow(world.instance, [other.instances[0].data], path=f"/dicomweb/studies/{world.study_uid}")
    assert r.status == 409
    assert failed_items(r) == [(other.instances[0].sop_uid, STUDY_MISMATCH)]


# ------------------------------------------------------------------ duplicates
def test_same_uid_with_different_content_is_refused_and_the_original_kept(world: World) -> None:
    original = world.good_instance(seed=101)
    r = stow(world.instance, [original.data])
    assert r.status == 200
    world.acknowledged(r, [original])

    forged = world.good_instance(sop_uid=original.sop_uid, seed=202)
    assert forged.sop_uid == original.sop_uid and forged.sha256 != original.sha256
    r = stow(world.instance, [forged.data])
    assert r.status == 409
    assert failed_items(r) == [(original.sop_uid, DUPLICATE_DIFFERENT)]
    assert world.instance.indexed_instances()[original.sop_uid] == original.sha256
    one = curl(
        world.instance,
        f"/dicomweb/studies/{world.study_uid}/series/{world.series_uid}"
        f"/instances/{original.sop_uid}",
    )
    assert wado_parts(one) == [original.data]
    # The refusal is audited as a failed transfer.
    failed = [
        rec for rec in world.instance.audit_records(event_id="110104") if rec.event.outcome == 4
    ]
    assert failed and "different content" in failed[-1].event.description


def test_same_instance_sent_again_is_accepted_idempotently(world: World) -> None:
    once = world.good_instance()
    r = stow(world.instance, [once.data])
    world.acknowledged(r, [once])
    again = stow(world.instance, [once.data])
    assert again.status == 200
    assert referenced_uids(again) == [once.sop_uid]


# ------------------------------------------------------------------------ caps
def test_body_over_the_cap_by_content_length_is_413(world: World) -> None:
    parts = [world.good_instance(rows=256) for _ in range(9)]  # ~9 x 131 kB
    body, ctype = multipart_related([p.data for p in parts])
    assert len(body) > MAX_BODY
    r = post(world, body, ctype)
    assert_error(r, 413, "TOO_LARGE", str(MAX_BODY))
    assert not set(p.sop_uid for p in parts) & set(world.instance.indexed_instances())


def test_chunked_body_over_the_cap_is_413_and_stores_nothing(world: World) -> None:
    # Without Content-Length the cap is enforced while streaming.
    parts = [world.good_instance(rows=256) for _ in range(9)]
    body, ctype = multipart_related([p.data for p in parts])
    r = post(world, body, ctype, headers=["Transfer-Encoding: chunked"])
    assert_error(r, 413, "TOO_LARGE", str(MAX_BODY))
    # The parts received before the cap was hit are not stored.
    assert not set(p.sop_uid for p in parts) & set(world.instance.indexed_instances())


def test_instance_over_the_cap_is_413(world: World) -> None:
    small = world.good_instance()
    big = world.good_instance(rows=512)  # 512 kB of pixel data
    assert MAX_INSTANCE < len(big.data) < MAX_BODY
    r = stow(world.instance, [small.data, big.data])
    assert_error(r, 413, "TOO_LARGE", str(MAX_INSTANCE))
    assert small.sop_uid not in world.instance.indexed_instances()
