"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]``.

The multipart/related body is streamed part by part to the content store's
temporary directory, hashed on the way (STYLE lesson 8); each part is then
validated as a PS3.10 file, moved to its content address and indexed.  The
metadata of the whole request is committed in one durable transaction before
the response is sent: an instance listed in ReferencedSOPSequence is on disk
and indexed.  Failures are reported per instance in FailedSOPSequence with the
PS3.18 Table 10.5.3-1 / PS3.4 failure reasons.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from aiohttp.helpers import parse_mimetype

from gateway.audit import events as ev
from gateway.dicomweb.common import require
from gateway.dicomweb.dicomjson import JsonDataset, attr
from gateway.dicomweb.multipart import MultipartError, MultipartReader
from gateway.peers import Principal
from gateway.service import Gateway
from gateway.store.files import HashingWriter, StagedFile
from gateway.store.index import PREFIX_BYTES, InstanceIndex, PrefixIndex, index_instance
from gateway.store.model import AddResult
from pki.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

log = logging.getLogger("sekisho.stow")
T = TypeVar("T")

#: Failure reasons (PS3.18 Table 10.5.3-1 and PS3.4 Annex B).
PROCESSING_FAILURE = 0x0110
DUPLICATE_DIFFERENT = 0x0111
OUT_OF_RESOURCES = 0xA700
STUDY_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
TS_NOT_SUPPORTED = 0xC122


@dataclass
class PartOutcome:
    index: InstanceIndex | None
    staged: StagedFile | None
    failure: int | None = None
    message: str = ""


def _check_content_type(request: web.Request) -> str:
    """Check the request's media type; returns the multipart boundary."""
    mt = parse_mimetype(request.headers.get("Content-Type", ""))
    if (mt.type, mt.subtype) != ("multipart", "related"):
        raise UnsupportedMediaTypeError(
            'STOW-RS needs Content-Type multipart/related; type="application/dicom"'
        )
    part_type = mt.parameters.get("type", "application/dicom").strip('"').lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaTypeError(
            f"this gateway accepts only application/dicom parts, not {part_type!r}"
        )
    if "boundary" not in mt.parameters:
        raise InvalidInputError("multipart/related body without a boundary parameter")
    return str(mt.parameters["boundary"]).strip('"')


#: Parts smaller than this are held in memory until they are complete and then
#: written, synced and validated in ONE worker-thread call; larger parts are
#: written in slices of this size as they arrive (memory stays bounded).
BUFFER = 4 * 1024 * 1024
#: Parts of one request being synced and validated while the next is read.
IN_FLIGHT = 8


@dataclass
class _Receiving:
    """A part being read: what is buffered and, for large parts, the open file."""

    chunks: list[bytes]
    buffered: int = 0
    writer: HashingWriter | None = None
    #: The part's first PREFIX_BYTES, parsed for the index without reading the file back.
    prefix: bytes = b""


def _flush(gw: Gateway, rx: _Receiving) -> None:
    if rx.writer is None:
        rx.writer = gw.files.writer(gw.settings.https.max_instance_bytes)
    for chunk in rx.chunks:
        rx.writer.write(chunk)
    rx.chunks, rx.buffered = [], 0


def _finish_part(gw: Gateway, rx: _Receiving, study_in_path: str | None) -> PartOutcome:
    """Worker thread: write the rest, fdatasync, validate, check for conflicts."""
    try:
        _flush(gw, rx)
        assert rx.writer is not None
        staged = rx.writer.finish(gw.settings.store.fsync)
    except BaseException:
        if rx.writer is not None:
            rx.writer.abort()
        raise
    try:
        idx = PrefixIndex(rx.prefix).result(staged.size) or index_instance(staged.path)
    except InvalidInputError as exc:
        staged.path.unlink(missing_ok=True)
        return PartOutcome(None, None, CANNOT_UNDERSTAND, exc.message)
    if study_in_path and idx.study_uid != study_in_path:
        staged.path.unlink(missing_ok=True)
        return PartOutcome(idx, None, STUDY_MISMATCH, "Study Instance UID does not match the URL")
    existing = gw.store.find_instance(idx.sop_instance_uid)
    if existing is not None and existing.sha256 != staged.sha256:
        staged.path.unlink(missing_ok=True)
        return PartOutcome(
            idx,
            None,
            DUPLICATE_DIFFERENT,
            "an instance with this SOP Instance UID and different content is stored",
        )
    return PartOutcome(idx, staged)


