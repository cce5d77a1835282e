"""Hostile media through the gateway import: right findings, nothing escapes (R-PDI-2, R-PDI-8).

Each medium is written by the real tools (pydicom, DCMTK ``dcmmkdir``,
``genisoimage``) and then corrupted.  The import runs against a real instance
(content store, metadata database, audit trail); after it the test checks the
findings in the import record, that the valid selected instances were stored,
that the medium is unchanged, that the store holds only content-addressed
objects (its ``tmp`` is empty) and that nothing was written to the system
temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_helpers import Instance, run_sekisho
from media_factory import (
    DOE_ASCII,
    SeriesSpec,
    StudySpec,
    build_media,
    file_id_bytes,
    make_instance,
    make_iso,
    patch_same_length,
    snapshot,
)
from pydicom import dcmwrite
from test_import_helpers import files_under, media_cli, media_instance

from gateway.imports.records import ImportRecords
from gateway.imports.service import ImportRequest, run_media_import
from gateway.service import Gateway
from gateway.settings import load_settings
from media.reconcile import Operator

FIRST = "DICOM/ST000001/SE000001/IM000001"
SECOND = "DICOM/ST000001/SE000001/IM000002"
OPERATOR = Operator("reception01", "Uketsuke^Hanako")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "CD"
    build_media(root, [StudySpec(DOE_ASCII, [SeriesSpec("CT", 3), SeriesSpec("CR", 1)], "CHEST")])
    return root


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Instance:
    return media_instance(tmp_path_factory.mktemp("template") / "sekisho")


@pytest.fixture
def inst(template: Instance, tmp_path: Path) -> Instance:
    root = tmp_path / "sekisho"
    shutil.copytree(template.root, root)
    return Instance(root, template.https_port, template.monitoring_port)


@pytest.fixture
def medium(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "medium" / "CD"
    shutil.copytree(pristine, root, symlinks=True)
    return root


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The process's temporary folder, watched: an import must not write there."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder


def run_import(inst: Instance, medium: Path, selection: tuple[str, ...] = ("patient:1",)) -> dict:
    gw = Gateway.open(load_settings(inst.config))
    try:
        outcome = run_media_import(
            gw,
            ImportRequest(
                path=medium,
                importer=OPERATOR,
                patient_id="H0001",
                issuer="SEKISHO",
                selection=selection,
                media_type="CD",
            ),
        )
        return outcome.record.to_dict()
    finally:
        gw.close()


def check_contained(inst: Instance, medium: Path, before: dict, private_tmp: Path) -> None:
    assert snapshot(medium) == before, "the medium was modified"
    assert list(inst.store_tmp.iterdir()) == [], "temporary files left in the store"
    assert os.listdir(private_tmp) == [], "something was written to the system temp folder"
    objects = inst.object_files()
    assert set(objects) == set(inst.indexed_instances().values())
    for name, path in objects.items():
        assert path.resolve().is_relative_to(inst.objects.resolve()), name


def codes(record: dict) -> set[str]:
    return {f["code"] for f in record["details"]["findings"]}


def stored_paths(record: dict) -> set[str]:
    return {s["path"] for s in record["details"]["stored"]}


def _dot_dot(m: Path) -> None:
    patch_same_length(m / "DICOMDIR", file_id_bytes(FIRST), b"..\\..\\..\\..\\..\\ETC\\PASSWD")


def _absolute(m: Path) -> None:
    patch_same_length(m / "DICOMDIR", file_id_bytes(FIRST), b"/etc/passwd")


def _symlink_out(m: Path) -> None:
    outside = m.parent.parent / "outside"
    outside.mkdir()
    shutil.move(m / SECOND, outside / "IM000002")
    os.symlink(outside / "IM000002", m / SECOND)
    os.symlink("/etc/passwd", m / "PASSWD")


def _truncated(m: Path) -> None:
    data = (m / SECOND).read_bytes()
    (m / SECOND).write_bytes(data[:-10])


def _missing(m: Path) -> None:
    (m / SECOND).unlink()


def _autorun(m: Path) -> None:
    (m / "AUTORUN.INF").write_text("[autorun]\nopen=VIEWER\\SETUP.EXE\n")
    (m / "VIEWER").mkdir()
    (m / "VIEWER" / "SETUP.EXE").write_bytes(b"MZ" + b"\x90" * 400)
    (m / "SETUP.EXE").write_bytes(b"MZ" + b"\x00" * 200)


CASES: dict[str, tuple[Callable[[Path], None], set[str], set[str]]] = {
    # name: (corruption, expected finding codes, paths not imported)
    "dot-dot-file-id": (_dot_dot, {"FILE_ID_HOSTILE", "UNREFERENCED_DICOM_FILE"}, set()),
    "absolute-file-id": (_absolute, {"FILE_ID_HOSTILE"}, set()),
    "symlink-out": (_symlink_out, {"SYMLINK", "FILE_ID_NOT_A_FILE"}, {SECOND}),
    "truncated-file": (_truncated, {"TRUNCATED_DICOM"}, {SECOND}),
    "missing-file": (_missing, {"RECORD_FILE_MISSING"}, {SECOND}),
    "autorun-and-exe": (_autorun, {"AUTORUN", "EXECUTABLE", "VIEWER_FOLDER"}, set()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_medium_is_contained_and_valid_items_import(
    case: str, inst: Instance, medium: Path, private_tmp: Path
) -> None:
    corrupt, expected, not_imported = CASES[case]
    corrupt(medium)
    before = snapshot(medium)
    record = run_import(inst, medium)
    found = codes(record)
    assert expected <= found, f"{case}: {sorted(found)}"
    all_files = {p.relative_to(medium).as_posix() for p in (medium / "DICOM").rglob("IM*")}
    assert stored_paths(record) == all_files - not_imported
    assert record["instance_count"] == 4 - len(not_imported)
    assert record["status"] == "finalized"
    check_contained(inst, medium, before, private_tmp)
    for path in ("AUTORUN.INF", "SETUP.EXE", "VIEWER/SETUP.EXE", "PASSWD"):
        assert path not in record["details"]["media_sha256"]


def test_lowercase_dcm_names_without_dicomdir(inst: Instance, tmp_path: Path, private_tmp: Path):
    root = tmp_path / "usb"
    study = StudySpec(DOE_ASCII, [SeriesSpec("CR", 2)])
    (root / "dicom" / "images").mkdir(parents=True)
    for i in range(2):
        dcmwrite(
            root / "dicom" / "images" / f"image{i}.dcm",
            make_instance(study, study.series[0], 1, i + 1),
            enforce_file_format=True,
        )
    before = snapshot(root)
    record = run_import(inst, root)
    assert "DICOMDIR_MISSING" in codes(record)
    assert stored_paths(record) == {"dicom/images/image0.dcm", "dicom/images/image1.dcm"}
    check_contained(inst, root, before, private_tmp)


def test_uid_already_stored_with_other_content_is_refused(inst: Instance, medium: Path) -> None:
    run_import(inst, medium, ("series:1.1.1",))
    # The same SOP Instance UIDs, other pixel data: a different instance.
    data = bytearray((medium / SECOND).read_bytes())
    data[-8:] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    (medium / SECOND).write_bytes(bytes(data))
    record = run_import(inst, medium, ("series:1.1.1",))
    reasons = {s["path"]: s["reason"] for s in record["details"]["skipped"]}
    assert reasons[SECOND] == "uid-conflict"
    assert reasons[FIRST] == "already-present"
    assert record["instance_count"] == 0


def test_hostile_iso_through_the_cli_writes_nothing_outside_the_store(
    inst: Instance, pristine: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(pristine, src, symlinks=True)
    _dot_dot(src)
    _autorun(src)
    os.symlink("/etc/passwd", src / "PASSWD")
    image = make_iso(src, tmp_path / "hostile.iso")
    sys_tmp = tmp_path / "cli-tmp"
    proc = media_cli(
        inst,
        "import",
        str(image),
        "--operator",
        "reception01",
        "--patient-id",
        "H0001",
        "--select",
        "1",
        "--json",
        "--no-progress",
        tmpdir=sys_tmp,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)["record"]
    assert {"FILE_ID_HOSTILE", "AUTORUN", "EXECUTABLE", "SYMLINK"} <= codes(record)
    assert record["instance_count"] == 4 and record["media_type"] == "ISO"
    assert record["media_label"] == "PDI_TEST"
    assert files_under(sys_tmp) == set()
    assert list(inst.store_tmp.iterdir()) == []
    assert run_sekisho("audit", "verify", config=inst.config).returncode == 0
    records = ImportRecords(inst.database)
    assert records.get(record["id"]).importer_id == "reception01"


def test_study_of_another_patient_is_refused_per_instance(inst: Instance, medium: Path) -> None:
    """The store files a study under one patient: importing more of it for another is refused."""
    run_import(inst, medium, ("series:1.1.1",))  # the CT series, for H0001
    gw = Gateway.open(load_settings(inst.config))
    try:
        outcome = run_media_import(
            gw,
            ImportRequest(
                path=medium,
                importer=OPERATOR,
                patient_id="H0002",
                issuer="SEKISHO",
                selection=("series:1.1.2",),  # the CR series of the same study
                media_type="CD",
            ),
        )
    finally:
        gw.close()
    record = outcome.record.to_dict()
    assert record["instance_count"] == 0
    assert [s["reason"] for s in record["details"]["skipped"]] == ["uid-conflict"]
    assert "another patient" in record["details"]["skipped"][0]["message"]
    assert len(inst.indexed_instances()) == 3
    assert list(inst.store_tmp.iterdir()) == []


def test_pydicom_never_echoes_values_into_logs_or_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """R-OPS-3: pydicom's complaints quote values from the medium; the gateway drops them."""
    import logging
    import warnings

    from pydicom import config
    from pydicom.valuerep import validate_value

    from gateway.imports.quiet import silence_pydicom

    logger = logging.getLogger("pydicom")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    try:
        with warnings.catch_warnings(record=True) as got, caplog.at_level(logging.DEBUG):
            warnings.simplefilter("always")
            silence_pydicom()
            validate_value("DA", "Yamada^Secret", config.WARN)
        assert [str(w.message) for w in got] == []
        assert "Yamada" not in caplog.text
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
