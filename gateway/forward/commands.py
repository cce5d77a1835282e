"""``sekisho send``, ``sekisho queue list|retry|work`` and ``sekisho restore``.

``send`` and ``queue retry`` only change the queue: the workers of the running
gateway (``sekisho serve``) pick the jobs up within ``forward.poll_interval_seconds``.
``queue work`` runs the same workers without the HTTPS/DIMSE listeners (a
separate sender process, or a one-shot ``--until-idle`` pass).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

from gateway.audit import events as ev
from gateway.forward.auditing import destination_extra
from gateway.forward.queue import JobSource, open_queue
from pki.errors import InvalidInputError, NotFoundError

Command = Callable[[argparse.Namespace], int]


def _open(args: argparse.Namespace) -> Any:
    from gateway.cli import _open as open_gateway

    return open_gateway(args)


def _operator() -> str:
    from gateway.cli import _operator as operator

    return operator()


def enqueue_study(gw: Any, study_uid: str, destination: str, by: str) -> tuple[int, int, int]:
    """Queue every stored instance of a study for a destination (used by CLI and API)."""
    dests = gw.settings.destinations
    if destination not in dests:
        known = ", ".join(sorted(dests)) or "none"
        raise NotFoundError(f"no destination named {destination!r} (configured: {known})")
    if not dests[destination].enabled:
        raise InvalidInputError(f"destination {destination!r} is disabled in the configuration")
    instances = gw.store.instances_of(study_uid, None, None, None)
    if not instances:
        raise NotFoundError("no stored instance of this study")
    sources = [
        JobSource(i.sop_instance_uid, i.study_uid, i.sop_class_uid, i.transfer_syntax,
                  i.sha256, i.size)
        for i in instances
    ]
    result = open_queue(gw.settings.store.database).enqueue(
        sources, destination, created_by=by, reason="send on request"
    )
    first = instances[0]
    gw.audit.record(ev.AuditEvent(  # PS3.15 A.5.3.2: who asked for which transfer (R-XCH-7)
        event_id=ev.BEGIN_TRANSFERRING_INSTANCES,
        action=ev.Action.EXECUTE,
        outcome=ev.Outcome.SUCCESS,
        actor=by,
        actor_kind="partner" if by.startswith("api:") else "user",
        destination=destination,
        patient_id=first.patient_id,
        patient_issuer=first.issuer or None,
        study_uids=(study_uid,),
        instance_count=len(instances),
        description=f"study queued for {destination}: {result.new} new, "
                    f"{result.requeued} resumed, {result.present} already queued or sent",
        extra=destination_extra(gw, destination),
    ))
    return result.new, result.requeued, result.present


def cmd_send(args: argparse.Namespace) -> int:
    gw = _open(args)
    try:
        new, requeued, present = enqueue_study(gw, args.study, args.to, args.by or _operator())
    finally:
        gw.close()
    print(f"{new} instance(s) queued for {args.to}"
          + (f", {requeued} stopped job(s) resumed" if requeued else "")
          + (f", {present} already queued or sent" if present else ""))
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    gw = _open(args)
    try:
        queue = open_queue(gw.settings.store.database)
        jobs = queue.list_jobs(state=args.state, destination=args.destination,
                               study_uid=args.study, limit=args.limit)
        counts = queue.counts()
    finally:
        gw.close()
    if args.json:
        print(json.dumps({"counts": counts, "jobs": [j.to_dict() for j in jobs]}, indent=2))
        return 0
    for dest, states in sorted(counts.items()):
        summary = ", ".join(f"{s}={n}" for s, n in sorted(states.items()))
        print(f"{dest}: {summary}")
    for j in jobs:
        when = j.committed_at or j.sent_at or j.to_dict()["next_attempt_at"]
        line = (f"{j.id:>6} {j.destination:<16} {j.state:<9} attempts={j.attempts:<3} "
                f"{str(when)[:19]:<19} sop={j.sop_uid}")
        print(line)
        if j.last_error and j.state in ("queued", "failed"):
            print(f"       last error: {j.last_error}")
    return 0


def cmd_queue_retry(args: argparse.Namespace) -> int:
    if args.job is None and args.destination is None and not args.all:
        raise SystemExit("give --job ID, --destination NAME or --all")
    gw = _open(args)
    try:
        n = open_queue(gw.settings.store.database).retry(
            job_id=args.job, destination=args.destination
        )
        if n:
            scope = (f"job {args.job}" if args.job is not None else
                     f"destination {args.destination}" if args.destination else "all")
            gw.audit.record(ev.AuditEvent(
                event_id=ev.APPLICATION_ACTIVITY,
                action=ev.Action.EXECUTE,
                outcome=ev.Outcome.SUCCESS,
                actor=args.by or _operator(),
                actor_kind="user",
                description=f"{n} stopped forwarding job(s) resumed ({scope})",
            ))
    finally:
        gw.close()
    print(f"{n} stopped job(s) queued again")
    return 0 if n else 1


def cmd_queue_work(args: argparse.Namespace) -> int:
    from gateway.forward.worker import Forwarder
    from gateway.server import configure_logging

    gw = _open(args)
    configure_logging(gw.settings)

    async def run() -> None:
        fw = Forwarder(gw)
        if args.until_idle:
            await fw.run_until_idle()
            await fw.stop()
            return
        await fw.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await fw.stop()

    try:
        asyncio.run(run())
    finally:
        gw.close()
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from gateway.forward.restore import restore_study

    gw = _open(args)
    try:
        if args.list:
            rows = open_queue(gw.settings.store.database).list_restores(args.study)
            for r in rows:
                print(f"{str(r['restored_at'])[:19]} {r['outcome']!s:<10} from={r['source']} "
                      f"by={r['restored_by']} sop={r['sop_uid']} {r['detail']}")
            return 0
        if not args.source:
            raise SystemExit("give --from NAME")
        report = asyncio.run(restore_study(gw, args.source, args.study, args.by or _operator()))
    finally:
        gw.close()
    print(f"restore {report.restore_id} from {report.source}: {len(report.verified)} verified "
          f"({report.written} written back), {len(report.mismatched)} MISMATCHED, "
          f"{len(report.missing)} missing, {len(report.unexpected)} unexpected")
    for uid in report.mismatched:
        print(f"  MISMATCH (quarantined, not stored): {uid}", file=sys.stderr)
    for uid in report.missing:
        print(f"  missing at the destination: {uid}", file=sys.stderr)
    return 0 if report.ok else 3


def add_commands(sub: Any, with_config: Callable[[argparse.ArgumentParser], Any]) -> None:
    """Register the forwarding commands on the ``sekisho`` parser."""
    p = with_config(sub.add_parser("send", help="send a study to a configured destination"))
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--to", required=True, help="destination name ([destinations.NAME])")
    p.add_argument("--by", help="staff member requesting it (default: login name)")
    p.set_defaults(func=cmd_send)

    queue = sub.add_parser("queue", help="the forwarding queue").add_subparsers(
        dest="queue_command", required=True
    )
    p = with_config(queue.add_parser("list", help="jobs and their states"))
    p.add_argument("--state", choices=["queued", "sending", "sent", "committed", "failed"])
    p.add_argument("--destination")
    p.add_argument("--study")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue_list)
    p = with_config(queue.add_parser("retry", help="resume stopped (failed) jobs"))
    p.add_argument("--job", type=int)
    p.add_argument("--destination")
    p.add_argument("--all", action="store_true")
    p.add_argument("--by", help="staff member resuming them (default: login name)")
    p.set_defaults(func=cmd_queue_retry)
    p = with_config(queue.add_parser("work", help="run forwarding workers without listeners"))
    p.add_argument("--until-idle", action="store_true", help="send what is due, then exit")
    p.set_defaults(func=cmd_queue_work)

    p = with_config(sub.add_parser("restore", help="restore a study from a destination"))
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--from", dest="source", help="destination name to restore from")
    p.add_argument("--by", help="staff member restoring (default: login name)")
    p.add_argument("--list", action="store_true", help="show recorded restores of the study")
    p.set_defaults(func=cmd_restore)
