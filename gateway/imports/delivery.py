"""Delivery of imported instances to the hospital archive (R-PDI-7).

The local store has them as soon as the import returns; for every enabled
destination with ``role = "pacs"`` they are also queued in the durable
forwarding queue (:mod:`gateway.forward.queue`), whose workers in
``sekisho serve`` (or ``sekisho queue work``) deliver them by C-STORE or
STOW-RS over mutual TLS, with retries and Storage Commitment where configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.imports.auditing import pacs_transfer_event
from gateway.imports.records import RecordHeader
from media.import_result import ImportResult

if TYPE_CHECKING:
    from gateway.service import Gateway


def queue_for_pacs(
    gw: Gateway, header: RecordHeader, import_id: int, result: ImportResult
) -> dict[str, int]:
    """Queue the imported instances for every enabled ``pacs`` destination (R-PDI-7).

    Uses the durable forwarding queue (:mod:`gateway.forward.queue`): the
    workers of ``sekisho serve`` (or ``sekisho queue work``) deliver them by
    C-STORE or STOW-RS over TLS, with retries.  Duplicates with
    ``[routing] on_receive`` are harmless (one job per instance and destination).
    """
    pacs = [n for n, d in gw.settings.destinations.items() if d.role == "pacs" and d.enabled]
    if not pacs or not result.imported:
        return {}
    from gateway.forward.auditing import destination_extra
    from gateway.forward.queue import JobSource, open_queue

    sources = []
    for item in result.imported:
        stored = gw.store.find_instance(item.sop_instance_uid)
        if stored is not None:
            sources.append(
                JobSource(stored.sop_instance_uid, stored.study_uid, stored.sop_class_uid,
                          stored.transfer_syntax, stored.sha256, stored.size)
            )  # fmt: skip
    queue = open_queue(gw.settings.store.database)
    queued: dict[str, int] = {}
    for name in pacs:
        got = queue.enqueue(
            sources, name, created_by=f"media-import:{import_id}", reason="media import (R-PDI-7)"
        )
        queued[name] = got.new + got.requeued
        gw.audit.record(
            pacs_transfer_event(
                header, import_id, name, (s.study_uid for s in sources), len(sources),
                destination_extra(gw, name),
            )
        )  # fmt: skip
    return queued
