"""Forwarding workers inside the serving process (R-XCH-4).

:class:`Forwarder` runs, as asyncio tasks:

* per destination, ``concurrency`` workers that claim a batch (one study),
  send it (DIMSE in a thread pool, STOW-RS on the event loop) and record each
  outcome in the queue;
* the routing scan (``[routing] on_receive``);
* maintenance: overdue Storage Commitment transactions, the audit sweep and
  the queue metrics.

While a batch is being sent its lease is renewed; on stop, the sending thread
finishes the instance on the wire, the rest of the batch is given back without
counting an attempt, and nothing is left half-recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import aiohttp

from gateway.forward import auditing, dimse_send, stow_send
from gateway.forward.batch import BatchResult, SendItem, SentInstance
from gateway.forward.commitment import handle_n_event_report
from gateway.forward.destinations import DestinationSettings, RetrySettings
from gateway.forward.queue import ForwardQueue, Job, new_owner, open_queue
from pki.errors import ConfigurationError, NotFoundError
from pki.tls import client_context

if TYPE_CHECKING:
    from gateway.service import Gateway
    from gateway.settings import Settings

log = logging.getLogger("sekisho.forward")


class _QueueCallbacks:
    """Called from the sending thread with each confirmation.

    Confirmations are written in small groups (every :data:`GROUP` instances or
    :data:`GROUP_SECONDS`), each group one durable transaction, and always before
    a Storage Commitment request and at the end of the batch.  Nothing is ever
    written before the peer confirmed it; a crash can only lose the last group's
    marks, which means sending those instances again (same bytes, harmless).
    """

    GROUP = 16
    GROUP_SECONDS = 0.25

    def __init__(self, queue: ForwardQueue, name: str, dest: DestinationSettings) -> None:
        self.queue = queue
        self.name = name
        self.dest = dest
        self._pending: list[tuple[int, str, str, str, int, bytes | None]] = []
        self._since = 0.0

    def sent(self, result: SentInstance) -> None:
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append((
            result.item.job_id, result.confirmed, result.sent_syntax, result.dataset_sha256,
            result.digest.dataset_offset, result.digest.meta,
        ))
        if len(self._pending) >= self.GROUP or time.monotonic() - self._since >= self.GROUP_SECONDS:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self.queue.mark_sent_many(pending)

    def begin_commitment(self, transaction_uid: str, job_ids: Sequence[int]) -> None:
        self.flush()
        self.queue.begin_commitment(
            transaction_uid, self.name, job_ids, self.dest.commitment_deadline_seconds
        )


def client_contexts(settings: Settings) -> dict[str, ssl.SSLContext]:
    """Build (and so validate) every enabled destination's TLS client context (R-TLS-1)."""
    out: dict[str, ssl.SSLContext] = {}
    for name, dest in settings.destinations.items():
        if not dest.enabled:
            continue
        try:
            out[name] = client_context(dest.tls)
        except ConfigurationError as exc:
            raise ConfigurationError(f"destinations.{name}.tls: {exc.message}") from exc
    return out


def check_provider_permissions(gw: Gateway) -> None:
    """R-EXT-1: the external storage provider may not query or retrieve for any purpose."""
    for name, dest in gw.settings.destinations.items():
        if dest.role != "external-storage" or not dest.partner:
            continue
        try:
            partner = gw.store.get_partner(dest.partner)
        except NotFoundError:
            continue
        bad = sorted(partner.permissions & {"query", "retrieve"})
        if bad:
            raise ConfigurationError(
                f"destinations.{name}.partner: the external storage provider's partner "
                f"registration {dest.partner!r} has {', '.join(bad)} permission; it must have "
                "none (R-EXT-1: only the hospital restores)"
            )


