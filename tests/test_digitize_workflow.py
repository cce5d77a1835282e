"""Film intake to signed archive record, end to end (R-DIG-1..5, R-SIG-3, R-SIG-4).

The gateway is a real ``sekisho init`` instance; signing uses the dev HPKI
signer and the loopback ``openssl ts`` TSA of :mod:`tests.signing_fixtures`.
Independent checks: DCMTK ``dcmdump`` and ``dcmsign --verify +tr`` on the
stored Secondary Capture, poppler ``pdfsig`` on the stored PDF.
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F401, F811

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pydicom
import pytest

from gateway.digitization.intake import overdue, receive_film, record_plan
from gateway.digitization.workflow import DigitizeRequest, digitize
from gateway.service import Gateway
from gateway.settings import load_settings
from media.digitize import ScanInfo
from pki.errors import ConfigurationError, NotFoundError, SigningError, TimestampError
from tests.digitize_fixtures import digitization_config, make_scan, signer_arg
from tests.gateway_helpers import Instance, create_instance
from tests.signing_fixtures import loopback_tsa, require_tool, signing_pki, tsa_server

IMPORT = "110107"
GOOD = ScanInfo(pitch_um=175.0, density_min=0.0, density_max=3.6)


@pytest.fixture(scope="module")
def inst(tmp_path_factory, signing_pki, loopback_tsa) -> Instance:
    root = tmp_path_factory.mktemp("digitize") / "gw"
    return create_instance(root, digitization_config(signing_pki, loopback_tsa.url))


@pytest.fixture
def gw(inst: Instance) -> Iterator[Gateway]:
    gateway = Gateway.open(load_settings(inst.config))
    yield gateway
    gateway.close()


def _sidecar(scan: Path, **values: float) -> Path:
    data = {"pitch_um": 175, "density_min": 0.0, "density_max": 3.6, **values}
    scan.with_name(scan.name + ".json").write_text(json.dumps(data))
    return scan


def _receive(inst: Instance, **extra: str) -> dict:
    args = ["film", "receive", "--patient-id", "P-100", "--from", "Minami Clinic"]
    args += ["--films", "1", "--json", "--by", "reception01"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return json.loads(inst.cli_ok(*args))


def _stored(inst: Instance, sha256: str) -> Path:
    return inst.object_path(sha256)


def _dcmsign(path: Path, pki) -> subprocess.CompletedProcess:
    cmd = [require_tool("dcmsign"), "--verify", "+cf", str(pki.cert_path("hpki-root-ca"))]
    cmd += ["+cf", str(pki.cert_path("root-ca")), "+tr", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


# ---------------------------------------------------------------- the whole path, by CLI
def test_16_bit_175_um_scan_becomes_signed_verifiable_sc(inst, signing_pki, tmp_path) -> None:
    receipt = _receive(inst)
    assert receipt["films"] == 1 and receipt["received_by"] == "reception01"
    scan = _sidecar(make_scan(tmp_path / "chest.png", bits=12))
    before = inst.audit_head()
    out = inst.cli_ok(
        "digitize",
        str(scan),
        "--receipt",
        receipt["id"],
        "--operator",
        "op01",
        "--operator-name",
        "Sousa^Ichiro",
        "--signer",
        signer_arg(signing_pki),
        "--json",
    )
    result = json.loads(out)
    d = result["digitization"]
    assert d["late"] is False and d["information_manager"] == "Kanri^Taro=管理^太郎"
    assert d["hc_role"] == "Medical Doctor" and d["timestamp_time"]
    (record,) = result["records"]
    assert record["kind"] == "dicom" and record["evidence_sha256"]
    stored = _stored(inst, record["sha256"])
    assert record["sop_uid"] in inst.indexed_instances()

    proc = subprocess.run(["dcmdump", str(stored)], capture_output=True, check=True)
    dump = proc.stdout.decode(errors="replace")
    assert "(0008,0064) CS [DF]" in dump
    assert "(0018,2010) DS [0.175\\0.175]" in dump
    assert "(0008,0100) SH [FILMD]" in dump and "(0008,0104) LO [Film Digitizer]" in dump
    assert "(0008,1070) PN [Sousa^Ichiro]" in dump
    assert "(0400,0310) OB" in dump  # Certified Timestamp
    ds = pydicom.dcmread(stored)
    assert ds.PatientID == "P-100" and ds.StudyInstanceUID == receipt["study_uid"]
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "Film Scan Co"

    verified = _dcmsign(stored, signing_pki)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    text = verified.stdout + verified.stderr
    assert "Signature Verification : OK" in text and "Timestamp Verification : OK" in text

    check = inst.cli("signatures", "verify", str(stored), "--type", "digitized-film")
    assert check.returncode == 0, check.stdout + check.stderr  # uses FILE.ers? none: object only
    (event,) = [r for r in inst.audit_records(after_seq=before) if r.event.event_id.value == IMPORT]
    assert event.event.actor == "op01" and event.event.patient_id == "P-100"
    assert event.event.extra["late"] == "no"
    assert event.event.extra["information_manager"] == "Kanri^Taro=管理^太郎"


@pytest.mark.parametrize(
    ("bits", "pitch", "message"),
    [
        (12, 250, "sampling pitch: 250 µm (required: <= 200 µm)"),
        (8, 175, "grey levels: 256 levels (8 bits stored)"),
    ],
)
def test_below_spec_scan_refused_nothing_stored(inst, signing_pki, tmp_path, bits, pitch, message):
    receipt = _receive(inst)
    scan = make_scan(tmp_path / "film.png", bits=bits, container=16 if bits > 8 else 8)
    _sidecar(scan, pitch_um=pitch)
    objects, before = set(inst.object_files()), inst.audit_head()
    proc = inst.cli(
        "digitize",
        str(scan),
        "--receipt",
        receipt["id"],
        "--operator",
        "op01",
        "--signer",
        signer_arg(signing_pki),
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert set(inst.object_files()) == objects
    (event,) = [r for r in inst.audit_records(after_seq=before) if r.event.event_id.value == IMPORT]
    assert event.event.outcome == 4 and event.event.reason_code == "digitization"


# ---------------------------------------------------------------- deadline (R-DIG-3)
def _monday_two_weeks_ago(gw: Gateway) -> datetime:
    zone = gw.settings.digitization.zone
    day = (datetime.now(zone) - timedelta(days=14)).date()
    day -= timedelta(days=day.weekday())
    return datetime.combine(day, time(10, 0), zone)


async def test_digitization_three_days_after_receipt_is_late(gw, signing_pki, tmp_path) -> None:
    monday = _monday_two_weeks_ago(gw)
    late_receipt = await receive_film(
        gw,
        patient_id="P-200",
        source_facility="Kita Hospital",
        films=1,
        received_by="reception01",
        received_at=monday,
    )
    waiting = await receive_film(
        gw,
        patient_id="P-201",
        source_facility="Kita Hospital",
        films=2,
        received_by="reception01",
        received_at=monday,
    )
    on_time = await receive_film(
        gw,
        patient_id="P-202",
        source_facility="Kita Hospital",
        films=1,
        received_by="reception01",
        received_at=monday + timedelta(days=2),
    )
    assert (
        late_receipt.deadline == (monday + timedelta(days=1, hours=14)).astimezone(UTC).isoformat()
    )
    thursday = monday + timedelta(days=3)
    request = DigitizeRequest(
        receipt_id=late_receipt.id,
        files=(make_scan(tmp_path / "a.png"),),
        operator_id="op02",
        signer=signer_arg(signing_pki),
        scan=GOOD,
    )
    late = await digitize(gw, request, now=thursday)
    assert late.digitization.late is True
    fine = await digitize(gw, replace(request, receipt_id=on_time.id), now=thursday)
    assert fine.digitization.late is False

    listing = await gw.run(overdue, gw, thursday)
    assert late.digitization.id in [d["id"] for d in listing["late_digitizations"]]
    assert fine.digitization.id not in [d["id"] for d in listing["late_digitizations"]]
    overdue_ids = [r["id"] for r in listing["overdue_receipts"]]
    assert waiting.id in overdue_ids and late_receipt.id not in overdue_ids
    records = list(gw.audit.iter_records(patient_id="P-200"))
    flagged = [r for r in records if r.event.event_id.value == IMPORT]
    assert flagged[-1].event.reason_code == "late-digitization"
    assert flagged[-1].event.extra["late"] == "yes"


def test_overdue_command_lists_receipts_and_late_digitizations(inst) -> None:
    old = (datetime.now(UTC) - timedelta(days=10)).isoformat()
    receipt = _receive(inst, received_at=old)
    out = json.loads(inst.cli_ok("digitize", "overdue", "--json"))
    assert receipt["id"] in [r["id"] for r in out["overdue_receipts"]]
    text = inst.cli_ok("digitize", "overdue")
    assert f"OVERDUE receipt {receipt['id']}" in text


# ---------------------------------------------------------------- bulk (R-DIG-5)
async def test_bulk_digitization_needs_a_recorded_plan(gw, signing_pki, tmp_path) -> None:
    old = datetime.now(UTC) - timedelta(days=400)
    receipt = await receive_film(
        gw,
        patient_id="P-300",
        source_facility="Film library",
        films=1,
        received_by="archive01",
        received_at=old,
    )
    request = DigitizeRequest(
        receipt_id=receipt.id,
        files=(make_scan(tmp_path / "old.png"),),
        operator_id="op03",
        signer=signer_arg(signing_pki),
        scan=GOOD,
        bulk_plan="PLAN-2026-01",
        patient_consent="notice 2026-05-01, consent form 17",
    )
    with pytest.raises(NotFoundError, match="no bulk digitization plan"):
        await digitize(gw, request)
    await record_plan(
        gw,
        "PLAN-2026-01",
        description="film library conversion",
        committee_approval="committee minutes 2026-04 incl. outside experts",
        external_auditor="Audit Co",
        recorded_by="admin01",
    )
    done = await digitize(gw, request)
    assert done.digitization.bulk_plan == "PLAN-2026-01" and done.digitization.late is False
    stored = pydicom.dcmread(gw.files.object_path(done.records[0]["sha256"]))
    text = stored.ContributingEquipmentSequence[0].ContributionDescription
    assert "bulk digitization under plan PLAN-2026-01" in text
    alerts = [r.event for r in gw.audit.iter_records(event_id="110113")]
    assert any(
        a.reason_code == "bulk-digitization" and a.extra["plan"] == "PLAN-2026-01" for a in alerts
    )


# ---------------------------------------------------------------- signer policy (R-DIG-4)
async def test_signer_without_hcrole_refused_and_nothing_stored(gw, signing_pki, tmp_path) -> None:
    receipt = await receive_film(
        gw, patient_id="P-400", source_facility="Clinic", films=1, received_by="reception01"
    )
    before = {p.name for p in gw.files.objects.rglob("*") if p.is_file()}
    request = DigitizeRequest(
        receipt_id=receipt.id,
        files=(make_scan(tmp_path / "f.png"),),
        operator_id="op04",
        signer=signer_arg(signing_pki, "hpki-signer-no-role"),
        scan=GOOD,
    )
    with pytest.raises(SigningError, match="no hcRole"):
        await digitize(gw, request)
    assert {p.name for p in gw.files.objects.rglob("*") if p.is_file()} == before
    assert list(gw.files.tmp.iterdir()) == []
    with pytest.raises(SigningError, match="must be signed"):
        await digitize(gw, replace(request, signer=None))


# ---------------------------------------------------------------- paper (R-DIG-1, R-SIG-4)
async def test_paper_record_is_pades_signed_with_sd_sc(gw, signing_pki, tmp_path) -> None:
    from PIL import Image

    pages = []
    for n in range(2):
        pages.append(tmp_path / f"letter-{n}.png")
        Image.new("L", (340, 440), 235).save(pages[-1], dpi=(200, 200))
    receipt = await receive_film(
        gw, patient_id="P-500", source_facility="Higashi Clinic", films=1, received_by="reception01"
    )
    done = await digitize(
        gw,
        DigitizeRequest(
            receipt_id=receipt.id,
            files=tuple(pages),
            operator_id="op05",
            signer=signer_arg(signing_pki, "hpki-signer-technologist"),
            kind="paper",
            paper_sc=True,
            encapsulate=True,
            title="Referral letter",
        ),
    )
    kinds = [r["kind"] for r in done.records]
    assert kinds == ["pdf", "dicom", "dicom", "dicom"]
    pdf_path = gw.files.object_path(done.records[0]["sha256"])
    out = subprocess.run([require_tool("pdfsig"), str(pdf_path)], capture_output=True, text=True)
    first = (out.stdout + out.stderr).split("Signature #2")[0]
    assert "Signature Validation: Signature is Valid." in first
    assert "Suzuki Hanako" in first
    sc = pydicom.dcmread(gw.files.object_path(done.records[1]["sha256"]))
    assert sc.ConversionType == "SD"
    code = sc.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0]
    assert code.CodeValue == "DOCD"
    for record in done.records[1:]:
        verified = _dcmsign(gw.files.object_path(record["sha256"]), signing_pki)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    encapsulated = pydicom.dcmread(gw.files.object_path(done.records[3]["sha256"]))
    assert encapsulated.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(encapsulated.EncapsulatedDocument).startswith(pdf_path.read_bytes())


async def test_receipt_must_exist_and_manager_must_be_configured(gw, tmp_path) -> None:
    request = DigitizeRequest(
        receipt_id="FR-nope", files=(tmp_path / "x.png",), operator_id="op", signer=None
    )
    with pytest.raises(NotFoundError):
        await digitize(gw, request)
    receipt = await receive_film(
        gw, patient_id="P-600", source_facility="Clinic", films=1, received_by="reception01"
    )
    no_manager = replace(gw.settings.digitization, information_manager="")
    gw.settings = replace(gw.settings, digitization=no_manager)
    with pytest.raises(ConfigurationError, match="information_manager"):
        await digitize(gw, replace(request, receipt_id=receipt.id))


async def test_tsa_unreachable_leaves_nothing_half_signed(gw, signing_pki, tmp_path) -> None:
    from tests.gateway_helpers import free_port

    receipt = await receive_film(
        gw, patient_id="P-700", source_facility="Clinic", films=1, received_by="reception01"
    )
    signing = dict(gw.settings.signing)
    signing["tsa_url"] = f"http://127.0.0.1:{free_port()}/tsa"
    gw.settings = replace(gw.settings, signing=signing)
    before = {p.name for p in gw.files.objects.rglob("*") if p.is_file()}
    request = DigitizeRequest(
        receipt_id=receipt.id,
        files=(make_scan(tmp_path / "f.png"),),
        operator_id="op07",
        signer=signer_arg(signing_pki),
        scan=GOOD,
    )
    with pytest.raises(TimestampError, match="unreachable"):
        await digitize(gw, request)
    assert {p.name for p in gw.files.objects.rglob("*") if p.is_file()} == before
    assert list(gw.files.tmp.iterdir()) == []
