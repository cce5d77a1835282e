"""``sekisho media inspect|import|imports|finalize-due`` (R-PDI-1..6), for scripts and kiosks.

``inspect`` reads a medium and prints what staff need to choose (patients,
studies, series, findings); it writes nothing and works without an instance.
``import`` runs :func:`gateway.imports.service.run_media_import` with a
progress bar on stderr; the ``--operator`` is the responsible party written
into every instance and the import record.  ``imports`` lists the records and
``finalize-due`` finalizes saved imports whose scheduled time has come
(``[media.finalization] mode = "scheduled"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from gateway.imports.config import MediaConfig
from pki.errors import InvalidInputError

Command = Callable[[argparse.Namespace], int]


def _gateway(args: argparse.Namespace) -> Any:
    from gateway.cli import _open

    return _open(args)


class ProgressBar:
    """A one-line progress bar on a terminal; otherwise a line per 10% for long imports."""

    #: Without a terminal, imports of fewer steps print no progress at all.
    min_lines_total = 100

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self._last = -1
        self._open = False

    def __call__(self, done: int, total: int) -> None:
        total = max(total, 1)
        percent = min(100, done * 100 // total)
        if self.tty:
            if percent == self._last and done != total:
                return
            filled = self.width * percent // 100
            bar = "#" * filled + "-" * (self.width - filled)
            elapsed = time.monotonic() - self.started
            self.stream.write(
                f"\r{self.label} [{bar}] {percent:3d}% {done}/{total} {elapsed:5.0f}s"
            )
            self._open = True
        elif total >= self.min_lines_total and (percent // 10 != self._last // 10 or done == total):
            self.stream.write(f"{self.label}: {percent}% ({done}/{total})\n")
        self._last = percent
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


# -- inspect -----------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from gateway.imports.service import report_fingerprint
    from media.inspect import inspect_media
    from media.source import open_source

    config = _media_config(args)
    settings = config.library_settings(None)
    with open_source(Path(args.path), settings) as source:
        report = inspect_media(source, settings)
    if args.json:
        out = report.to_dict()
        out["fingerprint"] = report_fingerprint(report)
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(report.to_text())
    if report.findings:
        print("Finding details:")
        for f in report.findings:
            print(f"  {f.severity.value:7} {f.code.value}: {f.path or '-'}: {f.message}")
    if report.never_imported:
        print("Never imported (programs, autorun, viewers, links):")
        for path in report.never_imported:
            print(f"  {path}")
    print(f"Select with --select patient:N, study:N.N or series:N.N.N ({len(report.patients)} "
          "patient(s) on the medium; nothing is selected by default)")  # fmt: skip
    return 0


def _media_config(args: argparse.Namespace) -> MediaConfig:
    """The instance's ``[media]`` settings, or the defaults when there is no instance."""
    from gateway.settings import load_settings, resolve_config_path

    path = resolve_config_path(getattr(args, "config", None))
    if getattr(args, "config", None) or path.exists():
        return load_settings(path).media
    return MediaConfig()


# -- import ------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from gateway.imports.service import ImportRequest, run_media_import
    from media.reconcile import Operator

    if not args.select:
        raise InvalidInputError(
            "nothing is selected; choose patients, studies or series with --select "
            "(see `sekisho media inspect`)"
        )
    gw = _gateway(args)
    try:
        staff = gw.settings.media.console.staff.get(args.operator)
        name = args.operator_name or (staff.name if staff else "") or args.operator
        request = ImportRequest(
            path=Path(args.path),
            importer=Operator(args.operator, name),
            patient_id=args.patient_id,
            issuer=args.issuer,
            selection=tuple(args.select),
            confirm_mismatch=args.confirm_mismatch,
            media_type=args.media_type,
            media_label=args.label,
            source_facility=args.source_facility,
            accession_number=args.accession,
            patient_name=args.patient_name,
            birth_date=args.birth_date,
            sex=args.sex,
            supersedes=args.supersedes,
            change_reason=args.reason or "",
        )
        bar = None if args.no_progress else ProgressBar("import")
        try:
            outcome = run_media_import(gw, request, progress=bar)
        finally:
            if bar is not None:
                bar.close()
    finally:
        gw.close()
    record, result = outcome.record, outcome.result
    if args.json:
        print(json.dumps(
            {"record": record.to_dict(), "queued": outcome.queued,
             "queue_error": outcome.queue_error}, indent=2, ensure_ascii=False,
        ))  # fmt: skip
        return 0
    print(f"import #{record.id} {record.status}: {len(result.imported)} instance(s) imported "
          f"by {record.importer_id} [{record.importer_name}]")  # fmt: skip
    if record.finalize_due_at:
        print(f"  finalization due at {record.finalize_due_at} "
              f"({gw.settings.media.finalization.responsible_id})")  # fmt: skip
    for skipped in result.skipped:
        print(f"  skipped {skipped.path}: {skipped.reason.value}: {skipped.message}")
    counts = record.details.get("findings", [])
    if counts:
        print(f"  {len(counts)} finding(s); see `sekisho media imports --id {record.id} --json`")
    for name, n in outcome.queued.items():
        print(f"  {n} instance(s) queued for {name}")
    if outcome.queue_error:
        print(f"WARNING: queueing for the PACS failed: {outcome.queue_error}", file=sys.stderr)
    return 0


