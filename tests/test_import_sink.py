"""The gateway sink: durable before visible, batched (R-PDI-7, R-XCH-5).

``GatewaySink.store`` takes the importer's file over and starts its data sync
in the background; only :meth:`flush` moves files to their content address
(after their data and then their directories are synced) and commits the
metadata.  A failed sync must leave neither a visible file nor a metadata row.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from media_factory import YAMADA_IR87, SeriesSpec, StudySpec, make_instance
from pydicom import dcmwrite

import gateway.imports.sink as sink_module
from gateway.imports.records import ImportRecords, RecordHeader
from gateway.imports.sink import GatewaySink
from gateway.service import Gateway
from gateway.settings import load_settings
from media.dicomfile import parse_file
from media.import_result import InstanceMeta
from media.reconcile import LocalPatient, Operator
from media.rewrite import Reconciliation, rewrite_instance
from media.selection import PlannedFile
from media.settings import StationInfo
from media.splice import MemorySource
from pki.errors import StoreError

LOCAL = LocalPatient("H0001", "SEKISHO")


@pytest.fixture
def gateway(instance_factory) -> Iterator[Gateway]:  # noqa: ANN001
    inst = instance_factory(name="sink")
    gw = Gateway.open(load_settings(inst.config))
    try:
        yield gw
    finally:
        gw.close()


def written_instances(gw: Gateway, count: int) -> list[tuple[Path, InstanceMeta]]:
    """Reconciled files in the store's ``tmp``, as the importer hands them over."""
    study = StudySpec(YAMADA_IR87, [SeriesSpec("CT", count)])
    job = Reconciliation(
        LOCAL, Operator("u1", "A^B"), StationInfo(), datetime(2024, 1, 1, tzinfo=UTC), None,
        True, gw.files.tmp,
    )  # fmt: skip
    out = []
    for n in range(1, count + 1):
        buffer = io.BytesIO()
        dcmwrite(buffer, make_instance(study, study.series[0], 1, n), enforce_file_format=True)
        data = buffer.getvalue()
        h = parse_file(io.BytesIO(data), len(data))
        planned = PlannedFile(
            f"IM{n}", h.sop_instance_uid, h.sop_class_uid, h.study_instance_uid,
            h.series_instance_uid, "1", len(data), None,
        )  # fmt: skip
        written = rewrite_instance(MemorySource(data), planned, job)
        meta = InstanceMeta(
            h.sop_instance_uid, h.sop_class_uid, h.study_instance_uid, h.series_instance_uid,
            written.transfer_syntax_uid, LOCAL.patient_id, LOCAL.issuer_of_patient_id,
            planned.path, "0" * 64, written.sha256, written.size,
        )  # fmt: skip
        out.append((written.path, meta))
    return out


def new_sink(gw: Gateway, batch_size: int = 64) -> GatewaySink:
    records = ImportRecords(gw.settings.store.database)
    header = RecordHeader("u1", "A^B", "ST", "CD", "L", "", LOCAL.patient_id, "SEKISHO")
    return GatewaySink(gw, records, records.begin(header), batch_size=batch_size)


def test_files_become_visible_only_at_flush(gateway: Gateway) -> None:
    gw = gateway
    assert gw.settings.store.fsync
    sink = new_sink(gw)
    files = written_instances(gw, 3)
    for path, meta in files:
        assert sink.store(path, meta) == meta.sha256
        assert not path.exists(), "the sink takes the file over"
        assert not gw.files.object_path(meta.sha256).exists()
        assert gw.store.find_instance(meta.sop_instance_uid) is None
    assert sink.stored_count == 3
    sink.flush()
    for _path, meta in files:
        assert gw.files.verify(meta.sha256)
        stored = gw.store.find_instance(meta.sop_instance_uid)
        assert stored is not None and stored.sha256 == meta.sha256
    assert list(gw.files.tmp.iterdir()) == []


def test_batches_are_flushed_as_they_fill(gateway: Gateway) -> None:
    gw = gateway
    sink = new_sink(gw, batch_size=2)
    files = written_instances(gw, 3)
    for path, meta in files:
        sink.store(path, meta)
    assert [gw.store.find_instance(m.sop_instance_uid) is not None for _p, m in files] == [
        True,
        True,
        False,
    ]
    sink.flush()
    assert gw.store.find_instance(files[2][1].sop_instance_uid) is not None


def test_failed_data_sync_leaves_nothing_visible(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = gateway

    def broken(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sink_module, "_fdatasync", broken)
    sink = new_sink(gw)
    files = written_instances(gw, 2)
    for path, meta in files:
        sink.store(path, meta)
    with pytest.raises(StoreError, match="Input/output error"):
        sink.flush()
    for _path, meta in files:
        assert not gw.files.object_path(meta.sha256).exists()
        assert gw.store.find_instance(meta.sop_instance_uid) is None
    assert sink.stored_count == 0
    assert list(gw.files.tmp.iterdir()) == []
