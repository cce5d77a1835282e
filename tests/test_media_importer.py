"""Importing selected instances into a sink (R-PDI-4, R-PDI-5, R-PDI-8)."""

from __future__ import annotations

import gc
import hashlib
import shutil
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from media_factory import (
    DOE_ASCII,
    SUZUKI_UTF8,
    FakeSink,
    SeriesSpec,
    StudySpec,
    build_media,
    make_instance,
)
from pydicom import dcmread, dcmwrite
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from media.importer import ImportResult, SkipReason, run_import
from media.inspect import inspect_media
from media.reconcile import LocalPatient, Operator
from media.scanner import NullScanner
from media.selection import ImportPlan, Selection, plan_import
from media.settings import MediaSettings
from media.source import open_source
from pki.errors import InvalidInputError, ReconciliationError

NOW = datetime(2024, 3, 1, 0, 0, tzinfo=UTC)
OPERATOR = Operator("u001", "Uketsuke^Hanako")
SUZUKI_LOCAL = LocalPatient("H2001", "SEKISHO", "Suzuki^Hanako=鈴木^花子", "19851224", "F")


def settings_for(work: Path, **kw: object) -> MediaSettings:
    work.mkdir(parents=True, exist_ok=True)
    return MediaSettings(scanner_required=False, work_dir=work, **kw)  # type: ignore[arg-type]


