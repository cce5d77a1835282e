"""Import the selected instances of a medium (R-PDI-2, R-PDI-4, R-PDI-5, R-PDI-8).

:func:`run_import` reads every planned file from the medium **once**:

1. **prepare** (a small pool of :data:`WORKERS` threads): the file is read
   into memory, or into a spool file in the work folder when it is large; the
   bytes read are hashed and streamed through the malware scanner; if the file
   is clean, is what inspection saw and is not stored yet, it is checked,
   reconciled (:mod:`media.reconcile`) and written to a temporary file in its
   original transfer syntax (:mod:`media.rewrite`: raw elements spliced,
   PS3.10 §7.1), hashed while written.  The scanner and the writer see the
   very bytes that were hashed: nothing is read from the medium twice;
2. **store**: only when *every* file is clean are the written files handed
   to the sink, in plan order.  A detection anywhere stops the import before
   anything is stored (:class:`~pki.errors.MalwareDetectedError` lists the
   files) and every temporary file is removed.

Reads from the medium are serialized (an optical drive must not seek between
two files, and an ISO image is one shared file handle); hashing, scanning,
parsing and writing of two files overlap.  The sink is the gateway's store
behind a two-method protocol (:class:`InstanceSink`), called from the calling
thread only, so ``media`` does no persistence itself.  At most a few files are
in flight, so memory does not grow with the medium; the written files wait on
disk in the work folder (the store's own ``tmp``) until the scan verdicts are
all in.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pki.errors import (
    ConflictError,
    InvalidInputError,
    MalwareDetectedError,
    MediaImportError,
    PayloadTooLargeError,
)

from .conformance import FindingCode, finding
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
    require_confirmation,
    validate_accession_number,
)
from .rewrite import (
    IMPLEMENTATION_VERSION_NAME,
    Reconciliation,
    RewriteRefused,
    Rewritten,
    rewrite_instance,
)
from .scanner import Scanner, ScanResult
from .selection import ImportPlan, PlannedFile
from .settings import MediaSettings, StationInfo
from .source import MediaSource
from .splice import ByteSource, FileSource, MemorySource

#: Files prepared at the same time: reading, hashing, scanning and writing of
#: one overlap with the Python work of the other (two suit a two-core kiosk).
WORKERS = 2
#: Prepared files waiting to be collected, beyond those being worked on.
_WINDOW = 2 * WORKERS

__all__ = [
    "IMPLEMENTATION_VERSION_NAME",
    "ImportResult",
    "ImportedInstance",
    "InstanceMeta",
    "InstanceSink",
    "ScanRecord",
    "SkipReason",
    "SkippedFile",
    "WORKERS",
    "run_import",
]


Progress = Callable[[int, int], None]


class _Skip(Exception):
    """One file is not imported (reason, message, and the finding to report if any)."""

    def __init__(self, reason: SkipReason, message: str, code: FindingCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code


@dataclass(slots=True)
class _Prepared:
    """What the prepare step found for one planned file."""

    planned: PlannedFile
    #: SHA-256 of the file as read (``None`` when it could not be read).
    sha256: str | None = None
    verdict: ScanResult | None = None
    skip: _Skip | None = None
    output: Rewritten | None = None

    def discard(self) -> None:
        """Remove the written file (not stored, or stored and moved already)."""
        if self.output is not None:
            self.output.path.unlink(missing_ok=True)


@dataclass(slots=True)
class _Context:
    """Everything the prepare step of one import needs (shared by the workers)."""

    source: MediaSource
    settings: MediaSettings
    scanner: Scanner
    job: Reconciliation
    #: Serializes reads from the medium (see the module docstring).
    read_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set after a detection (or a failure): nothing will be stored, so stop writing.
    halt: threading.Event = field(default_factory=threading.Event)


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
    job = Reconciliation(
        target, importer, station, now or datetime.now(UTC).astimezone(), accession_number,
        confirm_mismatch, settings.work_dir,
    )  # fmt: skip
    ctx = _Context(source, settings, scanner, job)
    total = 2 * len(plan.files)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    prepared: list[_Prepared] = []
    detections: list[tuple[str, str]] = []

    def collect(item: _Prepared) -> None:
        prepared.append(item)
        _record(result, item, detections)
        if detections:
            ctx.halt.set()
        tick()

    try:
        _prepare_all(ctx, plan, sink, collect)
        if detections:
            listing = ", ".join(f"{p} ({sig})" for p, sig in detections)
            error = MalwareDetectedError(
                f"malware was found on the medium; nothing was imported: {listing}",
                detail=listing,
            )
            error.detections = detections  # type: ignore[attr-defined]
            raise error
        for item in prepared:
            if item.output is not None:
                _store(item, job.target, sink, result)
            tick()
    finally:
        for item in prepared:
            item.discard()
    result.notes = sorted(set(result.notes))
    return result


def _prepare_all(
    ctx: _Context, plan: ImportPlan, sink: InstanceSink, collect: Callable[[_Prepared], None]
) -> None:
    """Prepare every planned file in the pool and ``collect`` each, in plan order.

    ``sink.exists`` is asked for every file first, in the calling thread (the
    sink need not be thread-safe; nothing is stored before the prepare step
    ends anyway).  If anything fails, the files written by files not yet
    collected are removed before the error propagates (the caller removes the
    others).
    """
    existing = [sink.exists(planned.sop_instance_uid) for planned in plan.files]
    pending: deque[Future[_Prepared]] = deque()
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sekisho-pdi") as pool:
        try:
            for planned, stored_sha in zip(plan.files, existing, strict=True):
                if len(pending) >= _WINDOW:
                    collect(pending.popleft().result())
                pending.append(pool.submit(_prepare, ctx, planned, stored_sha))
            while pending:
                collect(pending.popleft().result())
        except BaseException:
            ctx.halt.set()
            for future in pending:
                future.cancel()
            wait_futures(pending)
            for future in pending:
                if not future.cancelled() and future.exception() is None:
                    future.result().discard()
            raise


def _record(result: ImportResult, item: _Prepared, detections: list[tuple[str, str]]) -> None:
    """Fold one prepared file into the result, in plan order."""
    planned = item.planned
    if item.sha256 is not None:
        result.media_sha256[planned.path] = item.sha256
    if item.verdict is not None:
        result.scans.append(ScanRecord(planned.path, item.verdict))
        if not item.verdict.clean:
            detections.append((planned.path, item.verdict.signature or "unknown"))
    if item.skip is not None:
        result.skipped.append(
            SkippedFile(planned.path, planned.sop_instance_uid, item.skip.reason, item.skip.message)
        )
        if item.skip.code is not None:
            result.findings.append(finding(item.skip.code, planned.path))
    if item.output is not None:
        result.notes.extend(item.output.notes)


def _prepare(ctx: _Context, planned: PlannedFile, existing: str | None) -> _Prepared:
    """Read, hash, scan and (when it may be imported) rewrite one file.

    Scanner failures (``MediaImportError``) propagate: without a verdict
    nothing may be imported.  Everything else becomes a skip.
    """
    item = _Prepared(planned)
    try:
        data = _read(ctx, planned)
    except _Skip as skip:
        item.skip = skip
        return item
    try:
        item.sha256, item.verdict = _scan(ctx, planned, data)
        if not item.verdict.clean:
            return item
        _check_identity(planned, item.sha256, existing)
        if not ctx.halt.is_set():
            item.output = rewrite_instance(data, planned, ctx.job)
    except _Skip as skip:
        item.skip = skip
    except RewriteRefused as refused:
        item.skip = _Skip(refused.reason, refused.message)
    finally:
        if isinstance(data, FileSource):
            data.path.unlink(missing_ok=True)
    return item


def _read(ctx: _Context, planned: PlannedFile) -> ByteSource:
    """The whole file, in memory or in a spool file when over the spool threshold."""
    with ctx.read_lock:
        try:
            stream = ctx.source.open(planned.path)
        except PayloadTooLargeError:
            raise _Skip(
                SkipReason.TOO_LARGE, "larger than the per-file limit", FindingCode.FILE_TOO_LARGE
            ) from None
        except (MediaImportError, OSError) as exc:
            raise _Skip(
                SkipReason.READ_ERROR,
                f"cannot be opened ({type(exc).__name__})",
                FindingCode.READ_ERROR,
            ) from None
        with stream:
            return _drain(stream, ctx.settings)


def _drain(stream: BinaryIO, settings: MediaSettings) -> ByteSource:
    parts: list[bytes] = []
    size = 0
    spool: tuple[int, Path] | None = None
    try:
        while chunk := _next_chunk(stream, settings.chunk_bytes):
            size += len(chunk)
            if spool is None and size > settings.spool_threshold_bytes:
                fd, name = tempfile.mkstemp(prefix="sekisho-pdi-in-", dir=settings.work_dir)
                spool = (fd, Path(name))
                for part in parts:
                    _write_all(fd, part)
                parts = []
            if spool is not None:
                _write_all(spool[0], chunk)
            else:
                parts.append(chunk)
    except BaseException:
        if spool is not None:
            os.close(spool[0])
            spool[1].unlink(missing_ok=True)
        raise
    if spool is None:
        return MemorySource(b"".join(parts))
    os.close(spool[0])
    return FileSource(spool[1])


def _next_chunk(stream: BinaryIO, chunk_bytes: int) -> bytes:
    """The next chunk (empty at the end); read problems skip the file."""
    try:
        return stream.read(chunk_bytes)
    except PayloadTooLargeError:
        raise _Skip(
            SkipReason.READ_ERROR,
            "the file grew beyond the per-file limit while read",
            FindingCode.READ_ERROR,
        ) from None
    except (OSError, MediaImportError) as exc:
        raise _Skip(
            SkipReason.READ_ERROR, f"read failed ({type(exc).__name__})", FindingCode.READ_ERROR
        ) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _scan(ctx: _Context, planned: PlannedFile, data: ByteSource) -> tuple[str, ScanResult]:
    """Stream the bytes read through the scanner, hashing them on the way."""
    digest = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for chunk in data.chunks(0, data.size):
            digest.update(chunk)
            yield chunk

    stream = chunks()
    verdict = ctx.scanner.scan_stream(planned.path, stream)
    for _ in stream:  # a scanner that stopped early: finish the hash
        pass
    return digest.hexdigest(), verdict


def _check_identity(planned: PlannedFile, sha: str, existing: str | None) -> None:
    """Refuse a file that changed since inspection, or whose UID is already stored."""
    if planned.expected_sha256 is not None and planned.expected_sha256 != sha:
        raise _Skip(
            SkipReason.MEDIA_CHANGED,
            "the file changed after inspection",
            FindingCode.MEDIA_CHANGED,
        )
    if existing is None:
        return
    if existing == sha:
        raise _Skip(SkipReason.ALREADY_PRESENT, "this instance is already stored")
    raise _Skip(
        SkipReason.UID_CONFLICT,
        "a different instance with the same SOP Instance UID is already stored; "
        "this one was not imported",
    )


def _store(item: _Prepared, target: LocalPatient, sink: InstanceSink, result: ImportResult) -> None:
    """Hand one written file to the sink (the sink may move it)."""
    planned, output = item.planned, item.output
    assert output is not None and item.sha256 is not None
    meta = InstanceMeta(
        sop_instance_uid=planned.sop_instance_uid,
        sop_class_uid=planned.sop_class_uid,
        study_instance_uid=planned.study_instance_uid,
        series_instance_uid=planned.series_instance_uid,
        transfer_syntax_uid=output.transfer_syntax_uid,
        patient_id=target.patient_id,
        issuer_of_patient_id=target.issuer_of_patient_id,
        source_path=planned.path,
        source_sha256=item.sha256,
        sha256=output.sha256,
        size=output.size,
    )
    try:
        stored = sink.store(output.path, meta)
    except ConflictError as exc:  # the sink refuses this one instance (R-PDI-4)
        result.skipped.append(
            SkippedFile(
                planned.path, planned.sop_instance_uid, SkipReason.UID_CONFLICT, exc.message
            )
        )
        return
    finally:
        item.discard()
    result.imported.append(
        ImportedInstance(
            planned.path,
            planned.sop_instance_uid,
            planned.study_instance_uid,
            planned.series_instance_uid,
            item.sha256,
            stored,
        )
    )
