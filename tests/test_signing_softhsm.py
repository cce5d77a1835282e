"""PKCS#11 signer backend on a SoftHSM2 token set up by the tests (R-SIG-7).

The token holds the same key as the hpki-signer PKCS#12 bundle, so RSASSA-PKCS1-v1_5
(deterministic) must give byte-identical signatures through both backends, and
the independent verifiers must accept what the token signs.
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import os
import subprocess

import pydicom
import pytest

from pki.errors import ConfigurationError, SigningError
from signing.cades import sign_detached
from signing.dicom_sig import sign_dataset, verify_dataset
from signing.signers import SignerSpec, open_signer
from signing.tsa import SekishoTimeStamper, TsaClient
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    make_sc_dataset,
    openssl_cms_verify,
    p12_spec,
    require_tool,
    signing_pki,
    softhsm_token,
    trust,
    tsa_server,
)

pytestmark = pytest.mark.peer


def token_spec(tok, **overrides) -> SignerSpec:
    kw = {
        "kind": "pkcs11",
        "module": tok.module,
        "token_label": tok.label,
        "key_id": tok.key_id,
        "cert_id": tok.key_id,
        "pin_file": tok.pin_file,
    }
    kw.update(overrides)
    return SignerSpec(**kw)


async def test_token_and_pkcs12_produce_identical_signatures(softhsm_token, signing_pki) -> None:
    data = b"PS3.15 signature stream"
    async with await open_signer(token_spec(softhsm_token)) as hsm:
        assert hsm.backend == "pkcs11"
        assert hsm.certificate.dump() == load_cert(signing_pki)
        from_token = await hsm.sign_raw(data)
    async with await open_signer(p12_spec(signing_pki)) as p12:
        from_file = await p12.sign_raw(data)
    assert from_token == from_file and len(from_token) == 256


def load_cert(pki) -> bytes:
    from signing.trust import load_asn1_certificates

    return load_asn1_certificates(pki.cert_path("hpki-signer"))[0].dump()


async def test_token_signed_dicom_verifies_with_dcmsign_and_sekisho(
    softhsm_token, signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    dcmsign = require_tool("dcmsign")
    ds = make_sc_dataset()
    async with await open_signer(token_spec(softhsm_token)) as hsm:
        signed = await sign_dataset(ds, hsm, "creator", "1", TsaClient(loopback_tsa.url, trust))
    out = tmp_path / "hsm.dcm"
    signed.save_as(out, enforce_file_format=True)
    proc = subprocess.run(
        [
            dcmsign,
            "--verify",
            "+rg",
            "+tr",
            "+cf",
            str(signing_pki.cert_path("hpki-root-ca")),
            "+cf",
            str(signing_pki.cert_path("root-ca")),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Signature Verification : OK" in proc.stdout + proc.stderr
    (rep,) = await verify_dataset(pydicom.dcmread(out), trust)
    assert rep.intact and rep.chain_ok and rep.timestamps[0].ok


async def test_token_signed_p7s_verifies_with_openssl(
    softhsm_token, signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    content = b"scanned record from the token test"
    async with await open_signer(token_spec(softhsm_token)) as hsm:
        p7s = await sign_detached(
            content, hsm, SekishoTimeStamper(TsaClient(loopback_tsa.url, trust))
        )
    (tmp_path / "c.bin").write_bytes(content)
    (tmp_path / "c.p7s").write_bytes(p7s)
    proc = openssl_cms_verify(
        tmp_path / "c.bin", tmp_path / "c.p7s", signing_pki.cert_path("hpki-root-ca")
    )
    assert proc.returncode == 0, proc.stderr


async def test_certificate_can_come_from_a_file(softhsm_token, signing_pki) -> None:
    spec = token_spec(softhsm_token, cert_id=None, cert_file=signing_pki.cert_path("hpki-signer"))
    async with await open_signer(spec) as hsm:
        assert hsm.certificate.dump() == load_cert(signing_pki)


async def test_wrong_pin_is_refused(softhsm_token, tmp_path) -> None:
    from pki.certs import write_secret_file

    bad = tmp_path / "bad.pin"
    write_secret_file(bad, b"000000")
    with pytest.raises(SigningError, match="cannot open PKCS#11 token"):
        await open_signer(token_spec(softhsm_token, pin_file=bad))


async def test_pin_file_readable_by_others_is_refused(softhsm_token, tmp_path) -> None:
    loose = tmp_path / "loose.pin"
    loose.write_bytes(softhsm_token.pin_file.read_bytes())
    os.chmod(loose, 0o644)
    with pytest.raises(ConfigurationError, match="mode 0644"):
        await open_signer(token_spec(softhsm_token, pin_file=loose))


async def test_unknown_key_id_is_refused(softhsm_token) -> None:
    with pytest.raises(SigningError, match="not found on token"):
        await open_signer(token_spec(softhsm_token, key_id=b"\x99", cert_id=b"\x99"))


async def test_pin_prompt_is_used_without_pin_file(softhsm_token) -> None:
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return softhsm_token.pin_file.read_text().strip()

    spec = token_spec(softhsm_token, pin_file=None, pin_prompt=True)
    async with await open_signer(spec, pin_prompt=prompt) as hsm:
        assert len(await hsm.sign_raw(b"x")) == 256
    assert asked and softhsm_token.label in asked[0]
