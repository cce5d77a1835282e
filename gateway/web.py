"""The HTTPS application: DICOMweb routes, health and metrics, error mapping.

Every request reaching a handler comes over a connection whose client
certificate was validated and bound to a partner by ``gateway.tlsserver``; the
``principal`` middleware looks that partner up.  Errors are mapped in one place
from the :mod:`pki.errors` table to an HTTP status and a JSON body that helps
the partner's engineer without leaking anything (STYLE lesson 2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.dicomweb import qido, stow, wado
from gateway.service import Gateway
from pki.errors import PeerAuthenticationError, SekishoError

log = logging.getLogger("sekisho.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths that need no partner: they reveal no patient data (R-OPS-3).
OPEN_PATHS = frozenset({"/healthz", "/metrics"})


def _endpoint(request: web.Request) -> str:
    route = request.match_info.route
    return getattr(route.resource, "canonical", "unmatched") if route.resource else "unmatched"


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    gw: Gateway = request.app["gateway"]
    started = time.monotonic()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except SekishoError as exc:
        status = exc.http_status
        log.info("request refused: %s %s", exc.code, exc.message)
        return web.json_response(exc.to_dict(), status=exc.http_status)
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        log.exception("unexpected error handling a request")
        return web.json_response(
            {"code": "INTERNAL", "message": "internal error; see the gateway's log"}, status=500
        )
    finally:
        gw.metrics.inc(
            "sekisho_http_requests_total",
            endpoint=_endpoint(request),
            method=request.method,
            status=str(status),
        )
        gw.metrics.inc(
            "sekisho_http_request_seconds_total",
            time.monotonic() - started,
            endpoint=_endpoint(request),
        )


@web.middleware
async def principal(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in OPEN_PATHS:
        return await handler(request)
    lookup = request.app["principal_lookup"]
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    who = lookup(ssl_object) if ssl_object is not None else None
    if who is None:
        raise PeerAuthenticationError(
            "no authenticated partner on this connection", reason="no-certificate"
        )
    request["principal"] = who
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    gw: Gateway = request.app["gateway"]
    try:
        await gw.run(gw.store.counts)
        ok = True
    except SekishoError:
        ok = False
    return web.json_response({"status": "ok" if ok else "degraded"}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    gw: Gateway = request.app["gateway"]
    counts = await gw.run(gw.store.counts)
    for table in ("studies", "instances", "partners"):
        gw.metrics.set_gauge(f"sekisho_stored_{table}", counts[table])
    return web.Response(text=gw.metrics.render(), content_type="text/plain")


def create_app(
    gw: Gateway, principal_lookup: Callable[[object], object], base_url: str
) -> web.Application:
    app = web.Application(middlewares=[errors_and_metrics, principal])
    app["gateway"] = gw
    app["principal_lookup"] = principal_lookup
    app["base_url"] = base_url.rstrip("/") + "/dicomweb"
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    p = "/dicomweb"
    r.add_post(f"{p}/studies", stow.stow)
    r.add_post(f"{p}/studies/{{study}}", stow.stow)
    r.add_get(f"{p}/studies", qido.search_studies)
    r.add_get(f"{p}/series", qido.search_series)
    r.add_get(f"{p}/instances", qido.search_instances)
    r.add_get(f"{p}/studies/{{study}}/series", qido.search_series)
    r.add_get(f"{p}/studies/{{study}}/instances", qido.search_instances)
    r.add_get(f"{p}/studies/{{study}}/series/{{series}}/instances", qido.search_instances)
    r.add_get(f"{p}/studies/{{study}}", wado.retrieve)
    r.add_get(f"{p}/studies/{{study}}/series/{{series}}", wado.retrieve)
    r.add_get(f"{p}/studies/{{study}}/series/{{series}}/instances/{{instance}}", wado.retrieve)
    r.add_get(f"{p}/studies/{{study}}/metadata", wado.metadata)
    r.add_get(f"{p}/studies/{{study}}/series/{{series}}/metadata", wado.metadata)
    r.add_get(
        f"{p}/studies/{{study}}/series/{{series}}/instances/{{instance}}/metadata", wado.metadata
    )
    r.add_get(
        f"{p}/studies/{{study}}/series/{{series}}/instances/{{instance}}/bulkdata/{{tag}}",
        wado.bulkdata,
    )
    from gateway.forward import api as forward_api

    forward_api.add_routes(app)  # /admin/forward/...: needs the 'admin' permission
    return app


def create_monitoring_app(gw: Gateway) -> web.Application:
    """/healthz and /metrics only, for the plain-HTTP monitoring listener."""
    app = web.Application()
    app["gateway"] = gw
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
