"""Shared builders for the ``sekisho sign|verify|audit seal`` CLI tests (no tests here).

An instance is made by ``sekisho init`` (:func:`tests.gateway_helpers.create_instance`)
and gets a ``[signing]`` section that points at the session's development PKI
and the loopback ``openssl ts -reply`` TSA of :mod:`tests.signing_fixtures`.
Every command then runs as a subprocess, the way an operator runs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from gateway.audit.chain import AuditRecord
from pki.devpki import DevPki
from tests.gateway_helpers import Instance, dump_toml, merge

__all__ = [
    "DOCTOR_ONLY",
    "PATIENT_NAMES",
    "no_patient_name",
    "config_variant",
    "dcmsign_verify",
    "records_text",
    "sekisho_json",
    "signer_arg",
    "signing_section",
    "uncomment_signing",
]

#: The test patient's name (make_sc_dataset: "Yamada^Hanako") as it could leak: it
#: must never appear in command output or audit records (STYLE §12).  (The dev
#: PKI's technologist is "Suzuki Hanako", so the given name alone is no test.)
PATIENT_NAMES = ("Yamada^Hanako", "Yamada Hanako")
DOCTOR_ONLY = ["Medical Doctor"]


def signing_section(pki: DevPki, tsa_url: str, **overrides: Any) -> dict[str, Any]:
    """``[signing]`` for the dev PKI: HPKI root, TSA root, both CRLs, hard-fail."""
    section: dict[str, Any] = {
        "tsa_url": tsa_url,
        "tsa_timeout": 20,
        "max_clock_skew_seconds": 60,
        "trust": {
            "signer_anchors": [str(p) for p in pki.trust_anchor_paths("hpki")],
            "tsa_anchors": [str(p) for p in pki.trust_anchor_paths("tsa")],
            "crls": [str(pki.crl_path(r, der=True)) for r in ("root-ca", "hpki-root-ca")],
            "revocation": "hard-fail",
        },
        "policy": {
            "digitized-film": {
                "hpki_role_required": True,
                "allowed_roles": ["Medical Doctor", "Radiological Technologist"],
                "timestamp_required": True,
            },
            "scanned-document": {
                "hpki_role_required": True,
                "allowed_roles": DOCTOR_ONLY,
                "timestamp_required": True,
            },
            "imported-record": {"hpki_role_required": False, "timestamp_required": True},
        },
    }
    return merge(section, overrides)


def config_variant(inst: Instance, name: str, **signing: Any) -> Path:
    """A second configuration file next to ``inst``'s (same store and audit trail)
    with ``[signing]`` keys replaced."""
    data = inst.read_config()
    data["signing"] = merge(data["signing"], signing)
    path = inst.root / name
    path.write_text(dump_toml(data))
    return path


def signer_arg(pki: DevPki, role: str = "hpki-signer") -> str:
    """``--signer`` for a dev PKI signer's PKCS#12 file."""
    return f"pkcs12:{pki.p12_path(role)},password-file={pki.root / pki.entry(role)['p12_pass']}"


def sekisho_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


def dcmsign_verify(path: Path, pki: DevPki) -> subprocess.CompletedProcess[str]:
    """DCMTK's verdict, HPKI and TSA roots trusted, signature and timestamp required."""
    dcmsign = shutil.which("dcmsign")
    assert dcmsign, "DCMTK dcmsign is required"
    cmd = [dcmsign, "--verify", "+rg", "+tr"]
    for role in ("hpki-root-ca", "root-ca"):
        cmd += ["+cf", str(pki.cert_path(role))]
    return subprocess.run([*cmd, str(path)], capture_output=True, text=True, check=False)


def no_patient_name(*texts: str) -> bool:
    """Whether none of ``texts`` carries the test patient's name."""
    return not any(name in text for text in texts for name in PATIENT_NAMES)


def records_text(records: list[AuditRecord]) -> str:
    """Every audit record as JSON text (to search for what must not be there)."""
    return "\n".join(json.dumps(r.event.to_dict(), ensure_ascii=False) for r in records)


def uncomment_signing(config: Path, tsa_url: str) -> None:
    """Turn on the commented demo ``[signing]`` section written by ``sekisho init``."""
    out: list[str] = []
    active = False
    for line in config.read_text().splitlines():
        if line.startswith("# [signing]"):
            active = True
        if active and (line.startswith("# [") or re.match(r"# [a-z_]+ = ", line)):
            line = line[2:]
        out.append(line)
    text = "\n".join(out) + "\n"
    text = text.replace('"http://127.0.0.1:3180/tsa"', f'"{tsa_url}"')
    config.write_text(text)
