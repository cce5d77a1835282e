"""Admin HTTP API for the forwarding queue, on the mutual-TLS HTTPS listener.

Routes (mounted by :func:`gateway.web.create_app`)::

    GET  /admin/forward/jobs?state=&destination=&study=&limit=   list jobs and counts
    POST /admin/forward/send    {"study": UID, "destination": NAME}
    POST /admin/forward/retry   {"job": ID} | {"destination": NAME} | {"all": true}

Why here and not on the plain-HTTP monitoring listener: enqueuing a send moves
patient data out of the hospital, so the caller must be authenticated by a
client certificate (R-TLS-1/3) and authorised, and every call is attributable
in the audit trail.  The monitoring listener has no authentication at all.  The
caller needs a registered certificate whose partner registration carries the
``admin`` permission (``sekisho partner add NAME --permission admin``, for the
hospital's own administration client); regional partners and the external
storage provider never get it (R-XCH-3, R-EXT-1).  Refusals are audited as
Security Alerts.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.audit import events as ev
from gateway.forward.commands import enqueue_study
from gateway.forward.queue import STATES, open_queue
from gateway.peers import Principal
from gateway.service import Gateway
from pki.errors import AuthorizationError, InvalidInputError


async def _require_admin(request: web.Request) -> Principal:
    gw: Gateway = request.app["gateway"]
    principal: Principal = request["principal"]
    if principal.kind == "partner" and "admin" in principal.partner.permissions:
        return principal
    await gw.record(ev.security_alert(
        "not-permitted",
        f"{request.method} {request.path}: the admin API needs the 'admin' permission",
        actor=principal.name,
        actor_kind=principal.kind,  # type: ignore[arg-type]
        source_address=principal.address,
        cert_sha256=principal.cert_sha256,
        event_type=ev.USE_OF_RESTRICTED_FUNCTION,
    ))
    raise AuthorizationError("this client is not permitted to use the admin API")


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidInputError("the request body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return body


async def list_jobs(request: web.Request) -> web.Response:
    await _require_admin(request)
    gw: Gateway = request.app["gateway"]
    q = request.query
    state = q.get("state")
    if state is not None and state not in STATES:
        raise InvalidInputError(f"state must be one of {', '.join(STATES)}")
    try:
        limit = min(int(q.get("limit", "500")), 5000)
    except ValueError as exc:
        raise InvalidInputError("limit must be an integer") from exc
    queue = open_queue(gw.settings.store.database)
    jobs = await gw.run(queue.list_jobs, state=state, destination=q.get("destination"),
                        study_uid=q.get("study"), limit=limit)
    counts = await gw.run(queue.counts)
    return web.json_response({"counts": counts, "jobs": [j.to_dict() for j in jobs]})


async def send(request: web.Request) -> web.Response:
    principal = await _require_admin(request)
    gw: Gateway = request.app["gateway"]
    body = await _json(request)
    study, destination = body.get("study"), body.get("destination")
    if not isinstance(study, str) or not isinstance(destination, str):
        raise InvalidInputError('give {"study": UID, "destination": NAME}')
    new, requeued, present = await gw.run(
        enqueue_study, gw, study, destination, f"api:{principal.name}"
    )
    return web.json_response(
        {"queued": new, "resumed": requeued, "already_present": present}, status=202
    )


async def retry(request: web.Request) -> web.Response:
    principal = await _require_admin(request)
    gw: Gateway = request.app["gateway"]
    body = await _json(request)
    job, destination = body.get("job"), body.get("destination")
    if job is None and destination is None and body.get("all") is not True:
        raise InvalidInputError('give {"job": ID}, {"destination": NAME} or {"all": true}')
    if job is not None and (isinstance(job, bool) or not isinstance(job, int)):
        raise InvalidInputError("job must be an integer")
    queue = open_queue(gw.settings.store.database)
    n = await gw.run(queue.retry, job_id=job, destination=destination)
    if n:
        await gw.record(ev.AuditEvent(
            event_id=ev.APPLICATION_ACTIVITY,
            action=ev.Action.EXECUTE,
            outcome=ev.Outcome.SUCCESS,
            actor=principal.name,
            actor_kind="partner",
            actor_cert_sha256=principal.cert_sha256,
            source_address=principal.address,
            description=f"{n} stopped forwarding job(s) resumed through the admin API",
        ))
    return web.json_response({"resumed": n})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin/forward/jobs", list_jobs)
    r.add_post("/admin/forward/send", send)
    r.add_post("/admin/forward/retry", retry)
