"""Media services inside ``sekisho serve``: the staff console and scheduled finalization.

:func:`start_media_services` is called by :class:`gateway.server.RunningGateway`;
it starts the staff console listener when ``[media.console] port`` is set and
the finalization task when ``[media.finalization] mode = "scheduled"``
(R-PDI-6).  Both stop with the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.imports.finalization import finalization_task
from gateway.imports.records import ImportRecords
from gateway.service import Gateway

log = logging.getLogger("sekisho.media")


class MediaServices:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.console: object | None = None
        self.console_addresses: list[tuple[str, int]] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.gw.settings.media
        if s.console.port:
            from gateway.imports.console import ConsoleListener

            listener = ConsoleListener(self.gw)
            self.console_addresses = await listener.start()
            self.console = listener
            log.info(
                "staff console on %s (mutual TLS, registered staff certificates only)",
                self.console_addresses,
            )
        if s.finalization.mode == "scheduled":
            records = ImportRecords(self.gw.settings.store.database)
            self.task = asyncio.get_running_loop().create_task(finalization_task(self.gw, records))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.console is not None:
            await self.console.stop()  # type: ignore[attr-defined]


async def start_media_services(gw: Gateway) -> MediaServices:
    services = MediaServices(gw)
    await services.start()
    return services
