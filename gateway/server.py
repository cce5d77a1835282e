"""Running the gateway: TLS listener, DICOMweb application, start/stop audit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.audit import events as ev
from gateway.service import Gateway
from gateway.settings import Settings
from gateway.tlsserver import HttpRefusal, MutualTlsServer, Refusal
from gateway.web import create_app, create_monitoring_app
from pki.tls import server_context

log = logging.getLogger("sekisho")


class JsonFormatter(logging.Formatter):
    """Structured operational logs; these never carry patient data (R-OPS-3)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.logging.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.logging.level)
    # pynetdicom would log query identifiers (patient data) at debug level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from gateway.imports.quiet import silence_pydicom

    silence_pydicom()  # pydicom quotes values of hostile media in its warnings


class RunningGateway:
    """A started gateway; ``stop()`` shuts it down cleanly."""

    def __init__(self, gw: Gateway, *, primary: bool = True, housekeeping: bool = True) -> None:
        self.gw = gw
        #: The primary process runs everything; other workers serve HTTPS only.
        self.primary = primary
        #: Start-up housekeeping (audit checkpoint gap, tmp sweep); done once,
        #: before any worker process exists, when several serve the port.
        self.housekeeping = housekeeping and primary
        self.tls: MutualTlsServer | None = None
        self.runner: web.AppRunner | None = None
        self.monitoring: web.AppRunner | None = None
        self.addresses: list[tuple[str, int]] = []
        #: The DICOM TLS listener (gateway.dimse.DimseService) when [dimse] is enabled.
        self.dimse: Any = None
        self.dimse_address: tuple[str, int] | None = None
        #: Store-and-forward workers (gateway.forward.worker.Forwarder).
        self.forwarder: Any = None
        #: Staff console listener and scheduled finalization (gateway.imports.runtime).
        self.media: Any = None
        #: RFC 3161 seals of the audit chain head (gateway.signatures.sealing, R-AUD-2).
        self.sealer: Any = None

    async def start(self) -> None:
        gw = self.gw
        s = gw.settings
        if self.housekeeping:
            await gw.run(housekeeping, gw)
        if self.primary:
            for warning in await gw.run(gw.expiry_warnings):
                log.warning("certificate expiry: %s", warning)
        # A TSA-less configuration with sealing refuses to start.
        if self.primary and s.audit.seal_interval_minutes > 0:
            from gateway.signatures.sealing import PeriodicSealer

            self.sealer = PeriodicSealer(gw, s.audit.seal_interval_minutes)
        ctx = server_context(s.tls)
        authenticator = gw.authenticator()
        base_url = s.https.public_url or f"https://{_host_for_url(s.https.host)}:{s.https.port}"

        async def on_refusal(refusal: Refusal) -> None:
            gw.metrics.inc("sekisho_tls_refusals_total", reason=refusal.reason)
            log.warning("connection refused: %s (%s)", refusal.reason, refusal.message)
            await gw.record(
                ev.security_alert(
                    refusal.reason,
                    refusal.message,
                    source_address=refusal.address,
                    cert_sha256=refusal.cert_sha256,
                    extra={"detail": (refusal.detail or "")[:300], "port": "https"},
                )
            )

        self.tls = MutualTlsServer(
            ctx,
            authenticator.authenticate,
            lambda: None,  # replaced below once the runner exists
            on_refusal=on_refusal,
            refusal_factory=HttpRefusal,
            handshake_timeout=s.https.handshake_timeout_seconds,
            max_per_address=s.https.max_connections_per_address,
        )
        app = create_app(gw, self.tls.principal_for, base_url)
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            keepalive_timeout=s.https.idle_timeout_seconds,
            access_log=None,
        )
        await self.runner.setup()
        server = self.runner.server
        assert server is not None
        self.tls.protocol_factory = server  # type: ignore[assignment]
        self.addresses = await self.tls.start(
            s.https.host, s.https.port, reuse_port=s.https.workers > 1
        )
        if not self.primary:
            started = ev.application_activity(
                "start", actor=s.instance.name, description="HTTPS worker"
            )
            await gw.record(started)
            log.info("HTTPS worker %d listening on %s", os.getpid(), self.addresses)
            return
        if s.monitoring.port:
            self.monitoring = web.AppRunner(create_monitoring_app(gw), access_log=None)
            await self.monitoring.setup()
            await web.TCPSite(self.monitoring, s.monitoring.host, s.monitoring.port).start()
            log.info("monitoring on http://%s:%d/metrics", s.monitoring.host, s.monitoring.port)
        if s.dimse.enabled:
            from gateway.dimse import DimseService

            self.dimse = DimseService(gw, asyncio.get_running_loop())
            self.dimse_address = await gw.run(self.dimse.start)
        if s.forward.enabled and s.destinations:
            from gateway.forward.worker import Forwarder

            self.forwarder = Forwarder(gw)
            await self.forwarder.start()
        from gateway.imports.runtime import start_media_services

        self.media = await start_media_services(gw)
        await gw.record(ev.application_activity("start", actor=s.instance.name))
        if self.sealer:
            self.sealer.start()  # first seal now (covers the start record), then periodically
        log.info("Sekisho listening on %s (DICOMweb over mutual TLS)", self.addresses)

    async def stop(self) -> None:
        if self.sealer:
            await self.sealer.stop()
        if self.media:
            await self.media.stop()
        if self.forwarder:
            await self.forwarder.stop()
        if self.dimse:
            await self.gw.run(self.dimse.stop)
        if self.tls:
            await self.tls.close()
        if self.runner:
            await self.runner.cleanup()
        if self.monitoring:
            await self.monitoring.cleanup()
        try:
            await self.gw.record(
                ev.application_activity("stop", actor=self.gw.settings.instance.name)
            )
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.exception("could not audit the application stop")


def _host_for_url(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "localhost"
    return f"[{host}]" if ":" in host else host


def housekeeping(gw: Gateway) -> None:
    """Start-up checks that must run once, before any request is served."""
    gap = gw.audit.close_checkpoint_gap(gw.settings.instance.name)
    if gap:
        log.warning("audit: %d record(s) were outside the head checkpoint; alert recorded", gap)
    swept = gw.files.sweep_tmp()
    if swept:
        log.info("removed %d partial upload(s) left by an earlier stop", swept)


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker stops when the process that started it is gone (even after SIGKILL)."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("primary process gone; HTTPS worker stopping")
            stop.set()
            return
        await asyncio.sleep(0.5)


async def serve_forever(
    settings: Settings, *, primary: bool = True, housekeeping_done: bool = False,
    parent: int | None = None,
) -> None:
    gw = Gateway.open(settings)
    running = RunningGateway(gw, primary=primary, housekeeping=not housekeeping_done)
    await running.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(_watch_parent(parent, stop)) if parent is not None else None
    try:
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
    finally:
        log.info("stopping")
        await running.stop()
        gw.close()
