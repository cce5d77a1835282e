"""Reconcile one medium instance and write the file to store (R-PDI-1, R-PDI-4, R-PDI-5).

:func:`rewrite_instance` receives the bytes of one medium file exactly as they
were hashed and scanned (a :class:`~media.splice.ByteSource`), checks its
structure (:func:`media.dicomfile.parse_layout`), coerces it
(:func:`media.reconcile.reconcile_instance`) and writes a PS3.10 file in its
original transfer syntax with a new File Meta Information and a zeroed
preamble (PS3.10 §7.1; this also disarms PE/DICOM polyglots).  The SHA-256 of
the written file is computed while it is written.

The file is normally written by splicing (:mod:`media.splice`): untouched
elements, pixel data included, are copied byte for byte, and the coercion
computed for the first instance of a series serves the others whose
reconciled elements are byte-identical (:class:`PatchCache`).  Files the splice
writer does not handle -- deflated data sets (PS3.5 §A.5), unknown transfer
syntaxes, duplicate tags and other oddities -- are read completely and
rewritten by pydicom, as every file was before the splice writer existed.
Problems with one file raise :class:`RewriteRefused` with the reason the
import reports; nothing else is raised for hostile bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from .dicomfile import (
    PREAMBLE_LENGTH,
    DicomFileProblem,
    ElementSpan,
    FileForm,
    HeaderInfo,
    parse_layout,
)
from .import_result import SkipReason
from .reconcile import (
    RECONCILED_TAGS,
    LocalPatient,
    Operator,
    compare_demographics,
    reconcile_instance,
)
from .selection import PlannedFile
from .settings import StationInfo
from .splice import (
    IMPLEMENTATION_VERSION_NAME,
    ByteSource,
    FileMetaTemplates,
    FileSource,
    HashingWriter,
    MemorySource,
    Patch,
    SpliceUnsupported,
    apply_patch,
    can_splice,
    diff_head,
    head_bytes,
    new_file_meta,
    read_head,
    write_spliced,
)

_HASH_CHUNK = 1024 * 1024
#: Larger sets of reconciled elements are not cached (the cache stays small).
_CACHEABLE_BYTES = 16 * 1024


class RewriteRefused(Exception):
    """This file is not imported; ``reason`` and ``message`` go into the import record."""

    def __init__(self, reason: SkipReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What every instance of one import is reconciled with (IHE IRWF.b, R-PDI-5)."""

    target: LocalPatient
    importer: Operator
    station: StationInfo
    now: datetime
    accession_number: str | None
    confirm_mismatch: bool
    #: Where the written files go (the sink's temporary folder).
    work_dir: Path | None
    #: Outcomes shared by the instances of this import (see :class:`PatchCache`).
    cache: PatchCache = field(default_factory=lambda: PatchCache())
    #: File Meta Information encodings shared by the instances of this import.
    metas: FileMetaTemplates = field(default_factory=FileMetaTemplates)


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The written file, ready for the sink."""

    path: Path
    sha256: str
    size: int
    transfer_syntax_uid: str
    notes: tuple[str, ...]
    #: ``True`` when written by splicing, ``False`` when rewritten by pydicom.
    spliced: bool


def rewrite_instance(source: ByteSource, planned: PlannedFile, job: Reconciliation) -> Rewritten:
    """Check, reconcile and write one instance (see the module docstring)."""
    header, spans = _layout(source, planned)
    if spans is not None and can_splice(header.transfer_syntax_uid):
        try:
            return _splice(source, header, spans, job)
        except SpliceUnsupported:
            pass  # read it whole and let pydicom rewrite it
    return _rewrite_with_pydicom(source, header, job)


def _layout(
    source: ByteSource, planned: PlannedFile
) -> tuple[HeaderInfo, list[ElementSpan] | None]:
    try:
        with source.stream() as fp:
            header, spans = parse_layout(fp, source.size)
    except DicomFileProblem as problem:
        raise RewriteRefused(SkipReason.MALFORMED, problem.detail) from None
    except (struct.error, ValueError, OverflowError, OSError) as exc:
        raise RewriteRefused(
            SkipReason.MALFORMED, f"cannot be parsed ({type(exc).__name__})"
        ) from None
    if header.sop_instance_uid != planned.sop_instance_uid:
        raise RewriteRefused(SkipReason.MEDIA_CHANGED, "the SOP Instance UID changed")
    return header, spans


def _reconcile(ds: Dataset, job: Reconciliation) -> tuple[str, ...]:
    """Refuse unconfirmed demographic differences, then coerce ``ds`` in place."""
    if compare_demographics(ds, job.target) and not job.confirm_mismatch:
        raise RewriteRefused(SkipReason.DEMOGRAPHICS, "patient demographics differ")
    outcome = reconcile_instance(
        ds,
        job.target,
        importer=job.importer,
        station=job.station,
        now=job.now,
        accession_number=job.accession_number,
    )
    return tuple(outcome.notes)


def _output(job: Reconciliation) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(prefix="sekisho-pdi-", suffix=".dcm", dir=job.work_dir)
    return fd, Path(name)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """Reconciliation of one set of reconciled elements: a patch, or a refusal."""

    patch: Patch | None
    notes: tuple[str, ...] = ()
    refusal: tuple[SkipReason, str] | None = None


class PatchCache:
    """Reconciliation outcomes by the bytes of the elements reconciled (thread-safe).

    Instances of one series normally carry byte-identical patient, accession
    and equipment elements, and reconciliation depends on nothing else
    (``media.reconcile.RECONCILED_TAGS``), so the outcome computed for the
    first instance serves the others.  The cache is bounded in entries and in
    the size of each key, so memory stays flat.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: dict[tuple[bool, bool, bytes], _Outcome] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, key: tuple[bool, bool, bytes]) -> _Outcome | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: tuple[bool, bool, bytes], outcome: _Outcome) -> None:
        if len(key[2]) > _CACHEABLE_BYTES:
            return  # unusually large patient elements: not worth keeping
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = outcome


