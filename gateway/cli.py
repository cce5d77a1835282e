"""The ``sekisho`` command line.

Commands that act on an instance take ``--config FILE`` (default: the
``SEKISHO_CONFIG`` environment variable, then ``./sekisho.toml``).  Errors are
printed as one line an operator can act on, with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.audit import events as ev
from gateway.service import Gateway
from gateway.settings import Settings, load_settings, resolve_config_path
from pki.errors import SekishoError

Command = Callable[[argparse.Namespace], int]


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(resolve_config_path(getattr(args, "config", None)))


def _open(args: argparse.Namespace) -> Gateway:
    return Gateway.open(_settings(args))


# -- pki -------------------------------------------------------------------
def cmd_pki_dev_init(args: argparse.Namespace) -> int:
    from pki import devpki

    pki = devpki.generate(Path(args.out))
    print(f"development PKI written to {pki.root}")
    for entry in pki.manifest["certificates"]:
        print(f"  {entry['role']:28} sha256:{entry['sha256']}")
    return 0


def cmd_pki_show(args: argparse.Namespace) -> int:
    """Show trust anchors with their SHA-256 fingerprints (R-TLS-7)."""
    from pki.certs import fingerprint_sha256, load_pem_certificates

    s = _settings(args)
    for path in (*s.tls.trust_anchors, *s.tls.intermediates, s.tls.certificate):
        for cert in load_pem_certificates(path):
            print(f"{path}\n  subject: {cert.subject.rfc4514_string()}")
            print(f"  sha256:  {fingerprint_sha256(cert)}")
            print(f"  expires: {cert.not_valid_after_utc:%Y-%m-%d}")
    gw = Gateway.open(s)
    try:
        for warning in gw.expiry_warnings():
            print(f"WARNING: {warning}")
    finally:
        gw.close()
    return 0


# -- instance --------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from gateway.instance import curl_example, init_instance

    result = init_instance(
        Path(args.directory),
        https_port=args.https_port,
        dimse_port=args.dimse_port,
        monitoring_port=args.monitoring_port,
        force=args.force,
    )
    verb = "created" if result.created else "already exists"
    print(f"instance {verb}: {result.config}")
    print(f"try it with a partner certificate:\n  {curl_example(result, args.https_port)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import configure_logging, serve_forever

    settings = _settings(args)
    configure_logging(settings)
    workers = settings.https.workers
    if workers == 1:
        asyncio.run(serve_forever(settings))
        return 0
    # Several processes share the HTTPS port (R-OPS-1).  Housekeeping runs once,
    # before any of them serves; SQLite connections are opened after the fork.
    from gateway.server import housekeeping

    gw = Gateway.open(settings)
    try:
        housekeeping(gw)
    finally:
        gw.close()
    parent = os.getpid()
    children: list[int] = []
    for _ in range(workers - 1):
        pid = os.fork()
        if pid == 0:  # an HTTPS worker
            code = 0
            try:
                asyncio.run(
                    serve_forever(settings, primary=False, housekeeping_done=True, parent=parent)
                )
            except BaseException:  # noqa: BLE001 - report and leave without unwinding the parent's stack
                logging.getLogger("sekisho").exception("HTTPS worker failed")
                code = 1
            os._exit(code)
        children.append(pid)
    try:
        asyncio.run(serve_forever(settings, housekeeping_done=True))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from pki.tls import server_context

    s = _settings(args)
    server_context(s.tls)
    from gateway.forward.worker import client_contexts

    client_contexts(s)  # every destination's TLS files and key/certificate match
    from gateway.signatures.config import load_signing_settings, signing_configured

    if signing_configured(s) or s.audit.seal_interval_minutes > 0:
        load_signing_settings(s)  # [signing] anchors, CRLs and policies load (R-SIG)
    print("configuration is valid")
    return 0


# -- partners --------------------------------------------------------------
def cmd_partner_add(args: argparse.Namespace) -> int:
    from gateway.instance import partner_from_certificate

    gw = _open(args)
    try:
        partner = partner_from_certificate(
            args.name,
            Path(args.certificate),
            ae_titles=tuple(args.ae_title or ()),
            permissions=tuple(args.permission or ()),
            networks=tuple(args.network or ()),
            allowed_addresses=tuple(args.allow_address or ()),
            role=args.role,
            created_by=_operator(),
            move_destinations=_move_destinations(args.move_destination or ()),
        )
        gw.store.add_partner(partner)
        gw.audit.record(
            ev.AuditEvent(
                event_id=ev.APPLICATION_ACTIVITY,
                action=ev.Action.CREATE,
                outcome=ev.Outcome.SUCCESS,
                event_type_codes=(ev.SECURITY_CONFIGURATION,),
                actor=_operator(),
                actor_kind="user",
                description=f"partner {args.name!r} registered",
                extra={"cert_sha256": partner.fingerprints[0]},
            )
        )
        print(f"partner {args.name} registered; certificate sha256:{partner.fingerprints[0]}")
    finally:
        gw.close()
    return 0


def _move_destinations(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``AE=host:port`` options to (AE title, "host:port") pairs (PS3.4 C.4.2.1.4.1)."""
    from pki.errors import InvalidInputError

    out: list[tuple[str, str]] = []
    for value in values:
        ae, _, address = value.partition("=")
        host, _, port = address.rpartition(":")
        ae = ae.strip()
        if not (1 <= len(ae) <= 16 and ae.isascii() and "\\" not in ae) or not host:
            raise InvalidInputError(f"--move-destination {value!r}: expected AE=host:port")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInputError(f"--move-destination {value!r}: invalid port")
        out.append((ae, f"{host}:{int(port)}"))
    return tuple(out)