# -- records -----------------------------------------------------------------
def cmd_imports(args: argparse.Namespace) -> int:
    from gateway.imports.records import ImportRecords

    gw = _gateway(args)
    try:
        records = ImportRecords(gw.settings.store.database)
        if args.id is not None:
            rows = [records.get(args.id)]
        else:
            rows = records.query(status=args.status, patient_id=args.patient_id, limit=args.limit)
        if args.id is not None and args.json:
            out = rows[0].to_dict() | {"instances": records.instances(args.id)}
            print(json.dumps(out, indent=2, ensure_ascii=False))
            return 0
    finally:
        gw.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False))
        return 0
    for r in rows:
        print(r.summary())
    return 0


def cmd_finalize_due(args: argparse.Namespace) -> int:
    from gateway.imports.finalization import finalize_due
    from gateway.imports.records import ImportRecords

    now = _parse_now(args.now) if args.now else datetime.now(UTC)
    gw = _gateway(args)
    try:
        if gw.settings.media.finalization.mode != "scheduled":
            print("finalization is on save ([media.finalization] mode = \"on-save\"): "
                  "nothing to do")  # fmt: skip
            return 0
        done = finalize_due(gw, ImportRecords(gw.settings.store.database), now)
    finally:
        gw.close()
    for item in done:
        print(f"import #{item.id} finalized by {item.finalized_by} at {item.finalized_at}")
    print(f"{len(done)} import(s) finalized")
    return 0


def _parse_now(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInputError("--now must be an ISO 8601 date and time") from exc
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as an operator would write it
    return moment


# -- parser ------------------------------------------------------------------
def add_commands(sub: Any, with_config: Callable[[argparse.ArgumentParser], Any]) -> None:
    media = sub.add_parser(
        "media", help="patient-brought media (IHE PDI): inspect, import, records"
    ).add_subparsers(dest="media_command", required=True)

    p = with_config(media.add_parser("inspect", help="show what is on a medium (writes nothing)"))
    p.add_argument("path", help="mounted CD/DVD/USB folder or ISO 9660 image")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = with_config(media.add_parser("import", help="import selected studies of a medium"))
    p.add_argument("path", help="mounted CD/DVD/USB folder or ISO 9660 image")
    p.add_argument("--operator", required=True, help="staff ID of the importer (responsible)")
    p.add_argument("--operator-name", help="importer's name as DICOM PN (default: from "
                   "[media.console.staff.ID], else the ID)")  # fmt: skip
    p.add_argument("--patient-id", required=True, help="the hospital's patient ID")
    p.add_argument("--issuer", default="", help="issuer of the hospital's patient ID")
    p.add_argument("--select", action="extend", nargs="+", metavar="SPEC",
                   help="patient:N, study:N.N or series:N.N.N, or a Study/Series UID")  # fmt: skip
    p.add_argument("--confirm-mismatch", action="store_true",
                   help="import although name/birth date/sex differ (recorded)")  # fmt: skip
    p.add_argument("--media-type", choices=["CD", "DVD", "USB", "ISO"],
                   help="default: ISO for an image file, CD for a folder")  # fmt: skip
    p.add_argument("--label", help="media label (default: volume or folder name)")
    p.add_argument("--source-facility", help="facility that made the medium")
    p.add_argument("--accession", help="the hospital's accession number to write")
    p.add_argument("--patient-name", help="local name (PN) if the store does not know the patient")
    p.add_argument("--birth-date", help="local birth date YYYYMMDD (same)")
    p.add_argument("--sex", choices=["M", "F", "O"], help="local sex (same)")
    p.add_argument("--supersedes", type=int, metavar="ID",
                   help="this import changes import ID (a new, linked record)")  # fmt: skip
    p.add_argument("--reason", help="reason for the change (with --supersedes)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = with_config(media.add_parser("imports", help="list import records"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--id", type=int, help="one record, with its stored instances (--json)")
    p.add_argument("--status", choices=["importing", "saved", "finalized", "stopped"])
    p.add_argument("--patient-id")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(func=cmd_imports)

    p = with_config(
        media.add_parser("finalize-due", help="finalize saved imports whose time has come")
    )
    p.add_argument("--now", help="ISO 8601 moment to use instead of the clock (local if naive)")
    p.set_defaults(func=cmd_finalize_due)
