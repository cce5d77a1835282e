"""One media import from start to audit (R-PDI-1..8, R-AUD-3; IHE RAD TF PDI and IRWF.b).

:func:`run_media_import` is what the CLI and the staff console call:

1. open the medium (folder or ISO image, read-only) and inspect it
   (:func:`media.inspect.inspect_media`); with a ``fingerprint`` from an
   earlier inspection, refuse if the medium changed since staff looked at it;
2. plan the selection (:func:`media.selection.plan_import`) and compare the
   medium's demographics with the local record: differences need an explicit
   confirmation, recorded with who gave it (R-PDI-4);
3. open the import record (state ``importing``) so that every later outcome,
   including a stop, is attributable to the importer (R-PDI-5);
4. scan the unselected files (``scope = "all"``), then let the importer scan,
   reconcile and store the selected ones through :class:`.sink.GatewaySink`;
   malware stops everything before anything is stored (R-PDI-2);
5. audit the Import event, then save the record, finalized by the importer or
   due at the scheduled time (R-PDI-6), and queue the stored instances for
   every enabled destination with role ``pacs`` (R-PDI-7).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.imports.auditing import import_audit_event, malware_alert
from gateway.imports.delivery import queue_for_pacs
from gateway.imports.finalization import due_at, zone_of
from gateway.imports.records import ImportRecord, ImportRecords, RecordHeader, canonical_sha256
from gateway.imports.scanning import RestScan, files_to_prescan, scan_rest
from gateway.imports.sink import GatewaySink
from media.import_result import ImportResult, SkippedFile, SkipReason
from media.importer import run_import
from media.inspect import inspect_media
from media.reconcile import (
    LocalPatient,
    Mismatch,
    Operator,
    compare_demographics,
    require_confirmation,
    validate_accession_number,
)
from media.report import MediaReport
from media.selection import ImportPlan, Selection, plan_import
from media.settings import MediaSettings
from media.source import MediaSource, open_source
from pki.errors import (
    ConflictError,
    InvalidInputError,
    MalwareDetectedError,
    MediaImportError,
    SekishoError,
)

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("sekisho.media")
Progress = Callable[[int, int], None]
MEDIA_TYPES = ("CD", "DVD", "USB", "ISO")


@dataclass(frozen=True)
class ImportRequest:
    """Everything one import needs; the importer is the responsible party (R-PDI-5)."""

    path: Path
    importer: Operator
    patient_id: str
    selection: tuple[str, ...]
    issuer: str = ""
    confirm_mismatch: bool = False
    media_type: str | None = None
    media_label: str | None = None
    source_facility: str | None = None
    accession_number: str | None = None
    #: Demographics to use when the store does not know the patient yet (e.g. from the HIS).
    patient_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None
    supersedes: int | None = None
    change_reason: str = ""
    #: From an earlier inspection shown to staff: the import refuses a changed medium.
    fingerprint: str | None = None
    cert_sha256: str | None = None
    source_address: str | None = None


@dataclass
class ImportOutcome:
    record: ImportRecord
    result: ImportResult
    queued: dict[str, int] = field(default_factory=dict)
    queue_error: str | None = None


def media_settings(gw: Gateway) -> MediaSettings:
    """The library settings; temporary files go to the store's own ``tmp`` (swept at start)."""
    s = gw.settings
    return s.media.library_settings(
        gw.files.tmp, institution=s.instance.institution, station=s.instance.station
    )


