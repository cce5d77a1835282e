"""``sekisho audit seal`` / ``audit verify`` with a real TSA, and sealing while serving (R-AUD-2).

The seals are RFC 3161 tokens from the loopback ``openssl ts -reply`` TSA whose
imprint is the chain head's record hash, so ``openssl ts -verify -digest``
accepts them on its own.  Tampering is done as an intruder with write access
to the database would do it (triggers dropped, rows rewritten with the
project's own writer); only the token check finds a consistent rewrite.
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from gateway.audit import events as ev
from gateway.audit.chain import ROW_COLUMNS, StoredRow, build_row
from tests.gateway_helpers import (
    Instance,
    create_instance,
    dump_toml,
    free_port,
    run_sekisho,
    running_gateway,
    sekisho_command,
)
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    make_sc_dataset,
    signing_pki,
    tsa_server,
)
from tests.test_sign_cli_fixtures import (
    config_variant,
    dcmsign_verify,
    sekisho_json,
    signing_section,
    uncomment_signing,
)

pytestmark = pytest.mark.peer


@pytest.fixture
def inst(tmp_path: Path, signing_pki, loopback_tsa) -> Instance:
    inst = create_instance(
        tmp_path / "gw", {"signing": signing_section(signing_pki, loopback_tsa.url)}
    )
    for patient in ("P-1", "P-2", "P-3"):  # a few records to seal
        inst.cli_ok("consent", "grant", patient, "--partner", "partner-a", "--by", "reception01")
    return inst


def seal(inst: Instance, config: Path | None = None) -> dict:
    proc = run_sekisho(
        "audit", "seal", "--json", "--operator", "admin01", config=config or inst.config
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sekisho_json(proc)


def audit_verify(inst: Instance, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_sekisho("audit", "verify", config=config or inst.config)


def tamper(inst: Instance, *statements: tuple[str, tuple[object, ...]] | str) -> None:
    """Write access to the file: drop the append-only triggers, then edit."""
    conn = sqlite3.connect(inst.database, isolation_level=None)
    try:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            conn.execute(f"DROP TRIGGER {name}")
        for statement in statements:
            conn.execute(*statement) if isinstance(statement, tuple) else conn.execute(statement)
    finally:
        conn.close()


def seal_tokens(inst: Instance) -> list[tuple[int, int, str, bytes]]:
    conn = sqlite3.connect(inst.database)
    try:
        rows = conn.execute("SELECT id, head_seq, head_hash, token FROM audit_seals ORDER BY id")
        return [(r[0], r[1], r[2], bytes(r[3])) for r in rows]
    finally:
        conn.close()


def without_signing(inst: Instance) -> Path:
    data = inst.read_config()
    del data["signing"]
    path = inst.root / "no-signing.toml"
    path.write_text(dump_toml(data))
    return path


def test_seal_verifies_with_sekisho_and_openssl(inst, signing_pki, tmp_path) -> None:
    head = inst.audit_head()
    data = seal(inst)
    assert data["head_seq"] == head and "Sekisho Dev TSA" in data["tsa"]
    assert not data["skew_alert"]
    proc = audit_verify(inst)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 seal(s) checked" in proc.stdout

    ((_, head_seq, head_hash, token),) = seal_tokens(inst)
    assert (head_seq, head_hash) == (head, data["head_hash"])
    tsr = tmp_path / "seal.tst"
    tsr.write_bytes(token)
    check = subprocess.run(
        ["openssl", "ts", "-verify", "-digest", head_hash, "-in", str(tsr), "-token_in",
         "-CAfile", str(signing_pki.cert_path("root-ca"))],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0 and "Verification: OK" in check.stdout, check.stderr


def test_seal_with_skewed_clock_records_a_security_alert(inst) -> None:
    config = config_variant(inst, "tight.toml", max_clock_skew_seconds=0.000001)
    head = inst.audit_head()
    assert seal(inst, config)["skew_alert"]
    (alert,) = inst.security_alerts(after_seq=head)
    assert alert.event.reason_code == "clock-skew" and "audit sealing" in alert.event.description


def test_seal_failure_is_audited(inst) -> None:
    config = config_variant(inst, "dead.toml", tsa_url=f"http://127.0.0.1:{free_port()}/tsa")
    head = inst.audit_head()
    proc = run_sekisho("audit", "seal", config=config)
    assert proc.returncode != 0 and "unreachable" in proc.stderr
    (alert,) = inst.security_alerts(after_seq=head)
    assert alert.event.reason_code == "audit-seal-failed" and alert.event.outcome == 8
    assert seal_tokens(inst) == []


def test_damaged_or_swapped_seal_token_fails_verification(inst) -> None:
    seal(inst)
    inst.cli_ok("consent", "grant", "P-4", "--partner", "partner-a", "--by", "reception01")
    seal(inst)
    (first, second) = seal_tokens(inst)
    # A genuine token for another head: the TSA's signature is fine, the imprint is not.
    tamper(inst, ("UPDATE audit_seals SET token = ? WHERE id = 2", (first[3],)))
    proc = audit_verify(inst)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "seal 2 timestamp token does not verify" in proc.stderr
    assert "imprint mismatch" in proc.stderr

    damaged = bytearray(second[3])
    damaged[-5] ^= 0xFF  # inside the TSA's signature value
    tamper(inst, ("UPDATE audit_seals SET token = ? WHERE id = 2", (bytes(damaged),)))
    proc = audit_verify(inst)
    assert proc.returncode == 3 and "seal 2 timestamp token does not verify" in proc.stderr


def _read_rows(inst: Instance) -> list[StoredRow]:
    conn = sqlite3.connect(inst.database)
    try:
        cols = ", ".join(ROW_COLUMNS)
        return [StoredRow(*r) for r in conn.execute(f"SELECT {cols} FROM audit_log ORDER BY seq")]
    finally:
        conn.close()


def test_consistent_rewrite_is_found_only_by_the_seal_token(inst) -> None:
    """Rewrite a record, every later hash, the seal's head hash and the checkpoint."""
    seal(inst)
    rows = _read_rows(inst)
    target = next(r for r in rows if r.patient_id == "P-2")
    prev = next(r for r in rows if r.seq == target.seq - 1).record_hash
    statements: list[tuple[str, tuple[object, ...]] | str] = [
        f"DELETE FROM audit_log WHERE seq >= {target.seq}"
    ]
    marks = ", ".join("?" * len(ROW_COLUMNS))
    for row in (r for r in rows if r.seq >= target.seq):
        event = dict(json.loads(row.details))
        for key in ("event_id", "action", "outcome", "actor", "actor_kind", "patient_id",
                    "patient_issuer"):  # fmt: skip
            event[key] = getattr(row, key)
        if row.seq == target.seq:
            event["patient_id"] = "P-HIDDEN"  # the intruder hides whose consent it was
        new = build_row(row.seq, row.occurred_at, ev.AuditEvent.from_dict(event), prev)
        statements.append(
            (f"INSERT INTO audit_log ({', '.join(ROW_COLUMNS)}) VALUES ({marks})", tuple(new))
        )
        prev = new.record_hash
    statements.append(("UPDATE audit_seals SET head_hash = ?", (prev,)))
    tamper(inst, *statements)
    head_file = inst.database.with_name(inst.database.name + ".audit-head")
    head_file.write_text(
        json.dumps({"format": "sekisho-audit-head/1", "seq": rows[-1].seq, "record_hash": prev})
    )

    # Without the token check the forgery is perfect: this test can fail.
    assert audit_verify(inst, without_signing(inst)).returncode == 0
    proc = audit_verify(inst)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "seal 1 timestamp token does not verify" in proc.stderr


