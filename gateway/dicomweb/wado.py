"""WADO-RS (PS3.18 10.4): retrieve studies, series, instances and metadata.

Instances are streamed from the content store as they were received (bytes
identical, original transfer syntax): the gateway never transcodes, and a
request for another transfer syntax is answered 406 (R-XCH-6).  Studies that
are not shared with the partner answer 404, exactly like absent ones.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import replace
from typing import Any

import pydicom
from aiohttp import web

from gateway.audit import events as ev
from gateway.dicomweb.common import require
from gateway.peers import Principal
from gateway.service import Gateway
from gateway.store.model import StoredInstance
from pki.errors import NotFoundError, SekishoError

CHUNK = 1024 * 1024


class NotAcceptableError(SekishoError):
    """The requested representation (media type, transfer syntax) is not offered."""

    code = "NOT_ACCEPTABLE"
    http_status = 406
    audit_outcome = 4


def _check_accept(request: web.Request, media: str) -> None:
    accept = request.headers.get("Accept", "*/*")
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        mtype = parts[0].lower()
        params = {}
        for p in parts[1:]:
            if "=" in p:
                k, v = p.split("=", 1)
                params[k.strip().lower()] = v.strip().strip('"')
        if mtype in ("*/*", "multipart/*"):
            return
        if mtype == "multipart/related":
            ptype = params.get("type", media).lower()
            ts = params.get("transfer-syntax", "*")
            if ptype == media and ts == "*":
                return
        if mtype == media and media == "application/dicom+json":
            return
    raise NotAcceptableError(
        f"only {media} is offered (original transfer syntax, transfer-syntax=*); "
        "the gateway does not transcode"
    )


async def _visible_instances(
    request: web.Request,
) -> tuple[Gateway, Principal, list[StoredInstance]]:
    gw: Gateway = request.app["gateway"]
    principal: Principal = request["principal"]
    await require(request, principal, "retrieve")
    m = request.match_info
    rows = await gw.run(
        gw.store.instances_of,
        m["study"],
        m.get("series"),
        m.get("instance"),
        principal.visibility,
    )
    if not rows:
        raise NotFoundError("no such study, series or instance")
    return gw, principal, rows


async def _audit_retrieve(
    gw: Gateway, principal: Principal, rows: list[StoredInstance], what: str, accessed: bool
) -> None:
    by_patient: dict[tuple[str, str], list[StoredInstance]] = defaultdict(list)
    for r in rows:
        by_patient[(r.patient_id, r.issuer)].append(r)
    for (pid, issuer), items in by_patient.items():
        event = ev.instances_transferred(
            actor=principal.name,
            actor_kind=principal.kind,  # type: ignore[arg-type]
            patient_id=pid,
            patient_issuer=issuer or None,
            study_uids=sorted({i.study_uid for i in items}),
            instance_count=len(items),
            action=ev.Action.READ,
            source_address=principal.address,
            destination=principal.name,
            description=what,
            extra={"cert_sha256": principal.cert_sha256},
        )
        if accessed:
            event = replace(event, event_id=ev.INSTANCES_ACCESSED)
        await gw.record(event)


async def retrieve(request: web.Request) -> web.StreamResponse:
    gw, principal, rows = await _visible_instances(request)
    _check_accept(request, "application/dicom")
    await _audit_retrieve(gw, principal, rows, "instances retrieved by WADO-RS", accessed=False)
    boundary = uuid.uuid4().hex
    resp = web.StreamResponse(
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        }
    )
    await resp.prepare(request)
    for inst in rows:
        head = (
            f"--{boundary}\r\nContent-Type: application/dicom; "
            f"transfer-syntax={inst.transfer_syntax}\r\n"
            f"Content-Length: {inst.size}\r\n\r\n"
        )
        await resp.write(head.encode())
        fh = await gw.run(gw.files.open, inst.sha256)
        try:
            while True:
                block = await gw.run(fh.read, CHUNK)
                if not block:
                    break
                await resp.write(block)
        finally:
            fh.close()
        await resp.write(b"\r\n")
    await resp.write(f"--{boundary}--\r\n".encode())
    await resp.write_eof()
    gw.metrics.inc("sekisho_wado_instances_total", len(rows))
    return resp


def _metadata_of(gw: Gateway, inst: StoredInstance, base: str) -> dict[str, Any]:
    with gw.files.open(inst.sha256) as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=4096)
    url = (
        f"{base}/studies/{inst.study_uid}/series/{inst.series_uid}"
        f"/instances/{inst.sop_instance_uid}"
    )

    def bulk(elem: Any) -> str:
        return f"{url}/bulkdata/{elem.tag:08X}"

    out = ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=bulk)
    out["7FE00010"] = {"vr": "OB", "BulkDataURI": f"{url}/bulkdata/7FE00010"}
    return out


def _bulk_value(gw: Gateway, inst: StoredInstance, tag: int) -> bytes | None:
    with gw.files.open(inst.sha256) as fh:
        ds = pydicom.dcmread(fh, defer_size=4096)
    elem = ds.get(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return None


async def bulkdata(request: web.Request) -> web.Response:
    """PS3.18 10.4.1.1.5: a top-level bulk data element of one instance, as stored."""
    gw, principal, rows = await _visible_instances(request)
    _check_accept(request, "application/octet-stream")
    try:
        tag = int(request.match_info["tag"], 16)
    except ValueError as exc:
        raise NotFoundError("no such bulk data") from exc
    value = await gw.run(_bulk_value, gw, rows[0], tag)
    if value is None:
        raise NotFoundError("no such bulk data")
    await _audit_retrieve(gw, principal, rows, "bulk data retrieved by WADO-RS", accessed=True)
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + value
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return web.Response(
        body=body,
        headers={
            "Content-Type": (
                f'multipart/related; type="application/octet-stream"; boundary={boundary}'
            )
        },
    )


async def metadata(request: web.Request) -> web.Response:
    gw, principal, rows = await _visible_instances(request)
    _check_accept(request, "application/dicom+json")
    await _audit_retrieve(gw, principal, rows, "metadata retrieved by WADO-RS", accessed=True)
    base = request.app["base_url"]
    body = [await gw.run(_metadata_of, gw, inst, base) for inst in rows]
    return web.json_response(body, content_type="application/dicom+json")
