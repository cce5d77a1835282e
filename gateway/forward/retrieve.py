"""Getting a study back from a destination, for a restore (R-EXT-3).

* DIMSE destinations: C-GET at STUDY level, Study Root (PS3.4 C.4.3), over TLS,
  on one association; the C-STORE sub-operations arrive on it, the gateway
  taking the SCP role for each storage SOP class (PS3.7 D.3.3.4 role selection).
* DICOMweb destinations: WADO-RS ``GET {service}/studies/{study}`` with
  ``Accept: multipart/related; type="application/dicom"; transfer-syntax=*``
  (PS3.18 10.4; ``*`` asks for the stored syntax, never a transcoded one).

Either way each instance's *dataset bytes* go to a temporary file in the
store's ``tmp`` directory, hashed on the way; :mod:`.restore` verifies them.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_role

from gateway.forward.destinations import DestinationSettings
from gateway.forward.integrity import digest_file
from gateway.forward.queue import Job
from pki.errors import TransportError

log = logging.getLogger("sekisho.forward")

STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Retrieved:
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    #: A file holding only the dataset bytes (no preamble, no file meta).
    dataset_path: Path
    dataset_sha256: str


class _Sink:
    """C-STORE sub-operation handler: dataset bytes to a hashed temporary file."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.items: list[Retrieved] = []
        self._lock = threading.Lock()
        self._n = 0

    def __call__(self, event: Any) -> int:
        req = event.request
        with self._lock:
            self._n += 1
            target = self.tmp_dir / f"get-{self._n}.ds"
        h = hashlib.sha256()
        with open(target, "wb") as out:
            chunked = getattr(req, "_dataset_path", None)
            if chunked:  # pynetdicom STORE_RECV_CHUNKED_DATASET: a PS3.10 temp file
                path = Path(chunked[0] if isinstance(chunked, tuple) else chunked)
                _meta, offset = split_dataset(path)
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    while block := fh.read(CHUNK):
                        h.update(block)
                        out.write(block)
            else:
                data = req.DataSet.getvalue()
                h.update(data)
                out.write(data)
        with self._lock:
            self.items.append(Retrieved(
                str(req.AffectedSOPInstanceUID), str(req.AffectedSOPClassUID),
                str(event.context.transfer_syntax), target, h.hexdigest(),
            ))
        return 0x0000


def cget_study(
    dest: DestinationSettings,
    ctx: ssl.SSLContext,
    calling_ae: str,
    study_uid: str,
    expected: Sequence[Job],
    tmp_dir: Path,
) -> list[Retrieved]:
    """C-GET a study over TLS (blocking: run it in a thread)."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = dest.connect_timeout_seconds
    ae.acse_timeout = dest.association_timeout_seconds
    ae.dimse_timeout = dest.response_timeout_seconds
    ae.network_timeout = dest.idle_timeout_seconds
    ae.add_requested_context(STUDY_ROOT_GET)
    # One context per (SOP class, syntax it was sent in), that syntax alone: the
    # destination must give back exactly the encoding it received.
    pairs = sorted({(j.sop_class_uid, j.sent_syntax or j.transfer_syntax) for j in expected})
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, [ts])
    roles: list[Any] = [build_role(c, scp_role=True) for c in sorted({c for c, _ in pairs})]
    sink = _Sink(tmp_dir)
    assoc = ae.associate(
        dest.host, dest.port, ae_title=dest.called_ae, ext_neg=roles,
        tls_args=(ctx, dest.tls_name), evt_handlers=[(evt.EVT_C_STORE, sink)],
    )
    if not assoc.is_established:
        raise TransportError(
            f"could not open a DICOM association with {dest.called_ae}@{dest.address()} "
            "for the restore"
        )
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final: Any = None
        for status, _identifier in assoc.send_c_get(query, STUDY_ROOT_GET):
            if status:
                final = status
        if final is None or "Status" not in final:
            raise TransportError("no C-GET response from the destination (timeout or abort)")
        if int(final.Status) not in (0x0000, 0xB000):
            log.warning("C-GET ended with status 0x%04X", int(final.Status))
    finally:
        if assoc.is_established:
            assoc.release()
    return sink.items


async def wado_study(
    session: aiohttp.ClientSession, dest: DestinationSettings, study_uid: str, tmp_dir: Path
) -> list[Retrieved]:
    """WADO-RS retrieve of a study; each part is a PS3.10 file (PS3.18 8.7.3.5)."""
    import asyncio

    url = f"{dest.url.rstrip('/')}/studies/{study_uid}"
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    loop = asyncio.get_running_loop()
    out: list[Retrieved] = []
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status == 404:
                return []
            if resp.status != 200:
                raise TransportError(f"WADO-RS from {dest.url} answered HTTP {resp.status}")
            reader = aiohttp.MultipartReader.from_response(resp)
            n = 0
            while True:
                part = await reader.next()
                if part is None:
                    break
                n += 1
                whole = tmp_dir / f"wado-{n}.dcm"
                with open(whole, "wb") as fh:
                    while chunk := await part.read_chunk(CHUNK):  # type: ignore[union-attr]
                        fh.write(chunk)
                out.append(await loop.run_in_executor(None, _dataset_of, whole))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransportError(f"WADO-RS from {dest.url} failed: {exc}") from exc
    return out


def _dataset_of(part10: Path) -> Retrieved:
    """Split a PS3.10 file into its dataset bytes (file) and identifying UIDs."""
    meta, offset = split_dataset(part10)
    digest = digest_file(part10)
    target = part10.with_suffix(".ds")
    with open(part10, "rb") as src, open(target, "wb") as dst:
        src.seek(offset)
        while block := src.read(CHUNK):
            dst.write(block)
    part10.unlink()
    return Retrieved(
        str(meta.get("MediaStorageSOPInstanceUID", "")),
        str(meta.get("MediaStorageSOPClassUID", "")),
        str(meta.get("TransferSyntaxUID", "")),
        target,
        digest.dataset_sha256,
    )
