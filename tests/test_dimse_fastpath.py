"""The C-STORE fast path: what it borrows from pynetdicom, and that it changes nothing.

* pynetdicom internals that :mod:`gateway.dimse.session` and
  :mod:`gateway.dimse.storage` mirror or bypass (event-driven reactors,
  P-DATA-TF decoding, C-STORE-RSP encoding) are pinned: a new pynetdicom
  release fails here, loudly, until the mirrored code has been compared
  with the new one;
* the hand-built encodings (PS3.10 file meta, C-STORE-RSP command set, PDV
  splitting) equal pydicom's and pynetdicom's own, byte for byte;
* the index parsed from a received file's leading bytes equals
  ``index_instance`` on the whole file, or declines to guess;
* the ingest worker stores exactly the bytes received, refuses what it must,
  and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import inspect
import stat
import struct
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import association, dimse, dimse_messages, dul, fsm, service_class
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode

from gateway.dimse.ingest import IngestWorker, _Budget
from gateway.dimse.session import PYNETDICOM_VERSION, SekishoAssociation, split_pdvs
from gateway.dimse.storage import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    c_store_rsp_command,
    parse_c_store_rq,
    part10_header,
)
from gateway.store.files import FileStore
from gateway.store.index import PrefixIndex, TruncatedInstanceError, index_instance
from pki.errors import InvalidInputError

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"

#: SHA-256 (first 16 hex digits) of the pynetdicom functions whose behaviour
#: gateway.dimse.session / storage reproduce or bypass, as in pynetdicom 3.0.4.
PINNED_SOURCES = {
    "Association._run_reactor": (association.Association._run_reactor, "f28838c5559e462a"),
    "Association.kill": (association.Association.kill, "8f9713666a7f4cff"),
    "DULServiceProvider.run_reactor": (dul.DULServiceProvider.run_reactor, "e3a10eb3a0931e48"),
    "DULServiceProvider._read_pdu_data": (
        dul.DULServiceProvider._read_pdu_data, "19f2d4e38c13c835"),
    "DULServiceProvider._decode_pdu": (dul.DULServiceProvider._decode_pdu, "fc71dd1bf853e1ce"),
    "DULServiceProvider._is_transport_event": (
        dul.DULServiceProvider._is_transport_event, "8725ed03bb8fbdef"),
    "DULServiceProvider.stop_dul": (dul.DULServiceProvider.stop_dul, "28a7e0be126e7b30"),
    "DULServiceProvider.send_pdu": (dul.DULServiceProvider.send_pdu, "7cbce5da8594124e"),
    "fsm.DT_2": (fsm.DT_2, "9ec543394e0b49eb"),
    "DIMSEServiceProvider.send_msg": (dimse.DIMSEServiceProvider.send_msg, "a839cf2fb46976d9"),
    "DIMSEServiceProvider.receive_primitive": (
        dimse.DIMSEServiceProvider.receive_primitive, "5f99c86b14a15cef"),
    "StorageServiceClass.SCP": (service_class.StorageServiceClass.SCP, "63afca7fc6c6e7ee"),
    "DIMSEMessage.message_to_primitive": (
        dimse_messages.DIMSEMessage.message_to_primitive, "f8f43d34e43450ef"),
    # gateway.dimse.pdata (pre-encoded C-STORE-RQ PDUs written by the DUL thread)
    "DIMSEMessage.encode_msg": (dimse_messages.DIMSEMessage.encode_msg, "73000c902c52832d"),
    "DULServiceProvider._process_recv_primitive": (
        dul.DULServiceProvider._process_recv_primitive, "4c0ebbb3e646e35e"),
    "fsm.DT_1": (fsm.DT_1, "82e5c5d4114534fa"),
}


# -- pynetdicom internals -----------------------------------------------------
def test_pynetdicom_is_the_release_the_overrides_were_written_against() -> None:
    assert pynetdicom.__version__ == PYNETDICOM_VERSION, (
        f"pynetdicom {pynetdicom.__version__} is installed; gateway/dimse/session.py and "
        f"storage.py mirror private code of {PYNETDICOM_VERSION}: compare them with the new "
        "release, then update PYNETDICOM_VERSION and PINNED_SOURCES"
    )


@pytest.mark.parametrize("name", sorted(PINNED_SOURCES))
def test_mirrored_pynetdicom_code_is_unchanged(name: str) -> None:
    function, pinned = PINNED_SOURCES[name]
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == pinned, (
        f"pynetdicom's {name} changed: review the code in gateway/dimse/session.py and "
        "gateway/dimse/storage.py that mirrors or bypasses it, then update PINNED_SOURCES"
    )


def test_private_attributes_the_overrides_use_exist() -> None:
    assoc = SekishoAssociation(pynetdicom.AE(), "acceptor")
    for attr in ("_reactor_checkpoint", "_is_paused", "_kill", "_dul_ready", "_accepted_cx"):
        assert hasattr(assoc, attr), attr
    for attr in ("_recv_pdu", "event_queue", "to_provider_queue", "to_user_queue",
                 "_idle_timer", "artim_timer", "_kill_thread", "state_machine", "socket"):
        assert hasattr(assoc.dul, attr), attr
    # The P-DATA-TF shortcut does what the state machine table says (PS3.8 Table 9-10).
    assert fsm.TRANSITION_TABLE[("Evt10", "Sta6")] == "DT-2"
    assert fsm.ACTIONS["DT-2"][2] == "Sta6"
    # pynetdicom's per-association logging handlers are not bound.
    assert not assoc.get_handlers(pynetdicom.evt.EVT_DIMSE_RECV)
    assert not assoc.get_handlers(pynetdicom.evt.EVT_PDU_RECV)
    # The timers configured by the timeout setters belong to the replacement DUL.
    assoc.network_timeout = 12
    assert assoc.dul._idle_timer.timeout == 12


# -- encodings ------------------------------------------------------------------
def _pydicom_part10_header(sop_class: str, sop_instance: str, ts: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


@pytest.mark.parametrize(("sop_class", "sop_instance", "ts"), [
    (CT, "1.2.3", "1.2.840.10008.1.2.1"),
    (MR, "1.2.34", "1.2.840.10008.1.2"),
    (CT, "1." + "2" * 62, "1.2.840.10008.1.2.4.50"),
])
def test_part10_header_is_what_pydicom_writes(sop_class: str, sop_instance: str, ts: str) -> None:
    assert part10_header(sop_class, sop_instance, ts) == _pydicom_part10_header(
        sop_class, sop_instance, ts)


@pytest.mark.parametrize("uid", ["", "1.2.abc", "1." + "2" * 70, "1.2.3\u00e9"])
def test_part10_header_refuses_what_is_not_a_uid(uid: str) -> None:
    with pytest.raises(InvalidInputError):
        part10_header(CT, uid, "1.2.840.10008.1.2.1")


@pytest.mark.parametrize(("instance", "status"), [
    ("1.2.3.4.5", 0x0000), ("1.2.3.4.56", 0xA700), ("1." + "9" * 62, 0x0111),
])
def test_c_store_rsp_command_is_what_pynetdicom_encodes(instance: str, status: int) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert c_store_rsp_command(7, CT, instance, status) == encode(message.command_set, True, True)


def _c_store_rq_command(**fields: object) -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it."""
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.Priority = 0
    request.DataSet = BytesIO(b"\x00" * 8)
    for name, value in fields.items():
        setattr(request, name, value)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return encode(message.command_set, True, True)


