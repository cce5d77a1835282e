"""Shared helpers for the forwarding tests: test data, configuration, and real peers.

Peers started here: DCMTK ``storescp +tls`` (by absolute path, a pip package shadows
it on PATH), Orthanc with DICOM TLS (and its DICOMweb behind an nginx mutual-TLS
front), and a Storage Commitment SCP written with pynetdicom.  Everything binds to
loopback on free ports and is stopped by the context managers.

The module holds no tests of its own beyond a check that the data factory makes
valid PS3.10 files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from gateway.service import Gateway
from gateway.settings import load_settings
from gateway.store.index import index_instance
from pki import devpki

STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


# --- test data -----------------------------------------------------------------------


@dataclass
class Study:
    study_uid: str
    patient_id: str
    files: list[bytes] = field(default_factory=list)


def make_instance(
    study_uid: str, series_uid: str, number: int, *, patient_id: str = "P-001",
    syntax: str = ExplicitVRLittleEndian, size: int = 64,
) -> bytes:
    """A small CT image as PS3.10 bytes, written by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = "Yamada^Taro=山田^太郎"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyDate = "20240401"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "A1"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(number)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian,
               little_endian=True)
    return buf.getvalue()


def make_study(
    n_series: int = 2, per_series: int = 3, *, patient_id: str = "P-001",
    syntax: str = ExplicitVRLittleEndian, size: int = 64,
) -> Study:
    study = Study(generate_uid(), patient_id)
    for s in range(n_series):
        series = generate_uid()
        for i in range(per_series):
            study.files.append(make_instance(study.study_uid, series, s * 100 + i + 1,
                                             patient_id=patient_id, syntax=syntax, size=size))
    return study


def ingest(gw: Gateway, data: bytes, source: str = "test") -> str:
    """Store bytes through the production writer, indexer and metadata store."""
    writer = gw.files.writer(len(data) + 1)
    writer.write(data)
    staged = writer.finish(False)
    idx = index_instance(staged.path)
    gw.files.commit(staged)
    gw.store.add_instances([(idx, staged.sha256, staged.size)], source)
    return staged.sha256


def dataset_bytes(data: bytes) -> bytes:
    """The dataset part of a PS3.10 file (after the File Meta Information)."""
    buf = io.BytesIO(data)
    pydicom.filereader.read_preamble(buf, False)
    pydicom.filereader.read_dataset(
        buf, is_implicit_VR=False, is_little_endian=True,
        stop_when=lambda tag, vr, length: tag.group != 2,
    )
    return data[buf.tell():]


def dataset_sha(data: bytes) -> str:
    return hashlib.sha256(dataset_bytes(data)).hexdigest()


def sop_uid_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


# --- PKI and configuration --------------------------------------------------------------


def ca_bundle(pki: devpki.DevPki, out: Path) -> Path:
    """Root and issuing CA in one PEM file (what DCMTK and Orthanc trust)."""
    out.write_bytes(pki.cert_path("root-ca").read_bytes()
                    + pki.cert_path("intermediate-ca").read_bytes())
    return out


def tls_table(pki: devpki.DevPki, role: str = "gateway-server") -> str:
    return (
        f'certificate = "{pki.cert_path(role)}"\n'
        f'private_key = "{pki.key_path(role)}"\n'
        f'trust_anchors = ["{pki.cert_path("root-ca")}"]\n'
        f'intermediates = ["{pki.cert_path("intermediate-ca")}"]\n'
    )