def _splice(
    source: ByteSource, header: HeaderInfo, spans: list[ElementSpan], job: Reconciliation
) -> Rewritten:
    blob, tags = head_bytes(source, spans, RECONCILED_TAGS)
    key = (header.implicit_vr, header.little_endian, blob)
    outcome = job.cache.get(key)
    if outcome is None:
        outcome = _reconcile_head(blob, tags, header, job)
        job.cache.put(key, outcome)
    if outcome.refusal is not None:
        raise RewriteRefused(*outcome.refusal)
    assert outcome.patch is not None
    pieces = apply_patch(spans, outcome.patch)
    try:
        meta = job.metas.encode(
            header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax_uid
        )
    except Exception as exc:  # a UID pydicom refuses
        raise RewriteRefused(
            SkipReason.WRITE_ERROR, f"cannot be written ({type(exc).__name__})"
        ) from None
    fd, path = _output(job)
    try:
        with os.fdopen(fd, "wb") as fh:
            out = HashingWriter(fh)
            write_spliced(out, source, meta, pieces)
    except Exception as exc:  # a full disk, a spool cut short
        path.unlink(missing_ok=True)
        raise RewriteRefused(
            SkipReason.WRITE_ERROR, f"cannot be written ({type(exc).__name__})"
        ) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Rewritten(path, out.sha256, out.size, header.transfer_syntax_uid, outcome.notes, True)


def _reconcile_head(
    blob: bytes, tags: frozenset[int], header: HeaderInfo, job: Reconciliation
) -> _Outcome:
    """Reconcile the elements in ``blob`` and diff the result (see :mod:`media.splice`)."""
    try:
        head = read_head(
            blob, tags, implicit_vr=header.implicit_vr, little_endian=header.little_endian
        )
    except SpliceUnsupported:
        raise
    except Exception as exc:  # pydicom on hostile bytes
        raise RewriteRefused(
            SkipReason.MALFORMED, f"cannot be parsed ({type(exc).__name__})"
        ) from None
    try:
        notes = _reconcile(head.dataset, job)
    except RewriteRefused as refused:
        return _Outcome(None, refusal=(refused.reason, refused.message))
    try:
        return _Outcome(diff_head(head), notes)
    except Exception as exc:  # pydicom cannot encode a coerced value
        raise RewriteRefused(
            SkipReason.WRITE_ERROR, f"cannot be written ({type(exc).__name__})"
        ) from None


def _rewrite_with_pydicom(source: ByteSource, header: HeaderInfo, job: Reconciliation) -> Rewritten:
    """Read the whole file with pydicom, reconcile it and write it again (the fallback)."""
    force = header.form is not FileForm.PART10
    try:
        if isinstance(source, FileSource):  # large values are read when written
            ds = dcmread(os.fspath(source.path), force=force, defer_size="1 MB")
        else:
            with source.stream() as fp:
                ds = dcmread(fp, force=force)
    except Exception as exc:  # pydicom on hostile bytes
        raise RewriteRefused(
            SkipReason.MALFORMED, f"cannot be parsed ({type(exc).__name__})"
        ) from None
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(header.transfer_syntax_uid)
    transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    notes = _reconcile(ds, job)
    try:
        ds.file_meta = new_file_meta(
            str(ds.get("SOPClassUID", "") or header.sop_class_uid),
            header.sop_instance_uid,
            transfer_syntax,
        )
    except Exception as exc:  # a UID pydicom refuses
        raise RewriteRefused(
            SkipReason.WRITE_ERROR, f"cannot be written ({type(exc).__name__})"
        ) from None
    ds.preamble = b"\x00" * PREAMBLE_LENGTH
    fd, path = _output(job)
    try:
        with os.fdopen(fd, "wb") as out:
            dcmwrite(out, ds, enforce_file_format=True)
        sha, size = _hash_file(path)
    except Exception as exc:  # pydicom cannot encode what it read
        path.unlink(missing_ok=True)
        raise RewriteRefused(
            SkipReason.WRITE_ERROR, f"cannot be written ({type(exc).__name__})"
        ) from None
    return Rewritten(path, sha, size, transfer_syntax, notes, False)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fp:
        while chunk := fp.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


__all__ = [
    "IMPLEMENTATION_VERSION_NAME",
    "MemorySource",
    "PatchCache",
    "Reconciliation",
    "RewriteRefused",
    "Rewritten",
    "new_file_meta",
    "rewrite_instance",
]