class Forwarder:
    def __init__(self, gw: Gateway, *, owner: str | None = None) -> None:
        self.gw = gw
        self.fs = gw.settings.forward
        self.destinations: dict[str, DestinationSettings] = {
            n: d for n, d in gw.settings.destinations.items()
            if d.enabled
        }
        self.routing = gw.settings.routing
        self.queue = open_queue(gw.settings.store.database)
        self.owner = owner or new_owner()
        self.stop_event = threading.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        threads = sum(d.concurrency for d in self.destinations.values() if d.transport == "dimse")
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads),
                                        thread_name_prefix="sekisho-dimse")
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        for name in ("sekisho_forward_instances_total", "sekisho_forward_batches_total"):
            gw.metrics.describe(name, "Forwarded instances / batches by destination and outcome")
        gw.metrics.describe("sekisho_forward_stopped_jobs", "Forwarding jobs stopped (failed)")

    # -- lifecycle -----------------------------------------------------------
    def prepare(self) -> None:
        self._contexts = client_contexts(self.gw.settings)
        check_provider_permissions(self.gw)

    async def start(self) -> None:
        await self.gw.run(self.prepare)
        for name, dest in self.destinations.items():
            for _ in range(dest.concurrency):
                self._tasks.append(asyncio.create_task(self._worker(name)))
        if self.routing.on_receive:
            self._tasks.append(asyncio.create_task(self._router()))
        self._tasks.append(asyncio.create_task(self._maintenance()))
        log.info("forwarding to %d destination(s) started", len(self.destinations))

    async def stop(self, grace: float = 15.0) -> None:
        self.stop_event.set()
        self._stopping.set()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
        for session in self._sessions.values():
            await session.close()
        self._pool.shutdown(wait=False)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _worker(self, name: str) -> None:
        while not self._stopping.is_set():
            try:
                n = await self.run_batch(name)
            except Exception:
                log.exception("forwarding worker for %s failed; continuing", name)
                n = 0
            if n == 0:
                await self._sleep(self.fs.poll_interval_seconds)

    async def _router(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.route_once()
            except Exception:
                log.exception("routing scan failed; continuing")
            await self._sleep(self.routing.scan_interval_seconds)

    async def _maintenance(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.maintain_once()
            except Exception:
                log.exception("forwarding maintenance failed; continuing")
            await self._sleep(self.fs.poll_interval_seconds)

    # -- single steps (also used by `sekisho queue work` and the tests) --------
    async def route_once(self) -> int:
        names = [n for n in self.routing.on_receive if n in self.destinations]
        return await self.gw.run(self.queue.route_new_instances, names)

    def _retry_for_commitment(self, name: str) -> RetrySettings | None:
        dest = self.destinations.get(name)
        return dest.retry if dest is not None and dest.storage_commitment else None

    async def maintain_once(self) -> None:
        await self.gw.run(self.queue.expire_commitments, self._retry_for_commitment)
        await self.gw.run(auditing.sweep, self.gw, self.queue)
        counts = await self.gw.run(self.queue.counts)
        stopped = sum(states.get("failed", 0) for states in counts.values())
        self.gw.metrics.set_gauge("sekisho_forward_stopped_jobs", stopped)

    async def run_until_idle(self, *, max_batches: int = 100000) -> int:
        """Route, then send every due batch of every destination until none is due."""
        if not self._contexts:
            await self.gw.run(self.prepare)
        await self.route_once()
        total = 0
        busy = True
        while busy and total < max_batches and not self._stopping.is_set():
            busy = False
            for name in self.destinations:
                n = await self.run_batch(name)
                if n:
                    busy = True
                    total += 1
            await self.maintain_once()
        return total

    async def run_batch(self, name: str) -> int:
        """Claim one batch for ``name`` and send it; returns the number of jobs claimed."""
        dest = self.destinations[name]
        gw, queue = self.gw, self.queue
        jobs = await gw.run(queue.claim, name, self.owner, dest.batch_size, self.fs.lease_seconds)
        if not jobs:
            return 0
        ids = [j.id for j in jobs]
        heartbeat = asyncio.create_task(self._heartbeat(ids))
        try:
            result = await self._send(name, dest, jobs)
            await gw.run(self._apply, name, dest, result)
        except Exception as exc:
            log.exception("forwarding batch to %s failed unexpectedly", name)
            await gw.run(self._fail_all, ids, dest, f"internal error while sending: {exc}")
        finally:
            heartbeat.cancel()
            await gw.run(queue.finish_batch, ids, self.owner)
            await gw.run(auditing.sweep, gw, queue)
        return len(jobs)

    async def _heartbeat(self, ids: list[int]) -> None:
        while True:
            await asyncio.sleep(self.fs.lease_seconds / 3)
            await self.gw.run(self.queue.renew, ids, self.owner, self.fs.lease_seconds)

    def _items(self, jobs: Sequence[Job]) -> list[SendItem]:
        return [
            SendItem(j.id, j.sop_uid, j.sop_class_uid, j.transfer_syntax, j.sha256,
                     self.gw.files.object_path(j.sha256))
            for j in jobs
        ]

    async def _send(self, name: str, dest: DestinationSettings, jobs: list[Job]) -> BatchResult:
        if name not in self._contexts:
            self._contexts[name] = await self.gw.run(client_context, dest.tls)
        ctx = self._contexts[name]
        items = self._items(jobs)
        if dest.transport == "dimse":
            callbacks = _QueueCallbacks(self.queue, name, dest)
            calling = dest.calling_ae or self.gw.settings.instance.ae_title
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._pool, dimse_send.send_batch, dest, ctx, calling, items, callbacks,
                self.stop_event, lambda event: handle_n_event_report(self.gw, event),
            )
        session = self._sessions.get(name)
        if session is None or session.closed:
            session = self._sessions[name] = stow_send.new_session(dest, ctx)
        result, sent = await stow_send.send_batch(session, dest, jobs[0].study_uid, items)
        callbacks = _QueueCallbacks(self.queue, name, dest)
        for s in sent:
            callbacks.sent(s)
        await self.gw.run(callbacks.flush)
        return result

    def _apply(self, name: str, dest: DestinationSettings, result: BatchResult) -> None:
        """Record failures, give back untouched jobs, handle a missing commitment request."""
        q = self.queue
        for job_id, (error, permanent) in result.failures.items():
            q.mark_failure(job_id, error, dest.retry, permanent=permanent)
        q.release(result.untouched, self.owner)
        if dest.storage_commitment and result.sent and result.commitment_error:
            for job_id in result.sent:
                q.mark_failure(job_id, result.commitment_error, dest.retry, from_states=("sent",))
        m = self.gw.metrics
        m.inc("sekisho_forward_batches_total", destination=name)
        m.inc("sekisho_forward_instances_total", len(result.sent), destination=name,
              outcome="sent")
        m.inc("sekisho_forward_instances_total", len(result.failures), destination=name,
              outcome="failed")
        if result.failures:
            first = next(iter(result.failures.values()))[0]
            log.warning("forwarding to %s: %d instance(s) failed (%s)", name,
                        len(result.failures), first)

    def _fail_all(self, ids: Sequence[int], dest: DestinationSettings, error: str) -> None:
        for job_id in ids:
            self.queue.mark_failure(job_id, error, dest.retry)