def write_config(
    directory: Path, pki: devpki.DevPki, destinations: str = "", extra: str = "",
    *, https_port: int = 0,
) -> Path:
    """A minimal instance configuration with the given ``[destinations.*]`` tables."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sekisho.toml"
    config.write_text(
        f'[instance]\nname = "sekisho-test"\nae_title = "SEKISHO"\n\n'
        f"[https]\nport = {https_port or free_port()}\n\n"
        f"[tls]\n{tls_table(pki)}\n"
        f'[store]\ndatabase = "{directory / "var/sekisho.sqlite"}"\n'
        f'files = "{directory / "var/store"}"\nfsync = false\n\n'
        f"[forward]\nlease_seconds = 5\npoll_interval_seconds = 0.2\n\n"
        f"{extra}\n{destinations}\n"
    )
    return config


def dimse_destination(
    name: str, pki: devpki.DevPki, port: int, *, called_ae: str = "DEST",
    commitment: bool = False, retry: str = "", extra: str = "",
) -> str:
    body = (
        f'[destinations.{name}]\nrole = "pacs"\ntransport = "dimse"\nhost = "127.0.0.1"\n'
        f'port = {port}\ncalled_ae = "{called_ae}"\nstorage_commitment = '
        f'{"true" if commitment else "false"}\nconnect_timeout_seconds = 3\n'
        f"response_timeout_seconds = 10\n{extra}\n"
        f"[destinations.{name}.tls]\n{tls_table(pki)}\n"
    )
    if retry:
        body += f"[destinations.{name}.retry]\n{retry}\n"
    return body


def tls_dict(pki: devpki.DevPki, role: str = "gateway-server") -> dict[str, Any]:
    return {
        "certificate": str(pki.cert_path(role)),
        "private_key": str(pki.key_path(role)),
        "trust_anchors": [str(pki.cert_path("root-ca"))],
        "intermediates": [str(pki.cert_path("intermediate-ca"))],
    }


def dimse_destination_dict(
    pki: devpki.DevPki, port: int, *, called_ae: str = "DEST", **extra: Any
) -> dict[str, Any]:
    """A ``[destinations.NAME]`` table as a dict (for ``Instance.update_config``)."""
    retry = extra.pop("retry", {"backoff_base_seconds": 0.5, "backoff_max_seconds": 2.0})
    return {
        "role": "pacs", "transport": "dimse", "host": "127.0.0.1", "port": port,
        "called_ae": called_ae, "connect_timeout_seconds": 3, "response_timeout_seconds": 10,
        **extra, "tls": tls_dict(pki), "retry": retry,
    }


def open_gateway(config: Path) -> Gateway:
    return Gateway.open(load_settings(config))


# --- DCMTK storescp +tls -----------------------------------------------------------------


@contextlib.contextmanager
def storescp(
    pki: devpki.DevPki, out_dir: Path, *, port: int | None = None, ae: str = "DEST",
    extra: tuple[str, ...] = (),
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``storescp +tls KEY CERT +cf CA -rc +B`` writing received files bit-preserved."""
    port = port or free_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = ca_bundle(pki, out_dir.parent / f"ca-{port}.pem")
    cmd = [
        STORESCP, "+tls", str(pki.key_path("gateway-server")),
        str(pki.cert_path("gateway-server")), "+cf", str(bundle), "-rc",
        "+B", "-od", str(out_dir), "-aet", ae, "--socket-timeout", "20", *extra, str(port),
    ]
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def received_datasets(out_dir: Path) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the dataset bytes of each file storescp wrote."""
    out: dict[str, str] = {}
    for path in out_dir.iterdir():
        if not path.is_file():
            continue
        data = path.read_bytes()
        out[sop_uid_of(data)] = dataset_sha(data)
    return out


# --- a Storage Commitment Push Model SCP (pynetdicom) -------------------------------------


class CommitmentScp:
    """A Storage SCP that also answers Storage Commitment (PS3.4 J.3), over TLS.

    ``mode``: ``"same"`` reports on the requesting association; ``"separate"``
    opens a new association to ``report_to`` (host, port, AE) for the report.
    ``fail`` lists SOP Instance UIDs to report as failed (0x0112 no such object).
    """

    def __init__(self, pki: devpki.DevPki, *, mode: str = "same", ae: str = "ARCHIVE",
                 report_to: tuple[str, int, str] | None = None,
                 report_role: str = "storage-provider") -> None:
        from pki.tls import TlsEndpointSettings, client_context, server_context

        self.pki = pki
        self.mode = mode
        self.report_to = report_to
        self.fail: set[str] = set()
        self.stored: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.report_status: Any = None
        #: Cleared by a test to hold separate-association reports back until it is set.
        self.hold = threading.Event()
        self.hold.set()
        self.port = free_port()
        server = TlsEndpointSettings(
            pki.cert_path("gateway-server"), pki.key_path("gateway-server"),
            (pki.cert_path("root-ca"),), (pki.cert_path("intermediate-ca"),),
        )
        self._server_ctx = server_context(server)
        client = TlsEndpointSettings(
            pki.cert_path(report_role), pki.key_path(report_role),
            (pki.cert_path("root-ca"),), (pki.cert_path("intermediate-ca"),),
        )
        self._client_ctx = client_context(client)
        self.ae = AE(ae_title=ae)
        from pynetdicom import AllStoragePresentationContexts
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian,
                                                               ImplicitVRLittleEndian])
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self._server: Any = None
        self._threads: list[threading.Thread] = []

    def _on_store(self, event: Any) -> int:
        ds_bytes = event.request.DataSet.getvalue() if event.request.DataSet else b""
        self.stored[str(event.request.AffectedSOPInstanceUID)] = ds_bytes
        return 0x0000

    def _on_action(self, event: Any) -> tuple[int, Dataset | None]:
        info = event.action_information
        tx = str(info.TransactionUID)
        self.requests.append(tx)
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in info.ReferencedSOPSequence]
        event_type, report = self._report(tx, refs)
        if self.mode == "same":
            assoc = event.assoc

            def later() -> None:
                time.sleep(0.1)
                self.report_status, _ = assoc.send_n_event_report(
                    report, event_type, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
            t = threading.Thread(target=later, daemon=True)
        else:
            t = threading.Thread(target=self._report_separately, args=(event_type, report),
                                 daemon=True)
        self._threads.append(t)
        t.start()
        return 0x0000, None

    def _report(self, tx: str, refs: list[tuple[str, str]]) -> tuple[int, Dataset]:
        ds = Dataset()
        ds.TransactionUID = tx
        ok, bad = [], []
        for cls, uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            if uid in self.fail or uid not in self.stored:
                item.FailureReason = 0x0112
                bad.append(item)
            else:
                ok.append(item)
        if ok:
            ds.ReferencedSOPSequence = ok
        if bad:
            ds.FailedSOPSequence = bad
        return (2 if bad else 1), ds

    def _report_separately(self, event_type: int, report: Dataset) -> None:
        assert self.report_to is not None
        host, port, ae_title = self.report_to
        time.sleep(0.2)
        self.hold.wait(60)
        ae = AE(ae_title=self.ae.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = StorageCommitmentPushModel
        role.scu_role = False
        role.scp_role = True
        assoc = ae.associate(host, port, ae_title=ae_title, ext_neg=[role],
                             tls_args=(self._client_ctx, "localhost"))
        if assoc.is_established:
            self.report_status, _ = assoc.send_n_event_report(
                report, event_type, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
            assoc.release()
        else:
            self.report_status = None

    def __enter__(self) -> CommitmentScp:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)]
        self._server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                            ssl_context=self._server_ctx, evt_handlers=handlers)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hold.set()
        for t in self._threads:
            t.join(5)
        self._server.shutdown()


@contextlib.contextmanager
def commitment_listener(gw: Gateway, port: int | None = None) -> Iterator[int]:
    """A stand-in for the gateway's DIMSE listener: TLS, Storage Commitment only,
    N-EVENT-REPORT handled by ``gateway.forward.commitment.handle_n_event_report``."""
    from gateway.forward.commitment import handle_n_event_report
    from pki.tls import server_context

    ae = AE(ae_title=gw.settings.instance.ae_title)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = port or free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, ssl_context=server_context(gw.settings.tls),
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda e: handle_n_event_report(gw, e))],
    )
    try:
        yield port
    finally:
        server.shutdown()


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def have(tool: str) -> bool:
    return Path(tool).exists() or shutil.which(tool) is not None


def test_factory_makes_valid_part10_files() -> None:
    study = make_study(1, 2, syntax=RLELossless)
    for data in study.files:
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        assert dataset_bytes(data)