def _pynetdicom_primitive(raw: bytes) -> C_STORE:
    message = C_STORE_RQ()
    message.command_set = decode(BytesIO(raw), True, True)
    message.data_set = BytesIO()
    message.context_id = 1
    return message.message_to_primitive()


_PRIMITIVE_FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
                     "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


@pytest.mark.parametrize("fields", [
    {},
    {"MessageID": 65535, "Priority": 2},
    {"MessageID": 0, "Priority": 1, "AffectedSOPInstanceUID": "1." + "2" * 62},
    {"AffectedSOPClassUID": MR, "AffectedSOPInstanceUID": "1.2.840.1"},
])
def test_c_store_rq_parse_gives_pynetdicoms_primitive(fields: dict[str, object]) -> None:
    raw = _c_store_rq_command(**fields)
    parsed = parse_c_store_rq(raw)
    assert parsed is not None
    expected = _pynetdicom_primitive(raw)
    for name in _PRIMITIVE_FIELDS:
        assert getattr(parsed, name) == getattr(expected, name), name
    assert isinstance(parsed.AffectedSOPClassUID, UID)


def test_c_store_rq_parse_warns_like_pynetdicom_on_a_non_conformant_uid() -> None:
    raw = _c_store_rq_command().replace(b"1.2.3.4", b"1.2.x.4")
    parsed, expected = parse_c_store_rq(raw), _pynetdicom_primitive(raw)
    assert parsed is not None
    assert parsed.AffectedSOPInstanceUID == expected.AffectedSOPInstanceUID == "1.2.x.4"