async def _malformed_is_invalid(step: Awaitable[T]) -> T:
    """Await a step of the multipart reader; a grammar error is invalid input (400)."""
    try:
        return await step
    except MultipartError as exc:
        raise InvalidInputError(f"malformed multipart body: {exc}") from exc


async def _read_part(
    gw: Gateway, reader: MultipartReader, headers: dict[str, str], budget: list[int]
) -> _Receiving | PartOutcome:
    ptype = parse_mimetype(headers.get("content-type", "application/dicom"))
    if (ptype.type, ptype.subtype) != ("application", "dicom"):
        return PartOutcome(None, None, CANNOT_UNDERSTAND, "part is not application/dicom")
    rx = _Receiving([])
    limit = gw.settings.https.max_instance_bytes
    total = 0
    try:
        while True:
            chunk = await _malformed_is_invalid(reader.read_chunk())
            if not chunk:
                break
            budget[0] -= len(chunk)
            total += len(chunk)
            if budget[0] < 0:
                cap = gw.settings.https.max_body_bytes
                raise PayloadTooLargeError(f"request body larger than the limit of {cap} bytes")
            if total > limit:
                raise PayloadTooLargeError(
                    f"instance larger than the configured limit of {limit} bytes"
                )
            if len(rx.prefix) < PREFIX_BYTES:
                rx.prefix += chunk[: PREFIX_BYTES - len(rx.prefix)]
            rx.chunks.append(chunk)
            rx.buffered += len(chunk)
            if rx.buffered >= BUFFER:
                await gw.run(_flush, gw, rx)
    except BaseException:
        if rx.writer is not None:
            await gw.run(rx.writer.abort)
        raise
    return rx


def _commit_all(gw: Gateway, staged: list[StagedFile]) -> None:
    """Worker thread: move files to their content addresses, then sync the directories."""
    paths = [gw.files.commit(s, sync_dir=False) for s in staged]
    gw.files.sync_dirs(paths)


