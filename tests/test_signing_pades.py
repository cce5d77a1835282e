"""PAdES B-LTA signing checked by poppler pdfsig and openssl cms (R-SIG-4, R-SIG-6)."""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms

from pki.errors import SigningError, TimestampError
from signing.pades import sign_pdf, verify_pdf
from signing.policy import RecordPolicy
from signing.signers import open_signer
from signing.tsa import SekishoTimeStamper, TsaClient
from signing.verify import judge
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    make_pdf,
    openssl_cms_verify,
    p12_spec,
    require_tool,
    signing_pki,
    softhsm_token,
    trust,
    tsa_server,
)

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def signed_pdf(tmp_path_factory, signing_pki, loopback_tsa, trust) -> Path:
    import asyncio

    async def run() -> bytes:
        async with await open_signer(p12_spec(signing_pki)) as signer:
            stamper = SekishoTimeStamper(TsaClient(loopback_tsa.url, trust))
            return await sign_pdf(make_pdf(), signer, trust, stamper, reason="Author's Signature")

    path = tmp_path_factory.mktemp("pades") / "signed.pdf"
    path.write_bytes(asyncio.run(run()))
    return path


def one_byte_changed(src: Path, dst: Path) -> Path:
    """Flip one byte inside the first signed byte range (the page content)."""
    data = bytearray(src.read_bytes())
    at = data.index(b"Referral letter")
    data[at] ^= 0x20  # 'R' -> 'r'
    dst.write_bytes(bytes(data))
    return dst


def pdfsig(path: Path, *extra: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [require_tool("pdfsig"), *extra, str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )
    return proc.stdout + proc.stderr


async def test_pades_b_lta_verifies_with_pyhanko_validation(signed_pdf, trust) -> None:
    reports = await verify_pdf(signed_pdf.read_bytes(), trust)
    sig, *timestamps = reports
    assert sig.kind == "pades" and sig.intact and sig.chain_ok
    assert sig.hc_role == "Medical Doctor" and sig.revocation == "good"
    assert sig.details["subfilter"] == "/ETSI.CAdES.detached"
    assert sig.details["modification_level"] in ("NONE", "LTA_UPDATES")
    assert sig.details["embedded_validation_data"]["crls"] >= 1  # B-LT: DSS holds CRLs
    assert sig.timestamps[0].kind == "signature" and sig.timestamps[0].ok
    assert sig.coverage["byte_range"][0] == 0
    assert [t.kind for t in timestamps] == ["document-timestamp"]  # B-LTA
    assert timestamps[0].intact and timestamps[0].chain_ok
    policy = RecordPolicy(record_type="referral", hpki_role_required=True)
    assert all(judge(r, policy) == [] for r in reports)


def test_pdfsig_reports_signature_valid(signed_pdf) -> None:
    out = pdfsig(signed_pdf)
    first = out.split("Signature #2")[0]
    assert "Signer Certificate Common Name: Yamada Taro" in first
    assert "Signature Validation: Signature is Valid." in first
    assert "ETSI.CAdES.detached" in first


def _signed_ranges(pdf: bytes) -> tuple[bytes, list[int]]:
    import io

    from pyhanko.pdf_utils.reader import PdfFileReader

    emb = PdfFileReader(io.BytesIO(pdf)).embedded_signatures[0]
    a, b, c, d = (int(x) for x in emb.sig_object["/ByteRange"])
    return pdf[a : a + b] + pdf[c : c + d], [a, b, c, d]


def test_pdfsig_dump_and_openssl_cms_verify_signed_ranges(
    signed_pdf, signing_pki, tmp_path
) -> None:
    out = pdfsig(signed_pdf, "-dump", cwd=tmp_path)
    assert "Dumping Signatures" in out
    sig0 = tmp_path / f"{signed_pdf.name}.sig0"
    assert sig0.is_file()
    content, _ = _signed_ranges(signed_pdf.read_bytes())
    (tmp_path / "content.bin").write_bytes(content)
    proc = openssl_cms_verify(tmp_path / "content.bin", sig0, signing_pki.cert_path("hpki-root-ca"))
    assert proc.returncode == 0, proc.stderr
    assert "Verification successful" in proc.stderr
    # the dumped CMS carries the signature timestamp token as an unsigned attribute
    sd = cms.ContentInfo.load(sig0.read_bytes().rstrip(b"\x00"))["content"]
    attrs = [a["type"].native for a in sd["signer_infos"][0]["unsigned_attrs"]]
    assert "signature_time_stamp_token" in attrs


async def test_one_byte_change_detected_by_pdfsig_openssl_and_sekisho(
    signed_pdf, signing_pki, trust, tmp_path
) -> None:
    bad = one_byte_changed(signed_pdf, tmp_path / "bad.pdf")
    first = pdfsig(bad).split("Signature #2")[0]
    assert "Signature Validation: Signature is Valid." not in first
    assert "Signature Validation:" in first

    content, _ = _signed_ranges(bad.read_bytes())
    (tmp_path / "content.bin").write_bytes(content)
    pdfsig(bad, "-dump", cwd=tmp_path)
    proc = openssl_cms_verify(
        tmp_path / "content.bin", tmp_path / "bad.pdf.sig0", signing_pki.cert_path("hpki-root-ca")
    )
    assert proc.returncode != 0

    reports = await verify_pdf(bad.read_bytes(), trust)
    assert not reports[0].intact
    assert judge(reports[0], RecordPolicy(record_type="x"))[0].startswith("integrity")


async def test_untrusted_signer_refused_before_writing(signing_pki, loopback_tsa) -> None:
    from signing.trust import TrustConfig

    wrong = TrustConfig.from_paths(
        signer_anchors=[signing_pki.cert_path("unknown-root-ca")],
        tsa_anchors=[signing_pki.cert_path("root-ca")],
    )
    async with await open_signer(p12_spec(signing_pki)) as signer:
        stamper = SekishoTimeStamper(TsaClient(loopback_tsa.url, wrong))
        with pytest.raises(SigningError, match="refused by validation: not trusted"):
            await sign_pdf(make_pdf(), signer, wrong, stamper)


async def test_tsa_wrong_imprint_aborts_pades(signing_pki, loopback_tsa, trust) -> None:
    async with await open_signer(p12_spec(signing_pki)) as signer:
        stamper = SekishoTimeStamper(TsaClient(loopback_tsa.mode_url("wrong-imprint"), trust))
        with pytest.raises(TimestampError, match="imprint mismatch"):
            await sign_pdf(make_pdf(), signer, trust, stamper)


async def test_archive_timestamp_renewal_extends_the_chain(signed_pdf, loopback_tsa, trust) -> None:
    from signing.pades import renew_archive_timestamp

    stamper = SekishoTimeStamper(TsaClient(loopback_tsa.url, trust))
    renewed = await renew_archive_timestamp(signed_pdf.read_bytes(), trust, stamper)
    reports = await verify_pdf(renewed, trust)
    kinds = [r.kind for r in reports]
    assert kinds == ["pades", "document-timestamp", "document-timestamp"]
    assert all(r.intact and r.chain_ok for r in reports)
    assert reports[0].details["modification_level"] in ("NONE", "LTA_UPDATES")
    assert all(judge(r, RecordPolicy(record_type="x")) == [] for r in reports)
