"""verify_file: dispatch by content, detached .p7s lookup, JSON report (R-SIG-8)."""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import json

import pytest

from signing.cades import sign_detached
from signing.policy import RecordPolicy
from signing.signers import open_signer
from signing.tsa import SekishoTimeStamper, TsaClient
from signing.verify import detect_kind, verify_file
from tests.signing_fixtures import (  # noqa: F401 - fixtures are used by name
    loopback_tsa,
    make_pdf,
    make_sc_dataset,
    p12_spec,
    signing_pki,
    trust,
    tsa_server,
)


def test_detect_kind_by_magic_not_by_name(tmp_path) -> None:
    dcm, pdf, other = tmp_path / "a.pdf", tmp_path / "b.dcm", tmp_path / "c.dcm"
    make_sc_dataset(dcm)
    pdf.write_bytes(make_pdf())
    other.write_bytes(b"plain bytes")
    assert [detect_kind(p) for p in (dcm, pdf, other)] == ["dicom", "pdf", "other"]


async def test_other_file_uses_sibling_p7s_and_reports_json(
    signing_pki, loopback_tsa, trust, tmp_path
) -> None:
    data = tmp_path / "consent.txt"
    data.write_bytes(b"consent, scanned as text")
    async with await open_signer(p12_spec(signing_pki)) as signer:
        stamper = SekishoTimeStamper(TsaClient(loopback_tsa.url, trust))
        (tmp_path / "consent.txt.p7s").write_bytes(
            await sign_detached(data.read_bytes(), signer, stamper)
        )
    report = await verify_file(data, trust=trust)
    assert report.artifact == "file+p7s" and report.ok
    doc = json.loads(report.to_json())
    assert doc["verdict"] == "valid"
    assert doc["details"]["signature_file"].endswith("consent.txt.p7s")
    sig = doc["signatures"][0]
    assert sig["kind"] == "cades" and sig["intact"] and sig["chain_ok"]
    assert sig["timestamps"][0]["time"] and sig["revocation"] == "good"


async def test_missing_p7s_fails_when_signature_required(trust, tmp_path) -> None:
    data = tmp_path / "unsigned.bin"
    data.write_bytes(b"x")
    report = await verify_file(data, trust=trust, policy=RecordPolicy(record_type="r"))
    assert not report.ok and "no detached signature" in report.problems[0]
    lenient = RecordPolicy(record_type="r", signature_required=False)
    assert (await verify_file(data, trust=trust, policy=lenient)).ok


@pytest.mark.parametrize("required", [True, False])
async def test_unsigned_pdf_against_policy(required, trust, tmp_path) -> None:
    pdf = tmp_path / "plain.pdf"
    pdf.write_bytes(make_pdf())
    policy = RecordPolicy(record_type="r", signature_required=required)
    report = await verify_file(pdf, trust=trust, policy=policy)
    assert report.signatures == []
    assert report.ok is (not required)