# ------------------------------------------------------------------ while serving
def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_serving_gateway_seals_periodically(inst) -> None:
    inst.update_config({"audit": {"seal_interval_minutes": 1}})
    with running_gateway(inst) as gw:
        assert wait_for(lambda: len(seal_tokens(inst)) >= 1), gw.log()
        assert gw.running
    proc = audit_verify(inst)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (_, head_seq, _, _) = seal_tokens(inst)[0]
    starts = [r.seq for r in inst.audit_records(event_id=ev.APPLICATION_ACTIVITY.value)
              if r.event.event_type_codes[0] == ev.APPLICATION_START]  # fmt: skip
    assert head_seq >= starts[-1]  # the first seal covers the start record


def test_seal_failures_while_serving_are_audited_not_fatal(inst) -> None:
    inst.update_config(
        {"audit": {"seal_interval_minutes": 1},
         "signing": {"tsa_url": f"http://127.0.0.1:{free_port()}/tsa", "tsa_timeout": 2}}
    )  # fmt: skip
    head = inst.audit_head()
    with running_gateway(inst) as gw:
        failed = lambda: any(  # noqa: E731
            a.event.reason_code == "audit-seal-failed" for a in inst.security_alerts(head)
        )
        assert wait_for(failed), gw.log()
        assert gw.running and "audit seal failed" in gw.log()
    assert seal_tokens(inst) == []


def test_sealing_without_a_tsa_refuses_to_start(inst) -> None:
    data = inst.read_config()
    del data["signing"]
    data["audit"] = {**data.get("audit", {}), "seal_interval_minutes": 5}
    config = inst.root / "seal-without-tsa.toml"
    config.write_text(dump_toml(data))
    proc = subprocess.run(
        [*sekisho_command(), "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "audit.seal_interval_minutes" in proc.stderr
    assert run_sekisho("check-config", config=config).returncode != 0


# --------------------------------------------------------------------- the demo
def test_demo_instance_signs_with_its_dev_tsa(tmp_path) -> None:
    """``sekisho init``'s commented [signing] section + ``sekisho dev-tsa`` work as documented."""
    inst = create_instance(tmp_path / "demo")
    assert "signing" not in inst.read_config()  # off by default: serve needs no TSA
    port = free_port()
    uncomment_signing(inst.config, f"http://127.0.0.1:{port}/tsa")
    assert inst.cli("check-config").returncode == 0
    tsa = subprocess.Popen(
        [*sekisho_command(), "dev-tsa", "--config", str(inst.config), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert tsa.stdout is not None and "serving" in tsa.stdout.readline()
        pki = inst.pki
        src, out = tmp_path / "film.dcm", tmp_path / "film.signed.dcm"
        make_sc_dataset(src)
        signer = "pkcs12:pki/hpki-signer.p12,password-file=pki/hpki-signer.p12.pass"
        proc = subprocess.run(
            [*sekisho_command(), "sign", "dicom", str(src), str(out), "--type", "digitized-film",
             "--signer", signer, "--config", "sekisho.toml"],
            capture_output=True, text=True, cwd=inst.root, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert dcmsign_verify(out, pki).returncode == 0
        assert inst.cli("verify", str(out), "--type", "digitized-film").returncode == 0
        assert inst.cli("audit", "seal").returncode == 0
        assert "1 seal(s) checked" in inst.cli_ok("audit", "verify")
    finally:
        tsa.terminate()
        tsa.wait(timeout=30)
