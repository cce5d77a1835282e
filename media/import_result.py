"""What an import produces, and the sink protocol it delivers to (R-PDI-5, R-PDI-7).

:class:`ImportResult` carries what the gateway's import record needs: per-file
SHA-256 of the medium as read, SHA-256 of each stored instance, the scanner's
verdicts, findings, skipped files with reasons and confirmed demographic
differences.  :class:`InstanceSink` is the two-method protocol the gateway's
store implements; ``media`` never persists anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from .conformance import Finding
from .reconcile import Mismatch
from .scanner import ScanResult


@dataclass(frozen=True, slots=True)
class InstanceMeta:
    """What the sink needs to file an instance (no patient name: it is in the file)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer_of_patient_id: str
    source_path: str
    #: SHA-256 of the file as read from the medium (the original content).
    source_sha256: str
    #: SHA-256 of the reconciled file handed to the sink.
    sha256: str
    size: int


class InstanceSink(Protocol):
    """Where imported instances go (implemented by the gateway's store)."""

    def exists(self, sop_instance_uid: str) -> str | None:
        """SHA-256 of the original content of a stored instance with this UID, or ``None``.

        For instances imported from media this is ``InstanceMeta.source_sha256``
        as given to :meth:`store`; for others, the SHA-256 of the stored bytes.
        """
        ...

    def store(self, path: Path, meta: InstanceMeta) -> str:
        """Store the file at ``path`` (it may be moved) and return its stored SHA-256.

        Raise :class:`~pki.errors.ConflictError` to refuse this one instance (the
        importer reports it as ``uid-conflict`` and goes on with the others).
        """
        ...


class SkipReason(StrEnum):
    ALREADY_PRESENT = "already-present"
    UID_CONFLICT = "uid-conflict"
    MEDIA_CHANGED = "media-changed"
    MALFORMED = "malformed"
    READ_ERROR = "read-error"
    TOO_LARGE = "too-large"
    DEMOGRAPHICS = "demographics-mismatch"
    WRITE_ERROR = "write-error"


@dataclass(frozen=True, slots=True)
class SkippedFile:
    path: str
    sop_instance_uid: str
    reason: SkipReason
    message: str


@dataclass(frozen=True, slots=True)
class ImportedInstance:
    path: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    source_sha256: str
    stored_sha256: str


@dataclass(frozen=True, slots=True)
class ScanRecord:
    path: str
    result: ScanResult


@dataclass(slots=True)
class ImportResult:
    """Everything the import record needs (R-PDI-5): hashes, outcomes, findings."""

    imported: list[ImportedInstance] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    #: SHA-256 of each planned file as read from the medium.
    media_sha256: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    scans: list[ScanRecord] = field(default_factory=list)
    scanner_engine: str = ""
    #: Demographic differences the operator confirmed.
    confirmed_mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def already_present(self) -> list[SkippedFile]:
        return [s for s in self.skipped if s.reason is SkipReason.ALREADY_PRESENT]

    @property
    def stored_sha256(self) -> dict[str, str]:
        return {i.sop_instance_uid: i.stored_sha256 for i in self.imported}

    def to_dict(self) -> dict[str, object]:
        return {
            "imported": [vars_of(i) for i in self.imported],
            "skipped": [{**vars_of(s), "reason": s.reason.value} for s in self.skipped],
            "media_sha256": dict(self.media_sha256),
            "findings": [f.to_dict() for f in self.findings],
            "scanner_engine": self.scanner_engine,
            "scans": [
                {"path": s.path, "clean": s.result.clean, "signature": s.result.signature}
                for s in self.scans
            ],
            "confirmed_mismatches": [m.field for m in self.confirmed_mismatches],
            "notes": list(self.notes),
        }


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}