async def stow(request: web.Request) -> web.Response:
    gw: Gateway = request.app["gateway"]
    principal: Principal = request["principal"]
    study_in_path = request.match_info.get("study")
    await require(request, principal, "push")
    boundary = _check_content_type(request)
    length = request.content_length
    if length is not None and length > gw.settings.https.max_body_bytes:
        raise PayloadTooLargeError(
            f"request body of {length} bytes is larger than the limit of "
            f"{gw.settings.https.max_body_bytes} bytes"
        )
    budget = [gw.settings.https.max_body_bytes]
    # Part N is synced and validated in a worker thread while part N+1 is read.
    pending: list[asyncio.Future[PartOutcome]] = []
    try:
        reader = MultipartReader(request.content.readany, boundary)
        while (headers := await _malformed_is_invalid(reader.next_part())) is not None:
            got = await _read_part(gw, reader, headers, budget)
            if isinstance(got, PartOutcome):
                fut: asyncio.Future[PartOutcome] = asyncio.get_running_loop().create_future()
                fut.set_result(got)
                pending.append(fut)
                continue
            pending.append(asyncio.ensure_future(gw.run(_finish_part, gw, got, study_in_path)))
            in_flight = [f for f in pending if not f.done()]
            if len(in_flight) >= IN_FLIGHT:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        outcomes = list(await asyncio.gather(*pending))
    except BaseException:
        # Nothing of a failed request is kept: staged files are only temporary.
        done = await asyncio.gather(*pending, return_exceptions=True)
        for o in done:
            if isinstance(o, PartOutcome) and o.staged is not None:
                o.staged.path.unlink(missing_ok=True)
        raise
    if not outcomes:
        raise InvalidInputError("the multipart body contains no parts")

    good = [o for o in outcomes if o.failure is None and o.staged is not None]
    staged_files = [o.staged for o in good if o.staged is not None]
    if staged_files:
        # Renames and directory syncs in a few parallel batches.
        batches = [staged_files[i : i + 8] for i in range(0, len(staged_files), 8)]
        await asyncio.gather(*(gw.run(_commit_all, gw, b) for b in batches))
    to_add = [(o.index, o.staged.sha256, o.staged.size) for o in good]  # type: ignore[union-attr]
    results = await gw.run(gw.store.add_instances, to_add, principal.name) if to_add else []
    for o, result in zip(good, results, strict=True):
        if result == AddResult.CONFLICT:
            o.failure = DUPLICATE_DIFFERENT
            o.message = "an instance with this SOP Instance UID and different content is stored"
            # The refused bytes were already moved to their content address; no
            # row can ever reference them (identical bytes carry the same SOP
            # Instance UID, whose row points at other content), so drop them.
            assert o.staged is not None
            await gw.run(gw.files.object_path(o.staged.sha256).unlink, missing_ok=True)

    base = request.app["base_url"]
    referenced: list[JsonDataset] = []
    failed: list[JsonDataset] = []
    per_patient: dict[tuple[str, str], set[str]] = defaultdict(set)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    nbytes = 0
    for o in outcomes:
        idx = o.index
        if o.failure is None and idx is not None and o.staged is not None:
            url = (
                f"{base}/studies/{idx.study_uid}/series/{idx.series_uid}"
                f"/instances/{idx.sop_instance_uid}"
            )
            referenced.append(
                {
                    "00081150": attr("UI", idx.sop_class_uid),
                    "00081155": attr("UI", idx.sop_instance_uid),
                    "00081190": attr("UR", url),
                }
            )
            key = (idx.patient_id, idx.issuer)
            per_patient[key].add(idx.study_uid)
            counts[key] += 1
            nbytes += o.staged.size
        else:
            item: JsonDataset = {"00081197": attr("US", o.failure or PROCESSING_FAILURE)}
            if idx is not None:
                item["00081150"] = attr("UI", idx.sop_class_uid)
                item["00081155"] = attr("UI", idx.sop_instance_uid)
            failed.append(item)
            log.info("STOW part refused: %s", o.message)
    gw.metrics.inc("sekisho_stow_instances_total", len(referenced), outcome="stored")
    gw.metrics.inc("sekisho_stow_instances_total", len(failed), outcome="failed")
    gw.metrics.inc("sekisho_stow_bytes_total", nbytes)
    for (pid, issuer), studies in per_patient.items():
        await gw.record(
            ev.instances_transferred(
                actor=principal.name,
                actor_kind=principal.kind,  # type: ignore[arg-type]
                patient_id=pid,
                patient_issuer=issuer or None,
                study_uids=sorted(studies),
                instance_count=counts[(pid, issuer)],
                source_address=principal.address,
                destination=gw.settings.instance.ae_title,
                description="instances received by STOW-RS",
                extra={"cert_sha256": principal.cert_sha256},
            )
        )
    if failed:
        await gw.record(
            ev.instances_transferred(
                actor=principal.name,
                actor_kind=principal.kind,  # type: ignore[arg-type]
                patient_id=None,
                study_uids=[],
                instance_count=len(failed),
                outcome=ev.Outcome.MINOR_FAILURE,
                source_address=principal.address,
                description="; ".join(sorted({o.message for o in outcomes if o.failure}))[:500],
            )
        )
    body: JsonDataset = {}
    if study_in_path:
        body["00081190"] = attr("UR", f"{base}/studies/{study_in_path}")
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    # PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored.
    status = 200 if not failed else (202 if referenced else 409)
    return web.json_response(body, status=status, content_type="application/dicom+json")