def do_import(
    root: Path,
    settings: MediaSettings,
    sink: FakeSink,
    target: LocalPatient = SUZUKI_LOCAL,
    select: tuple[str, ...] = ("1",),
    **kw: object,
) -> tuple[ImportPlan, ImportResult]:
    with open_source(root, settings) as src:
        report = inspect_media(src, settings)
        plan = plan_import(report, Selection.parse(list(select)))
        result = run_import(
            src, plan, target, OPERATOR, settings.station, settings, NullScanner(), sink,
            now=NOW, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
    return plan, result


@pytest.fixture(scope="module")
def suzuki_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suzuki")
    build_media(root, [StudySpec(SUZUKI_UTF8, [SeriesSpec("MR", 3), SeriesSpec("MR", 2)])])
    return root


def test_import_stores_reconciled_instances(suzuki_medium: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "work")
    sink = FakeSink(settings.work_dir)
    progress: list[tuple[int, int]] = []
    plan, result = do_import(
        suzuki_medium,
        settings,
        sink,
        accession_number="L777",
        progress=lambda d, t: progress.append((d, t)),
    )
    assert len(result.imported) == 5 and not result.skipped
    assert progress[-1] == (10, 10) and progress == sorted(progress)
    for item in result.imported:
        media_bytes = (suzuki_medium / item.path).read_bytes()
        assert result.media_sha256[item.path] == hashlib.sha256(media_bytes).hexdigest()
        assert item.source_sha256 == result.media_sha256[item.path]
        stored = sink.stored[item.sop_instance_uid]
        assert item.stored_sha256 == hashlib.sha256(stored).hexdigest()
        original = dcmread(suzuki_medium / item.path)
        written = dcmread(__import__("io").BytesIO(stored))
        assert written.PatientID == "H2001" and written.AccessionNumber == "L777"
        assert written.SOPInstanceUID == original.SOPInstanceUID == item.sop_instance_uid
        assert written.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert written.PixelData == original.PixelData
        assert written.SpecificCharacterSet == "ISO_IR 192"
        assert written.OtherPatientIDsSequence[0].PatientID == "OTH-0002"
        assert written.ContributingEquipmentSequence[-1].OperatorsName == "Uketsuke^Hanako"
        meta = sink.meta[item.sop_instance_uid]
        assert meta.patient_id == "H2001" and meta.source_path == item.path  # type: ignore[attr-defined]
    assert result.to_dict()["imported"]


def test_identical_reimport_is_reported_as_already_present(
    suzuki_medium: Path, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "work")
    sink = FakeSink()
    do_import(suzuki_medium, settings, sink)
    calls = sink.store_calls
    _plan, again = do_import(suzuki_medium, settings, sink)
    assert sink.store_calls == calls
    assert not again.imported
    assert len(again.already_present) == 5
    assert {s.reason for s in again.skipped} == {SkipReason.ALREADY_PRESENT}


def test_other_instance_with_same_uid_is_not_imported(suzuki_medium: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "work")
    sink = FakeSink()
    with open_source(suzuki_medium, settings) as src:
        report = inspect_media(src, settings)
    taken = next(i for *_x, i in report.instances())
    sink.source_sha[taken.sop_instance_uid] = "0" * 64  # stored earlier, other content
    _plan, result = do_import(suzuki_medium, settings, sink)
    [conflict] = [s for s in result.skipped if s.reason is SkipReason.UID_CONFLICT]
    assert conflict.sop_instance_uid == taken.sop_instance_uid
    assert "same SOP Instance UID" in conflict.message
    assert taken.sop_instance_uid not in sink.stored
    assert len(result.imported) == 4


def test_file_changed_after_inspection_is_skipped(suzuki_medium: Path, tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(suzuki_medium, root)
    settings = settings_for(tmp_path / "work")
    sink = FakeSink()
    with open_source(root, settings) as src:
        report = inspect_media(src, settings)
        plan = plan_import(report, Selection.parse(["1"]))
        victim = root / plan.files[0].path
        ds = dcmread(victim)
        ds.SeriesDescription = "swapped"
        dcmwrite(victim, ds, enforce_file_format=True)
        result = run_import(src, plan, SUZUKI_LOCAL, OPERATOR, settings.station, settings,
                            NullScanner(), sink, now=NOW)  # fmt: skip
    changed = [s for s in result.skipped if s.reason is SkipReason.MEDIA_CHANGED]
    assert [s.path for s in changed] == [plan.files[0].path]
    assert len(result.imported) == 4


def test_demographic_mismatch_needs_confirmation(suzuki_medium: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "work")
    sink = FakeSink()
    other = LocalPatient("H9", "", "Tanaka^Jiro", "19851224", "F")
    with pytest.raises(ReconciliationError, match="name"):
        do_import(suzuki_medium, settings, sink, target=other)
    assert sink.store_calls == 0
    _plan, result = do_import(suzuki_medium, settings, sink, target=other, confirm_mismatch=True)
    assert [m.field for m in result.confirmed_mismatches] == ["name"]
    stored = dcmread(__import__("io").BytesIO(next(iter(sink.stored.values()))))
    assert str(stored.PatientName) == "Tanaka^Jiro"
    assert str(stored.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].PatientName) == (
        "Suzuki^Hanako=鈴木^花子=すずき^はなこ"
    )


def test_empty_plan_is_refused(suzuki_medium: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "work")
    with open_source(suzuki_medium, settings) as src:
        with pytest.raises(InvalidInputError, match="nothing is selected"):
            run_import(src, ImportPlan(), SUZUKI_LOCAL, OPERATOR, settings.station, settings,
                       NullScanner(), FakeSink())  # fmt: skip


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_original_transfer_syntax_is_kept(tmp_path: Path, syntax: str) -> None:
    root = tmp_path / "m"
    root.mkdir()
    study = StudySpec(DOE_ASCII, [SeriesSpec("CT", 1)])
    ds = make_instance(study, study.series[0], 1, 1)
    ds.file_meta.TransferSyntaxUID = syntax
    dcmwrite(root / "IM1", ds, enforce_file_format=True)
    settings = settings_for(tmp_path / "work")
    sink = FakeSink()
    _plan, result = do_import(root, settings, sink, target=LocalPatient("H1"))
    [item] = result.imported
    written = dcmread(__import__("io").BytesIO(sink.stored[item.sop_instance_uid]))
    assert written.file_meta.TransferSyntaxUID == syntax
    assert written.PatientID == "H1" and written.InstanceOriginStatus == "IMPORTED"


def test_large_files_are_spooled_to_disk_and_cleaned_up(
    suzuki_medium: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    settings = settings_for(work, spool_threshold_bytes=64, chunk_bytes=256)
    sink = FakeSink(work)
    _plan, result = do_import(suzuki_medium, settings, sink)
    assert len(result.imported) == 5
    assert list(work.iterdir()) == []


def _big_medium(root: Path, count: int) -> None:
    study = StudySpec(DOE_ASCII, [SeriesSpec("CT", count)])
    (root / "DICOM").mkdir(parents=True)
    for i in range(count):
        ds = make_instance(study, study.series[0], 1, i + 1)
        ds.Rows = ds.Columns = 512
        ds.PixelData = np.full((512, 512), i, dtype=np.uint16).tobytes()
        dcmwrite(root / "DICOM" / f"IM{i:06d}", ds, enforce_file_format=True)


def _peak_import_memory(root: Path, tmp_path: Path) -> int:
    settings = settings_for(tmp_path / "work", spool_threshold_bytes=64 * 1024)
    sink = _CountingSink()
    gc.collect()
    tracemalloc.start()
    try:
        do_import(root, settings, sink, target=LocalPatient("H1"), confirm_mismatch=True)  # type: ignore[arg-type]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class _CountingSink:
    """Keeps only hashes, so the test measures the importer, not the sink."""

    def __init__(self) -> None:
        self.known: dict[str, str] = {}

    def exists(self, uid: str) -> str | None:
        return self.known.get(uid)

    def store(self, path: Path, meta: object) -> str:
        self.known[meta.sop_instance_uid] = meta.source_sha256  # type: ignore[attr-defined]
        return meta.sha256  # type: ignore[attr-defined]


def test_memory_does_not_grow_with_the_number_of_files(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    _big_medium(small, 4)
    _big_medium(large, 24)  # six times the data (each file is 512 KiB)
    peak_small = _peak_import_memory(small, tmp_path / "a")
    peak_large = _peak_import_memory(large, tmp_path / "b")
    assert peak_large < peak_small * 1.5 + 1_000_000, (peak_small, peak_large)


def test_result_carries_inspection_findings_and_refuses_bad_accession_early(
    suzuki_medium: Path, tmp_path: Path
) -> None:
    root = tmp_path / "m"
    shutil.copytree(suzuki_medium, root)
    (root / "AUTORUN.INF").write_text("[autorun]\n")
    settings = settings_for(tmp_path / "work")
    sink = FakeSink()
    with pytest.raises(InvalidInputError, match="accession"):
        do_import(root, settings, sink, accession_number="X" * 17)
    assert sink.store_calls == 0
    _plan, result = do_import(root, settings, sink)
    assert "AUTORUN" in {f.code.value for f in result.findings}


class _CountingSource:
    """A medium that counts how often each file is opened."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.opens: dict[str, int] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def open(self, path: str) -> object:
        self.opens[path] = self.opens.get(path, 0) + 1
        return self.inner.open(path)  # type: ignore[attr-defined]


def test_each_selected_file_is_read_from_the_medium_once(
    suzuki_medium: Path, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "work")
    sink = FakeSink(settings.work_dir)
    with open_source(suzuki_medium, settings) as src:
        report = inspect_media(src, settings)
        plan = plan_import(report, Selection.parse(["1"]))
        counting = _CountingSource(src)
        result = run_import(
            counting, plan, SUZUKI_LOCAL, OPERATOR, settings.station, settings,  # type: ignore[arg-type]
            NullScanner(), sink, now=NOW,
        )  # fmt: skip
    assert len(result.imported) == 5
    assert counting.opens == {f.path: 1 for f in plan.files}
    assert len(result.scans) == 5 and all(s.result.clean for s in result.scans)


class _FailingScanner:
    """Answers for two files, then fails like an unreachable daemon."""

    performs_scan = True
    engine = "failing"

    def __init__(self) -> None:
        self.calls = 0

    def scan_stream(self, name: str, chunks: object) -> object:
        from media.scanner import ScanResult
        from pki.errors import MediaImportError

        for _ in chunks:  # type: ignore[attr-defined]
            pass
        self.calls += 1
        if self.calls > 2:
            raise MediaImportError("the malware scanner cannot be reached")
        return ScanResult(clean=True, signature=None, engine=self.engine)


def test_scanner_failure_midway_stores_nothing_and_leaves_no_file(
    suzuki_medium: Path, tmp_path: Path
) -> None:
    from pki.errors import MediaImportError

    work = tmp_path / "work"
    settings = MediaSettings(work_dir=settings_for(work).work_dir)
    sink = FakeSink(work)
    with open_source(suzuki_medium, settings) as src:
        report = inspect_media(src, settings)
        plan = plan_import(report, Selection.parse(["1"]))
        with pytest.raises(MediaImportError, match="cannot be reached"):
            run_import(src, plan, SUZUKI_LOCAL, OPERATOR, settings.station, settings,
                       _FailingScanner(), sink, now=NOW)  # type: ignore[arg-type]  # fmt: skip
    assert sink.store_calls == 0
    assert list(work.iterdir()) == []


def test_iso_image_import_reads_each_file_intact_with_parallel_workers(tmp_path: Path) -> None:
    """pycdlib shares one file handle: reads must not interleave between workers."""
    from media_factory import make_iso, run_dcmmkdir

    root = tmp_path / "m"
    study = StudySpec(DOE_ASCII, [SeriesSpec("CT", 24)])
    folder = root / "DICOM" / "ST000001" / "SE000001"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for n in range(1, 25):
        ds = make_instance(study, study.series[0], 1, n)
        ds.Rows = ds.Columns = 128
        ds.PixelData = rng.integers(0, 4096, (128, 128), dtype=np.uint16).tobytes()
        dcmwrite(folder / f"IM{n:06d}", ds, enforce_file_format=True)
    run_dcmmkdir(root)
    image = make_iso(root, tmp_path / "medium.iso")
    settings = settings_for(tmp_path / "work", chunk_bytes=4096)
    sink = FakeSink(settings.work_dir)
    _plan, result = do_import(image, settings, sink, target=LocalPatient("H1"))
    assert len(result.imported) == 24 and not result.skipped
    for item in result.imported:
        original = (root / item.path).read_bytes()
        assert item.source_sha256 == hashlib.sha256(original).hexdigest()
        stored = dcmread(__import__("io").BytesIO(sink.stored[item.sop_instance_uid]))
        assert stored.PixelData == dcmread(root / item.path).PixelData