def cmd_partner_list(args: argparse.Namespace) -> int:
    gw = _open(args)
    try:
        partners = gw.store.list_partners()
    finally:
        gw.close()
    if args.json:
        print(
            json.dumps(
                [p.__dict__ | {"permissions": sorted(p.permissions)} for p in partners],
                indent=2,
                default=list,
            )
        )
        return 0
    for p in partners:
        print(
            f"{p.name}: role={p.role} permissions={','.join(sorted(p.permissions)) or '-'} "
            f"ae={','.join(p.ae_titles) or '-'} networks={','.join(p.networks) or '-'} "
            f"cert-expires={p.certificate_not_after[:10] or '?'}"
        )
        for ae, address in p.move_destinations:
            print(f"    move-destination {ae}={address}")
        for fp in p.fingerprints:
            print(f"    sha256:{fp}")
    return 0


def cmd_partner_remove(args: argparse.Namespace) -> int:
    gw = _open(args)
    try:
        if not gw.store.remove_partner(args.name):
            print(f"no partner named {args.name!r}", file=sys.stderr)
            return 1
        gw.audit.record(
            ev.AuditEvent(
                event_id=ev.APPLICATION_ACTIVITY,
                action=ev.Action.DELETE,
                outcome=ev.Outcome.SUCCESS,
                event_type_codes=(ev.SECURITY_CONFIGURATION,),
                actor=_operator(),
                actor_kind="user",
                description=f"partner {args.name!r} removed",
            )
        )
    finally:
        gw.close()
    print(f"partner {args.name} removed")
    return 0


# -- consent ---------------------------------------------------------------
def _scope(args: argparse.Namespace) -> tuple[str, str]:
    if bool(args.partner) == bool(args.network):
        raise SystemExit("give exactly one of --partner or --network")
    return ("partner", args.partner) if args.partner else ("network", args.network)


def _consent_event(args: argparse.Namespace, action: str, text: str) -> ev.AuditEvent:
    return ev.AuditEvent(
        event_id=ev.PATIENT_RECORD,
        action=action,
        outcome=ev.Outcome.SUCCESS,
        actor=args.by or _operator(),
        actor_kind="user",
        patient_id=args.patient_id,
        patient_issuer=args.issuer or None,
        description=text,
    )


