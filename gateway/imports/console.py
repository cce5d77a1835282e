"""Staff console HTTP API for media import, on its own mutual-TLS listener (R-PDI-3..6, R-USR-1).

Why a separate listener with staff client certificates: staff accounts do not
exist yet (R-USR), and the importer must be a person the gateway has
authenticated, not a name a request claims -- the import record, every
imported instance and the audit trail name them as the responsible party
(R-PDI-5).  A loopback-only plain listener would let any local process import
in anyone's name; a route on the partner listener would put staff functions
one registration mistake away from partners.  So the console listens on
``[media.console] host:port`` (loopback by default), requires TLS 1.2+ with a
client certificate that chains to the gateway's trust anchors, passes
revocation checks and whose SHA-256 fingerprint is registered in
``[media.console.staff.<id>]``.  Everything else is refused during the
handshake and audited as a Security Alert; the routes below exist only on
this listener.

Routes (JSON unless noted)::

    POST   /media/uploads               body: an ISO 9660 image (streamed, capped) -> {"upload"}
    DELETE /media/uploads/{upload}
    POST   /media/inspect               {"upload": ID} | {"path": "/mnt/cdrom"}  -> report
    POST   /media/preview               medium + selection + patient -> plan, mismatches
    POST   /media/import                medium + selection + patient + fingerprint -> record
    GET    /media/imports               ?status=&patient_id=&limit=
    GET    /media/imports/{id}

A ``path`` must resolve (links followed) inside one of ``allowed_roots``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.audit import events as ev
from gateway.imports.config import StaffMember
from gateway.imports.records import ImportRecords
from gateway.imports.service import (
    ImportRequest,
    inspect_path,
    preview,
    report_fingerprint,
    run_media_import,
)
from gateway.service import Gateway
from gateway.tlsserver import HttpRefusal, MutualTlsServer, Refusal
from gateway.web import errors_and_metrics
from media.reconcile import Operator
from pki.certs import fingerprint_sha256, load_certificate
from pki.errors import (
    AuthorizationError,
    ConfigurationError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PeerAuthenticationError,
    SekishoError,
)
from pki.peer import PeerCertificateValidator
from pki.tls import server_context

log = logging.getLogger("sekisho.console")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_UPLOAD = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StaffPrincipal:
    """An authenticated staff member: the importer of anything they import."""

    staff_id: str
    name: str
    cert_sha256: str
    address: str | None


class StaffAuthenticator:
    """Certificate validation (chain, validity, EKU, revocation) plus the staff registry."""

    def __init__(
        self, validator: PeerCertificateValidator, staff: Mapping[str, StaffMember]
    ) -> None:
        self.validator = validator
        self.by_fingerprint: dict[str, tuple[str, str]] = {}
        for staff_id, member in staff.items():
            try:
                fp = fingerprint_sha256(load_certificate(member.certificate))
            except (SekishoError, OSError, ValueError) as exc:
                raise ConfigurationError(
                    f"configuration key 'media.console.staff.{staff_id}.certificate': "
                    "cannot read the certificate"
                ) from exc
            self.by_fingerprint[fp] = (staff_id, member.name)

    async def authenticate(self, der: bytes | None, address: str | None) -> StaffPrincipal:
        if not der:
            raise PeerAuthenticationError(
                "the staff console needs a client certificate", reason="no-certificate"
            )
        cert = await self.validator.validate(der)
        entry = self.by_fingerprint.get(cert.sha256)
        if entry is None:
            raise PeerAuthenticationError(
                "the client certificate is valid but not registered for the staff console",
                reason="unregistered",
            )
        return StaffPrincipal(entry[0], entry[1], cert.sha256, address)


@web.middleware
async def staff_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    lookup = request.app["principal_lookup"]
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    who = lookup(ssl_object) if ssl_object is not None else None
    if not isinstance(who, StaffPrincipal):
        raise PeerAuthenticationError("no authenticated staff member", reason="no-certificate")
    request["staff"] = who
    return await handler(request)


def _gw(request: web.Request) -> Gateway:
    return request.app["gateway"]  # type: ignore[no-any-return]


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidInputError("the request body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return body


def _upload_path(gw: Gateway, token: object) -> Path:
    if not isinstance(token, str) or not _UPLOAD.match(token):
        raise InvalidInputError("upload must be an upload ID returned by POST /media/uploads")
    return gw.settings.media.console.upload_dir / f"{token}.iso"


async def resolve_medium(request: web.Request, body: Mapping[str, Any]) -> Path:
    """The medium a request names: an upload, or a path inside an allowed root."""
    gw = _gw(request)
    if "upload" in body:
        path = _upload_path(gw, body["upload"])
        if not path.is_file():
            raise NotFoundError("no such upload")
        return path
    raw = body.get("path")
    if not isinstance(raw, str) or not raw.startswith("/") or "\x00" in raw:
        raise InvalidInputError('name the medium with {"upload": ID} or {"path": "/absolute"}')
    real = Path(os.path.realpath(raw))  # links and ".." resolved before the check
    roots = [r.resolve() for r in gw.settings.media.console.allowed_roots]
    if not any(real == root or real.is_relative_to(root) for root in roots):
        staff: StaffPrincipal = request["staff"]
        await gw.record(
            ev.security_alert(
                "path-not-allowed",
                "the staff console was asked to read a path outside media.console.allowed_roots",
                actor=staff.staff_id,
                actor_kind="user",
                source_address=staff.address,
                cert_sha256=staff.cert_sha256,
                event_type=ev.USE_OF_RESTRICTED_FUNCTION,
                extra={"path": raw[:300]},
            )
        )
        raise AuthorizationError("this path is not under an allowed media root")
    if not real.exists():
        raise NotFoundError("the media path does not exist")
    return real


# -- uploads -------------------------------------------------------------------
async def upload(request: web.Request) -> web.Response:
    """Stream an ISO image to the spool folder with its SHA-256; the size is capped."""
    gw = _gw(request)
    cfg = gw.settings.media.console
    if request.content_length is not None and request.content_length > cfg.max_upload_bytes:
        raise PayloadTooLargeError(f"the image is larger than {cfg.max_upload_bytes} bytes")
    await gw.run(cfg.upload_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_hex(16)
    final = cfg.upload_dir / f"{token}.iso"
    part = final.with_suffix(".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    digest, size = hashlib.sha256(), 0

    def write(chunk: bytes) -> None:
        digest.update(chunk)
        os.write(fd, chunk)

    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > cfg.max_upload_bytes:
                raise PayloadTooLargeError(f"the image is larger than {cfg.max_upload_bytes} bytes")
            await gw.run(write, chunk)
        await gw.run(os.fsync, fd)
    except BaseException:
        os.close(fd)
        part.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(part, final)
    log.info("media image uploaded (%d bytes)", size)
    return web.json_response(
        {"upload": token, "size": size, "sha256": digest.hexdigest()}, status=201
    )


async def delete_upload(request: web.Request) -> web.Response:
    path = _upload_path(_gw(request), request.match_info["upload"])
    if not path.is_file():
        raise NotFoundError("no such upload")
    path.unlink()
    return web.json_response({"deleted": request.match_info["upload"]})


# -- inspect, preview, import ----------------------------------------------------
async def inspect(request: web.Request) -> web.Response:
    gw = _gw(request)
    path = await resolve_medium(request, await _json(request))
    report = await gw.run(inspect_path, gw, path)
    out = report.to_dict()
    out["fingerprint"] = report_fingerprint(report)
    return web.json_response(out)


def _request_from(
    body: Mapping[str, Any], path: Path, staff: StaffPrincipal, *, for_import: bool
) -> ImportRequest:
    selection = body.get("selection")
    if not isinstance(selection, list) or not all(isinstance(s, str) for s in selection):
        raise InvalidInputError('"selection" must be a list such as ["study:1.2"]')
    patient_id = body.get("patient_id")
    if not isinstance(patient_id, str):
        raise InvalidInputError('"patient_id" (the hospital\'s patient ID) is required')
    fingerprint = body.get("fingerprint")
    if for_import and not isinstance(fingerprint, str):
        raise InvalidInputError('"fingerprint" from /media/inspect is required to import')
    texts: dict[str, str | None] = {}
    for key in ("issuer", "media_type", "label", "source_facility", "accession",
                "patient_name", "birth_date", "sex", "reason"):  # fmt: skip
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f'"{key}" must be a string')
        texts[key] = value
    supersedes = body.get("supersedes")
    if supersedes is not None and (isinstance(supersedes, bool) or not isinstance(supersedes, int)):
        raise InvalidInputError('"supersedes" must be an import record ID')
    return ImportRequest(
        path=path,
        importer=Operator(staff.staff_id, staff.name),
        patient_id=patient_id,
        issuer=texts["issuer"] or "",
        selection=tuple(selection),
        confirm_mismatch=body.get("confirm_mismatch") is True,
        media_type=texts["media_type"],
        media_label=texts["label"],
        source_facility=texts["source_facility"],
        accession_number=texts["accession"],
        patient_name=texts["patient_name"],
        birth_date=texts["birth_date"],
        sex=texts["sex"],
        supersedes=supersedes,
        change_reason=texts["reason"] or "",
        fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        cert_sha256=staff.cert_sha256,
        source_address=staff.address,
    )


async def preview_import(request: web.Request) -> web.Response:
    """Plan and reconciliation preview: what would be imported, and any mismatch to confirm."""
    gw = _gw(request)
    staff: StaffPrincipal = request["staff"]
    body = await _json(request)
    path = await resolve_medium(request, body)
    req = _request_from(body, path, staff, for_import=False)
    out = await gw.run(preview, gw, req)
    if out["local_patient"]["known"]:  # the hospital's record was read (R-AUD-1)
        await gw.record(_patient_read(staff, req.patient_id, req.issuer, "import preview"))
    return web.json_response(out)


async def do_import(request: web.Request) -> web.Response:
    gw = _gw(request)
    staff: StaffPrincipal = request["staff"]
    body = await _json(request)
    path = await resolve_medium(request, body)
    req = _request_from(body, path, staff, for_import=True)
    outcome = await gw.run(run_media_import, gw, req)
    return web.json_response(
        {
            "record": outcome.record.to_dict(),
            "queued": outcome.queued,
            "queue_error": outcome.queue_error,
        },
        status=201,
    )


# -- records -------------------------------------------------------------------
def _patient_read(staff: StaffPrincipal, patient_id: str, issuer: str, what: str) -> ev.AuditEvent:
    return ev.AuditEvent(
        event_id=ev.PATIENT_RECORD,
        action=ev.Action.READ,
        outcome=ev.Outcome.SUCCESS,
        actor=staff.staff_id,
        actor_kind="user",
        actor_cert_sha256=staff.cert_sha256,
        source_address=staff.address,
        patient_id=patient_id,
        patient_issuer=issuer or None,
        description=f"staff console: {what}",
    )


async def list_imports(request: web.Request) -> web.Response:
    gw = _gw(request)
    staff: StaffPrincipal = request["staff"]
    q = request.query
    try:
        limit = int(q.get("limit", "200"))
    except ValueError as exc:
        raise InvalidInputError("limit must be an integer") from exc
    records = ImportRecords(gw.settings.store.database)
    rows = await gw.run(
        records.query, status=q.get("status"), patient_id=q.get("patient_id"), limit=limit
    )
    await gw.record(
        ev.query(
            actor=staff.staff_id,
            actor_kind="user",
            source_address=staff.address,
            cert_sha256=staff.cert_sha256,
            patient_id=q.get("patient_id"),
            query_text=request.query_string,
            description="staff console: media import records listed",
        )
    )
    return web.json_response({"imports": [r.to_dict() for r in rows]})


async def get_import(request: web.Request) -> web.Response:
    gw = _gw(request)
    staff: StaffPrincipal = request["staff"]
    try:
        import_id = int(request.match_info["id"])
    except ValueError as exc:
        raise InvalidInputError("an import record ID is a number") from exc
    records = ImportRecords(gw.settings.store.database)
    record = await gw.run(records.get, import_id)
    instances = await gw.run(records.instances, import_id)
    await gw.record(
        _patient_read(
            staff, record.local_patient_id, record.local_issuer, f"media import #{import_id} read"
        )
    )
    return web.json_response(record.to_dict() | {"instances": instances})


def create_console_app(
    gw: Gateway, principal_lookup: Callable[[object], object]
) -> web.Application:
    app = web.Application(middlewares=[errors_and_metrics, staff_only])
    app["gateway"] = gw
    app["principal_lookup"] = principal_lookup
    r = app.router
    r.add_post("/media/uploads", upload)
    r.add_delete("/media/uploads/{upload}", delete_upload)
    r.add_post("/media/inspect", inspect)
    r.add_post("/media/preview", preview_import)
    r.add_post("/media/import", do_import)
    r.add_get("/media/imports", list_imports)
    r.add_get("/media/imports/{id}", get_import)
    from gateway.digitization.api import add_routes as add_digitization_routes

    add_digitization_routes(app)  # /staff/...: film receipts, overdue list (R-DIG-3)
    return app


class ConsoleListener:
    """The staff console's mutual-TLS listener (same TLS factory as the partner listener)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.tls: MutualTlsServer | None = None
        self.runner: web.AppRunner | None = None

    async def start(self) -> list[tuple[str, int]]:
        gw = self.gw
        s = gw.settings
        cfg = s.media.console
        authenticator = StaffAuthenticator(gw.peer_validator(), cfg.staff)

        async def on_refusal(refusal: Refusal) -> None:
            gw.metrics.inc("sekisho_tls_refusals_total", reason=refusal.reason)
            log.warning("staff console connection refused: %s", refusal.reason)
            await gw.record(
                ev.security_alert(
                    refusal.reason,
                    refusal.message,
                    actor_kind="user",
                    source_address=refusal.address,
                    cert_sha256=refusal.cert_sha256,
                    extra={"detail": (refusal.detail or "")[:300], "port": "staff-console"},
                )
            )

        self.tls = MutualTlsServer(
            server_context(s.tls),
            authenticator.authenticate,
            asyncio.Protocol,  # replaced by the aiohttp server once the runner exists
            on_refusal=on_refusal,
            refusal_factory=HttpRefusal,
            handshake_timeout=cfg.handshake_timeout_seconds,
            max_per_address=cfg.max_connections_per_address,
        )
        app = create_console_app(gw, self.tls.principal_for)
        self.runner = web.AppRunner(
            app, handle_signals=False, keepalive_timeout=cfg.idle_timeout_seconds, access_log=None
        )
        await self.runner.setup()
        assert self.runner.server is not None
        self.tls.protocol_factory = self.runner.server  # type: ignore[assignment]
        return await self.tls.start(cfg.host, cfg.port)

    async def stop(self) -> None:
        if self.tls is not None:
            await self.tls.close()
        if self.runner is not None:
            await self.runner.cleanup()