def _echo_command() -> bytes:
    echo = C_ECHO()
    echo.MessageID = 3
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    return encode(message.command_set, True, True)


@pytest.mark.parametrize(("name", "raw"), [
    ("move originator", _c_store_rq_command(MoveOriginatorApplicationEntityTitle="MOVER",
                                            MoveOriginatorMessageID=9)),
    ("C-ECHO", _echo_command()),
    ("no data set", _c_store_rq_command().replace(
        struct.pack("<HHIH", 0, 0x0800, 2, 0x0001), struct.pack("<HHIH", 0, 0x0800, 2, 0x0101))),
    ("bad priority", _c_store_rq_command().replace(
        struct.pack("<HHIH", 0, 0x0700, 2, 0), struct.pack("<HHIH", 0, 0x0700, 2, 7))),
    ("not ASCII", _c_store_rq_command().replace(b"1.2.3.4", b"1.2.\xb3.4")),
    ("cut", _c_store_rq_command()[:-3]),
    ("empty", b""),
])
def test_c_store_rq_parse_leaves_the_rest_to_pynetdicom(name: str, raw: bytes) -> None:
    assert parse_c_store_rq(raw) is None


def _pdu(*pdvs: tuple[int, bytes]) -> bytes:
    items = b"".join(struct.pack(">IB", len(data) + 1, cid) + data for cid, data in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(items)) + items


def test_split_pdvs_returns_views_of_each_item() -> None:
    pdu = bytearray(_pdu((1, b"\x03command"), (3, b"\x00" + b"d" * 1000)))
    pdvs = split_pdvs(pdu)
    assert [(cid, bytes(data)) for cid, data in pdvs] == [
        (1, b"\x03command"), (3, b"\x00" + b"d" * 1000)]
    assert all(isinstance(data, memoryview) for _, data in pdvs)


@pytest.mark.parametrize("pdu", [
    _pdu((1, b"\x03x"))[:-1],  # shorter than its length field says
    _pdu((1, b"\x03x")) + b"\x00",  # longer
    b"\x04\x00" + struct.pack(">I", 5) + struct.pack(">I", 9) + b"\x01",  # item past the end
    b"\x04\x00" + struct.pack(">I", 5) + struct.pack(">I", 1) + b"\x01",  # item too short
    b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # not a P-DATA-TF
])
def test_split_pdvs_refuses_inconsistent_lengths(pdu: bytes) -> None:
    with pytest.raises(ValueError):
        split_pdvs(pdu)


# -- index from the leading bytes -------------------------------------------------
def _file(*, pixels: int = 300_000, after_pixels: bool = False, big_before: int = 0,
          patient_name: str = "YAMADA^TARO") -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = "P1", patient_name
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20250401", "CT", 2, 7
    if big_before:
        ds.add_new(0x00090010, "LO", "SEKISHO TEST")
        ds.add_new(0x00091000, "OB", b"\x01" * big_before)  # a private blob before (0010,xxxx)
    ds.Rows, ds.Columns, ds.BitsAllocated = 1, 1, 8
    ds.PixelData = b"\x00" * pixels
    if after_pixels:
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # Data Set Trailing Padding
    fp = BytesIO()
    pydicom.dcmwrite(fp, ds, enforce_file_format=True)
    return fp.getvalue()