def cmd_consent_grant(args: argparse.Namespace) -> int:
    kind, scope = _scope(args)
    gw = _open(args)
    try:
        c = gw.store.grant_consent(
            args.patient_id, args.issuer, kind, scope, args.by or _operator(), args.note
        )
        gw.audit.record(
            _consent_event(args, ev.Action.CREATE, f"consent to share with {kind} {scope}")
        )
    finally:
        gw.close()
    print(
        f"consent {c.id} recorded: share with {kind} {scope}, by {c.granted_by} at {c.granted_at}"
    )
    return 0


def cmd_consent_revoke(args: argparse.Namespace) -> int:
    kind, scope = _scope(args)
    gw = _open(args)
    try:
        n = gw.store.revoke_consent(
            args.patient_id, args.issuer, kind, scope, args.by or _operator()
        )
        if n:
            gw.audit.record(
                _consent_event(
                    args, ev.Action.UPDATE, f"consent to share with {kind} {scope} revoked"
                )
            )
    finally:
        gw.close()
    print(f"{n} consent record(s) revoked")
    return 0 if n else 1


def cmd_consent_list(args: argparse.Namespace) -> int:
    gw = _open(args)
    try:
        rows = gw.store.list_consents(args.patient_id)
    finally:
        gw.close()
    for c in rows:
        state = f"revoked by {c.revoked_by} at {c.revoked_at}" if c.revoked_at else "active"
        print(
            f"{c.id}: {c.patient_id}^{c.issuer} -> {c.scope_kind} {c.scope_name} "
            f"(by {c.granted_by} at {c.granted_at}; {state})"
        )
    return 0


# -- audit -----------------------------------------------------------------
def cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit.trail import AuditTrail
    from gateway.signatures.sealing import token_check_for

    s = _settings(args)
    trail = AuditTrail(s.audit_database)
    # R-AUD-2: with [signing] configured, each seal's RFC 3161 token is verified too.
    report = trail.verify(token_check=token_check_for(s))
    stale = _unchecked_records(trail, report)
    if report.ok and stale:
        print(
            f"AUDIT TRAIL NOT COVERED: records {stale[0]} to {stale[-1]} were appended after the "
            "last head checkpoint and more than a minute ago; they may have been forged. If the "
            "gateway crashed, starting it records the gap as a Security Alert.",
            file=sys.stderr,
        )
        return 4
    if report.ok:
        print(
            f"audit trail intact: {report.records} record(s), head {report.head_seq}, "
            f"{report.seals_checked} seal(s) checked"
        )
        for warning in report.warnings:
            print(f"warning: {warning}")
        return 0
    print(f"AUDIT TRAIL ALTERED: {report.problem}", file=sys.stderr)
    for problem in report.problems[1:]:
        print(f"  also: {problem}", file=sys.stderr)
    if report.first_bad_seq is not None:
        print(f"  first affected record: {report.first_bad_seq}", file=sys.stderr)
    return 3


#: Records this recent may legitimately be missing from the head checkpoint
#: while a running gateway appends (the checkpoint follows each commit).
CHECKPOINT_GRACE_SECONDS = 60


def _unchecked_records(trail: Any, report: Any) -> list[int]:
    """Sequence numbers past the head checkpoint that are older than the grace period."""
    checkpoint = report.checkpoint_seq or 0
    if checkpoint >= report.head_seq:
        return []
    horizon = datetime.now(UTC) - timedelta(seconds=CHECKPOINT_GRACE_SECONDS)
    return [
        r.seq
        for r in trail.iter_records(after_seq=checkpoint, check_hashes=False)
        if r.occurred_at < horizon
    ]


def cmd_audit_export(args: argparse.Namespace) -> int:
    from gateway.audit.dicom_xml import export_dicom_xml
    from gateway.audit.trail import AuditTrail

    s = _settings(args)
    trail = AuditTrail(s.audit_database)
    records = trail.iter_records(patient_id=args.patient_id)
    if args.output == "-":
        export_dicom_xml(records, sys.stdout.buffer)
    else:
        with open(args.output, "wb") as fh:
            export_dicom_xml(records, fh)
    return 0