def report_fingerprint(report: MediaReport) -> str:
    """SHA-256 over the medium's label and every file read (path, size, SHA-256)."""
    digest = hashlib.sha256(f"{report.source_kind}\0{report.label}\0".encode())
    for f in sorted(report.files, key=lambda f: f.path):
        digest.update(f"{f.path}\0{f.size}\0{f.sha256 or '-'}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def inspect_path(gw: Gateway, path: Path) -> MediaReport:
    """Inspect a medium with the gateway's caps (nothing is written)."""
    settings = media_settings(gw)
    with open_source(path, settings) as source:
        return inspect_media(source, settings)


def local_patient(gw: Gateway, request: ImportRequest) -> tuple[LocalPatient, bool]:
    """The local patient the medium is attached to, and whether the store knows it.

    A known patient's demographics come from the store (the hospital's record);
    otherwise those given in the request (if any) are used.
    """
    known = gw.store.patient(request.patient_id, request.issuer)
    if known is not None:
        return (
            LocalPatient(
                request.patient_id,
                request.issuer,
                known.get("name") or None,
                known.get("birth_date") if len(known.get("birth_date") or "") == 8 else None,
                known.get("sex") if known.get("sex") in ("M", "F", "O") else None,
            ),
            True,
        )
    return (
        LocalPatient(
            request.patient_id, request.issuer, request.patient_name or None,
            request.birth_date or None, request.sex or None,
        ),
        False,
    )  # fmt: skip


def mismatches_of(plan: ImportPlan, target: LocalPatient) -> list[Mismatch]:
    out: list[Mismatch] = []
    for demo in plan.demographics.values():
        out.extend(compare_demographics(demo, target))
    return out


def _media_type(requested: str | None, kind: str) -> str:
    if requested:
        value = requested.strip().upper()
        if value not in MEDIA_TYPES:
            raise InvalidInputError(f"media type must be one of {', '.join(MEDIA_TYPES)}")
        return value
    return "ISO" if kind == "iso" else "CD"


def _facility(report: MediaReport, plan: ImportPlan) -> str:
    studies = {f.study_instance_uid for f in plan.files}
    names = {
        (study.institution_name or "").strip()
        for patient in report.patients
        for study in patient.studies
        if study.study_instance_uid in studies
    }
    return "; ".join(sorted(n for n in names if n))


def preview(gw: Gateway, request: ImportRequest) -> dict[str, Any]:
    """What an import would do: files, exclusions, local patient, mismatches (no writing)."""
    settings = media_settings(gw)
    with open_source(request.path, settings) as source:
        report = inspect_media(source, settings)
        plan = plan_import(report, Selection.parse(request.selection))
    target, known = local_patient(gw, request)
    return {
        "fingerprint": report_fingerprint(report),
        "files": len(plan.files),
        "excluded": plan.to_dict()["excluded"],
        "patients_on_media": [_media_patient(report, i) for i in plan.patients],
        "local_patient": {
            "patient_id": target.patient_id,
            "issuer": target.issuer_of_patient_id,
            "known": known,
            "name": target.name,
            "birth_date": target.birth_date,
            "sex": target.sex,
        },
        "mismatches": [vars_of(m) for m in mismatches_of(plan, target)],
        "source_facility": _facility(report, plan),
    }


def vars_of(m: Mismatch) -> dict[str, str]:
    return {"field": m.field, "media_value": m.media_value, "local_value": m.local_value}


def _media_patient(report: MediaReport, index: str) -> dict[str, Any]:
    for p in report.patients:
        if p.index == index:
            return {
                "index": p.index,
                "patient_id": p.patient_id,
                "issuer": p.issuer_of_patient_id,
                "name": p.name,
                "birth_date": p.birth_date,
                "sex": p.sex,
            }
    return {"index": index}


def run_media_import(
    gw: Gateway,
    request: ImportRequest,
    *,
    records: ImportRecords | None = None,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> ImportOutcome:
    """Inspect, plan, scan, reconcile, store, audit and record one import (module docstring)."""
    records = records or ImportRecords(gw.settings.store.database)
    settings = media_settings(gw)
    validate_accession_number(request.accession_number)
    if request.supersedes is not None and not request.change_reason.strip():
        raise InvalidInputError("a superseding import needs a reason for the change")
    when = now or datetime.now(zone_of(gw.settings.media.finalization))
    with open_source(request.path, settings) as source:
        report = inspect_media(source, settings)
        if request.fingerprint and request.fingerprint != report_fingerprint(report):
            raise ConflictError("the medium changed since it was inspected; inspect it again")
        plan = plan_import(report, Selection.parse(request.selection))
        if plan.is_empty:
            raise InvalidInputError("the selection holds no instance that can be imported")
        target, _known = local_patient(gw, request)
        mismatches = mismatches_of(plan, target)
        require_confirmation(mismatches, confirm=request.confirm_mismatch)
        header = RecordHeader(
            importer_id=request.importer.operator_id,
            importer_name=request.importer.name,
            station=settings.station.station_name,
            media_type=_media_type(request.media_type, source.kind),
            media_label=(request.media_label or source.label or "(no label)").strip()[:64],
            source_facility=(request.source_facility or _facility(report, plan)).strip()[:128],
            local_patient_id=target.patient_id,
            local_issuer=target.issuer_of_patient_id,
            importer_cert_sha256=request.cert_sha256,
            source_address=request.source_address,
            supersedes=request.supersedes,
            change_reason=request.change_reason.strip(),
        )
        import_id = records.begin(header, now=when)
        log.info("media import #%d started (%d file(s) selected)", import_id, len(plan.files))
        base = {
            "version": 1,
            "medium": {
                "kind": source.kind,
                "label": source.label,
                "dicomdir": report.dicomdir_path,
                "dicomdir_used": report.dicomdir_used,
                "file_set_id": report.file_set_id,
                "fingerprint": report_fingerprint(report),
            },
            "reconciliation": {
                "local": {
                    "patient_id": target.patient_id,
                    "issuer": target.issuer_of_patient_id,
                    "name": target.name,
                    "birth_date": target.birth_date,
                    "sex": target.sex,
                },
                "media_patients": [_media_patient(report, i) for i in plan.patients],
                "mismatches": [vars_of(m) for m in mismatches],
                "confirmed_by": (
                    {"id": header.importer_id, "name": header.importer_name} if mismatches else None
                ),
            },
            "selection": list(request.selection),
            "plan": plan.to_dict(),
            "accession_number": request.accession_number,
            "inspected_files": [f.to_dict() for f in report.files],
        }
        sink = GatewaySink(gw, records, import_id)
        rest, result = _scan_and_import(
            gw, records, header, import_id, source, plan, target, settings, sink, request,
            when, progress, base,
        )  # fmt: skip
    return _finish(gw, records, header, import_id, rest, result, when, base)


def _scan_and_import(
    gw: Gateway,
    records: ImportRecords,
    header: RecordHeader,
    import_id: int,
    source: MediaSource,
    plan: ImportPlan,
    target: LocalPatient,
    settings: MediaSettings,
    sink: GatewaySink,
    request: ImportRequest,
    when: datetime,
    progress: Progress | None,
    base: dict[str, Any],
) -> tuple[RestScan, ImportResult]:
    scanner_cfg = gw.settings.media.scanner
    scanner = scanner_cfg.build()
    rest = RestScan()
    try:
        others: list[str] = []
        if scanner_cfg.scope == "all" and getattr(scanner, "performs_scan", False):
            others = files_to_prescan(source, plan)
        total = len(others) + 2 * len(plan.files)
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

        rest = scan_rest(source, others, scanner, settings, tick)
        if rest.detections:
            listing = ", ".join(f"{p} ({sig})" for p, sig in rest.detections)
            error = MalwareDetectedError(
                f"malware was found on the medium; nothing was imported: {listing}",
                detail=listing,
            )
            error.detections = list(rest.detections)  # type: ignore[attr-defined]
            raise error
        offset = len(others)
        try:
            result = run_import(
                source, plan, target, request.importer, settings.station, settings, scanner,
                sink, now=when, accession_number=request.accession_number,
                confirm_mismatch=request.confirm_mismatch,
                progress=(lambda d, t: progress(offset + d, offset + t)) if progress else None,
            )  # fmt: skip
        finally:
            sink.flush()  # every stored file is indexed and attributed, also after a failure
        _fold_late_conflicts(result, sink)
    except MalwareDetectedError as exc:
        detections = list(getattr(exc, "detections", []))
        details = {**base, "scanner": _scanner_info(gw, rest, None, detections)}
        digest = records.stop(import_id, "malware detected", details)
        gw.audit.record(malware_alert(header, import_id, detections))
        gw.audit.record(
            import_audit_event(
                header, import_id, study_uids=(), instance_count=0,
                outcome=exc.audit_outcome,
                description=f"media import #{import_id} stopped: malware on the medium",
                extra={"details_sha256": digest, "status": "stopped"},
            )
        )  # fmt: skip
        log.warning("media import #%d stopped: malware detected", import_id)
        raise
    except SekishoError as exc:
        if sink.stored_count:
            raise  # instances were stored: the record stays "importing" (interrupted)
        details = {**base, "error": {"code": exc.code, "message": exc.message}}
        reason = "scanner unavailable" if isinstance(exc, MediaImportError) else exc.code.lower()
        digest = records.stop(import_id, reason, details)
        gw.audit.record(
            import_audit_event(
                header, import_id, study_uids=(), instance_count=0,
                outcome=exc.audit_outcome,
                description=f"media import #{import_id} stopped: {exc.message}"[:300],
                extra={"details_sha256": digest, "status": "stopped"},
            )
        )  # fmt: skip
        log.warning("media import #%d stopped: %s", import_id, exc.code)
        raise
    return rest, result


def _fold_late_conflicts(result: ImportResult, sink: GatewaySink) -> None:
    """Instances the store refused at commit time are reported as skipped, not imported."""
    refused = set(sink.late_conflicts)
    if not refused:
        return
    for item in [i for i in result.imported if i.sop_instance_uid in refused]:
        result.imported.remove(item)
        result.skipped.append(
            SkippedFile(
                item.path,
                item.sop_instance_uid,
                SkipReason.UID_CONFLICT,
                "the store refused this instance when it was committed (stored meanwhile "
                "by another path with other content, or under another patient)",
            )
        )


def _scanner_info(
    gw: Gateway,
    rest: RestScan,
    result: ImportResult | None,
    detections: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    cfg = gw.settings.media.scanner
    scans = result.scans if result is not None else []
    return {
        "kind": cfg.kind,
        "engine": (
            result.scanner_engine
            if result is not None
            else str(getattr(cfg.build(), "engine", cfg.kind))
        ),
        "required": cfg.required,
        "scope": cfg.scope,
        "other_files": rest.to_dict(),
        "selected_files_scanned": len(scans),
        "selected_files_clean": sum(1 for s in scans if s.result.clean),
        "detections": [{"path": p, "signature": s} for p, s in detections],
        "verdict": "malware" if detections else "clean",
    }


def _finish(
    gw: Gateway,
    records: ImportRecords,
    header: RecordHeader,
    import_id: int,
    rest: RestScan,
    result: ImportResult,
    when: datetime,
    base: dict[str, Any],
) -> ImportOutcome:
    details = {
        **base,
        "media_sha256": dict(result.media_sha256),
        "stored": [
            {
                "path": i.path,
                "sop_instance_uid": i.sop_instance_uid,
                "study_uid": i.study_instance_uid,
                "series_uid": i.series_instance_uid,
                "source_sha256": i.source_sha256,
                "stored_sha256": i.stored_sha256,
            }
            for i in result.imported
        ],
        "skipped": [
            {
                "path": s.path,
                "sop_instance_uid": s.sop_instance_uid,
                "reason": s.reason.value,
                "message": s.message,
            }
            for s in result.skipped
        ],  # fmt: skip
        "findings": [f.to_dict() for f in result.findings],
        "scanner": _scanner_info(gw, rest, result),
        "notes": list(result.notes),
    }
    fin = gw.settings.media.finalization
    scheduled = fin.mode == "scheduled"
    due = due_at(when, fin.at, zone_of(fin)) if scheduled else None
    status = "saved" if scheduled else "finalized"
    digest = canonical_sha256(details)
    studies = {i.study_instance_uid for i in result.imported}
    failed = [s for s in result.skipped if s.reason is not SkipReason.ALREADY_PRESENT]
    on_media = base["reconciliation"]["media_patients"]
    media_ids = sorted(
        {f"{p['patient_id']}^{p.get('issuer') or ''}" for p in on_media if p.get("patient_id")}
    )
    mismatched = base["reconciliation"]["mismatches"]
    extra = {
        "details_sha256": digest,
        "status": status,
        "media_patient_ids": ", ".join(media_ids),
        "scanner": str(details["scanner"]["engine"]),
        "skipped": str(len(result.skipped)),
        "already_present": str(len(result.already_present)),
    }
    if mismatched:
        extra["confirmed_mismatch"] = ", ".join(sorted({m["field"] for m in mismatched}))
        extra["confirmed_by"] = header.importer_id
    if due is not None:
        extra["finalize_due_at"] = due.isoformat()
    gw.audit.record(  # audited before the record is saved: no unaudited saved import
        import_audit_event(
            header, import_id, study_uids=studies, instance_count=len(result.imported),
            outcome=4 if failed else 0,
            description=(
                f"media import #{import_id}: {len(result.imported)} instance(s) imported, "
                f"{len(result.skipped)} skipped; {status}"
            ),
            extra=extra,
        )
    )  # fmt: skip
    records.save(
        import_id,
        details,
        instance_count=len(result.imported),
        saved_at=when,
        finalize_due_at=due,
        finalized_by=None if scheduled else (header.importer_id, header.importer_name),
    )
    log.info(
        "media import #%d %s: %d imported, %d skipped",
        import_id, status, len(result.imported), len(result.skipped),
    )  # fmt: skip
    outcome = ImportOutcome(records.get(import_id), result)
    try:
        outcome.queued = queue_for_pacs(gw, header, import_id, result)
    except SekishoError as exc:
        outcome.queue_error = exc.message
        log.warning("media import #%d: queueing for the PACS failed (%s)", import_id, exc.code)
    return outcome
