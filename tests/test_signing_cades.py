"""Detached CAdES-T (.p7s) checked by openssl cms and openssl ts (R-SIG-4, R-SIG-5)."""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import subprocess

import pytest
from asn1crypto import cms

from pki.errors import TimestampError
from signing.cades import sign_detached, signature_timestamp_tokens, verify_detached
from signing.policy import RecordPolicy
from signing.signers import open_signer
from signing.tsa import SekishoTimeStamper, TsaClient, verify_token
from signing.verify import judge
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    openssl_cms_verify,
    p12_spec,
    require_tool,
    signing_pki,
    softhsm_token,
    trust,
    tsa_server,
)

pytestmark = pytest.mark.peer

CONTENT = b"%scanned consent form, not a PDF\n" + bytes(range(256)) * 8


async def _sign(pki, url, trust) -> bytes:
    async with await open_signer(p12_spec(pki)) as signer:
        return await sign_detached(CONTENT, signer, SekishoTimeStamper(TsaClient(url, trust)))


async def test_p7s_verifies_with_openssl_and_its_timestamp_too(
    signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    p7s = await _sign(signing_pki, loopback_tsa.url, trust)
    data, sig = tmp_path / "form.bin", tmp_path / "form.bin.p7s"
    data.write_bytes(CONTENT)
    sig.write_bytes(p7s)
    proc = openssl_cms_verify(data, sig, signing_pki.cert_path("hpki-root-ca"))
    assert proc.returncode == 0, proc.stderr
    assert "Verification successful" in proc.stderr

    # signature-time-stamp: an RFC 3161 token over the SignerInfo signature value
    (token,) = signature_timestamp_tokens(p7s)
    signature_value = cms.ContentInfo.load(p7s)["content"]["signer_infos"][0]["signature"].native
    (tmp_path / "sigvalue.bin").write_bytes(signature_value)
    (tmp_path / "tst.der").write_bytes(token)
    proc = subprocess.run(
        [
            "openssl",
            "ts",
            "-verify",
            "-data",
            str(tmp_path / "sigvalue.bin"),
            "-in",
            str(tmp_path / "tst.der"),
            "-token_in",
            "-CAfile",
            str(signing_pki.cert_path("root-ca")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Verification: OK" in proc.stdout
    assert (await verify_token(token, trust, data=signature_value)).tsa_subject


async def test_sekisho_reports_cades_t(signing_pki, loopback_tsa, trust) -> None:
    p7s = await _sign(signing_pki, loopback_tsa.url, trust)
    (rep,) = await verify_detached(CONTENT, p7s, trust)
    assert rep.kind == "cades" and rep.intact and rep.chain_ok
    assert rep.hc_role == "Medical Doctor" and rep.revocation == "good"
    assert rep.timestamps[0].ok and rep.signing_time == rep.timestamps[0].time
    assert judge(rep, RecordPolicy(record_type="x", hpki_role_required=True)) == []


async def test_one_byte_change_detected_by_openssl_and_sekisho(
    signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    p7s = await _sign(signing_pki, loopback_tsa.url, trust)
    changed = bytearray(CONTENT)
    changed[100] ^= 0x01
    data, sig = tmp_path / "f.bin", tmp_path / "f.bin.p7s"
    data.write_bytes(bytes(changed))
    sig.write_bytes(p7s)
    proc = openssl_cms_verify(data, sig, signing_pki.cert_path("hpki-root-ca"))
    assert proc.returncode != 0
    assert "content verify error" in proc.stderr.lower()
    (rep,) = await verify_detached(bytes(changed), p7s, trust)
    assert not rep.intact
    assert judge(rep, RecordPolicy(record_type="x"))[0].startswith("integrity")


async def test_wrong_imprint_from_tsa_aborts_cades(signing_pki, loopback_tsa, trust) -> None:
    with pytest.raises(TimestampError, match="imprint mismatch"):
        await _sign(signing_pki, loopback_tsa.mode_url("wrong-imprint"), trust)