# -- parser ----------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sekisho", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", help="configuration file (default: $SEKISHO_CONFIG, ./sekisho.toml)"
        )
        return p

    pki = sub.add_parser("pki", help="certificates and trust anchors").add_subparsers(
        dest="pki_command", required=True
    )
    p = pki.add_parser("dev-init", help="generate a development PKI")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_pki_dev_init)
    p = with_config(pki.add_parser("show", help="show trust anchors and fingerprints"))
    p.set_defaults(func=cmd_pki_show)

    p = sub.add_parser("init", help="create a demo instance")
    p.add_argument("directory")
    p.add_argument("--https-port", type=int, default=8443)
    p.add_argument("--dimse-port", type=int, default=2762)
    p.add_argument(
        "--monitoring-port", type=int, default=9464, help="0 disables /metrics over HTTP"
    )
    p.add_argument("--force", action="store_true", help="regenerate an existing instance")
    p.set_defaults(func=cmd_init)

    with_config(sub.add_parser("serve", help="run the gateway")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("check-config", help="validate the configuration")).set_defaults(
        func=cmd_check_config
    )

    partner = sub.add_parser("partner", help="registered partners").add_subparsers(
        dest="partner_command", required=True
    )
    p = with_config(partner.add_parser("add"))
    p.add_argument("name")
    p.add_argument("--certificate", required=True, help="partner's client certificate (PEM)")
    p.add_argument("--ae-title", action="append", help="AE title of the partner (repeatable)")
    p.add_argument(
        "--permission",
        action="append",
        choices=["push", "query", "retrieve", "admin"],
        help="admin: the forwarding admin API (the hospital's own administration client only)",
    )
    p.add_argument("--network", action="append", help="regional network membership")
    p.add_argument("--allow-address", action="append", help="allowed source address/network")
    p.add_argument("--role", choices=["partner", "external-storage"], default="partner")
    p.add_argument(
        "--move-destination",
        action="append",
        metavar="AE=HOST:PORT",
        help="the partner's own DICOM TLS node a C-MOVE may send to (repeatable)",
    )
    p.set_defaults(func=cmd_partner_add)
    p = with_config(partner.add_parser("list"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_partner_list)
    p = with_config(partner.add_parser("remove"))
    p.add_argument("name")
    p.set_defaults(func=cmd_partner_remove)

    consent = sub.add_parser("consent", help="patients' consent to share").add_subparsers(
        dest="consent_command", required=True
    )
    for name, func in (("grant", cmd_consent_grant), ("revoke", cmd_consent_revoke)):
        p = with_config(consent.add_parser(name))
        p.add_argument("patient_id")
        p.add_argument("--issuer", default="")
        p.add_argument("--partner")
        p.add_argument("--network")
        p.add_argument("--by", help="staff member recording it (default: login name)")
        if name == "grant":
            p.add_argument("--note", default="")
        p.set_defaults(func=func)
    p = with_config(consent.add_parser("list"))
    p.add_argument("patient_id", nargs="?")
    p.set_defaults(func=cmd_consent_list)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True
    )
    with_config(audit.add_parser("verify")).set_defaults(func=cmd_audit_verify)
    p = with_config(audit.add_parser("export"))
    p.add_argument("--format", choices=["dicom-xml"], default="dicom-xml")
    p.add_argument("--patient-id")
    p.add_argument("--output", "-o", default="-")
    p.set_defaults(func=cmd_audit_export)
    from gateway.signatures.commands import add_audit_commands

    add_audit_commands(audit, with_config)  # audit seal (R-AUD-2)

    from gateway.forward.commands import add_commands as add_forward_commands

    add_forward_commands(sub, with_config)  # send, queue list|retry|work, restore
    from gateway.imports.commands import add_commands as add_media_commands

    add_media_commands(sub, with_config)  # media inspect|import|imports|finalize-due
    from gateway.digitization.commands import add_commands as add_digitization_commands

    add_digitization_commands(sub, with_config)  # film, digitize, signatures
    from gateway.signatures.commands import add_commands as add_signing_commands

    add_signing_commands(sub, with_config)  # sign, verify, dev-tsa (R-SIG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.imports.quiet import silence_pydicom

    silence_pydicom()  # hostile media: pydicom would quote patient data in its warnings
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SekishoError as exc:
        print(f"sekisho: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
