"""``sekisho media inspect|import|imports`` on media made by DCMTK (R-PDI-1, R-PDI-3..5, R-PDI-7).

Media are written by the real tools: studies by pydicom in several modalities
and character sets, DICOMDIR by ``dcmmkdir`` (general-purpose CD profile and
``-Pdv``), ISO 9660 images by ``genisoimage``.  Every stored instance is then
read back with DCMTK ``dcmdump``: the Contributing Equipment item names the
importer, Other Patient IDs Sequence keeps the medium's ID and issuer, and
Original Attributes Sequence keeps every coerced value (IHE RAD TF IRWF.b).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from gateway_helpers import Instance, run_sekisho
from media_factory import build_media, make_iso
from test_import_helpers import (
    IMPORT_EVENT,
    dcmdump,
    media_cli,
    media_instance,
    media_ok,
)

YAMADA_FILES = 6  # patient 1 of media_factory.standard_studies(): CT 3 + CT 2 + CR 1


@pytest.fixture(scope="module")
def gp_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gp") / "CDROM"
    build_media(root, profile="-Pgp")
    return root


@pytest.fixture(scope="module")
def dv_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dv") / "DVD"
    build_media(root, profile="-Pdv")
    return root


@pytest.fixture(scope="module")
def gp_image(gp_medium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_iso(gp_medium, tmp_path_factory.mktemp("iso") / "pdi.iso")


def sequence_block(dump: str, tag: str) -> str:
    """The lines of ``dump`` nested under the first sequence element ``tag`` ("0018,a001")."""
    lines = dump.splitlines()
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(f"({tag}) SQ"):
            indent = len(line) - len(stripped)
            block = []
            for nxt in lines[i + 1 :]:
                if len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt)
            return "\n".join(block)
    raise AssertionError(f"({tag}) not in the dcmdump output")


def top_level(dump: str, tag: str) -> str:
    """The value text of a top-level (unindented) element."""
    for line in dump.splitlines():
        if line.startswith(f"({tag}) "):
            match = re.search(r"\[(.*)\]", line)
            return match.group(1) if match else line
    raise AssertionError(f"({tag}) not at the top level")


def stored_object(inst: Instance, sha256: str) -> Path:
    return inst.object_path(sha256)


def import_json(inst: Instance, medium: Path, *args: str) -> dict:
    out = media_ok(
        inst, "import", str(medium), "--operator", "reception01", "--no-progress", "--json", *args
    )
    return json.loads(out)


@pytest.mark.parametrize("which", ["gp", "dv", "iso"])
def test_import_writes_importer_and_reconciliation_into_every_instance(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    medium = request.getfixturevalue(
        {"gp": "gp_medium", "dv": "dv_medium", "iso": "gp_image"}[which]
    )
    inst = media_instance(tmp_path / "sekisho")
    out = import_json(
        inst,
        medium,
        "--patient-id",
        "H0001",
        "--issuer",
        "SEKISHO",
        "--select",
        "patient:1",
        "--media-type",
        "CD",
        "--label",
        "PDI CD 1",
        "--source-facility",
        "Other Hospital",
        "--accession",
        "L777",
    )
    record = out["record"]
    assert record["status"] == "finalized" and record["finalization"] == "importer"
    assert record["importer_id"] == "reception01"
    assert record["importer_name"] == "Uketsuke^Hanako=受付^花子"
    assert record["finalized_by_id"] == "reception01"
    assert (record["media_type"], record["media_label"]) == ("CD", "PDI CD 1")
    assert record["source_facility"] == "Other Hospital"
    assert record["instance_count"] == YAMADA_FILES
    details = record["details"]
    assert details["reconciliation"]["media_patients"][0]["patient_id"] == "OTH-0001"
    assert details["selection"] == ["patient:1"]

    stored = details["stored"]
    assert len(stored) == YAMADA_FILES
    for item in stored:
        # per-file SHA-256 of the medium as read equals the file on the medium
        if which != "iso":
            assert (
                hashlib.sha256((medium / item["path"]).read_bytes()).hexdigest()
                == (item["source_sha256"])
            )
        assert details["media_sha256"][item["path"]] == item["source_sha256"]
        path = stored_object(inst, item["stored_sha256"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == item["stored_sha256"]
        dump = dcmdump(path)
        assert top_level(dump, "0010,0020") == "H0001"
        assert top_level(dump, "0010,0021") == "SEKISHO"
        assert top_level(dump, "0008,0050") == "L777"
        assert top_level(dump, "0400,0600") == "IMPORTED"
        equipment = sequence_block(dump, "0018,a001")
        assert "(0008,1070) PN [Uketsuke^Hanako=受付^花子]" in equipment
        assert "(0008,0100) SH [MEDIM]" in equipment
        assert "(0008,0104) LO [Portable Media Importer Equipment]" in equipment
        assert "(0008,0100) SH [reception01]" in equipment  # Operator Identification
        assert "(0008,1010) SH [SEKISHO-GW]" in equipment
        assert "(0018,a002) DT [" in equipment
        other_ids = sequence_block(dump, "0010,1002")
        assert "(0010,0020) LO [OTH-0001]" in other_ids
        assert "(0010,0021) LO [OTHER_HOSP]" in other_ids
        originals = sequence_block(dump, "0400,0561")
        assert "(0010,0020) LO [OTH-0001]" in originals
        assert "(0010,0021) LO [OTHER_HOSP]" in originals
        assert "(0008,0050) SH [A100" in originals  # the medium's accession number
        assert "(0400,0565) CS [COERCE]" in originals
        assert "(0400,0563) LO [SEKISHO]" in originals
    assert inst.indexed_instances() == {s["sop_instance_uid"]: s["stored_sha256"] for s in stored}
    assert list(inst.store_tmp.iterdir()) == []


def test_folder_and_iso_image_inspect_the_same(gp_medium: Path, gp_image: Path) -> None:
    folder = json.loads(run_sekisho("media", "inspect", str(gp_medium), "--json").stdout)
    image = json.loads(run_sekisho("media", "inspect", str(gp_image), "--json").stdout)
    assert folder["patients"] == image["patients"]
    assert folder["findings_by_code"] == image["findings_by_code"]
    assert {f["path"]: f["sha256"] for f in folder["files"]} == {
        f["path"]: f["sha256"] for f in image["files"]
    }
    assert len(folder["patients"]) == 3
    text = run_sekisho("media", "inspect", str(gp_medium)).stdout
    assert "[1] Yamada^Tarou=山田^太郎=やまだ^たろう ID=OTH-0001" in text
    assert "[1.2.1] CT" in text and "MR" in text


def test_import_is_audited_with_importer_media_and_patient(gp_medium: Path, tmp_path: Path) -> None:
    inst = media_instance(tmp_path / "sekisho")
    record = import_json(
        inst,
        gp_medium,
        "--patient-id",
        "H0001",
        "--issuer",
        "SEKISHO",
        "--select",
        "1",
        "--media-type",
        "DVD",
        "--label",
        "PATIENT DVD",
    )["record"]
    events = inst.audit_records(event_id=IMPORT_EVENT)
    assert len(events) == 1
    event = events[0].event
    assert (event.actor, event.actor_kind) == ("reception01", "user")
    assert (event.patient_id, event.patient_issuer) == ("H0001", "SEKISHO")
    assert event.instance_count == YAMADA_FILES
    assert set(event.study_uids) == {s["study_uid"] for s in record["details"]["stored"]}
    assert event.extra["import_id"] == str(record["id"])
    assert event.extra["importer_name"] == "Uketsuke^Hanako=受付^花子"
    assert event.extra["media_type"] == "DVD" and event.extra["media_label"] == "PATIENT DVD"
    assert event.extra["media_patient_ids"] == "OTH-0001^OTHER_HOSP"
    assert event.extra["details_sha256"] == record["details_sha256"]
    xml = run_sekisho(
        "audit", "export", "--patient-id", "H0001", config=inst.config
    ).stdout  # PS3.15 A.5.1 with the CID 405 media type
    assert 'csd-code="110033"' in xml and "PATIENT DVD" in xml and "reception01" in xml
    verify = run_sekisho("audit", "verify", config=inst.config)
    assert verify.returncode == 0, verify.stderr
    listing = media_ok(inst, "imports")
    assert f"#{record['id']}" in listing and "reception01" in listing and "finalized" in listing


def test_demographic_mismatch_needs_confirmation_which_is_recorded(
    gp_medium: Path, tmp_path: Path
) -> None:
    inst = media_instance(tmp_path / "sekisho")
    import_json(inst, gp_medium, "--patient-id", "H0001", "--issuer", "SEKISHO", "--select", "1")
    # Patient 3 of the medium (Suzuki, F, 1985) is not the hospital's H0001 (Yamada, M, 1970).
    refused = media_cli(
        inst,
        "import",
        str(gp_medium),
        "--operator",
        "reception01",
        "--patient-id",
        "H0001",
        "--issuer",
        "SEKISHO",
        "--select",
        "3",
        "--no-progress",
    )
    assert refused.returncode == 2
    assert "birth date, name, sex" in refused.stderr and "confirmation" in refused.stderr
    assert len(inst.indexed_instances()) == YAMADA_FILES  # nothing more was stored
    record = import_json(
        inst,
        gp_medium,
        "--patient-id",
        "H0001",
        "--issuer",
        "SEKISHO",
        "--select",
        "3",
        "--confirm-mismatch",
    )["record"]
    rec = record["details"]["reconciliation"]
    assert {m["field"] for m in rec["mismatches"]} == {"name", "birth_date", "sex"}
    assert rec["confirmed_by"] == {"id": "reception01", "name": "Uketsuke^Hanako=受付^花子"}
    event = inst.audit_records(event_id=IMPORT_EVENT)[-1].event
    assert event.extra["confirmed_mismatch"] == "birth_date, name, sex"
    assert event.extra["confirmed_by"] == "reception01"
    dump = dcmdump(stored_object(inst, record["details"]["stored"][0]["stored_sha256"]))
    assert top_level(dump, "0010,0010") == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert top_level(dump, "0010,0040") == "M"
    originals = sequence_block(dump, "0400,0561")
    assert "(0010,0010) PN [Suzuki^Hanako=鈴木^花子=すずき^はなこ]" in originals
    assert "(0010,0030) DA [19851224]" in originals and "(0010,0040) CS [F]" in originals


def test_the_same_medium_twice_is_already_present(gp_medium: Path, tmp_path: Path) -> None:
    inst = media_instance(tmp_path / "sekisho")
    args = ("--patient-id", "H0001", "--issuer", "SEKISHO", "--select", "study:1.2")
    first = import_json(inst, gp_medium, *args)["record"]
    again = import_json(inst, gp_medium, *args)["record"]
    assert first["instance_count"] == 5 and again["instance_count"] == 0
    assert {s["reason"] for s in again["details"]["skipped"]} == {"already-present"}
    assert len(inst.indexed_instances()) == 5


def test_empty_selection_is_refused(gp_medium: Path, tmp_path: Path) -> None:
    inst = media_instance(tmp_path / "sekisho")
    proc = media_cli(
        inst, "import", str(gp_medium), "--operator", "reception01", "--patient-id", "H0001"
    )
    assert proc.returncode == 2 and "nothing is selected" in proc.stderr
    proc = media_cli(
        inst,
        "import",
        str(gp_medium),
        "--operator",
        "reception01",
        "--patient-id",
        "H0001",
        "--select",
        "patient:9",
    )
    assert proc.returncode == 2 and "matches nothing" in proc.stderr
    assert inst.indexed_instances() == {}


def test_imported_instances_are_queued_for_the_pacs(gp_medium: Path, tmp_path: Path) -> None:
    """R-PDI-7: a destination with role "pacs" gets every imported instance queued.

    Only the queueing is tested here; delivery by the forwarding workers is
    covered by the forwarding tests (tests/test_forward_*.py).
    """
    inst = media_instance(tmp_path / "sekisho")
    pki = inst.root / "pki"
    inst.update_config(
        {
            "destinations": {
                "pacs": {
                    "role": "pacs",
                    "transport": "dimse",
                    "host": "127.0.0.1",
                    "port": 11112,
                    "called_ae": "HOSP_PACS",
                    "tls": {
                        "certificate": str(pki / "gateway-server.crt.pem"),
                        "private_key": str(pki / "gateway-server.key.pem"),
                        "trust_anchors": [str(pki / "root-ca.crt.pem")],
                    },
                }
            }
        }
    )
    out = import_json(inst, gp_medium, "--patient-id", "H0001", "--select", "study:1.2")
    assert out["queued"] == {"pacs": 5}
    jobs = json.loads(run_sekisho("queue", "list", "--json", config=inst.config).stdout)
    rows = jobs["jobs"] if isinstance(jobs, dict) else jobs
    assert {j["sop_uid"] for j in rows} == {
        s["sop_instance_uid"] for s in out["record"]["details"]["stored"]
    }
    assert {j["created_by"] for j in rows} == {f"media-import:{out['record']['id']}"}
    assert all(j["destination"] == "pacs" for j in rows)
