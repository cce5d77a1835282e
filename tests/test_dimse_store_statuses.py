"""C-STORE answers, both ways a request can be served (PS3.4 B.2.3; R-XCH-3/5).

A C-STORE whose command Sekisho decodes itself is answered by the ingest
worker that stored its data set (``StorageScp.answer``); one that pynetdicom
must see whole (here forced by binding an EVT_DIMSE_SENT handler on the
listener) goes through pynetdicom's Storage service class to
``StorageScp.handle``.  A pynetdicom SCU over TLS, with the development
partner certificates, sends the same cases both ways; the statuses and what
the store holds afterwards must be the same, and each way must really be the
one taken (the handler's calls are counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config, evt

from gateway.dimse.scp import DimseService
from gateway.service import Gateway
from gateway.settings import load_settings
from pki.tls import TlsEndpointSettings, client_context
from tests.dimse_support import dataset_sha256, sop_uid_of
from tests.gateway_helpers import (
    Instance,
    build_dataset,
    create_instance,
    dataset_bytes,
    sha256,
    truncate_in_pixel_data,
)

pytestmark = pytest.mark.peer

MAX_INSTANCE = 200_000
SUCCESS, NOT_AUTHORIZED, DUPLICATE_DIFFERENT = 0x0000, 0x0124, 0x0111
OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC000


@dataclass
class Served:
    inst: Instance
    gw: Gateway
    service: DimseService
    port: int
    #: Calls of StorageScp.handle (pynetdicom's way).
    handled: list[int]
    work: Path


def _serve(work: Path, *, pynetdicom_way: bool) -> Iterator[Served]:
    inst = create_instance(work / "gw", {"dimse": {"max_instance_bytes": MAX_INSTANCE}})
    for name, role, ae, perms in (
        ("partner-a", "partner-valid-1", "PARTNER_A", ("push", "query")),
        ("partner-b", "partner-valid-2", "PARTNER_B", ("query",)),
    ):
        inst.cli_ok("partner", "remove", name)
        args = ["partner", "add", name, "--certificate", str(inst.pki.cert_path(role)),
                "--ae-title", ae, "--network", "regional"]
        for perm in perms:
            args += ["--permission", perm]
        inst.cli_ok(*args)
    gw = Gateway.open(load_settings(inst.config))
    service = DimseService(gw)
    handled: list[int] = []
    handle = service.storage.handle

    def counting(event: object) -> int:
        status = handle(event)
        handled.append(status)
        return status

    service.storage.handle = counting  # type: ignore[method-assign]
    _, port = service.start()
    if pynetdicom_way:
        # A handler expecting pynetdicom's message objects: the worker may not answer.
        service.server.bind(evt.EVT_DIMSE_SENT, lambda event: None)  # type: ignore[union-attr]
    try:
        yield Served(inst, gw, service, port, handled, work)
    finally:
        service.stop()
        gw.close()


@pytest.fixture(scope="module", params=["worker-answers", "pynetdicom-answers"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp(request.param),
                      pynetdicom_way=request.param == "pynetdicom-answers")


def _store(s: Served, data: bytes, *, role: str = "partner-valid-1",
           calling: str = "PARTNER_A") -> int:
    """Send one Part 10 file by C-STORE over TLS; the response status."""
    pki = s.inst.pki
    tls = client_context(TlsEndpointSettings(
        certificate=pki.cert_path(role), private_key=pki.key_path(role),
        trust_anchors=(pki.cert_path("root-ca"),),
    ), check_hostname=False)
    path = s.work / f"send-{generate_uid()}.dcm"
    path.write_bytes(data)
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", s.port, ae_title="SEKISHO", tls_args=(tls, None))
    assert assoc.is_established
    # The file's bytes after its meta, sent as they are (not decoded and re-encoded);
    # the request's SOP Class and Instance UIDs are the file meta's.
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
        assert status, "no C-STORE response"
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def _instance(**kw: object) -> pydicom.Dataset:
    values: dict[str, object] = {
        "patient_id": "P-STATUS", "patient_name": "STATUS^TEST", "study_uid": generate_uid(),
        "series_uid": generate_uid(), "rows": 64, "columns": 64,
    }
    values.update(kw)
    return build_dataset(**values)  # type: ignore[arg-type]


def _expect_handled(s: Served, before: int, n: int) -> None:
    """pynetdicom's way calls the handler once per request; the worker's way never."""
    pynetdicom_way = s.service.server is not None and bool(
        s.service.server.get_handlers(evt.EVT_DIMSE_SENT))
    assert len(s.handled) - before == (n if pynetdicom_way else 0)


def test_a_stored_instance_is_the_bytes_sent(served: Served) -> None:
    before = len(served.handled)
    data = dataset_bytes(_instance())
    assert _store(served, data) == SUCCESS
    digest = served.inst.indexed_instances()[sop_uid_of(data)]
    stored = served.inst.object_files()[digest].read_bytes()
    assert sha256(stored) == digest
    # The data set exactly as sent, after Sekisho's own File Meta Information.
    assert dataset_sha256(stored) == dataset_sha256(data)
    _expect_handled(served, before, 1)


def test_the_same_instance_again_is_success_and_one_copy(served: Served) -> None:
    data = dataset_bytes(_instance())
    before = len(served.handled)
    assert _store(served, data) == SUCCESS
    files = len(served.inst.object_files())
    assert _store(served, data) == SUCCESS
    assert len(served.inst.object_files()) == files
    _expect_handled(served, before, 2)


def test_other_content_under_a_stored_uid_is_refused(served: Served) -> None:
    ds = _instance()
    original = dataset_bytes(ds)
    assert _store(served, original) == SUCCESS
    ds.StudyDescription = "changed"
    before = len(served.handled)
    assert _store(served, dataset_bytes(ds)) == DUPLICATE_DIFFERENT
    digest = served.inst.indexed_instances()[str(ds.SOPInstanceUID)]
    assert dataset_sha256(served.inst.object_files()[digest].read_bytes()) == dataset_sha256(
        original)
    _expect_handled(served, before, 1)


def _refused_and_nothing_kept(s: Served, data: bytes, status: int) -> None:
    objects, indexed = set(s.inst.object_files()), s.inst.indexed_instances()
    before = len(s.handled)
    assert _store(s, data) == status
    assert set(s.inst.object_files()) == objects
    assert s.inst.indexed_instances() == indexed
    assert list(s.inst.store_tmp.iterdir()) == [] or all(
        p.name.startswith("in-") and p.stat().st_size <= MAX_INSTANCE
        for p in s.inst.store_tmp.iterdir()  # at most the worker's spare for the next one
    )
    _expect_handled(s, before, 1)


def test_a_data_set_of_another_sop_class_than_requested_is_refused(served: Served) -> None:
    data = dataset_bytes(_instance(modality="MR"))  # the data set says MR Image Storage
    # The file meta, from which the request's SOP Class is taken, says CT (same length).
    mr, ct = MRImageStorage.encode(), CTImageStorage.encode()
    assert len(mr) == len(ct) and data.index(mr) < data.index(b"\x08\x00\x16\x00")
    _refused_and_nothing_kept(served, data.replace(mr, ct, 1), DOES_NOT_MATCH)


def test_an_instance_over_the_size_limit_is_refused(served: Served) -> None:
    _refused_and_nothing_kept(served, dataset_bytes(_instance(rows=400, columns=400)),
                              OUT_OF_RESOURCES)


def test_a_truncated_data_set_is_refused(served: Served) -> None:
    _refused_and_nothing_kept(served, truncate_in_pixel_data(dataset_bytes(_instance())),
                              CANNOT_UNDERSTAND)


def test_a_partner_without_push_permission_is_refused(served: Served) -> None:
    """Its data set is read and discarded; pynetdicom's way in both cases."""
    objects = set(served.inst.object_files())
    before = len(served.handled)
    status = _store(served, dataset_bytes(_instance()), role="partner-valid-2",
                    calling="PARTNER_B")
    assert status == NOT_AUTHORIZED
    assert set(served.inst.object_files()) == objects
    assert len(served.handled) - before == 1
