"""cmd_sign / cmd_verify: the policy applied end to end, refusals leave no file (R-SIG-1..8)."""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import json
import socket

import pytest

from pki.errors import ConfigurationError, SigningError, TimestampError
from signing.cli import SigningSettings, cmd_sign, cmd_verify
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    make_pdf,
    make_sc_dataset,
    p12_spec,
    signing_pki,
    softhsm_token,
    trust,
    tsa_server,
)

POLICY = {
    "digitized_film": {
        "hpki_role_required": True,
        "allowed_roles": ["Medical Doctor"],
        "timestamp_required": True,
    },
    "referral_letter": {"hpki_role_required": True, "timestamp_required": True},
    "imported_record": {"timestamp_required": False},
}


def settings_for(pki, tsa_url: str | None, **extra) -> SigningSettings:
    config = {
        "trust": {
            "signer_anchors": [str(p) for p in pki.trust_anchor_paths("hpki")],
            "tsa_anchors": [str(p) for p in pki.trust_anchor_paths("tsa")],
            "crls": [str(pki.crl_path(r, der=True)) for r in ("root-ca", "hpki-root-ca")],
            "revocation": "hard-fail",
        },
        "policy": POLICY,
        **extra,
    }
    if tsa_url:
        config["tsa_url"] = tsa_url
    return SigningSettings.from_config(config)


def signer_text(pki, role: str = "hpki-signer") -> str:
    spec = p12_spec(pki, role)
    return f"pkcs12:{spec.pkcs12},password-file={spec.password_file}"


def test_settings_reject_unknown_keys(signing_pki) -> None:
    with pytest.raises(ConfigurationError, match=r"signing\.tsa_ur: unknown key"):
        settings_for(signing_pki, None, tsa_ur="http://x")
    with pytest.raises(ConfigurationError, match=r"signing\.max_clock_skew_seconds"):
        settings_for(signing_pki, None, max_clock_skew_seconds=-1)


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["dicom", "pdf", "file"])
async def test_sign_then_verify_each_kind(kind, signing_pki, loopback_tsa, tmp_path) -> None:
    settings = settings_for(signing_pki, loopback_tsa.url)
    if kind == "dicom":
        inp = tmp_path / "film.dcm"
        make_sc_dataset(inp)
        out, record = tmp_path / "film.signed.dcm", "digitized_film"
    elif kind == "pdf":
        inp = tmp_path / "letter.pdf"
        inp.write_bytes(make_pdf())
        out, record = tmp_path / "letter.signed.pdf", "referral_letter"
    else:
        inp = tmp_path / "record.bin"
        inp.write_bytes(b"imported record payload")
        out, record = tmp_path / "record.bin.p7s", "imported_record"
    report = await cmd_sign(kind, inp, out, signer_text(signing_pki), "1", record, settings)
    assert out.is_file()
    assert report["hc_role"] == "Medical Doctor" and report["backend"] == "pkcs12"
    assert report["timestamps"] and report["clock_skew_alert"] is False
    assert abs(report["timestamps"][0]["clock_skew_seconds"]) < 5

    target = inp if kind == "file" else out
    code, verified = await cmd_verify(target, settings=settings, record_type=record)
    assert code == 0, verified.to_json()
    data = json.loads(verified.to_json())
    assert data["verdict"] == "valid"
    assert data["signatures"][0]["hc_role"] == "Medical Doctor"
    assert data["signatures"][0]["timestamp_ok"] is True


@pytest.mark.peer
@pytest.mark.parametrize(
    ("role", "message"),
    [
        ("hpki-signer-no-role", "no hcRole"),
        ("hpki-signer-technologist", "'Radiological Technologist' is not allowed"),
        ("hpki-signer-expired", "expired"),
        ("hpki-signer-revoked", "revoked"),
    ],
)
async def test_refused_signers_leave_no_output(
    role, message, signing_pki, loopback_tsa, tmp_path
) -> None:
    inp, out = tmp_path / "film.dcm", tmp_path / "out.dcm"
    make_sc_dataset(inp)
    before = loopback_tsa.server.requests_seen
    with pytest.raises(SigningError, match=message):
        await cmd_sign(
            "dicom",
            inp,
            out,
            signer_text(signing_pki, role),
            "1",
            "digitized_film",
            settings_for(signing_pki, loopback_tsa.url),
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [inp]
    assert loopback_tsa.server.requests_seen == before  # refused before any TSA request


async def test_untrusted_signer_refused(signing_pki, tmp_path) -> None:
    settings = SigningSettings.from_config(
        {
            "trust": {
                "signer_anchors": [str(signing_pki.cert_path("unknown-root-ca"))],
                "tsa_anchors": [str(signing_pki.cert_path("root-ca"))],
            },
            "policy": POLICY,
        }
    )
    inp, out = tmp_path / "r.bin", tmp_path / "r.bin.p7s"
    inp.write_bytes(b"x")
    with pytest.raises(SigningError, match="not trusted"):
        await cmd_sign("file", inp, out, signer_text(signing_pki), "1", "imported_record", settings)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["dicom", "pdf", "file"])
async def test_unreachable_tsa_when_required_writes_nothing(kind, signing_pki, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/tsa"
    settings = settings_for(signing_pki, dead, tsa_timeout=2)
    inp = tmp_path / "in"
    if kind == "dicom":
        make_sc_dataset(inp)
    elif kind == "pdf":
        inp.write_bytes(make_pdf())
    else:
        inp.write_bytes(b"payload")
    out = tmp_path / "out"
    with pytest.raises(TimestampError, match="unreachable"):
        await cmd_sign(kind, inp, out, signer_text(signing_pki), "1", "referral_letter", settings)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


async def test_timestamp_required_without_tsa_is_refused(signing_pki, tmp_path) -> None:
    inp = tmp_path / "in.dcm"
    make_sc_dataset(inp)
    with pytest.raises(SigningError, match="requires a timestamp; no TSA configured"):
        await cmd_sign(
            "dicom",
            inp,
            tmp_path / "o.dcm",
            signer_text(signing_pki),
            "1",
            "digitized_film",
            settings_for(signing_pki, None),
        )


@pytest.mark.peer
async def test_verify_fails_policy_for_unsigned_and_untimestamped(signing_pki, tmp_path) -> None:
    settings = settings_for(signing_pki, None)
    plain = tmp_path / "plain.dcm"
    make_sc_dataset(plain)
    code, report = await cmd_verify(plain, settings=settings, record_type="digitized_film")
    assert code == 1 and "requires one" in report.problems[0]

    signed = tmp_path / "signed.dcm"
    await cmd_sign(
        "dicom", plain, signed, signer_text(signing_pki), "1", "imported_record", settings
    )
    code, _ = await cmd_verify(signed, settings=settings, record_type="imported_record")
    assert code == 0
    code, report = await cmd_verify(signed, settings=settings, record_type="digitized_film")
    assert code == 1
    assert any("no valid timestamp" in p for p in report.signatures[0].problems)


async def test_verify_unreadable_file_exits_2(signing_pki, tmp_path) -> None:
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.7\nnot really a pdf")
    code, report = await cmd_verify(bad, settings=settings_for(signing_pki, None))
    assert code == 2 and report["verdict"] == "unreadable"
