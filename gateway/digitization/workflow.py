"""Digitization of films and paper as the legal record (R-DIG-1, R-DIG-2, R-DIG-4, R-DIG-5).

* :func:`digitize` runs one digitization: every scan through the JSRT quality
  gate first (R-DIG-2, nothing is signed if one fails), then the Secondary
  Capture (films) or PDF and optional SC/Encapsulated PDF (paper) are built
  with the receipt's patient and study, the operator and the
  information-creation manager (R-DIG-1, R-DIG-4), sealed by
  :class:`~gateway.digitization.sealing.Sealer` (signed at once, verified,
  evidence record), committed to the store, indexed, recorded and audited as
  a DICOM Import event (PS3.15 A.5.3.8; IHE IRWF treats hardcopy digitization
  as an import).  Late digitizations carry ``late`` in the record and the
  reason code ``late-digitization`` in the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydicom.uid import generate_uid

from gateway.audit import events as ev
from gateway.digitization.deadline import is_late
from gateway.digitization.intake import records_of
from gateway.digitization.records import (
    Digitization,
    FilmReceipt,
    Plan,
    new_id,
    utc_iso,
)
from gateway.digitization.renewal import renewal_policy
from gateway.digitization.sealing import Sealed, Sealer, load_signing
from gateway.service import Gateway
from media import digitize as film
from media import paper
from media.secondary_capture import DOCD, FILMD, Contribution, PatientStudy, SeriesInfo
from media.secondary_capture import check_sc_iod as iod_problems
from pki.errors import ConfigurationError, DigitizationError, InvalidInputError, SekishoError
from signing.signers import PinPrompt, SignerSpec

__all__ = ["DigitizeRequest", "DigitizeResult", "digitize"]


@dataclass(frozen=True)
class DigitizeRequest:
    receipt_id: str
    files: tuple[Path, ...]
    operator_id: str
    signer: SignerSpec | str | None
    operator_name: str = ""
    kind: Literal["film", "paper"] = "film"
    #: Operator-given scan facts (override sidecars and files).
    scan: film.ScanInfo = field(default_factory=film.ScanInfo)
    #: One sidecar for every file; otherwise ``FILE.json`` beside each file is used.
    sidecar: Path | None = None
    mammography: bool = False
    bulk_plan: str | None = None
    patient_consent: str = ""
    paper_sc: bool = False
    encapsulate: bool = False
    title: str = ""


@dataclass
class DigitizeResult:
    digitization: Digitization
    records: list[dict[str, Any]]
    skew_alerts: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "digitization": self.digitization.to_dict(),
            "records": self.records,
            "clock_skew_alerts": self.skew_alerts,
        }


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _read_scans(gw: Gateway, req: DigitizeRequest) -> list[film.Scan]:
    scans = []
    for path in req.files:
        if path.stat().st_size > gw.settings.digitization.max_file_bytes:
            raise InvalidInputError(f"{path.name}: larger than digitization.max_file_bytes")
        sidecar = req.sidecar or path.with_name(path.name + ".json")
        info = film.read_sidecar(sidecar) if sidecar.is_file() else film.ScanInfo()
        info = info.merged(req.scan)
        read = film.read_digitizer_dicom if _is_dicom(path) else film.read_scan_image
        scans.append(read(path, info))
    return scans


def _patient(receipt: FilmReceipt) -> PatientStudy:
    return PatientStudy(
        patient_id=receipt.patient_id,
        study_uid=receipt.study_uid,
        issuer=receipt.issuer,
        patient_name=receipt.patient_name,
        birth_date=receipt.birth_date,
        sex=receipt.sex,
        accession=receipt.accession,
    )


def _gateway_version() -> str:
    try:
        return f"sekisho {metadata.version('sekisho')}"
    except metadata.PackageNotFoundError:
        return "sekisho"


def _contribution(
    gw: Gateway, req: DigitizeRequest, info: film.ScanInfo, note: str
) -> Contribution:
    s = gw.settings
    d = s.digitization.digitizer
    manufacturer = info.manufacturer or d.manufacturer
    if not manufacturer:
        raise DigitizationError(
            "the digitizer is not named: set digitization.digitizer.manufacturer or give"
            " --manufacturer (Contributing Equipment, PS3.3 C.12.1; R-DIG-1)"
        )
    return Contribution(
        operator_id=req.operator_id,
        operator_name=req.operator_name or req.operator_id,
        manufacturer=manufacturer,
        model=info.model or d.model,
        serial_number=info.serial_number or d.serial_number,
        software_versions=info.software_versions or d.software_versions,
        institution=s.instance.institution,
        station=s.instance.station,
        manager=s.digitization.information_manager,
        purpose=FILMD if req.kind == "film" else DOCD,
        note=note,
        operator_scheme=s.digitization.operator_coding_scheme,
        gateway_version=_gateway_version(),
    )


async def _refused(
    gw: Gateway, req: DigitizeRequest, receipt: FilmReceipt | None, exc: SekishoError
) -> None:  # noqa: E501
    await gw.record(
        ev.import_event(
            actor=req.operator_id,
            patient_id=receipt.patient_id if receipt else "unknown",
            patient_issuer=(receipt.issuer or None) if receipt else None,
            study_uids=(),
            instance_count=0,
            outcome=exc.audit_outcome,
            media_type=req.kind.upper(),
            reason_code=exc.code.lower(),
            description=f"{req.kind} digitization refused",
            extra={"receipt": req.receipt_id, "detail": (exc.detail or exc.message)[:300]},
        )
    )


async def digitize(
    gw: Gateway,
    req: DigitizeRequest,
    *,
    now: datetime | None = None,
    pin_prompt: PinPrompt | None = None,
) -> DigitizeResult:
    """Gate, build, sign at once, verify, store, record and audit one digitization."""
    receipt: FilmReceipt | None = None
    try:
        receipt = await gw.run(records_of(gw).receipt, req.receipt_id)
        return await _digitize(gw, req, receipt, now or datetime.now(UTC), pin_prompt)
    except SekishoError as exc:
        await _refused(gw, req, receipt, exc)
        raise


async def _digitize(
    gw: Gateway,
    req: DigitizeRequest,
    receipt: FilmReceipt,
    now: datetime,
    pin_prompt: PinPrompt | None,
) -> DigitizeResult:
    s = gw.settings.digitization
    if not s.information_manager:
        raise ConfigurationError(
            "configuration key 'digitization.information_manager': required (情報作成管理者,"
            " R-DIG-4)"
        )
    if not req.files:
        raise InvalidInputError("no file to digitize")
    plan = None
    if req.bulk_plan:
        plan = await gw.run(records_of(gw).plan, req.bulk_plan)
        if not req.patient_consent:
            raise InvalidInputError(
                "bulk digitization needs the patient's notice/consent reference (R-DIG-5)"
            )
    deadline = datetime.fromisoformat(receipt.deadline)
    late = plan is None and is_late(now, deadline)
    digitization_id = new_id("DG", now)
    note = f"bulk digitization under plan {plan.id}" if plan else ""
    series = SeriesInfo(
        generate_uid(),
        s.series_number,
        1,
        "Digitized film" if req.kind == "film" else "Scanned document",
        modality=(receipt.modality or "OT") if req.kind == "film" else "DOC",
    )
    patient = _patient(receipt)
    record_type = s.film_record_type if req.kind == "film" else s.paper_record_type
    signing = load_signing(gw.settings)
    sealed: list[Sealed] = []
    details: dict[str, Any] = {"files": [p.name for p in req.files]}
    async with Sealer(
        gw,
        signing,
        record_type,
        req.signer,
        pin_prompt=pin_prompt,
        renewal=renewal_policy(gw.settings),
    ) as sealer:
        if req.kind == "film":
            scans = await gw.run(_read_scans, gw, req)
            mammo = (
                req.mammography
                or receipt.modality == "MG"
                or any(sc.info.modality.upper() == "MG" for sc in scans)
            )
            limits, label = (s.mammography, "mammography") if mammo else (s.limits, "JSRT")
            for scan in scans:  # the whole set passes the gate before anything is signed
                film.enforce_quality(scan, limits, label=label)
            details["quality"] = {
                "limits": label,
                "scans": [
                    {
                        "file": sc.source_name,
                        "pitch_um": sc.info.pitch_um,
                        "bits": sc.bits_stored,
                        "effective_bits": sc.stats.effective_bits,
                        "density": [sc.info.density_min, sc.info.density_max],
                    }
                    for sc in scans
                ],
            }
            for number, scan in enumerate(scans, start=1):
                contribution = _contribution(gw, req, scan.info, note)
                ds = await gw.run(
                    film.build_film_sc,
                    scan,
                    patient,
                    replace(series, instance_number=number),
                    contribution,
                    sop_instance_uid=generate_uid(),
                    now=now.astimezone(s.zone),
                    prefer=s.sop_class,
                )
                _check_iod(ds)
                sealed.append(await sealer.seal_dicom(ds))
        else:
            pages = await gw.run(paper.read_pages, list(req.files))
            title = req.title or "Scanned document"
            pdf = await gw.run(paper.pages_to_pdf, pages, title=title, author=req.operator_id)
            signed_pdf = await sealer.seal_pdf(pdf, reason="Scanned paper record (R-DIG-1)")
            sealed.append(signed_pdf)
            contribution = _contribution(gw, req, req.scan, note)
            local = now.astimezone(s.zone)
            if req.paper_sc:
                for number, page in enumerate(pages, start=1):
                    ds = await gw.run(
                        paper.build_document_sc,
                        page,
                        patient,
                        replace(series, instance_number=number),
                        contribution,
                        sop_instance_uid=generate_uid(),
                        now=local,
                    )
                    _check_iod(ds)
                    sealed.append(await sealer.seal_dicom(ds))
            if req.encapsulate:
                pdf_bytes = await gw.run(signed_pdf.staged.path.read_bytes)
                ds = paper.build_encapsulated_pdf(
                    pdf_bytes,
                    patient,
                    replace(series, instance_number=len(pages) + 1),
                    contribution,
                    sop_instance_uid=generate_uid(),
                    title=title,
                    now=local,
                )
                sealed.append(await sealer.seal_dicom(ds))
        result = await _commit(
            gw,
            req,
            receipt,
            sealed,
            record_type,
            digitization_id,
            now,
            late,
            plan,
            series.series_uid,
            details,
            sealer,
        )
        sealer.staged.clear()  # committed: nothing left to discard
    return result


def _check_iod(ds: Any) -> None:
    problems = iod_problems(ds)
    if problems:
        raise DigitizationError(
            "the Secondary Capture object is not conformant: " + "; ".join(problems)
        )


async def _commit(
    gw: Gateway,
    req: DigitizeRequest,
    receipt: FilmReceipt,
    sealed: list[Sealed],
    record_type: str,
    digitization_id: str,
    now: datetime,
    late: bool,
    plan: Plan | None,
    series_uid: str,
    details: dict[str, Any],
    sealer: Sealer,
) -> DigitizeResult:
    for item in sealed:
        await gw.run(gw.files.commit, item.staged)
        if item.evidence is not None:
            await gw.run(gw.files.commit, item.evidence)
    indexed = [(i.index, i.staged.sha256, i.staged.size) for i in sealed if i.index is not None]
    if indexed:
        results = await gw.run(gw.store.add_instances, indexed, f"digitization:{digitization_id}")
        if any(r != "stored" for r in results):
            raise DigitizationError(f"the archive did not accept every object: {results}")
    first = next((i for i in sealed if i.timestamp_time), None)
    record = Digitization(
        id=digitization_id,
        receipt_id=receipt.id,
        kind=req.kind,
        record_type=record_type,
        operator_id=req.operator_id,
        operator_name=req.operator_name,
        information_manager=gw.settings.digitization.information_manager,
        digitized_at=utc_iso(now),
        deadline=receipt.deadline,
        late=late,
        bulk_plan=plan.id if plan else None,
        patient_consent=req.patient_consent,
        images=len(indexed) if req.kind == "film" else 0,
        series_uid=series_uid,
        signer=sealer.subject,
        hc_role=sealer.role or "",
        timestamp_time=first.timestamp_time if first else "",
        tsa=first.tsa if first else "",
        details=details,
    )
    signed = [
        {
            "kind": i.kind,
            "record_type": record_type,
            "sop_uid": i.index.sop_instance_uid if i.index else "",
            "sha256": i.staged.sha256,
            "evidence_sha256": i.evidence.sha256 if i.evidence else "",
            "patient_id": receipt.patient_id,
            "issuer": receipt.issuer,
            "study_uid": receipt.study_uid,
            "protected_until": i.protected_until,
            "protection_reason": i.protection_reason,
            "created_at": utc_iso(datetime.now(UTC)),
        }
        for i in sealed
    ]
    await gw.run(records_of(gw).add_digitization, record, signed)
    await _audit_success(gw, record, receipt, len(indexed), plan, sealer)
    return DigitizeResult(record, signed, sealer.skew_alerts())


async def _audit_success(
    gw: Gateway,
    record: Digitization,
    receipt: FilmReceipt,
    count: int,
    plan: Plan | None,
    sealer: Sealer,
) -> None:
    extra = {
        "digitization": record.id,
        "receipt": receipt.id,
        "record_type": record.record_type,
        "information_manager": record.information_manager,
        "deadline": record.deadline,
        "late": "yes" if record.late else "no",
        "signer": record.signer[:200],
        "timestamp": record.timestamp_time,
    }
    if plan is not None:
        extra.update(bulk_plan=plan.id, patient_consent=record.patient_consent[:200])
    await gw.record(
        ev.import_event(
            actor=record.operator_id,
            patient_id=receipt.patient_id,
            patient_issuer=receipt.issuer or None,
            study_uids=(receipt.study_uid,),
            instance_count=count,
            media_type=record.kind.upper(),
            source_facility=receipt.source_facility,
            reason_code="late-digitization" if record.late else None,
            description=f"{record.kind} digitized, signed and stored"
            + (" after the deadline" if record.late else ""),
            extra=extra,
        )
    )
    if plan is not None:  # stricter audit of bulk digitization (seed 000 §5.2(2))
        await gw.record(
            ev.security_alert(
                "bulk-digitization",
                f"bulk digitization {record.id} under plan {plan.id}",
                actor=record.operator_id,
                actor_kind="user",
                event_type=ev.USE_OF_RESTRICTED_FUNCTION,
                outcome=ev.Outcome.SUCCESS,
                extra={"plan": plan.id, "digitization": record.id},
            )
        )
    for alert in sealer.skew_alerts():  # R-AUD-5
        await gw.record(
            ev.security_alert(
                "clock-skew",
                f"local clock differs from TSA time by {alert['skew_seconds']:.1f} s",
                actor="sekisho",
                actor_kind="system",
                extra={"tsa": alert["tsa"][:200]},
            )
        )
