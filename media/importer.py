"""Import the selected instances of a medium (R-PDI-2, R-PDI-4, R-PDI-5, R-PDI-8).

:func:`run_import` works in two passes over the planned files:

1. **scan**: every file is streamed once through the malware scanner while its
   SHA-256 is computed; any detection stops the import before anything is
   stored (:class:`~pki.errors.MalwareDetectedError` lists the files);
2. **import**: each file is read again and must hash to what was scanned (and
   inspected), is reconciled (:mod:`media.reconcile`), written to a temporary
   file in its original transfer syntax with a zeroed preamble (PS3.10 §7.1;
   this also disarms PE/DICOM polyglots), hashed, and handed to the sink.

The sink is the gateway's store behind a two-method protocol
(:class:`InstanceSink`), so ``media`` does no persistence itself.  Files are
handled one at a time and streamed, so memory does not grow with the medium.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from pki.errors import (
    ConflictError,
    InvalidInputError,
    MalwareDetectedError,
    MediaImportError,
    PayloadTooLargeError,
)

from .conformance import FindingCode, finding
from .dicomfile import PREAMBLE_LENGTH, DicomFileProblem, FileForm, parse_file
from .import_result import (
    ImportedInstance,
    ImportResult,
    InstanceMeta,
    InstanceSink,
    ScanRecord,
    SkippedFile,
    SkipReason,
)
from .reconcile import (
    LocalPatient,
    Mismatch,
    Operator,
    compare_demographics,
    reconcile_instance,
    require_confirmation,
    validate_accession_number,
)
from .scanner import Scanner
from .selection import ImportPlan, PlannedFile
from .settings import MediaSettings, StationInfo
from .source import MediaSource

IMPLEMENTATION_VERSION_NAME = "SEKISHO_PDI"

__all__ = [
    "ImportResult",
    "ImportedInstance",
    "InstanceMeta",
    "InstanceSink",
    "ScanRecord",
    "SkipReason",
    "SkippedFile",
    "run_import",
]


Progress = Callable[[int, int], None]


class _HashingChunks:
    """Iterates a stream in chunks while hashing what went through.

    A read failure ends the iteration and is kept in ``error`` so that a
    scanner consuming the chunks never mistakes a media problem for its own.
    """

    def __init__(self, stream: BinaryIO, chunk_bytes: int) -> None:
        self.stream = stream
        self.chunk_bytes = chunk_bytes
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        while self.error is None:
            try:
                chunk = self.stream.read(self.chunk_bytes)
            except PayloadTooLargeError:
                self.error = "the file grew beyond the per-file limit while read"
                return
            except (OSError, MediaImportError) as exc:
                self.error = f"read failed ({type(exc).__name__})"
                return
            if not chunk:
                return
            self.digest.update(chunk)
            self.size += len(chunk)
            yield chunk


def run_import(
    source: MediaSource,
    plan: ImportPlan,
    target: LocalPatient,
    importer: Operator,
    station: StationInfo,
    settings: MediaSettings,
    scanner: Scanner,
    sink: InstanceSink,
    *,
    now: datetime | None = None,
    accession_number: str | None = None,
    confirm_mismatch: bool = False,
    progress: Progress | None = None,
) -> ImportResult:
    """Scan, reconcile and store the planned files; see the module docstring.

    Raises before anything is stored: ``InvalidInputError`` (empty plan),
    ``MediaImportError`` (scanner required but not configured, or the scanner
    failed), ``ReconciliationError`` (demographics differ and ``confirm_mismatch``
    is not set) and ``MalwareDetectedError`` (a detection; ``.detections`` lists
    ``(path, signature)``).  Per-file problems are reported in the result.
    """
    if plan.is_empty:
        raise InvalidInputError("nothing is selected for import")
    if settings.scanner_required and not getattr(scanner, "performs_scan", False):
        raise MediaImportError(
            "malware scanning is required by the configuration but no scanner is configured"
        )
    validate_accession_number(accession_number)
    result = ImportResult(scanner_engine=str(getattr(scanner, "engine", type(scanner).__name__)))
    result.findings.extend(plan.findings)
    mismatches: list[Mismatch] = []
    for demo in plan.demographics.values():
        mismatches.extend(compare_demographics(demo, target))
    require_confirmation(mismatches, confirm=confirm_mismatch)
    result.confirmed_mismatches = mismatches
    when = now or datetime.now(UTC).astimezone()
    total = 2 * len(plan.files)
    done = 0

    scanned: dict[str, str] = {}
    detections: list[tuple[str, str]] = []
    for planned in plan.files:
        sha = _scan_one(source, planned, settings, scanner, result, detections)
        if sha is not None:
            scanned[planned.path] = sha
        done += 1
        if progress is not None:
            progress(done, total)
    if detections:
        listing = ", ".join(f"{p} ({sig})" for p, sig in detections)
        error = MalwareDetectedError(
            f"malware was found on the medium; nothing was imported: {listing}",
            detail=listing,
        )
        error.detections = detections  # type: ignore[attr-defined]
        raise error

    for planned in plan.files:
        sha = scanned.get(planned.path)
        if sha is not None:
            _import_one(
                source, planned, sha, target, importer, station, settings, sink, result,
                when, accession_number, confirm_mismatch,
            )  # fmt: skip
        done += 1
        if progress is not None:
            progress(done, total)
    result.notes = sorted(set(result.notes))
    return result


def _skip(result: ImportResult, planned: PlannedFile, reason: SkipReason, message: str) -> None:
    result.skipped.append(SkippedFile(planned.path, planned.sop_instance_uid, reason, message))


def _scan_one(
    source: MediaSource,
    planned: PlannedFile,
    settings: MediaSettings,
    scanner: Scanner,
    result: ImportResult,
    detections: list[tuple[str, str]],
) -> str | None:
    """Scan one file, returning its SHA-256 (``None`` when it was skipped).

    Read problems skip the file; scanner problems (``MediaImportError`` from the
    scanner) propagate: without a verdict nothing may be imported.
    """
    try:
        stream = source.open(planned.path)
    except PayloadTooLargeError:
        _skip(result, planned, SkipReason.TOO_LARGE, "larger than the per-file limit")
        result.findings.append(finding(FindingCode.FILE_TOO_LARGE, planned.path))
        return None
    except (MediaImportError, OSError) as exc:
        _skip(result, planned, SkipReason.READ_ERROR, f"cannot be opened ({type(exc).__name__})")
        result.findings.append(finding(FindingCode.READ_ERROR, planned.path))
        return None
    with stream:
        chunks = _HashingChunks(stream, settings.chunk_bytes)
        verdict = scanner.scan_stream(planned.path, chunks)
        for _ in chunks:  # a scanner that stopped early: finish the hash
            pass
    if chunks.error is not None:
        _skip(result, planned, SkipReason.READ_ERROR, chunks.error)
        result.findings.append(finding(FindingCode.READ_ERROR, planned.path))
        return None
    sha = chunks.digest.hexdigest()
    result.media_sha256[planned.path] = sha
    result.scans.append(ScanRecord(planned.path, verdict))
    if not verdict.clean:
        detections.append((planned.path, verdict.signature or "unknown"))
        return None
    if planned.expected_sha256 is not None and planned.expected_sha256 != sha:
        _skip(result, planned, SkipReason.MEDIA_CHANGED, "the file changed after inspection")
        result.findings.append(finding(FindingCode.MEDIA_CHANGED, planned.path))
        return None
    return sha


def _spool(
    source: MediaSource, planned: PlannedFile, settings: MediaSettings
) -> tuple[str, Path | io.BytesIO]:
    """Copy a medium file to memory or to a temporary file, hashing on the way."""
    with source.open(planned.path) as fp:
        chunks = _HashingChunks(fp, settings.chunk_bytes)
        sha, spool = _drain(chunks, planned, settings)
    if chunks.error is not None:
        if isinstance(spool, Path):
            spool.unlink(missing_ok=True)
        raise MediaImportError(chunks.error)
    return sha, spool


def _drain(
    chunks: _HashingChunks, planned: PlannedFile, settings: MediaSettings
) -> tuple[str, Path | io.BytesIO]:
    """Small files go to memory, large ones to a temporary file (memory stays flat)."""
    if planned.size is not None and planned.size <= settings.spool_threshold_bytes:
        buffer = io.BytesIO()
        for chunk in chunks:
            buffer.write(chunk)
        buffer.seek(0)
        return chunks.digest.hexdigest(), buffer
    fd, name = tempfile.mkstemp(prefix="sekisho-pdi-in-", dir=settings.work_dir)
    with os.fdopen(fd, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
    return chunks.digest.hexdigest(), Path(name)


def _import_one(
    source: MediaSource,
    planned: PlannedFile,
    scanned_sha: str,
    target: LocalPatient,
    importer: Operator,
    station: StationInfo,
    settings: MediaSettings,
    sink: InstanceSink,
    result: ImportResult,
    now: datetime,
    accession_number: str | None,
    confirm: bool,
) -> None:
    existing = sink.exists(planned.sop_instance_uid)
    if existing is not None:
        if existing == scanned_sha:
            _skip(result, planned, SkipReason.ALREADY_PRESENT, "this instance is already stored")
        else:
            _skip(
                result,
                planned,
                SkipReason.UID_CONFLICT,
                "a different instance with the same SOP Instance UID is already stored; "
                "this one was not imported",
            )
        return
    spool: Path | io.BytesIO | None = None
    out_path: Path | None = None
    try:
        try:
            sha, spool = _spool(source, planned, settings)
        except (MediaImportError, OSError) as exc:
            _skip(result, planned, SkipReason.READ_ERROR, f"read failed ({type(exc).__name__})")
            return
        if sha != scanned_sha:
            _skip(result, planned, SkipReason.MEDIA_CHANGED, "the file changed after the scan")
            result.findings.append(finding(FindingCode.MEDIA_CHANGED, planned.path))
            return
        ds = _load(spool, planned, result)
        if ds is None:
            return
        header_demo = compare_demographics(ds, target)
        if header_demo and not confirm:
            _skip(result, planned, SkipReason.DEMOGRAPHICS, "patient demographics differ")
            return
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        outcome = reconcile_instance(
            ds,
            target,
            importer=importer,
            station=station,
            now=now,
            accession_number=accession_number,
        )
        result.notes.extend(outcome.notes)
        _replace_file_meta(ds, transfer_syntax)
        out_path = _write(ds, settings, planned, result)
        del ds
        if out_path is None:
            return
        stored_local = _hash_file(out_path, settings.chunk_bytes)
        meta = InstanceMeta(
            sop_instance_uid=planned.sop_instance_uid,
            sop_class_uid=planned.sop_class_uid,
            study_instance_uid=planned.study_instance_uid,
            series_instance_uid=planned.series_instance_uid,
            transfer_syntax_uid=transfer_syntax,
            patient_id=target.patient_id,
            issuer_of_patient_id=target.issuer_of_patient_id,
            source_path=planned.path,
            source_sha256=sha,
            sha256=stored_local,
            size=out_path.stat().st_size,
        )
        try:
            stored = sink.store(out_path, meta)
        except ConflictError as exc:  # the sink refuses this one instance (R-PDI-4)
            _skip(result, planned, SkipReason.UID_CONFLICT, exc.message)
            return
        result.imported.append(
            ImportedInstance(
                planned.path,
                planned.sop_instance_uid,
                planned.study_instance_uid,
                planned.series_instance_uid,
                sha,
                stored,
            )
        )
    finally:
        if isinstance(spool, Path):
            spool.unlink(missing_ok=True)
        if out_path is not None:
            out_path.unlink(missing_ok=True)


def _load(spool: Path | io.BytesIO, planned: PlannedFile, result: ImportResult) -> Dataset | None:
    """Check the structure and read the full data set (large values deferred)."""
    try:
        if isinstance(spool, Path):
            with open(spool, "rb") as fp:
                header = parse_file(fp, spool.stat().st_size)
            ds = dcmread(
                os.fspath(spool), force=header.form is not FileForm.PART10, defer_size="1 MB"
            )
        else:
            header = parse_file(spool, len(spool.getbuffer()))
            spool.seek(0)
            ds = dcmread(spool, force=header.form is not FileForm.PART10)
    except DicomFileProblem as problem:
        _skip(result, planned, SkipReason.MALFORMED, problem.detail)
        return None
    except Exception as exc:  # pydicom on hostile bytes
        _skip(result, planned, SkipReason.MALFORMED, f"cannot be parsed ({type(exc).__name__})")
        return None
    if header.sop_instance_uid != planned.sop_instance_uid:
        _skip(result, planned, SkipReason.MEDIA_CHANGED, "the SOP Instance UID changed")
        return None
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(header.transfer_syntax_uid)
    return ds


def _replace_file_meta(ds: Dataset, transfer_syntax: str) -> None:
    """New File Meta Information for the file Sekisho writes (PS3.10 §7.1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\x00" * PREAMBLE_LENGTH


def _write(
    ds: Dataset, settings: MediaSettings, planned: PlannedFile, result: ImportResult
) -> Path | None:
    fd, name = tempfile.mkstemp(prefix="sekisho-pdi-", suffix=".dcm", dir=settings.work_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            dcmwrite(out, ds, enforce_file_format=True)
    except Exception as exc:  # pydicom cannot encode what it read
        path.unlink(missing_ok=True)
        _skip(result, planned, SkipReason.WRITE_ERROR, f"cannot be written ({type(exc).__name__})")
        return None
    return path


def _hash_file(path: Path, chunk_bytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        while chunk := fp.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
