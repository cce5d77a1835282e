"""Inspect a medium: hierarchy, conformance findings and per-file SHA-256.

:func:`inspect_media` implements R-PDI-1 (read PDI media, tolerate
non-conformant ones and say exactly what was wrong), R-PDI-2 (programs,
autorun files, scripts and viewers are listed and never imported) and R-PDI-8
(hostile File IDs, links and devices refused, sizes capped, malformed files
reported per file).  IHE RAD TF-1 §15 (PDI) and PS3.10/PS3.11 define what a
conformant medium looks like; everything else becomes a finding.

Order of work:

1. classify every listed entry (links, devices, programs, viewer folders);
2. read the DICOMDIR, if any, and resolve each record's File ID (exactly,
   then case-insensitively), examining each referenced file;
3. examine every other file (preamble + ``DICM``, or a bare data set) so that
   media without a usable DICOMDIR, and files the DICOMDIR forgot, are still
   shown;
4. number the hierarchy for selection.

Each file is read once in streaming chunks for its SHA-256; its header is
parsed without pixel data and its element structure is walked with seeks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.uid import MediaStorageDirectoryStorage as DIRECTORY_SOP

from pki.errors import MediaImportError, PayloadTooLargeError

from .conformance import (
    Finding,
    FindingCode,
    check_file_id,
    classify_content,
    classify_name,
    finding,
    hostile_reason,
    under_any,
    viewer_folders,
)
from .dicomdir import DicomdirReading, DirectoryRecord, locate_dicomdir, parse_dicomdir
from .dicomfile import (
    PREAMBLE_LENGTH,
    FileForm,
    HeaderInfo,
    ProblemKind,
    examine_stream,
    sniff,
)
from .hierarchy import HierarchyBuilder, RecordContext
from .report import FileRecord, InstanceEntry, InstanceStatus, MediaReport
from .settings import MediaSettings
from .source import EntryKind, MediaEntry, MediaSource

#: Root-level record types that describe no patient (PS3.3 F.4): not imported.
_NON_PATIENT_ROOT_TYPES = frozenset(
    {"HANGING PROTOCOL", "PALETTE", "IMPLANT", "IMPLANT ASSY", "IMPLANT GROUP"}
)


@dataclass(slots=True)
class Examined:
    """The outcome of reading one file."""

    path: str
    size: int
    sha256: str | None
    header: HeaderInfo | None
    status: InstanceStatus
    problem: str | None
    findings: list[Finding]


def examine_file(
    source: MediaSource, entry: MediaEntry, settings: MediaSettings, *, expect_dicom: bool
) -> Examined:
    """Read one file: sniff it, hash it, walk its structure, keep its header.

    Files not expected to be DICOM (not referenced by a DICOMDIR) are only
    sniffed from their first bytes unless they look like DICOM.  Never raises
    for content problems; they come back as findings and a status.
    """
    out = Examined(entry.path, entry.size, None, None, InstanceStatus.OK, None, [])
    try:
        with source.open(entry.path) as fp:
            prefix = fp.read(PREAMBLE_LENGTH + 4)
            form = sniff(prefix)
            if form is FileForm.NOT_DICOM and not expect_dicom:
                program = classify_content(prefix)
                if program is not None:
                    out.findings.append(finding(program, entry.path, "(recognized by content)"))
                    out.status = InstanceStatus.REFUSED
                else:
                    out.findings.append(finding(FindingCode.NON_DICOM_FILE, entry.path))
                out.problem = "not DICOM"
                return out
            exam = examine_stream(fp, settings.chunk_bytes)
    except PayloadTooLargeError:
        out.status = InstanceStatus.TOO_LARGE
        out.problem = "larger than the per-file limit"
        out.findings.append(finding(FindingCode.FILE_TOO_LARGE, entry.path))
        return out
    except (MediaImportError, OSError) as exc:
        out.status = InstanceStatus.UNREADABLE
        out.problem = "could not be read"
        out.findings.append(finding(FindingCode.READ_ERROR, entry.path, f"({type(exc).__name__})"))
        return out
    out.sha256, out.size = exam.sha256, exam.size
    problem = exam.problem
    if problem is not None:
        if problem.kind is ProblemKind.NOT_DICOM and not expect_dicom:
            out.findings.append(finding(FindingCode.NON_DICOM_FILE, entry.path))
            out.problem = "not DICOM"
            return out
        code = (
            FindingCode.TRUNCATED_DICOM
            if problem.kind is ProblemKind.TRUNCATED
            else FindingCode.MALFORMED_DICOM
        )
        out.findings.append(finding(code, entry.path, problem.detail))
        out.status = InstanceStatus.MALFORMED
        out.problem = problem.detail
        return out
    header = exam.header
    out.header = header
    if header is not None and header.form is FileForm.NO_PREAMBLE:
        out.findings.append(finding(FindingCode.NO_PREAMBLE, entry.path))
    if header is not None and header.preamble_is_program:
        out.findings.append(
            finding(
                FindingCode.EXECUTABLE,
                entry.path,
                "Its DICOM preamble holds a program header; the preamble is cleared on import.",
            )
        )
    return out


class _Inspector:
    def __init__(self, source: MediaSource, settings: MediaSettings) -> None:
        self.source = source
        self.settings = settings
        self.entries = source.entries()
        self.by_path = {e.path: e for e in self.entries}
        self.by_upper: dict[str, list[MediaEntry]] = {}
        for e in self.entries:
            self.by_upper.setdefault(e.path.upper(), []).append(e)
        self.report = MediaReport(source.kind, source.label, None, False)
        self.builder = HierarchyBuilder(self.report)
        self.examined: dict[str, Examined] = {}
        self.referenced: set[str] = set()
        self.excluded: set[str] = set()
        self.viewers: list[str] = []

    def add(self, f: Finding) -> None:
        self.report.findings.append(f)

    # 1. entries that are never imported -----------------------------------------
    def classify_entries(self) -> None:
        for path in self.source.unlisted():
            self.add(finding(FindingCode.UNREADABLE_ENTRY, path))
        programs: list[str] = []
        for e in self.entries:
            if e.kind is EntryKind.SYMLINK:
                self.add(finding(FindingCode.SYMLINK, e.path, f"It points to {e.link_target!r}."))
                self.excluded.add(e.path)
            elif e.kind in (EntryKind.DEVICE, EntryKind.OTHER):
                self.add(finding(FindingCode.SPECIAL_FILE, e.path))
                self.excluded.add(e.path)
            elif e.kind is EntryKind.FILE:
                code = classify_name(e.path)
                if code is not None:
                    self.add(finding(code, e.path))
                    self.excluded.add(e.path)
                    if code is not FindingCode.AUTORUN:
                        programs.append(e.path)
        directories = [e.path for e in self.entries if e.kind is EntryKind.DIRECTORY]
        self.viewers = viewer_folders(directories, programs)
        for folder in self.viewers:
            self.add(finding(FindingCode.VIEWER_FOLDER, folder))
        self.report.never_imported = sorted(
            self.excluded | {e.path for e in self.entries if under_any(e.path, self.viewers)}
        )

    # 2. DICOMDIR ---------------------------------------------------------------
    def read_dicomdir(self) -> None:
        entry, findings = locate_dicomdir(self.entries)
        self.report.findings.extend(findings)
        if entry is None:
            return
        self.report.dicomdir_path = entry.path
        self.referenced.add(entry.path)
        if entry.size > self.settings.max_dicomdir_bytes:
            self.add(finding(FindingCode.DICOMDIR_TOO_LARGE, entry.path))
            return
        try:
            with self.source.open(entry.path) as fp:
                data = fp.read(self.settings.max_dicomdir_bytes + 1)
        except (MediaImportError, OSError) as exc:
            self.add(
                finding(FindingCode.DICOMDIR_UNREADABLE, entry.path, f"({type(exc).__name__})")
            )
            return

        self.report.files.append(
            FileRecord(entry.path, len(data), hashlib.sha256(data).hexdigest(), "dicomdir")
        )
        reading = parse_dicomdir(data, entry.path)
        self.report.findings.extend(reading.findings)
        if not reading.usable:
            return
        self.report.dicomdir_used = True
        self.report.file_set_id = reading.file_set_id
        self.walk(reading)

    def walk(self, reading: DicomdirReading) -> None:
        stack: list[tuple[DirectoryRecord, RecordContext]] = [
            (r, RecordContext()) for r in reversed(reading.roots)
        ]
        while stack:
            record, ctx = stack.pop()
            rtype = record.record_type
            file_id = record.file_id()
            if rtype == "PATIENT":
                ctx = RecordContext(patient=record)
            elif rtype == "STUDY":
                ctx = RecordContext(patient=ctx.patient, study=record)
            elif rtype == "SERIES":
                ctx = RecordContext(patient=ctx.patient, study=ctx.study, series=record)
            elif file_id is not None:
                self.leaf(record, file_id, ctx)
            for child in reversed(record.children):
                stack.append((child, ctx))

    def leaf(self, record: DirectoryRecord, components: list[str], ctx: RecordContext) -> None:
        shown = "\\".join(components)
        reason = hostile_reason(components)
        if reason is not None:
            self.add(
                finding(FindingCode.FILE_ID_HOSTILE, shown, f"It was refused because {reason}.")
            )
            if record.record_type not in _NON_PATIENT_ROOT_TYPES:
                self.builder.add_record_instance(
                    record, ctx, None, shown, InstanceStatus.REFUSED, "hostile file reference"
                )
            return
        if ctx.series is None and record.record_type in _NON_PATIENT_ROOT_TYPES:
            resolved = self.resolve(components, shown)
            if resolved is not None:
                self.referenced.add(resolved.path)
            return
        if ctx.series is None or ctx.study is None:
            self.add(finding(FindingCode.RECORD_OUT_OF_PLACE, shown))
        for f in check_file_id(components, shown):
            self.add(f)
        entry = self.resolve(components, shown)
        if entry is None:
            rel = "/".join(components).upper()
            present = rel in self.by_upper or any(
                "/".join(components[:d]).upper() in self.by_upper
                and self.by_upper["/".join(components[:d]).upper()][0].kind is EntryKind.SYMLINK
                for d in range(1, len(components))
            )
            status, why = (
                (InstanceStatus.REFUSED, "refused: not a single regular file (see findings)")
                if present
                else (InstanceStatus.MISSING, "file not on the medium")
            )
            self.builder.add_record_instance(record, ctx, None, shown, status, why)
            return
        self.referenced.add(entry.path)
        if entry.path in self.excluded or under_any(entry.path, self.viewers):
            self.builder.add_record_instance(
                record, ctx, entry.path, shown, InstanceStatus.REFUSED, "program or viewer file"
            )
            return
        examined = self.examine(entry, expect_dicom=True)
        self.builder.add_examined_instance(examined, record, ctx, shown)

    def resolve(self, components: list[str], shown: str) -> MediaEntry | None:
        """Find the entry a File ID names: exact, then case-insensitive (R-PDI-1)."""
        rel = "/".join(components)
        entry = self.by_path.get(rel)
        if entry is None:
            matches = self.by_upper.get(rel.upper(), [])
            if len(matches) > 1:
                self.add(finding(FindingCode.FILE_ID_AMBIGUOUS, shown))
                return None
            if matches:
                entry = matches[0]
                self.add(
                    finding(FindingCode.FILE_ID_CASE_MISMATCH, shown, f"Found as {entry.path}.")
                )
        if entry is None:
            for depth in range(1, len(components)):
                prefix = "/".join(components[:depth]).upper()
                for parent in self.by_upper.get(prefix, []):
                    if parent.kind is EntryKind.SYMLINK:
                        self.add(
                            finding(
                                FindingCode.FILE_ID_NOT_A_FILE,
                                shown,
                                f"It passes through the link {parent.path}.",
                            )
                        )
                        return None
            self.add(finding(FindingCode.RECORD_FILE_MISSING, shown))
            return None
        if entry.kind is not EntryKind.FILE:
            self.add(finding(FindingCode.FILE_ID_NOT_A_FILE, shown, f"It is a {entry.kind.value}."))
            return None
        return entry

    def examine(self, entry: MediaEntry, *, expect_dicom: bool) -> Examined:
        cached = self.examined.get(entry.path)
        if cached is not None:
            return cached
        examined = examine_file(self.source, entry, self.settings, expect_dicom=expect_dicom)
        self.examined[entry.path] = examined
        self.report.findings.extend(examined.findings)
        role = "dicom" if examined.header is not None else (examined.problem or "other")
        if examined.sha256 is not None:
            self.report.files.append(FileRecord(entry.path, examined.size, examined.sha256, role))
        return examined

    # 3. everything else -----------------------------------------------------------
    def scan_rest(self) -> None:
        for e in self.entries:
            if e.kind is not EntryKind.FILE or e.path in self.referenced:
                continue
            if e.path in self.excluded or under_any(e.path, self.viewers):
                continue
            examined = self.examine(e, expect_dicom=False)
            if examined.header is None and examined.status is InstanceStatus.REFUSED:
                self.report.never_imported.append(e.path)
                continue
            if examined.header is None and examined.problem == "not DICOM":
                continue
            if examined.header is not None and examined.header.sop_class_uid == DIRECTORY_SOP:
                self.add(finding(FindingCode.EXTRA_DICOMDIR, e.path))
                continue
            if self.report.dicomdir_used and examined.header is not None:
                self.add(finding(FindingCode.UNREFERENCED_DICOM_FILE, e.path))
            if examined.header is not None:
                for f in check_file_id(e.path.split("/"), e.path):
                    self.add(f)
            self.builder.add_examined_instance(examined, None, RecordContext(), None)

    def finish(self) -> MediaReport:
        self.builder.finish()
        seen: dict[str, InstanceEntry] = {}
        for _p, _s, _r, inst in self.report.instances():
            if not inst.sop_instance_uid:
                continue
            first = seen.get(inst.sop_instance_uid)
            if first is None:
                seen[inst.sop_instance_uid] = inst
            elif first.path != inst.path:
                self.add(
                    finding(
                        FindingCode.DUPLICATE_SOP_INSTANCE,
                        inst.path or inst.file_id,
                        f"The same UID is also in {first.path or first.file_id}.",
                    )
                )
        self.report.never_imported = sorted(set(self.report.never_imported))
        self.report.files.sort(key=lambda f: f.path)
        self.report.number()
        return self.report


def inspect_media(source: MediaSource, settings: MediaSettings) -> MediaReport:
    """Inspect a medium and return its report (never writes anything).

    Raises only :class:`~pki.errors.SekishoError` subclasses, and only for the
    medium as a whole (e.g. over the size caps when it was opened); problems
    with single files and records are findings.
    """
    inspector = _Inspector(source, settings)
    inspector.classify_entries()
    inspector.read_dicomdir()
    inspector.scan_rest()
    return inspector.finish()
