"""Scanning the rest of a medium for malware before an import (R-PDI-2; 003 6.5 C-6).

:func:`media.importer.run_import` scans every file it imports.  With
``[media.scanner] scope = "all"`` (the default) the gateway first scans every
other regular file of the medium as well -- the viewer, the autorun file, the
programs that are never imported -- so that an infected medium is stopped and
reported whatever the staff member selected.  Links and devices are never
opened (the source refuses them); files over the per-file cap are not read and
are listed as not scanned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from media.scanner import Scanner
from media.selection import ImportPlan
from media.settings import MediaSettings
from media.source import EntryKind, MediaSource
from pki.errors import MediaImportError, PayloadTooLargeError


@dataclass
class RestScan:
    """What the pre-import scan of the unselected files found."""

    scanned: int = 0
    detections: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    not_scanned: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "scanned": self.scanned,
            "detections": [{"path": p, "signature": s} for p, s in self.detections],
            "unreadable": list(self.unreadable),
            "not_scanned_too_large": list(self.not_scanned),
        }


class _Chunks:
    """Chunks of a stream; a read failure ends them and is kept (never the scanner's fault)."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream = stream
        self.size = size
        self.error = False

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                chunk = self.stream.read(self.size)
            except (OSError, MediaImportError):
                self.error = True
                return
            if not chunk:
                return
            yield chunk


def files_to_prescan(source: MediaSource, plan: ImportPlan) -> list[str]:
    """Regular files of the medium that the import itself will not scan."""
    planned = {f.path for f in plan.files}
    return [e.path for e in source.entries() if e.kind is EntryKind.FILE and e.path not in planned]


def scan_rest(
    source: MediaSource,
    paths: list[str],
    scanner: Scanner,
    settings: MediaSettings,
    tick: Callable[[], None] | None = None,
) -> RestScan:
    """Scan ``paths``; scanner failures raise ``MediaImportError`` (no verdict, no import)."""
    out = RestScan()
    for path in paths:
        try:
            stream = source.open(path)
        except PayloadTooLargeError:
            out.not_scanned.append(path)
            continue
        except (MediaImportError, OSError):
            out.unreadable.append(path)
            continue
        with stream:
            chunks = _Chunks(stream, settings.chunk_bytes)
            verdict = scanner.scan_stream(path, chunks)
            for _ in chunks:  # a scanner that stopped early
                pass
        if not verdict.clean:  # even on partly read content, a detection counts
            out.detections.append((path, verdict.signature or "unknown"))
        if chunks.error:
            out.unreadable.append(path)
        else:
            out.scanned += 1
        if tick is not None:
            tick()
    return out
