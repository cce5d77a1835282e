"""Fuzzing the DICOMDIR walker and the file walker with corrupted real files.

Inputs are made by the real writers (DCMTK ``dcmmkdir``, pydicom) and then
corrupted by hypothesis; the readers may only produce findings or raise
Sekisho's own errors, never anything else (R-PDI-8: never crash the import).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from media_factory import DOE_ASCII, YAMADA_IR87, SeriesSpec, StudySpec, build_media

from media.conformance import Finding
from media.dicomdir import parse_dicomdir
from media.dicomfile import DicomFileProblem, parse_file
from media.inspect import inspect_media
from media.settings import MediaSettings
from media.source import open_source
from pki.errors import SekishoError

SETTINGS = MediaSettings()


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    build_media(
        root,
        [
            StudySpec(YAMADA_IR87, [SeriesSpec("CT", 2)]),
            StudySpec(DOE_ASCII, [SeriesSpec("CR", 1)]),
        ],
    )
    return root


@st.composite
def corruptions(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    """A few byte flips, a truncation or an insertion at drawn positions."""
    ops = st.one_of(
        st.tuples(st.just("set"), st.integers(0, size - 1), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.integers(0, size - 1), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, size - 1), st.integers(0, 255)),
    )
    return draw(st.lists(ops, min_size=1, max_size=6))


def corrupt(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, value in ops:
        pos = min(pos, max(len(buf) - 1, 0))
        if op == "set" and buf:
            buf[pos] = value
        elif op == "cut":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = bytes([value]) * 4
    return bytes(buf)


# pydicom warns about the invalid values the corruption creates; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.data())
def test_dicomdir_walker_survives_corruption(medium: Path, data: st.DataObject) -> None:
    original = (medium / "DICOMDIR").read_bytes()
    ops = data.draw(corruptions(len(original)))
    reading = parse_dicomdir(corrupt(original, ops))
    assert all(isinstance(f, Finding) for f in reading.findings)
    seen: set[int] = set()
    stack = list(reading.roots)
    while stack:  # the tree is finite and acyclic whatever the offsets say
        node = stack.pop()
        assert node.offset not in seen
        seen.add(node.offset)
        stack.extend(node.children)


@FUZZ
@given(data=st.data())
def test_inspection_survives_a_corrupted_dicomdir(
    medium: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    root = tmp_path_factory.mktemp("case")
    shutil.copytree(medium, root, dirs_exist_ok=True)
    original = (medium / "DICOMDIR").read_bytes()
    (root / "DICOMDIR").write_bytes(corrupt(original, data.draw(corruptions(len(original)))))
    try:
        with open_source(root, SETTINGS) as src:
            report = inspect_media(src, SETTINGS)
    except SekishoError:
        return
    finally:
        shutil.rmtree(root)
    # Whatever happened to the DICOMDIR, the intact instances are still found.
    assert report.number_of_instances >= 3
    assert sum(1 for *_x, i in report.instances() if i.importable) == 3


@FUZZ
@given(data=st.data())
def test_file_walker_survives_corruption(medium: Path, data: st.DataObject) -> None:
    original = (medium / "DICOM" / "ST000001" / "SE000001" / "IM000001").read_bytes()
    damaged = corrupt(original, data.draw(corruptions(len(original))))
    try:
        header = parse_file(io.BytesIO(damaged), len(damaged))
    except DicomFileProblem as problem:
        assert problem.detail
        return
    assert header.sop_instance_uid


def test_the_fuzz_target_is_valid_to_start_with(medium: Path) -> None:
    original = (medium / "DICOMDIR").read_bytes()
    reading = parse_dicomdir(original)
    assert reading.usable and not reading.findings
    assert [r.record_type for r in reading.roots] == ["PATIENT", "PATIENT"]
