"""Selecting what to import: nothing by default, by index or by UID (R-PDI-3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from media_factory import build_media

from media.inspect import inspect_media
from media.report import MediaReport
from media.selection import Level, Selection, SelectionItem, plan_import
from media.settings import MediaSettings
from media.source import open_source
from pki.errors import InvalidInputError

SETTINGS = MediaSettings()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> MediaReport:
    root = tmp_path_factory.mktemp("sel")
    build_media(root)
    with open_source(root, SETTINGS) as src:
        return inspect_media(src, SETTINGS)


def test_parse_forms() -> None:
    sel = Selection.parse(["1", "1.2", "1.2.3", "study:1.2.840.99", "SERIES:2.1.1", "patient:ABC"])
    assert sel.items == (
        SelectionItem(Level.PATIENT, "1"),
        SelectionItem(Level.STUDY, "1.2"),
        SelectionItem(Level.SERIES, "1.2.3"),
        SelectionItem(Level.STUDY, "1.2.840.99"),
        SelectionItem(Level.SERIES, "2.1.1"),
        SelectionItem(Level.PATIENT, "ABC"),
    )


@pytest.mark.parametrize("bad", ["everything", "image:1", "1.2.3.4", "01"])
def test_parse_refuses_what_it_does_not_understand(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        Selection.parse([bad])


def test_nothing_is_selected_by_default(report: MediaReport) -> None:
    plan = plan_import(report, Selection())
    assert plan.is_empty
    not_selected = [e for e in plan.excluded if e.reason == "not selected"]
    assert sum(e.instances for e in not_selected) == report.number_of_instances


def test_select_series_by_index_and_study_by_uid(report: MediaReport) -> None:
    first = report.patients[0]
    study = first.studies[1]
    series = report.patients[2].studies[0].series[0]
    plan = plan_import(
        report, Selection.of(studies=[study.study_instance_uid], series=[series.index])
    )
    expected = {i.path for s in study.series for i in s.instances} | {
        i.path for i in series.instances
    }
    assert {f.path for f in plan.files} == expected
    assert plan.patients == [first.index, report.patients[2].index]
    assert set(plan.demographics) == set(plan.patients)
    planned = {f.path: f for f in plan.files}
    some = series.instances[0]
    assert planned[some.path].expected_sha256 == some.sha256
    assert planned[some.path].series_instance_uid == series.series_instance_uid


def test_select_patient_by_media_patient_id(report: MediaReport) -> None:
    patient = report.patients[1]
    plan = plan_import(report, Selection.of(patients=[patient.patient_id]))
    assert len(plan.files) == patient.number_of_images
    assert plan.demographics[patient.index].name == patient.name


def test_unknown_selection_is_an_error_not_an_empty_import(report: MediaReport) -> None:
    with pytest.raises(InvalidInputError, match="matches nothing"):
        plan_import(report, Selection.parse(["study:1.2.3.4.5.6.7"]))
    with pytest.raises(InvalidInputError, match="matches nothing"):
        plan_import(report, Selection.parse(["9"]))


def test_unimportable_instances_are_excluded_with_reason(tmp_path: Path) -> None:
    root = tmp_path / "m"
    build_media(root)
    victim = root / "DICOM" / "ST000001" / "SE000001" / "IM000001"
    victim.write_bytes(victim.read_bytes()[:200])
    copy = root / "DICOM" / "ST000001" / "SE000001" / "IM000002"
    shutil.copyfile(copy, root / "DUP")  # the same instance twice on the medium
    with open_source(root, SETTINGS) as src:
        rep = inspect_media(src, SETTINGS)
    plan = plan_import(rep, Selection.parse(["1", "2", "3"]))
    reasons = {e.what: e.reason for e in plan.excluded}
    assert reasons["DICOM/ST000001/SE000001/IM000001"].startswith("malformed")
    dup_reason = reasons.get("DUP") or reasons.get("DICOM/ST000001/SE000001/IM000002")
    assert dup_reason is not None and dup_reason.startswith("same SOP Instance UID")
    assert "DICOM/ST000001/SE000001/IM000001" not in {f.path for f in plan.files}
    assert plan.to_dict()["excluded"]