def _written(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"{hashlib.sha256(data).hexdigest()}.dcm"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["YAMADA^TARO", "山田^太郎=やまだ^たろう"])
def test_prefix_index_equals_the_whole_file_index(tmp_path: Path, name: str) -> None:
    data = _file(patient_name=name)
    idx = PrefixIndex(data[:65536]).result(len(data))
    assert idx is not None
    assert idx == index_instance(_written(tmp_path, data))


def test_prefix_index_of_a_small_file_is_the_whole_file(tmp_path: Path) -> None:
    data = _file(pixels=100)
    assert PrefixIndex(data).result(len(data)) == index_instance(_written(tmp_path, data))


def test_prefix_index_sees_a_truncated_instance() -> None:
    data = _file()
    with pytest.raises(TruncatedInstanceError):
        PrefixIndex(data[:65536]).result(len(data) - 10)
    with pytest.raises(TruncatedInstanceError):
        PrefixIndex(data[:5000]).result(5000)  # the whole (cut) file


@pytest.mark.parametrize("kwargs", [
    {"after_pixels": True},  # something follows the element the prefix stops in
    {"big_before": 70_000},  # the index attributes lie beyond the prefix
])
def test_prefix_index_declines_when_the_prefix_cannot_prove_it(kwargs: dict[str, object]) -> None:
    data = _file(**kwargs)  # type: ignore[arg-type]
    assert PrefixIndex(data[:65536]).result(len(data)) is None


def test_prefix_index_declines_garbage() -> None:
    assert PrefixIndex(b"\x00" * 200).result(10_000) is None


# -- the ingest worker -------------------------------------------------------------
def _ingest(store: FileStore, data: bytes, sop_class: str = CT, *, max_bytes: int = 10**8,
            chunk: int = 131066) -> tuple[IngestWorker, object]:
    worker = IngestWorker(store, max_bytes, fsync=True)
    header_len = data.index(b"DICM") + 4
    meta_end = header_len + 12 + struct.unpack_from("<I", data, header_len + 8)[0]
    sink = worker.open(sop_class, lambda: data[:meta_end])
    view = memoryview(bytearray(data[meta_end:]))
    for start in range(0, len(view), chunk):
        sink.write(view[start : start + chunk])
    sink.end()
    assert sink.wait(30)
    return worker, sink


