"""``sekisho film``, ``sekisho digitize`` and ``sekisho signatures`` (R-DIG-1..5, R-SIG-6).

::

    sekisho film receive --patient-id ID [--issuer X] --from FACILITY --films N
                         [--received-at ISO] [--study-uid UID] [--accession A] [--modality MG]
    sekisho film list [--patient-id ID] [--json]
    sekisho film plan PLAN_ID --description T --committee-approval T --external-auditor T
    sekisho digitize FILES... --receipt ID --operator ID --signer SPEC [--pitch-um N]
                     [--density-min D --density-max D] [--bits-stored N] [--sidecar JSON]
                     [--mammography] [--paper [--paper-sc] [--encapsulate]]
                     [--bulk-plan PLAN_ID --patient-consent REF]
    sekisho digitize overdue [--now ISO] [--json]
    sekisho signatures renew [--dry-run] [--now ISO] [--json]
    sekisho signatures status [--now ISO] [--json]
    sekisho signatures verify (--record N | FILE [--evidence FILE.ers]) [--now ISO]
                              [--crl FILE]... [--json]

``--signer`` takes the forms of :meth:`signing.signers.SignerSpec.parse`
(``pkcs12:FILE,password-file=PATH`` or ``pkcs11:module=...,pin-file=...``);
without ``pin-file`` a PKCS#11 PIN is asked for on the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.service import Gateway
from gateway.settings import load_settings, resolve_config_path

__all__ = ["add_commands"]


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


def _open(args: argparse.Namespace) -> Gateway:
    logging.getLogger("pyhanko").setLevel(logging.CRITICAL)  # expected failures log tracebacks
    logging.getLogger("pyhanko_certvalidator").setLevel(logging.CRITICAL)
    return Gateway.open(load_settings(resolve_config_path(args.config)))


def _run(args: argparse.Namespace, work: Callable[[Gateway], Any]) -> Any:
    gw = _open(args)
    try:
        return asyncio.run(work(gw))
    finally:
        gw.close()


def _print(data: Any, as_json: bool, text: Callable[[Any], None]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        text(data)


def cmd_film_receive(args: argparse.Namespace) -> int:
    from gateway.digitization.intake import parse_time, receive_film

    async def work(gw: Gateway) -> Any:
        return await receive_film(
            gw,
            patient_id=args.patient_id,
            issuer=args.issuer,
            source_facility=args.source,
            films=args.films,
            received_by=args.by or _login(),
            received_at=parse_time(args.received_at, gw) if args.received_at else None,
            study_uid=args.study_uid or "",
            accession=args.accession or "",
            modality=args.modality or "",
            patient_name=args.patient_name or "",
            note=args.note or "",
        )

    receipt = _run(args, work)
    _print(
        receipt.to_dict(),
        args.json,
        lambda r: print(
            f"film receipt {r['id']} recorded: {r['films']} film(s) from {r['source_facility']};"
            f" digitize before {r['deadline']}"
        ),
    )
    return 0


def cmd_film_list(args: argparse.Namespace) -> int:
    from gateway.digitization.intake import records_of

    async def work(gw: Gateway) -> Any:
        return await gw.run(records_of(gw).receipts, args.patient_id)

    rows = [r.to_dict() for r in _run(args, work)]

    def text(items: list[dict[str, Any]]) -> None:
        for r in items:
            print(
                f"{r['id']}: patient {r['patient_id']} films {r['digitized_images']}/{r['films']}"
                f" from {r['source_facility']} received {r['received_at']}"
                f" deadline {r['deadline']}"
            )

    _print(rows, args.json, text)
    return 0


def cmd_film_plan(args: argparse.Namespace) -> int:
    from gateway.digitization.intake import record_plan

    async def work(gw: Gateway) -> Any:
        return await record_plan(
            gw,
            args.plan_id,
            description=args.description,
            committee_approval=args.committee_approval,
            external_auditor=args.external_auditor,
            recorded_by=args.by or _login(),
        )

    plan = _run(args, work)
    print(f"bulk digitization plan {plan.id} recorded")
    return 0


def _scan_info(args: argparse.Namespace) -> Any:
    from media.digitize import ScanInfo

    return ScanInfo(
        pitch_um=args.pitch_um,
        pitch_col_um=args.pitch_col_um,
        density_min=args.density_min,
        density_max=args.density_max,
        bits_stored=args.bits_stored,
        photometric=args.photometric,
        manufacturer=args.manufacturer or "",
        model=args.model or "",
        serial_number=args.serial_number or "",
        modality="MG" if args.mammography else "",
    )


def cmd_digitize(args: argparse.Namespace) -> int:
    if args.items == ["overdue"]:
        return _overdue(args)
    from gateway.digitization.workflow import DigitizeRequest, digitize

    missing = [o for o, v in (("--receipt", args.receipt), ("--operator", args.operator)) if not v]
    if missing:
        raise SystemExit(f"sekisho digitize: {', '.join(missing)} required")
    if bool(args.bulk_plan) != bool(args.patient_consent):
        raise SystemExit("sekisho digitize: --bulk-plan and --patient-consent go together")
    files = tuple(Path(f) for f in args.items)
    for f in files:
        if not f.is_file():
            raise SystemExit(f"sekisho digitize: {f} is not a file")
    req = DigitizeRequest(
        receipt_id=args.receipt,
        files=files,
        operator_id=args.operator,
        operator_name=args.operator_name or "",
        signer=args.signer,
        kind="paper" if args.paper else "film",
        scan=_scan_info(args),
        sidecar=Path(args.sidecar) if args.sidecar else None,
        mammography=args.mammography,
        bulk_plan=args.bulk_plan,
        patient_consent=args.patient_consent or "",
        paper_sc=args.paper_sc,
        encapsulate=args.encapsulate,
        title=args.title or "",
    )
    result = _run(args, lambda gw: digitize(gw, req, pin_prompt=getpass.getpass))

    def text(data: dict[str, Any]) -> None:
        d = data["digitization"]
        flag = " LATE (after the deadline)" if d["late"] else ""
        print(f"digitization {d['id']}: {len(data['records'])} signed record(s) stored{flag}")
        print(
            f"  signer {d['signer']} ({d['hc_role'] or 'no hcRole'}), timestamp"
            f" {d['timestamp_time'] or '-'}; information-creation manager"
            f" {d['information_manager']}"
        )
        for alert in data["clock_skew_alerts"]:
            print(f"WARNING: clock skew {alert['skew_seconds']:.1f} s against {alert['tsa']}")

    _print(result.to_dict(), args.json, text)
    return 0


def _overdue(args: argparse.Namespace) -> int:
    from gateway.digitization.intake import overdue, parse_time

    async def work(gw: Gateway) -> Any:
        now = parse_time(args.now, gw) if args.now else None
        return await gw.run(overdue, gw, now)

    data = _run(args, work)

    def text(d: dict[str, Any]) -> None:
        for r in d["overdue_receipts"]:
            print(
                f"OVERDUE receipt {r['id']}: patient {r['patient_id']},"
                f" {r['digitized_images']}/{r['films']} film(s) digitized, deadline"
                f" {r['deadline']}"
            )
        for g in d["late_digitizations"]:
            print(
                f"LATE digitization {g['id']} (receipt {g['receipt_id']}): digitized"
                f" {g['digitized_at']}, deadline {g['deadline']}"
            )
        if not d["overdue_receipts"] and not d["late_digitizations"]:
            print("nothing overdue")

    _print(data, args.json, text)
    return 0


def cmd_signatures_renew(args: argparse.Namespace) -> int:
    from gateway.digitization.intake import parse_time
    from gateway.digitization.renewal import renew_signatures

    async def work(gw: Gateway) -> Any:
        now = parse_time(args.now, gw) if args.now else None
        return await renew_signatures(gw, now=now, dry_run=args.dry_run, actor=args.by or _login())

    run = _run(args, work)

    def text(r: Any) -> None:
        verb = "due (dry run)" if r.dry_run else "due"
        print(f"{len(r.due)} record(s) {verb}, {len(r.renewed)} renewed, {len(r.failed)} failed")
        for item in r.renewed:
            print(
                f"  renewed record {item['record']}: protected until {item['new_protected_until']}"
            )
        for item in r.failed:
            print(f"  FAILED record {item['record']}: {item['error']}")

    _print(run.to_dict() if args.json else run, args.json, text)
    return 1 if run.failed else 0


def cmd_signatures_status(args: argparse.Namespace) -> int:
    from gateway.digitization.intake import records_of

    async def work(gw: Gateway) -> Any:
        return await gw.run(records_of(gw).signed_records)

    rows = [r.to_dict() for r in _run(args, work)]

    def text(items: list[dict[str, Any]]) -> None:
        for r in items:
            error = f"  ERROR {r['last_error']}" if r["last_error"] else ""
            print(
                f"{r['id']}: {r['kind']} {r['record_type']} protected until"
                f" {r['protected_until'] or '-'} ({r['protection_reason'] or 'no timestamp'})"
                f" renewals {r['renewals']}{error}"
            )

    _print(rows, args.json, text)
    return 0


def cmd_signatures_verify(args: argparse.Namespace) -> int:
    from gateway.digitization.verification import verify_long_term

    report = _run(
        args,
        lambda gw: verify_long_term(
            gw,
            record_id=args.record,
            path=Path(args.file) if args.file else None,
            evidence=Path(args.evidence) if args.evidence else None,
            now_text=args.now,
            crl_files=[Path(c) for c in args.crl or ()],
            record_type=args.type,
        ),
    )

    def text(r: dict[str, Any]) -> None:
        print(
            f"{r['verdict'].upper()} at {r['checked_at']} ({r['kind']});"
            f" protected until {r['protected_until'] or '-'}"
        )
        for p in r["problems"]:
            print(f"  problem: {p}")

    _print(report.to_dict(), args.json, text)
    return 0 if report.ok else 1


def add_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    """Register ``film``, ``digitize`` and ``signatures`` on the ``sekisho`` parser."""
    film = sub.add_parser("film", help="film receipts and bulk plans (R-DIG-3, R-DIG-5)")
    fsub = film.add_subparsers(dest="film_command", required=True)
    p = with_config(fsub.add_parser("receive", help="record received films"))
    p.add_argument("--patient-id", required=True)
    p.add_argument("--issuer", default="")
    p.add_argument("--from", dest="source", required=True, help="facility the films come from")
    p.add_argument("--films", type=int, required=True)
    p.add_argument("--received-at", help="ISO 8601 (default: now; no offset = local time)")
    p.add_argument("--study-uid")
    p.add_argument("--accession")
    p.add_argument("--modality", help="modality of the films, e.g. MG for mammography")
    p.add_argument("--patient-name")
    p.add_argument("--note")
    p.add_argument("--by", help="staff member receiving (default: login name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_film_receive)
    p = with_config(fsub.add_parser("list", help="film receipts"))
    p.add_argument("--patient-id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_film_list)
    p = with_config(fsub.add_parser("plan", help="record a bulk digitization plan (R-DIG-5)"))
    p.add_argument("plan_id")
    p.add_argument("--description", required=True)
    p.add_argument("--committee-approval", required=True, help="committee decision reference")
    p.add_argument("--external-auditor", required=True)
    p.add_argument("--by")
    p.set_defaults(func=cmd_film_plan)

    p = with_config(sub.add_parser("digitize", help="digitize films or paper, or list overdue"))
    p.add_argument("items", nargs="+", metavar="FILE", help="scan files, or the word 'overdue'")
    p.add_argument("--receipt")
    p.add_argument("--operator", help="operator ID (作業責任者)")
    p.add_argument("--operator-name")
    p.add_argument("--signer", help="pkcs12:FILE,password-file=PATH | pkcs11:module=...")
    for name in ("--pitch-um", "--pitch-col-um", "--density-min", "--density-max"):
        p.add_argument(name, type=float)
    p.add_argument("--bits-stored", type=int)
    p.add_argument("--photometric", choices=["MONOCHROME1", "MONOCHROME2"])
    p.add_argument("--manufacturer")
    p.add_argument("--model")
    p.add_argument("--serial-number")
    p.add_argument("--sidecar", help="JSON with pitch_um, density_min/max, ... for every file")
    p.add_argument("--mammography", action="store_true", help="apply the mammography limits")
    p.add_argument("--paper", action="store_true", help="scanned paper record: PDF (PAdES)")
    p.add_argument("--paper-sc", action="store_true", help="also SC images (SD, DOCD)")
    p.add_argument("--encapsulate", action="store_true", help="also Encapsulated PDF")
    p.add_argument("--title")
    p.add_argument("--bulk-plan", help="recorded plan id for past films (R-DIG-5)")
    p.add_argument("--patient-consent", help="patient notice/consent reference (R-DIG-5)")
    p.add_argument("--now", help="overdue only: list as of this ISO 8601 time")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_digitize)

    sig = sub.add_parser("signatures", help="long-term validity of signed records (R-SIG-6)")
    ssub = sig.add_subparsers(dest="signatures_command", required=True)
    p = with_config(ssub.add_parser("renew", help="renew archive timestamps that expire soon"))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--now", help="plan as of this ISO 8601 time")
    p.add_argument("--by")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_signatures_renew)
    p = with_config(ssub.add_parser("status", help="signed records and their protection"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_signatures_status)
    p = with_config(ssub.add_parser("verify", help="verify a record as of a time"))
    p.add_argument("file", nargs="?")
    p.add_argument("--record", type=int, help="signed record number (see 'status')")
    p.add_argument("--evidence", help="evidence record (default: FILE.ers if present)")
    p.add_argument("--type", help="record type whose signing policy applies")
    p.add_argument("--now", help="verify as of this ISO 8601 time")
    p.add_argument("--crl", action="append", help="current CRL of the newest TSA (PEM/DER)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_signatures_verify)
