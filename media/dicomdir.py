"""Find and read the DICOMDIR of a medium (PS3.10 §8, PS3.3 Annex F).

The DICOMDIR is parsed with pydicom's ``dcmread``; its directory records are
then linked by their byte offsets, exactly as PS3.3 F.3.2.1 defines them:
the root's *Offset of the First Directory Record of the Root Directory Entity*
(0004,1200), each record's *Offset of the Next Directory Record* (0004,1400)
and *Offset of Referenced Lower-Level Directory Entity* (0004,1420).

Why not ``pydicom.fileset.FileSet`` for reading: it needs a host file system
path (an ISO image read in place has none), it resolves Referenced File IDs on
the host following symbolic links, it drops records whose file is missing and
reads orphaned files to re-record them, and it stops at the first hostile File
ID.  Reading a hostile medium needs every one of those cases reported per
record instead, so this walker is tolerant: bad offsets, loops and damaged
records become findings and the rest of the tree is kept.  The tests check the
walker against ``FileSet`` on well-formed media.

Nothing here raises: every problem is a :class:`~media.conformance.Finding`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage

from .charset import charset_terms, safe_text
from .conformance import Finding, FindingCode, file_id_components, finding
from .source import EntryKind, MediaEntry

_FIRST = 0x00041200
_NEXT = 0x00041400
_IN_USE = 0x00041410
_LOWER = 0x00041420
_TYPE = 0x00041430
_FILE_ID = 0x00041500
_MAX_LEVELS = 16


@dataclass(slots=True)
class DirectoryRecord:
    """One directory record, linked into the tree, with its effective charset."""

    offset: int
    record_type: str
    dataset: Dataset
    character_set: tuple[str, ...]
    children: list[DirectoryRecord] = field(default_factory=list)

    def file_id(self) -> list[str] | None:
        """Referenced File ID components (``None`` when the record has none)."""
        if _FILE_ID not in self.dataset:
            return None
        try:
            value = self.dataset[_FILE_ID].value
        except Exception:
            return [""]
        if value is None or value == "":
            return None
        return file_id_components(value if isinstance(value, str) else list(value))

    def text(self, keyword: str) -> str:
        return safe_text(self.dataset, keyword)


@dataclass(slots=True)
class DicomdirReading:
    """What could be made of a DICOMDIR: the record tree and the findings."""

    path: str
    usable: bool
    roots: list[DirectoryRecord]
    findings: list[Finding]
    record_count: int = 0
    file_set_id: str = ""


def locate_dicomdir(entries: Sequence[MediaEntry]) -> tuple[MediaEntry | None, list[Finding]]:
    """Pick the DICOMDIR at the root of the medium, matching the name case-insensitively."""
    candidates = [
        e for e in entries if "/" not in e.path and e.path.upper() in ("DICOMDIR", "DICOMDIR.")
    ]
    findings: list[Finding] = []
    if not candidates:
        return None, [finding(FindingCode.DICOMDIR_MISSING, None)]
    files = [e for e in candidates if e.kind is EntryKind.FILE]
    if len(candidates) > 1:
        findings.append(finding(FindingCode.DICOMDIR_DUPLICATE, candidates[0].path))
    if not files:
        findings.append(
            finding(
                FindingCode.DICOMDIR_UNREADABLE,
                candidates[0].path,
                "It is not a regular file (a link, folder or device).",
            )
        )
        return None, findings
    exact = [e for e in files if e.path == "DICOMDIR"]
    chosen = exact[0] if exact else files[0]
    if chosen.path != "DICOMDIR":
        findings.append(finding(FindingCode.DICOMDIR_NAME_CASE, chosen.path))
    return chosen, findings


def parse_dicomdir(data: bytes, path: str = "DICOMDIR") -> DicomdirReading:
    """Parse DICOMDIR bytes into a linked record tree; never raises on bad input."""
    findings: list[Finding] = []
    try:
        ds = dcmread(io.BytesIO(data))
        sequence = list(ds.DirectoryRecordSequence)
    except Exception as exc:  # hostile bytes: pydicom raises many types
        findings.append(finding(FindingCode.DICOMDIR_UNREADABLE, path, f"({type(exc).__name__})"))
        return DicomdirReading(path, False, [], findings)
    meta = getattr(ds, "file_meta", None)
    try:
        sop_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
        ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    except Exception:
        sop_class, ts = "", ""
    if sop_class != MediaStorageDirectoryStorage:
        findings.append(finding(FindingCode.DICOMDIR_NOT_DIRECTORY_SOP, path))
    if ts and ts != ExplicitVRLittleEndian:
        findings.append(finding(FindingCode.DICOMDIR_TRANSFER_SYNTAX, path))
    root_charset = charset_terms(ds)
    by_offset: dict[int, Dataset] = {}
    for index, item in enumerate(sequence):
        offset = getattr(item, "seq_item_tell", None)
        if not isinstance(offset, int):
            findings.append(
                finding(FindingCode.RECORD_BROKEN, path, f"Entry {index + 1} has no position.")
            )
            continue
        by_offset[offset] = item
    walker = _Walker(by_offset, root_charset, path)
    first = _offset(ds, _FIRST)
    if first is None:
        findings.append(
            finding(FindingCode.RECORD_BROKEN, path, "The offset of the first entry is damaged.")
        )
        first = 0
    roots = walker.siblings(first, 0)
    findings.extend(walker.findings)
    orphans = [off for off in by_offset if off not in walker.visited]
    for off in orphans:
        item = by_offset[off]
        shown = _shown_file_id(item) or path
        findings.append(finding(FindingCode.RECORD_ORPHANED, shown, f"(entry at byte {off})"))
    return DicomdirReading(
        path=path,
        usable=True,
        roots=roots,
        findings=findings,
        record_count=len(sequence),
        file_set_id=safe_text(ds, "FileSetID"),
    )


def _offset(ds: Dataset, tag: int) -> int | None:
    """An offset element's value: 0 when absent, ``None`` when damaged."""
    if tag not in ds:
        return 0
    try:
        value = ds[tag].value
    except Exception:
        return None
    if value is None or value == "":
        return 0
    if isinstance(value, int) and value >= 0:
        return value
    return None