def test_ingest_stores_the_received_bytes_at_their_content_address(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    data = _file()
    worker, sink = _ingest(store, data)
    try:
        assert sink.failure is None  # type: ignore[attr-defined]
        staged = sink.staged  # type: ignore[attr-defined]
        final = store.object_path(staged.sha256)
        assert final.read_bytes() == data
        assert staged.sha256 == hashlib.sha256(data).hexdigest() and staged.size == len(data)
        assert sink.index == index_instance(final)  # type: ignore[attr-defined]
    finally:
        worker.close()
    assert list(store.tmp.iterdir()) == []  # the file opened ahead is gone too


def test_stored_files_are_read_only_under_one_fan_out_level(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    # The 256 directories exist before anything is stored: a commit never makes one.
    assert sorted(p.name for p in store.objects.iterdir()) == [f"{n:02x}" for n in range(256)]
    data = _file()
    worker, sink = _ingest(store, data)
    worker.close()
    final = store.object_path(sink.staged.sha256)  # type: ignore[attr-defined]
    assert final.relative_to(store.objects).parts == (final.name[:2], final.name)
    assert stat.S_IMODE(final.stat().st_mode) == 0o400
    # A fan-out directory removed from under the store is made again.
    other = next(
        b"other %d" % n for n in range(1000)
        if hashlib.sha256(b"other %d" % n).hexdigest()[:2] != final.name[:2]
    )
    writer = store.writer(10**6)
    writer.write(other)
    staged = writer.finish(fsync=True)
    store.object_path(staged.sha256).parent.rmdir()
    assert store.commit(staged).read_bytes() == other
    # The same bytes committed twice: one file, the second staged copy removed.
    writer = store.writer(10**6)
    writer.write(other)
    again = writer.finish(fsync=False)
    assert store.commit(again) == store.object_path(staged.sha256)
    assert not again.path.exists() and list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("written", [0, 1, 4095, 100_000, 200_000, 200_001, 700_000])
def test_a_preallocated_file_holds_exactly_what_was_written(tmp_path: Path, written: int) -> None:
    store = FileStore(tmp_path / "store")
    writer = store.writer(10**8)
    writer.preallocate(200_000)
    data = bytes(range(256)) * (written // 256) + b"x" * (written % 256)
    for start in range(0, len(data), 65536):
        writer.write(data[start : start + 65536])
    staged = writer.finish(fsync=False)
    assert staged.path.read_bytes() == data
    assert staged.size == len(data) and staged.sha256 == hashlib.sha256(data).hexdigest()


def test_successive_instances_of_varying_size_on_one_worker(tmp_path: Path) -> None:
    """Each spare file is filled to the previous instance's size; none may keep its zeros."""
    store = FileStore(tmp_path / "store")
    worker = IngestWorker(store, 10**8, fsync=False)
    try:
        for pixels in (300_000, 20_000, 500_000, 500_000, 64, 250_000):
            data = _file(pixels=pixels)
            header_len = data.index(b"DICM") + 4
            meta_end = header_len + 12 + struct.unpack_from("<I", data, header_len + 8)[0]
            sink = worker.open(CT, lambda d=data, m=meta_end: d[:m])
            view = memoryview(bytearray(data[meta_end:]))
            for start in range(0, len(view), 131066):
                sink.write(view[start : start + 131066])
            sink.end()
            assert sink.wait(30)
            assert sink.failure is None, sink.failure
            assert store.object_path(sink.staged.sha256).read_bytes() == data
    finally:
        worker.close()
    assert list(store.tmp.iterdir()) == []


def test_ingest_refuses_a_data_set_of_another_sop_class(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    worker, sink = _ingest(store, _file(), sop_class=MR)
    worker.close()
    assert sink.failure is not None and sink.failure[1] == 0xA900  # type: ignore[attr-defined]
    assert not any(p.is_file() for p in store.objects.rglob("*"))
    assert list(store.tmp.iterdir()) == []


def test_ingest_enforces_the_size_cap_and_keeps_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    worker, sink = _ingest(store, _file(), max_bytes=100_000)
    worker.close()
    assert sink.failure is not None and sink.failure[1] == 0xA700  # type: ignore[attr-defined]
    assert list(store.tmp.iterdir()) == []
    assert not any(p.is_file() for p in store.objects.rglob("*"))


def test_ingest_refuses_a_truncated_data_set(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    worker, sink = _ingest(store, _file()[:-1000])
    worker.close()
    assert sink.failure is not None and sink.failure[1] == 0xC000  # type: ignore[attr-defined]
    assert not any(p.is_file() for p in store.objects.rglob("*"))


def test_closing_the_worker_removes_an_unfinished_data_set(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    worker = IngestWorker(store, 10**8, fsync=False)
    sink = worker.open(CT, lambda: part10_header(CT, "1.2.3", "1.2.840.10008.1.2.1"))
    sink.write(b"\x08\x00" * 1000)
    worker.close()  # the association ended before the last fragment
    assert sink.wait(0)
    assert sink.failure is not None
    assert list(store.tmp.iterdir()) == []


def test_budget_holds_the_poster_back_until_the_worker_catches_up() -> None:
    budget = _Budget(100)
    budget.acquire(80)
    entered, done = threading.Event(), threading.Event()

    def poster() -> None:
        entered.set()
        budget.acquire(50)  # 130 > 100: waits
        done.set()

    t = threading.Thread(target=poster)
    t.start()
    assert entered.wait(5)
    assert not done.is_set()
    budget.release(80)
    assert done.wait(5)
    t.join(5)
    budget.release(50)
    budget.acquire(1000)  # alone, any size passes: a huge PDU never deadlocks
