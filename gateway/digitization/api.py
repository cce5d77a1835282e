"""Staff console HTTP API for film intake and digitization worklists (R-DIG-3, R-USR-1).

Mounted by :func:`add_routes` on the staff console application
(:mod:`gateway.imports.console`): its own mutual-TLS listener that admits only
client certificates registered as staff in ``[media.console.staff.<id>]``
(chain, validity, revocation checked; everything else refused during the
handshake and audited).  The ``staff_only`` middleware of that application
puts the authenticated :class:`~gateway.imports.console.StaffPrincipal` in
``request["staff"]``; :func:`_staff` refuses any request without one, so a
route mounted elsewhere by mistake fails closed.  The staff member's ID is the
receiver of a film receipt: a request never names its own actor.

Routes (JSON)::

    GET  /staff/film-receipts?patient_id=&limit=     receipts with digitized/total films
    POST /staff/film-receipts                        {"patient_id", "source_facility", "films",
                                                      "issuer"?, "received_at"?, "study_uid"?,
                                                      "accession"?, "modality"?, "patient_name"?,
                                                      "note"?} -> the receipt and its deadline
    GET  /staff/digitizations/overdue?now=ISO        overdue receipts, late digitizations
    GET  /staff/digitizations/{id}                   one digitization record
    GET  /staff/signatures                           signed records and their protection end

Signing is not offered here: the operator's HPKI key stays on the card at the
digitization workstation (R-SIG-7), where ``sekisho digitize`` runs.  Every
response that shows patient data is audited (R-AUD-1).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.audit import events as ev
from gateway.digitization.intake import overdue, parse_time, receive_film, records_of
from gateway.service import Gateway
from pki.errors import InvalidInputError, PeerAuthenticationError

__all__ = ["add_routes"]


def _gw(request: web.Request) -> Gateway:
    return request.app["gateway"]  # type: ignore[no-any-return]


def _staff(request: web.Request) -> Any:
    staff = request.get("staff")
    if staff is None or not getattr(staff, "staff_id", None):
        raise PeerAuthenticationError("no authenticated staff member", reason="no-certificate")
    return staff


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidInputError("the request body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str, *, required: bool = False, limit: int = 64) -> str:
    value = body.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInputError(f"{key} must be a text of at most {limit} characters")
    if required and not value.strip():
        raise InvalidInputError(f"{key} is required")
    return value


async def _audit_read(request: web.Request, what: str, patient_id: str | None = None) -> None:
    staff = _staff(request)
    await _gw(request).record(
        ev.query(
            actor=staff.staff_id,
            actor_kind="user",
            source_address=staff.address,
            cert_sha256=staff.cert_sha256,
            patient_id=patient_id or None,
            query_text=request.path_qs[:500],
            description=what,
        )
    )


async def list_receipts(request: web.Request) -> web.Response:
    _staff(request)
    gw = _gw(request)
    patient_id = request.query.get("patient_id") or None
    try:
        limit = min(max(int(request.query.get("limit", "200")), 1), 2000)
    except ValueError as exc:
        raise InvalidInputError("limit must be an integer") from exc
    rows = await gw.run(records_of(gw).receipts, patient_id, limit)
    await _audit_read(request, "film receipts listed", patient_id)
    return web.json_response({"receipts": [r.to_dict() for r in rows]})


_RECEIPT_FIELDS = frozenset(
    {
        "patient_id",
        "issuer",
        "source_facility",
        "films",
        "received_at",
        "study_uid",
        "accession",
        "modality",
        "patient_name",
        "note",
    }
)


async def create_receipt(request: web.Request) -> web.Response:
    staff = _staff(request)
    gw = _gw(request)
    body = await _body(request)
    unknown = sorted(set(body) - _RECEIPT_FIELDS)
    if unknown:
        raise InvalidInputError(f"unknown field(s): {', '.join(unknown)}")
    films = body.get("films")
    if isinstance(films, bool) or not isinstance(films, int):
        raise InvalidInputError("films must be an integer")
    received = _text(body, "received_at", limit=40)
    receipt = await receive_film(
        gw,
        patient_id=_text(body, "patient_id", required=True),
        issuer=_text(body, "issuer"),
        source_facility=_text(body, "source_facility", required=True),
        films=films,
        received_by=staff.staff_id,
        received_at=parse_time(received, gw) if received else None,
        study_uid=_text(body, "study_uid"),
        accession=_text(body, "accession", limit=16),
        modality=_text(body, "modality", limit=16),
        patient_name=_text(body, "patient_name"),
        note=_text(body, "note", limit=500),
    )
    return web.json_response(receipt.to_dict(), status=201)


async def list_overdue(request: web.Request) -> web.Response:
    _staff(request)
    gw = _gw(request)
    when = request.query.get("now")
    data = await gw.run(overdue, gw, parse_time(when, gw) if when else None)
    await _audit_read(request, "overdue digitizations listed")
    return web.json_response(data)


async def get_digitization(request: web.Request) -> web.Response:
    _staff(request)
    gw = _gw(request)
    record = await gw.run(records_of(gw).digitization, request.match_info["id"])
    receipt = await gw.run(records_of(gw).receipt, record.receipt_id)
    await _audit_read(request, "digitization record read", receipt.patient_id)
    return web.json_response(record.to_dict() | {"patient_id": receipt.patient_id})


async def list_signatures(request: web.Request) -> web.Response:
    _staff(request)
    gw = _gw(request)
    rows = await gw.run(records_of(gw).signed_records)
    await _audit_read(request, "signed records listed")
    return web.json_response({"signed_records": [r.to_dict() for r in rows]})


def add_routes(app: web.Application) -> None:
    """Mount ``/staff/...`` on the staff console application."""
    r = app.router
    r.add_get("/staff/film-receipts", list_receipts)
    r.add_post("/staff/film-receipts", create_receipt)
    r.add_get("/staff/digitizations/overdue", list_overdue)
    r.add_get("/staff/digitizations/{id}", get_digitization)
    r.add_get("/staff/signatures", list_signatures)