def _shown_file_id(item: Dataset) -> str | None:
    try:
        if _FILE_ID not in item:
            return None
        value = item[_FILE_ID].value
        comps = file_id_components(value if isinstance(value, str) else list(value))
        return "\\".join(comps)
    except Exception:
        return None


class _Walker:
    """Follows sibling and child offsets, cutting loops and bad links."""

    def __init__(self, by_offset: dict[int, Dataset], charset: tuple[str, ...], path: str):
        self.by_offset = by_offset
        self.charset = charset
        self.path = path
        self.visited: set[int] = set()
        self.findings: list[Finding] = []

    def siblings(self, offset: int, level: int) -> list[DirectoryRecord]:
        nodes: list[DirectoryRecord] = []
        if level >= _MAX_LEVELS:
            if offset:
                self.findings.append(
                    finding(FindingCode.RECORD_LOOP, self.path, "The tree is nested too deeply.")
                )
            return nodes
        while offset:
            if offset in self.visited:
                self.findings.append(
                    finding(FindingCode.RECORD_LOOP, self.path, f"(entry at byte {offset})")
                )
                break
            item = self.by_offset.get(offset)
            if item is None:
                self.findings.append(
                    finding(FindingCode.RECORD_BAD_OFFSET, self.path, f"(byte {offset})")
                )
                break
            self.visited.add(offset)
            next_offset = _offset(item, _NEXT)
            lower = _offset(item, _LOWER)
            record_type = safe_text(item, "DirectoryRecordType").upper()
            if next_offset is None or lower is None or not record_type:
                self.findings.append(
                    finding(
                        FindingCode.RECORD_BROKEN,
                        _shown_file_id(item) or self.path,
                        f"(entry at byte {offset})",
                    )
                )
                offset = next_offset or 0
                continue
            if self._inactive(item):
                offset = next_offset
                continue
            try:
                terms = charset_terms(item, self.charset)
            except Exception:
                terms = self.charset
            node = DirectoryRecord(offset, record_type, item, terms)
            if lower:
                node.children = self.siblings(lower, level + 1)
            nodes.append(node)
            offset = next_offset
        return nodes

    @staticmethod
    def _inactive(item: Dataset) -> bool:
        """Record In-use Flag 0000H marks an inactive record (PS3.3 F.3.2.2, retired)."""
        if _IN_USE not in item:
            return False
        try:
            return item[_IN_USE].value == 0
        except Exception:
            return False
