"""Long-term validity: renewal before the TSA certificate ends, verification after (R-SIG-6).

Scenario: a film (DICOM SC with an RFC 4998 Evidence Record) and a paper
record (PAdES B-LTA PDF) are digitized and signed with the first TSA.  The
clock is then *planned* ten days before that TSA certificate ends:
``sekisho signatures renew`` renews both with a TSA whose certificate runs
longer.  With the clock frozen a day *after* the first TSA certificate ended,
the renewed records verify and the copies kept from before the renewal do
not.  A second renewal run renews nothing and every renewal is audited.

Separately, with a PKI whose CRL and OCSP services are stopped after signing,
the records still verify from the validation data captured at signing.
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F401, F811

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from gateway.digitization.intake import receive_film
from gateway.digitization.workflow import DigitizeRequest, digitize
from gateway.service import Gateway
from gateway.settings import load_settings
from media.digitize import ScanInfo
from signing.evidence import load_record
from signing.validation_data import from_attributes
from tests.digitize_fixtures import (
    crl_at,
    digitization_config,
    make_scan,
    renewal_tsa,
    signer_arg,
    start_ca_services,
    stop_tsa,
)
from tests.gateway_helpers import Instance, create_instance
from tests.signing_fixtures import loopback_tsa, signing_pki, tsa_server

ACCESSED = "110103"
GOOD = ScanInfo(pitch_um=175.0, density_min=0.0, density_max=3.6)


async def _digitize_film_and_paper(inst: Instance, pki, work: Path) -> dict[str, dict]:
    page = work / "letter.png"
    Image.new("L", (300, 400), 240).save(page, dpi=(150, 150))
    gw = Gateway.open(load_settings(inst.config))
    try:
        receipt = await receive_film(
            gw,
            patient_id="P-900",
            source_facility="Nishi Clinic",
            films=1,
            received_by="reception01",
        )
        base = DigitizeRequest(
            receipt_id=receipt.id,
            files=(make_scan(work / "film.png"),),
            operator_id="op09",
            signer=signer_arg(pki),
            scan=GOOD,
        )
        film = await digitize(gw, base)
        paper = await digitize(
            gw,
            DigitizeRequest(
                receipt_id=receipt.id,
                files=(page,),
                operator_id="op09",
                signer=signer_arg(pki),
                kind="paper",
            ),
        )
    finally:
        gw.close()
    return {"dicom": film.records[0], "pdf": paper.records[0]}


def _status(inst: Instance) -> dict[str, dict]:
    rows = json.loads(inst.cli_ok("signatures", "status", "--json"))
    return {r["kind"]: r for r in rows}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


@pytest.fixture(scope="module")
def renewed(tmp_path_factory, signing_pki, loopback_tsa, renewal_tsa):
    """Digitize, keep pre-renewal copies, renew as of ten days before the TSA ends."""
    import asyncio

    work = tmp_path_factory.mktemp("renew")
    inst = create_instance(
        work / "gw",
        digitization_config(signing_pki, loopback_tsa.url, renewal_tsa_url=renewal_tsa.url),
    )
    asyncio.run(_digitize_film_and_paper(inst, signing_pki, work))
    status = _status(inst)
    old = work / "old"
    old.mkdir()
    dicom, pdf = status["dicom"], status["pdf"]
    shutil.copy(inst.object_path(dicom["sha256"]), old / "film.dcm")
    er = dicom["evidence_sha256"]
    shutil.copy(inst.object_path(er), old / "film.dcm.ers")
    shutil.copy(inst.object_path(pdf["sha256"]), old / "letter.pdf")
    tsa_end = datetime.fromisoformat(signing_pki.entry("tsa")["not_after"].replace("Z", "+00:00"))
    plan_at = tsa_end - timedelta(days=10)
    before = inst.audit_head()
    dry = json.loads(
        inst.cli_ok("signatures", "renew", "--dry-run", "--now", _iso(plan_at), "--json")
    )
    first = json.loads(inst.cli_ok("signatures", "renew", "--now", _iso(plan_at), "--json"))
    second = json.loads(inst.cli_ok("signatures", "renew", "--now", _iso(plan_at), "--json"))
    frozen = tsa_end + timedelta(days=1)
    crl = crl_at(signing_pki, "root-ca", frozen, work / "root-ca-then.crl")
    return {
        "inst": inst,
        "old": old,
        "dry": dry,
        "first": first,
        "second": second,
        "audit_from": before,
        "frozen": frozen,
        "crl": crl,
        "status": _status(inst),
        "tsa_end": tsa_end,
    }


def test_dry_run_lists_what_is_due_without_renewing(renewed) -> None:
    dry = renewed["dry"]
    assert dry["dry_run"] is True and dry["renewed"] == []
    assert sorted(d["kind"] for d in dry["due"]) == ["dicom", "pdf"]
    assert all("TSA certificate of" in d["reason"] for d in dry["due"])


def test_renewal_extends_protection_beyond_the_first_tsa(renewed) -> None:
    first = renewed["first"]
    assert sorted(r["kind"] for r in first["renewed"]) == ["dicom", "pdf"] and not first["failed"]
    for item in first["renewed"]:
        assert "Sekisho Dev TSA 2" in item["new_tsa"]
        assert datetime.fromisoformat(item["new_protected_until"]) > renewed["tsa_end"]
    status = renewed["status"]
    assert status["dicom"]["renewals"] == 1 and status["pdf"]["renewals"] == 1
    er = renewed["inst"].object_path(status["dicom"]["evidence_sha256"])
    assert len(load_record(er.read_bytes())["archive_time_stamp_sequence"]) == 2


def test_second_renewal_run_renews_nothing(renewed) -> None:
    second = renewed["second"]
    assert second["due"] == [] and second["renewed"] == [] and second["failed"] == []


def test_every_renewal_is_audited(renewed) -> None:
    events = [
        r.event
        for r in renewed["inst"].audit_records(after_seq=renewed["audit_from"])
        if r.event.event_id.value == ACCESSED and r.event.action == "U"
    ]
    assert len(events) == 2
    assert {e.extra["kind"] for e in events} == {"dicom", "pdf"}
    assert all(e.patient_id == "P-900" and e.outcome == 0 for e in events)
    assert all("Sekisho Dev TSA 2" in e.extra["tsa"] for e in events)


@pytest.mark.parametrize("kind", ["dicom", "pdf"])
def test_renewed_record_verifies_after_the_first_tsa_ended(renewed, kind) -> None:
    inst, record = renewed["inst"], renewed["status"][kind]
    proc = inst.cli(
        "signatures",
        "verify",
        "--record",
        str(record["id"]),
        "--now",
        _iso(renewed["frozen"]),
        "--crl",
        str(renewed["crl"]),
        "--json",
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report["problems"]
    assert report["verdict"] == "valid"
    assert datetime.fromisoformat(report["protected_until"]) > renewed["frozen"]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("film.dcm", "archive timestamp 1 not valid now: TSA certificate expired"),
        ("letter.pdf", "long-term validation of SekishoSignature"),
    ],
)
def test_unrenewed_copy_fails_after_the_first_tsa_ended(renewed, name, problem) -> None:
    inst = renewed["inst"]
    proc = inst.cli(
        "signatures",
        "verify",
        str(renewed["old"] / name),
        "--now",
        _iso(renewed["frozen"]),
        "--crl",
        str(renewed["crl"]),
        "--json",
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["verdict"] == "invalid"
    assert any(problem in p for p in report["problems"]), report["problems"]


def test_unrenewed_copy_is_still_valid_today(renewed) -> None:
    inst = renewed["inst"]
    for name in ("film.dcm", "letter.pdf"):
        proc = inst.cli("signatures", "verify", str(renewed["old"] / name), "--json")
        assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------- CA services gone
async def test_verification_uses_captured_data_when_ca_services_are_gone(tmp_path) -> None:
    services, pki = start_ca_services(tmp_path / "ca")
    try:
        inst = create_instance(
            tmp_path / "gw",
            digitization_config(pki, services.url, preload_crls=False, allow_fetching=True),
        )
        await _digitize_film_and_paper(inst, pki, tmp_path)
    finally:
        stop_tsa(services)  # the CA's CRL and OCSP services (and its TSA) stop answering
    assert services.server.ocsp_requests > 0  # type: ignore[attr-defined]
    status = _status(inst)
    er_sha = status["dicom"]["evidence_sha256"]
    record = load_record(inst.object_path(er_sha).read_bytes())
    captured = from_attributes(
        (a["type"].dotted, v.dump()) for a in record["crypto_infos"] for v in a["values"]
    )
    assert captured.ocsps and captured.certificates  # OCSP answers captured at signing
    for kind in ("dicom", "pdf"):
        proc = inst.cli("signatures", "verify", "--record", str(status[kind]["id"]), "--json")
        report = json.loads(proc.stdout)
        assert proc.returncode == 0, report["problems"]
        if kind == "dicom":
            assert report["evidence"]["validation_items"] >= 5  # certificates and CRLs
    # Without the captured data (the object alone) revocation cannot be established now.
    sha = status["dicom"]["sha256"]
    bare = tmp_path / "bare.dcm"
    shutil.copy(inst.object_path(sha), bare)
    proc = inst.cli("signatures", "verify", str(bare), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert any("revocation" in p for p in report["problems"]), report["problems"]


def test_sekisho_verify_follows_the_evidence_record_beside_the_object(renewed, tmp_path) -> None:
    """``sekisho verify FILE`` checks ``FILE.ers`` too (R-SIG-6, R-SIG-8)."""
    inst, old = renewed["inst"], renewed["old"]
    proc = inst.cli("verify", str(old / "film.dcm"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["long_term"]["verdict"] == "valid"
    assert report["long_term"]["evidence"] is not None
    # A damaged evidence record makes the verdict fail although the signature is intact.
    bad = tmp_path / "film.dcm"
    shutil.copy(old / "film.dcm", bad)
    er = bytearray((old / "film.dcm.ers").read_bytes())
    er[-5] ^= 0xFF
    (tmp_path / "film.dcm.ers").write_bytes(bytes(er))
    proc = inst.cli("verify", str(bad), "--json")
    assert proc.returncode != 0
