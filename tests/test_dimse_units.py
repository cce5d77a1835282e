"""Unit tests of the pure parts of the DICOM TLS service (no network).

Identifier parsing and matching (PS3.4 C.2.2.2), the PS3.10 header written in
front of received data sets, the data set offset used to send stored bytes,
the connection gate (R-TLS-6) and the partner's move destinations.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.cli import _move_destinations
from gateway.dimse.listener import ConnectionGate
from gateway.dimse.qr import (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    STUDY_ROOT_MOVE,
    _matches,
    find_response,
    parse_find,
    resolve_retrieve,
)
from gateway.dimse.retrieve import dataset_offset
from gateway.dimse.storage import IMPLEMENTATION_CLASS_UID, part10_header
from gateway.store.model import Partner, Visibility
from pki.errors import InvalidInputError


def _identifier(level: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_find_keys_go_to_sql_or_row_filters() -> None:
    ident = _identifier(
        "STUDY", PatientID="P*", StudyDate="20250101-20251231", StudyInstanceUID="",
        StudyDescription="CT*", ModalitiesInStudy="MR", PatientName="",
    )
    q = parse_find(ident, STUDY_ROOT_FIND, 100)
    assert q.level == "STUDY"
    assert (q.flt.patient_id, q.flt.study_date, q.flt.modality) == ("P*", "20250101-20251231", "MR")
    assert q.flt.patient_name is None and q.flt.study_uids == ()
    assert q.post == (("StudyDescription", "CT*"),)
    assert "PatientID=P*" in q.text


def test_uid_lists_and_levels() -> None:
    q = parse_find(_identifier("SERIES", SeriesInstanceUID=["1.2.3", "1.2.4"]), STUDY_ROOT_FIND, 10)
    assert q.flt.series_uids == ("1.2.3", "1.2.4")
    with pytest.raises(InvalidInputError):
        parse_find(_identifier("PATIENT"), STUDY_ROOT_FIND, 10)  # Study Root has no PATIENT
    assert parse_find(_identifier("PATIENT"), PATIENT_ROOT_FIND, 10).level == "PATIENT"
    with pytest.raises(InvalidInputError):
        parse_find(_identifier("FRAME"), PATIENT_ROOT_FIND, 10)


@pytest.mark.parametrize(
    ("pattern", "value", "vr", "expected"),
    [
        ("CT*", "CT chest", "LO", True),
        ("CT?", "CTX", "LO", True),
        ("CT", "ct", "LO", False),
        ("0900-1000", "093000", "TM", True),
        ("1000-", "093000", "TM", False),
        ("1.2\\1.3", "1.3", "UI", True),
        ("3", "3", "IS", True),
        ("3", "4", "IS", False),
        ("[ab]*", "[ab]x", "LO", True),  # brackets are literal in DICOM matching
    ],
)
def test_matching(pattern: str, value: str, vr: str, expected: bool) -> None:
    assert _matches(pattern, value, vr) is expected


def test_find_response_returns_every_requested_key() -> None:
    ident = _identifier("STUDY", StudyInstanceUID="", PatientName="", StudyID="",
                        ModalitiesInStudy="", RetrieveAETitle="")
    q = parse_find(ident, STUDY_ROOT_FIND, 10)
    row = {"study_uid": "1.2.3", "patient_name": "山田^太郎", "modalities": "CT,MR",
           "patient_id": "P1", "issuer": ""}
    ds = find_response(q, row, "SEKISHO")
    assert ds.StudyInstanceUID == "1.2.3" and list(ds.ModalitiesInStudy) == ["CT", "MR"]
    assert "StudyID" in ds and not ds.StudyID and ds.RetrieveAETitle == "SEKISHO"
    assert ds.SpecificCharacterSet == "ISO_IR 192"  # non-ASCII names are sent as UTF-8
    assert "PatientID" not in ds  # not requested, not returned


class _Store:
    """The store's query surface, recording what was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def instances_of(self, study: str, series: object, sop: object, vis: object) -> list[object]:
        self.calls.append(("instances_of", study, series, sop, vis))
        return []

    def query_studies(self, flt: object, vis: object) -> list[object]:
        self.calls.append(("query_studies", flt, vis))
        return []


def test_retrieve_uses_unique_keys_and_the_partners_visibility() -> None:
    vis = Visibility("partner-a", ("regional",))
    store = _Store()
    resolve_retrieve(store, _identifier("STUDY", StudyInstanceUID=["1.2", "1.3"]),
                     STUDY_ROOT_MOVE, vis)
    assert store.calls == [("instances_of", "1.2", None, None, vis),
                           ("instances_of", "1.3", None, None, vis)]
    with pytest.raises(InvalidInputError):
        resolve_retrieve(store, _identifier("STUDY"), STUDY_ROOT_MOVE, vis)
    with pytest.raises(InvalidInputError):  # wildcards are not unique keys
        resolve_retrieve(store, _identifier("PATIENT", PatientID="P*"),
                         "1.2.840.10008.5.1.4.1.2.1.2", vis)


def test_part10_header_and_dataset_offset(tmp_path: Path) -> None:
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")
    body = Dataset()
    body.SOPInstanceUID = "1.2.3.4"
    buf = io.BytesIO()
    body.save_as(buf, implicit_vr=False, little_endian=True)
    path = tmp_path / "x.dcm"
    path.write_bytes(header + buf.getvalue())
    assert dataset_offset(path) == len(header)
    ds = dcmread(path)
    assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.SOPInstanceUID == "1.2.3.4"
    # Deterministic: the same instance received twice gives the same file.
    assert header == part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1")


def test_connection_gate_limits_per_address_and_in_total() -> None:
    gate = ConnectionGate(per_address=2, total=3)
    assert gate.acquire("a") is None and gate.acquire("a") is None
    assert gate.acquire("a") == "address-limit"
    assert gate.acquire("b") is None
    assert gate.acquire("c") == "connection-limit"
    gate.release("a")
    assert gate.acquire("c") is None
    assert gate.count() == 3 and gate.count("a") == 1


def test_move_destinations() -> None:
    assert _move_destinations(["PACS_A=10.0.0.5:2762", "WS=[::1]:104"]) == (
        ("PACS_A", "10.0.0.5:2762"), ("WS", "[::1]:104"),
    )
    for bad in ("NOPORT=host", "=host:1", "A=host:0", "A=:104", "TOO_LONG_AE_TITLE_X=h:1"):
        with pytest.raises(InvalidInputError):
            _move_destinations([bad])
    partner = Partner("p", move_destinations=(("PACS_A", "10.0.0.5:2762"), ("WS", "[::1]:104")))
    assert partner.move_destination("PACS_A ") == ("10.0.0.5", 2762)
    assert partner.move_destination("WS") == ("::1", 104)
    assert partner.move_destination("OTHER") is None
