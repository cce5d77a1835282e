"""Pure conformance rules: File IDs (PS3.10 §8.2/§8.5), programs, findings table, settings."""

from __future__ import annotations

import pytest

from media.charset import best_person_name, pn_fits, representable
from media.conformance import (
    FINDINGS,
    FindingCode,
    Severity,
    check_file_id,
    classify_content,
    classify_name,
    file_id_components,
    hostile_reason,
    viewer_folders,
)
from media.settings import MediaSettings, StationInfo
from pki.errors import ConfigurationError


def test_every_finding_code_has_a_row_with_plain_words() -> None:
    assert set(FINDINGS) == set(FindingCode)
    for code, kind in FINDINGS.items():
        assert kind.summary.endswith("."), code
        assert isinstance(kind.severity, Severity)


@pytest.mark.parametrize(
    ("file_id", "expected"),
    [
        ("DICOM\\ST000001\\SE000001\\IM000001", set()),
        ("A\\B\\C\\D\\E\\F\\G\\H\\I", {FindingCode.FILE_ID_TOO_DEEP}),
        ("DICOM\\IMAGE0001", {FindingCode.FILE_ID_COMPONENT_TOO_LONG}),
        ("dicom\\im1", {FindingCode.FILE_ID_LOWERCASE}),
        ("DICOM\\IM1.DCM", {FindingCode.FILE_ID_EXTENSION}),
        ("DICOM\\IM-1", {FindingCode.FILE_ID_BAD_CHARACTERS}),
    ],
)
def test_file_id_rules(file_id: str, expected: set[FindingCode]) -> None:
    comps = file_id_components(file_id)
    assert hostile_reason(comps) is None
    assert {f.code for f in check_file_id(comps, file_id)} == expected


@pytest.mark.parametrize(
    "file_id", ["..\\ETC", "\\ETC\\PASSWD", "/etc/passwd", "A\\.\\B", "C:\\X", "A\\\x01B", ""]
)
def test_hostile_file_ids(file_id: str) -> None:
    assert hostile_reason(file_id_components(file_id)) is not None


def test_multi_valued_file_id_from_pydicom() -> None:
    assert file_id_components(["DICOM", "IM1 "]) == ["DICOM", "IM1"]


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("AUTORUN.INF", FindingCode.AUTORUN),
        ("x/autorun.inf", FindingCode.AUTORUN),
        ("SETUP.EXE", FindingCode.EXECUTABLE),
        ("VIEWER/lib.dll", FindingCode.EXECUTABLE),
        ("start.bat", FindingCode.SCRIPT),
        ("run.sh", FindingCode.SCRIPT),
        ("DICOM/IM000001", None),
        ("INDEX.HTM", None),
    ],
)
def test_classify_names(name: str, code: FindingCode | None) -> None:
    assert classify_name(name) is code


def test_classify_content() -> None:
    assert classify_content(b"MZ\x90\x00") is FindingCode.EXECUTABLE
    assert classify_content(b"\x7fELF\x02") is FindingCode.EXECUTABLE
    assert classify_content(b"#!/bin/sh") is FindingCode.SCRIPT
    assert classify_content(b"\x00" * 128) is None


def test_viewer_folders_are_top_most() -> None:
    folders = viewer_folders(
        ["VIEWER", "VIEWER/BIN", "DICOM", "TOOLS", "TOOLS/X"], ["TOOLS/X/app.exe", "SETUP.EXE"]
    )
    assert folders == ["TOOLS/X", "VIEWER"]


def test_repertoires() -> None:
    assert representable("Yamada^Tarou", ())
    assert not representable("Müller", ())
    assert representable("Müller", ("ISO_IR 100",))
    assert representable("山田^太郎", ("", "ISO 2022 IR 87"))
    assert not representable("山田", ("ISO_IR 13",))  # JIS X 0201 has no kanji
    assert representable("ﾔﾏﾀﾞ", ("ISO_IR 13",))
    assert representable("鈴木", ("ISO_IR 192",))
    assert pn_fits("Yamada^Tarou=山田^太郎=やまだ^たろう", ("", "ISO 2022 IR 87"))
    assert best_person_name("Yamada^Tarou=山田^太郎", ("ISO_IR 100",)) == "Yamada^Tarou"
    assert best_person_name("山田^太郎", ()) is None


def test_settings_from_mapping() -> None:
    settings = MediaSettings.from_mapping(
        {"max_file_bytes": 10, "scanner_required": False, "station": {"station_name": "RECEP1"}}
    )
    assert settings.max_file_bytes == 10 and not settings.scanner_required
    assert settings.station == StationInfo(station_name="RECEP1")
    with pytest.raises(ConfigurationError, match="media.max_fle_bytes"):
        MediaSettings.from_mapping({"max_fle_bytes": 1})
    with pytest.raises(ConfigurationError, match="media.station.colour"):
        MediaSettings.from_mapping({"station": {"colour": "red"}})
    with pytest.raises(ConfigurationError, match="positive"):
        MediaSettings(max_entries=0)
    with pytest.raises(ConfigurationError, match="true or false"):
        MediaSettings.from_mapping({"scanner_required": "yes"})
