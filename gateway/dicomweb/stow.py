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

import logging
from collections import defaultdict
from dataclasses import dataclass

from aiohttp import BodyPartReader, web
from aiohttp.helpers import parse_mimetype

from gateway.audit import events as ev
from gateway.dicomweb.common import require
from gateway.dicomweb.dicomjson import JsonDataset, attr
from gateway.peers import Principal
from gateway.service import Gateway
from gateway.store.files import StagedFile
from gateway.store.index import InstanceIndex, index_instance
from gateway.store.model import AddResult
from pki.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

log = logging.getLogger("sekisho.stow")

CHUNK = 1024 * 1024

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


def _check_content_type(request: web.Request) -> None:
    mt = parse_mimetype(request.headers.get("Content-Type", ""))
    if (mt.type, mt.subtype) != ("multipart", "related"):
        raise UnsupportedMediaTypeError(
            "STOW-RS needs Content-Type multipart/related; type=\"application/dicom\""
        )
    part_type = mt.parameters.get("type", "application/dicom").strip('"').lower()
    if part_type != "application/dicom":
        raise UnsupportedMediaTypeError(
            f"this gateway accepts only application/dicom parts, not {part_type!r}"
        )
    if "boundary" not in mt.parameters:
        raise InvalidInputError("multipart/related body without a boundary parameter")


async def _receive_part(gw: Gateway, part: BodyPartReader, budget: list[int]) -> PartOutcome:
    ptype = parse_mimetype(part.headers.get("Content-Type", "application/dicom"))
    if (ptype.type, ptype.subtype) != ("application", "dicom"):
        await part.release()
        return PartOutcome(None, None, CANNOT_UNDERSTAND, "part is not application/dicom")
    writer = await gw.run(gw.files.writer, gw.settings.https.max_instance_bytes)
    try:
        while True:
            chunk = await part.read_chunk(CHUNK)
            if not chunk:
                break
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise PayloadTooLargeError(
                    f"request body larger than the limit of {gw.settings.https.max_body_bytes} bytes"
                )
            await gw.run(writer.write, chunk)
        staged = await gw.run(writer.finish, gw.settings.store.fsync)
    except BaseException:
        await gw.run(writer.abort)
        raise
    try:
        idx = await gw.run(index_instance, staged.path)
    except InvalidInputError as exc:
        staged.path.unlink(missing_ok=True)
        return PartOutcome(None, None, CANNOT_UNDERSTAND, exc.message)
    return PartOutcome(idx, staged)


async def stow(request: web.Request) -> web.Response:
    gw: Gateway = request.app["gateway"]
    principal: Principal = request["principal"]
    study_in_path = request.match_info.get("study")
    await require(request, principal, "push")
    _check_content_type(request)
    length = request.content_length
    if length is not None and length > gw.settings.https.max_body_bytes:
        raise PayloadTooLargeError(
            f"request body of {length} bytes is larger than the limit of "
            f"{gw.settings.https.max_body_bytes} bytes"
        )
    budget = [gw.settings.https.max_body_bytes]
    outcomes: list[PartOutcome] = []
    try:
        reader = await request.multipart()
        while True:
            try:
                part = await reader.next()
            except (ValueError, AssertionError) as exc:
                raise InvalidInputError(f"malformed multipart body: {exc}") from exc
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise InvalidInputError("nested multipart bodies are not accepted")
            outcomes.append(await _receive_part(gw, part, budget))
    except BaseException:
        for o in outcomes:
            if o.staged is not None:
                o.staged.path.unlink(missing_ok=True)
        raise
    if not outcomes:
        raise InvalidInputError("the multipart body contains no parts")

    to_add: list[tuple[InstanceIndex, str, int]] = []
    added_from: list[PartOutcome] = []
    for o in outcomes:
        if o.index is None or o.staged is None:
            continue
        if study_in_path and o.index.study_uid != study_in_path:
            o.failure, o.message = STUDY_MISMATCH, "Study Instance UID does not match the URL"
            o.staged.path.unlink(missing_ok=True)
            continue
        await gw.run(gw.files.commit, o.staged)
        to_add.append((o.index, o.staged.sha256, o.staged.size))
        added_from.append(o)
    results = await gw.run(gw.store.add_instances, to_add, principal.name) if to_add else []
    for o, result in zip(added_from, results, strict=True):
        if result == AddResult.CONFLICT:
            o.failure = DUPLICATE_DIFFERENT
            o.message = "an instance with this SOP Instance UID and different content is stored"

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

