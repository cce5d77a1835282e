"""``sekisho sign``, ``sekisho verify``, ``sekisho audit seal`` and ``sekisho dev-tsa``.

::

    sekisho sign dicom|pdf|file IN OUT --signer SPEC --type RECORD_TYPE [--purpose P]
                 [--operator ID] [--json]
    sekisho verify FILE [--p7s SIG] [--type RECORD_TYPE] [--operator ID] [--json]
    sekisho audit seal [--operator ID] [--json]
    sekisho dev-tsa [--pki DIR] [--host H] [--port N]

``--signer`` takes the forms of :meth:`signing.signers.SignerSpec.parse`:
``pkcs12:FILE,password-file=PATH`` (development) or
``pkcs11:module=LIB,token=LABEL,key-id=HEX[,cert-file=PEM][,pin-file=PATH]``
(the HPKI card; without ``pin-file`` the PIN is asked for on the terminal).
Exit status: 0 success / valid; 1 verification found a problem; 2 refused,
unreadable or misconfigured (the message says why).  Every signature, refusal
and verification is in the audit trail (R-SIG-8, R-AUD-1).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.audit.trail import AuditTrail
from gateway.settings import Settings, load_settings, resolve_config_path

__all__ = ["add_audit_commands", "add_commands"]

WithConfig = Callable[[argparse.ArgumentParser], Any]


def _operator(args: argparse.Namespace) -> str:
    if getattr(args, "operator", None):
        return str(args.operator)
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"


def _settings(args: argparse.Namespace) -> Settings:
    import logging

    # pyHanko logs expected validation failures (a refused signer) with tracebacks.
    logging.getLogger("pyhanko").setLevel(logging.CRITICAL)
    logging.getLogger("pyhanko_certvalidator").setLevel(logging.CRITICAL)
    return load_settings(resolve_config_path(getattr(args, "config", None)))


def _dump(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# -- sign --------------------------------------------------------------------
def cmd_sign(args: argparse.Namespace) -> int:
    from gateway.signatures.service import sign_and_audit

    settings = _settings(args)
    with AuditTrail(settings.audit_database) as trail:
        result = asyncio.run(
            sign_and_audit(
                trail,
                settings,
                kind=args.kind,
                inp=Path(args.input),
                out=Path(args.output),
                signer=args.signer,
                purpose=args.purpose,
                record_type=args.record_type,
                operator=_operator(args),
            )
        )
    if args.json:
        _dump(result)
        return 0
    print(f"signed {result['kind']}: {result['output']}")
    print(
        f"  signer:    {result['signer']} (hcRole: {result['hc_role'] or '-'}, {result['backend']})"
    )
    print(
        f"  record:    {result['record_type']}, purpose {result['purpose']['code']} "
        f"{result['purpose']['meaning']}"
    )
    for stamp in result["timestamps"]:
        print(
            f"  timestamp: {stamp['gen_time']} by {stamp['tsa']} "
            f"(local clock {stamp['clock_skew_seconds']:+.3f} s)"
        )
    print(f"  sha256:    {result['output_sha256']}")
    if result["clock_skew_alert"]:
        print(
            "WARNING: the local clock differs from the TSA's beyond the configured bound; "
            "a Security Alert was recorded (R-AUD-5)"
        )
    return 0


# -- verify ------------------------------------------------------------------
def _print_report(report: dict[str, Any]) -> None:
    verdict = report.get("verdict", "unreadable")
    record = report.get("record_type") or "no record type"
    print(f"{report.get('path')}: {verdict.upper()} ({report.get('artifact', '?')}, {record})")
    for n, sig in enumerate(report.get("signatures", []), 1):
        state = "intact" if sig.get("intact") else f"NOT INTACT: {sig.get('integrity_problem')}"
        print(f"  signature {n} ({sig.get('kind')}): {state}")
        if sig.get("signer_subject"):
            print(f"    signer:     {sig['signer_subject']}")
            print(f"    hcRole:     {sig.get('hc_role') or '-'}")
            chain = "ok" if sig.get("chain_ok") else (sig.get("chain_problem") or "not trusted")
            print(f"    chain:      {chain}")
            print(f"    revocation: {sig.get('revocation')} at signing time")
        for ts in sig.get("timestamps", []):
            state = "ok" if ts.get("ok") else f"INVALID: {ts.get('problem')}"
            print(f"    timestamp:  {ts.get('kind')} {ts.get('time')} by {ts.get('tsa')} ({state})")
        coverage = sig.get("coverage", {})
        if "covered_attributes" in coverage:
            print(f"    covers:     {len(coverage['covered_attributes'])} attributes")
        elif "byte_range" in coverage:
            whole = "whole revision" if coverage.get("covers_whole_file") else "earlier revision"
            print(f"    covers:     bytes {coverage['byte_range']} ({whole})")
        elif "content_sha256" in coverage:
            print(f"    covers:     content sha256 {coverage['content_sha256']}")
        for problem in sig.get("problems", []):
            print(f"    problem:    {problem}")
    for problem in report.get("problems", []):
        print(f"  problem: {problem}")


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.signatures.service import verify_and_audit

    settings = _settings(args)
    with AuditTrail(settings.audit_database) as trail:
        code, report = asyncio.run(
            verify_and_audit(
                trail,
                settings,
                path=Path(args.file),
                p7s=Path(args.p7s) if args.p7s else None,
                record_type=args.record_type,
                operator=_operator(args),
            )
        )
    if args.json:
        _dump(report)
    else:
        _print_report(report)
    return code


# -- audit seal --------------------------------------------------------------
def cmd_audit_seal(args: argparse.Namespace) -> int:
    from gateway.signatures.config import load_signing_settings
    from gateway.signatures.sealing import seal_audit_trail

    settings = _settings(args)
    signing = load_signing_settings(settings)
    with AuditTrail(settings.audit_database) as trail:
        outcome = seal_audit_trail(trail, signing, actor=_operator(args))
    data = outcome.to_dict()
    if args.json:
        _dump(data)
        return 0
    print(
        f"audit trail sealed: seal {data['seal_id']} over record {data['head_seq']} "
        f"(sha256 {data['head_hash']})"
    )
    print(
        f"  timestamp: {data['gen_time']} by {data['tsa']} "
        f"(local clock {data['clock_skew_seconds']:+.3f} s)"
    )
    if data["skew_alert"]:
        print(
            "WARNING: the local clock differs from the TSA's beyond the configured bound; "
            "a Security Alert was recorded (R-AUD-5)"
        )
    return 0


# -- dev-tsa -----------------------------------------------------------------
def cmd_dev_tsa(args: argparse.Namespace) -> int:
    from gateway.signatures.devtsa import DevTsa

    if args.pki:
        pki_dir = Path(args.pki)
    else:
        pki_dir = resolve_config_path(args.config).resolve().parent / "pki"
    tsa = DevTsa(pki_dir, host=args.host, port=args.port).start()
    print(f"development TSA (NOT for production) serving {tsa.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        tsa.stop()
    return 0


# -- parsers -----------------------------------------------------------------
def add_commands(sub: Any, with_config: WithConfig) -> None:
    """``sign``, ``verify`` and ``dev-tsa`` on the top-level subparsers."""
    p = with_config(sub.add_parser("sign", help="sign a DICOM object, PDF or file (R-SIG)"))
    p.add_argument(
        "kind",
        choices=["dicom", "pdf", "file"],
        help="dicom: PS3.15 signature; pdf: PAdES B-LTA; file: detached CAdES-T .p7s",
    )
    p.add_argument("input")
    p.add_argument("output", help="signed object (for 'file': the .p7s)")
    p.add_argument(
        "--signer",
        required=True,
        help="pkcs12:FILE,password-file=PATH or pkcs11:module=LIB,token=...,key-id=...",
    )
    p.add_argument(
        "--type", dest="record_type", required=True, help="record type of [signing.policy.<type>]"
    )
    p.add_argument("--purpose", help="ASTM E1762 signature purpose 1..18 (default: the policy's)")
    p.add_argument("--operator", help="staff member signing (default: login name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sign)

    p = with_config(sub.add_parser("verify", help="verify signatures and timestamps (R-SIG-8)"))
    p.add_argument("file", help="DICOM object, PDF, or any file with a detached .p7s")
    p.add_argument("--p7s", help="detached signature (default: FILE.p7s)")
    p.add_argument("--type", dest="record_type", help="judge against this record type's policy")
    p.add_argument("--operator", help="staff member verifying (default: login name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = with_config(sub.add_parser("dev-tsa", help="run a development TSA on loopback (demo)"))
    p.add_argument("--pki", help="development PKI directory (default: pki/ next to the config)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3180)
    p.set_defaults(func=cmd_dev_tsa)


def add_audit_commands(audit: Any, with_config: WithConfig) -> None:
    """``audit seal`` on the ``audit`` subparsers."""
    p = with_config(
        audit.add_parser("seal", help="timestamp the chain head with the TSA (R-AUD-2)")
    )
    p.add_argument("--operator", help="staff member sealing (default: login name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit_seal)
