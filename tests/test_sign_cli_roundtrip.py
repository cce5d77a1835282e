"""``sekisho sign`` and ``sekisho verify`` through the real CLI (R-SIG-1..5, R-SIG-8, R-AUD-5).

Each command runs as a subprocess against an instance made by ``sekisho init``
whose ``[signing]`` section points at the dev PKI and a loopback ``openssl ts``
TSA.  Independent verifiers judge the outputs: DCMTK ``dcmsign``, poppler
``pdfsig`` and ``openssl cms``.  Every signature, refusal and verification must
be in the audit trail, and no patient name may appear in output or audit.
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.gateway_helpers import Instance, create_instance, dump_toml, free_port, run_sekisho
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    make_pdf,
    make_sc_dataset,
    openssl_cms_verify,
    require_tool,
    signing_pki,
    softhsm_token,
    tsa_server,
)
from tests.test_sign_cli_fixtures import (
    config_variant,
    dcmsign_verify,
    no_patient_name,
    records_text,
    sekisho_json,
    signer_arg,
    signing_section,
)

pytestmark = pytest.mark.peer
INSTANCES_ACCESSED = "110103"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, signing_pki, loopback_tsa) -> Instance:
    root = tmp_path_factory.mktemp("sign-cli") / "gw"
    return create_instance(root, {"signing": signing_section(signing_pki, loopback_tsa.url)})


def sign(
    inst: Instance,
    kind: str,
    src: Path,
    out: Path,
    signer: str,
    record_type: str,
    *extra: str,
    config: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [
        "sign",
        kind,
        str(src),
        str(out),
        "--signer",
        signer,
        "--type",
        record_type,
        "--operator",
        "operator01",
        *extra,
    ]
    return run_sekisho(*args, config=config or inst.config)


def verify(inst: Instance, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return inst.cli("verify", str(path), "--operator", "auditor01", *extra)


def signing_records(inst: Instance, after: int) -> list:
    return [
        r
        for r in inst.audit_records(after_seq=after)
        if r.event.event_id.value == INSTANCES_ACCESSED
    ]


# ------------------------------------------------------------------------- DICOM
def test_signed_dicom_verifies_with_dcmsign_and_sekisho(inst, signing_pki, tmp_path) -> None:
    src, out = tmp_path / "film.dcm", tmp_path / "film.signed.dcm"
    make_sc_dataset(src)
    head = inst.audit_head()
    proc = sign(inst, "dicom", src, out, signer_arg(signing_pki), "digitized-film", "--json")
    assert proc.returncode == 0, proc.stderr
    result = sekisho_json(proc)
    assert result["hc_role"] == "Medical Doctor" and "Yamada Taro" in result["signer"]
    assert result["timestamps"] and not result["clock_skew_alert"]

    dcm = dcmsign_verify(out, signing_pki)  # the independent verifier (R-SIG-3)
    assert dcm.returncode == 0, dcm.stdout + dcm.stderr
    assert "Timestamp Verification : OK" in dcm.stdout + dcm.stderr

    proc = verify(inst, out, "--type", "digitized-film", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = sekisho_json(proc)
    assert report["verdict"] == "valid" and report["artifact"] == "dicom"
    (sig,) = report["signatures"]
    assert sig["intact"] and sig["chain_ok"] and sig["revocation"] == "good"
    assert "Yamada Taro" in sig["signer_subject"] and sig["hc_role"] == "Medical Doctor"
    (ts,) = sig["timestamps"]
    assert ts["ok"] and ts["kind"] == "certified" and ts["time"]
    assert "Sekisho Dev TSA" in ts["tsa"]

    signed, checked = signing_records(inst, head)
    assert (signed.event.action, signed.event.outcome) == ("U", 0)
    assert signed.event.actor == "operator01" and signed.event.patient_id == "P-0001"
    assert signed.event.extra["record_type"] == "digitized-film"
    assert "Yamada Taro" in signed.event.extra["signer"]
    assert signed.event.actor_cert_sha256 == signing_pki.fingerprint("hpki-signer")
    assert signed.event.extra["signature_uid"] == str(
        pydicom.dcmread(out).DigitalSignaturesSequence[0].DigitalSignatureUID
    )
    assert (checked.event.action, checked.event.outcome) == ("R", 0)
    assert checked.event.actor == "auditor01" and checked.event.extra["verdict"] == "valid"
    # STYLE §12: the patient's name is in neither the output nor the audit trail.
    assert no_patient_name(proc.stdout, proc.stderr, records_text([signed, checked]))


@pytest.mark.parametrize("attr", ["PatientName", "PixelData"])
def test_altered_dicom_fails_verification(inst, signing_pki, tmp_path, attr) -> None:
    src, out, bad = tmp_path / "in.dcm", tmp_path / "signed.dcm", tmp_path / "bad.dcm"
    make_sc_dataset(src)
    assert sign(inst, "dicom", src, out, signer_arg(signing_pki), "digitized-film").returncode == 0
    ds = pydicom.dcmread(out)
    if attr == "PixelData":
        data = bytearray(ds.PixelData)
        data[100] ^= 0x01
        ds.PixelData = bytes(data)
    else:
        ds.PatientName = "Tampered^Name"
    ds.save_as(bad, enforce_file_format=True)
    head = inst.audit_head()

    proc = verify(inst, bad, "--type", "digitized-film", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = sekisho_json(proc)
    assert report["verdict"] == "invalid" and not report["signatures"][0]["intact"]
    assert dcmsign_verify(bad, signing_pki).returncode != 0
    text = verify(inst, bad).stdout  # the human form says the same
    assert "INVALID" in text and "NOT INTACT" in text
    (audited, _) = signing_records(inst, head)
    assert audited.event.outcome == 4 and audited.event.reason_code == "verdict-invalid"


@pytest.mark.parametrize(
    ("role", "record_type", "code", "words"),
    [
        ("hpki-signer-no-role", "digitized-film", "no-role", "no hcRole"),
        ("hpki-signer-technologist", "scanned-document", "role-not-allowed", "not allowed"),
        ("hpki-signer-revoked", "digitized-film", "revoked", "revoked"),
    ],
)
def test_refused_signer_leaves_no_file_and_is_audited(
    inst, signing_pki, tmp_path, role, record_type, code, words
) -> None:
    src, out = tmp_path / "in.dcm", tmp_path / "out" / "signed.dcm"
    out.parent.mkdir()
    make_sc_dataset(src)
    head = inst.audit_head()
    proc = sign(inst, "dicom", src, out, signer_arg(signing_pki, role), record_type)
    assert proc.returncode != 0
    assert words in proc.stderr
    assert list(out.parent.iterdir()) == []  # nothing, not even a partial file
    (refused,) = signing_records(inst, head)
    assert refused.event.outcome != 0 and refused.event.reason_code == "signing"
    assert code in refused.event.extra["codes"].split(",")
    assert refused.event.extra["signer"] and refused.event.actor == "operator01"
    assert refused.event.patient_id == "P-0001"
    assert no_patient_name(records_text([refused]), proc.stderr)


def test_unreachable_tsa_refuses_and_is_audited(inst, signing_pki, tmp_path) -> None:
    config = config_variant(inst, "dead-tsa.toml", tsa_url=f"http://127.0.0.1:{free_port()}/tsa")
    src, out = tmp_path / "in.dcm", tmp_path / "signed.dcm"
    make_sc_dataset(src)
    head = inst.audit_head()
    proc = sign(inst, "dicom", src, out, signer_arg(signing_pki), "digitized-film", config=config)
    assert proc.returncode != 0 and "unreachable" in proc.stderr
    assert not out.exists()
    (refused,) = signing_records(inst, head)
    assert refused.event.reason_code == "timestamp" and refused.event.outcome != 0


def test_clock_skew_beyond_the_bound_is_a_security_alert(inst, signing_pki, tmp_path) -> None:
    # genTime has whole seconds: any real clock differs from it by more than 1 µs.
    config = config_variant(inst, "tight-skew.toml", max_clock_skew_seconds=0.000001)
    src, out = tmp_path / "in.dcm", tmp_path / "signed.dcm"
    make_sc_dataset(src)
    head = inst.audit_head()
    proc = sign(inst, "dicom", src, out, signer_arg(signing_pki), "digitized-film", config=config)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stdout and "R-AUD-5" in proc.stdout
    (alert,) = inst.security_alerts(after_seq=head)
    assert alert.event.reason_code == "clock-skew"
    assert "Sekisho Dev TSA" in alert.event.extra["tsa"]


def test_unknown_record_type_and_missing_section_are_refused(inst, signing_pki, tmp_path) -> None:
    src, out = tmp_path / "in.dcm", tmp_path / "signed.dcm"
    make_sc_dataset(src)
    proc = sign(inst, "dicom", src, out, signer_arg(signing_pki), "no-such-type")
    assert proc.returncode != 0 and "no signing policy" in proc.stderr
    bare = inst.root / "no-signing.toml"
    data = inst.read_config()
    del data["signing"]
    bare.write_text(dump_toml(data))
    proc = sign(inst, "dicom", src, out, signer_arg(signing_pki), "digitized-film", config=bare)
    assert proc.returncode != 0 and "'signing': not configured" in proc.stderr
    assert not out.exists()


def test_pkcs11_token_signer_through_the_cli(inst, signing_pki, softhsm_token, tmp_path) -> None:
    """The HPKI card path (R-SIG-7): SoftHSM2 token, key and certificate by CKA_ID."""
    tok = softhsm_token
    spec = (
        f"pkcs11:module={tok.module},token={tok.label},key-id={tok.key_id.hex()},"
        f"cert-id={tok.key_id.hex()},pin-file={tok.pin_file}"
    )
    src, out = tmp_path / "in.dcm", tmp_path / "signed.dcm"
    make_sc_dataset(src)
    head = inst.audit_head()
    proc = sign(inst, "dicom", src, out, spec, "digitized-film", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sekisho_json(proc)["backend"] == "pkcs11"
    assert dcmsign_verify(out, signing_pki).returncode == 0
    assert verify(inst, out, "--type", "digitized-film").returncode == 0
    (signed, _) = signing_records(inst, head)
    assert signed.event.extra["backend"] == "pkcs11"
    assert signed.event.actor_cert_sha256 == signing_pki.fingerprint("hpki-signer")


# --------------------------------------------------------------------------- PDF
def test_pdf_round_trip_with_pdfsig(inst, signing_pki, tmp_path) -> None:
    src, out = tmp_path / "letter.pdf", tmp_path / "letter.signed.pdf"
    src.write_bytes(make_pdf())
    proc = sign(inst, "pdf", src, out, signer_arg(signing_pki), "scanned-document", "--json")
    assert proc.returncode == 0, proc.stderr
    pdfsig = subprocess.run([require_tool("pdfsig"), str(out)], capture_output=True, text=True)
    assert "Signature is Valid" in pdfsig.stdout, pdfsig.stdout

    proc = verify(inst, out, "--type", "scanned-document", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = sekisho_json(proc)
    kinds = [s["kind"] for s in report["signatures"]]
    assert "pades" in kinds and "document-timestamp" in kinds  # B-LTA (R-SIG-4)
    pades = report["signatures"][kinds.index("pades")]
    assert pades["hc_role"] == "Medical Doctor" and pades["timestamps"][0]["ok"]

    data = bytearray(out.read_bytes())
    start = data.index(b"Referral letter")
    data[start] ^= 0x01  # one byte of the signed page content
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(bytes(data))
    proc = verify(inst, bad, "--type", "scanned-document", "--json")
    assert proc.returncode == 1 and sekisho_json(proc)["verdict"] == "invalid"


# -------------------------------------------------------------------- file + p7s
def test_file_p7s_round_trip_with_openssl_cms(inst, signing_pki, tmp_path) -> None:
    data, p7s = tmp_path / "record.bin", tmp_path / "record.bin.p7s"
    data.write_bytes(b"imported record payload\n" * 100)
    proc = sign(inst, "file", data, p7s, signer_arg(signing_pki), "imported-record")
    assert proc.returncode == 0, proc.stderr
    cms = openssl_cms_verify(data, p7s, signing_pki.cert_path("hpki-root-ca"), "-purpose", "any")
    assert cms.returncode == 0, cms.stderr

    proc = verify(inst, data, "--type", "imported-record", "--json")  # default: FILE.p7s
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sig,) = sekisho_json(proc)["signatures"]
    assert sig["kind"] == "cades" and sig["timestamps"][0]["ok"]

    moved = tmp_path / "elsewhere.sig"
    p7s.rename(moved)
    assert verify(inst, data, "--type", "imported-record").returncode == 1  # no signature
    assert verify(inst, data, "--p7s", str(moved), "--type", "imported-record").returncode == 0
    data.write_bytes(data.read_bytes() + b"x")
    proc = verify(inst, data, "--p7s", str(moved), "--json")
    assert proc.returncode == 1 and not sekisho_json(proc)["signatures"][0]["intact"]


def test_unreadable_file_exits_2_and_is_audited(inst, tmp_path) -> None:
    head = inst.audit_head()
    proc = verify(inst, tmp_path / "missing.dcm", "--json")
    assert proc.returncode == 2 and sekisho_json(proc)["verdict"] == "unreadable"
    (audited,) = signing_records(inst, head)
    assert audited.event.outcome == 8
