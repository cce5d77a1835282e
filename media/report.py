"""The inspection report: Patient -> Study -> Series -> Instance, files, findings.

The hierarchy is what reception staff see to choose what to import (R-PDI-3);
the findings say exactly what was non-conformant (R-PDI-1); ``files`` holds the
SHA-256 of every file as it was read (R-PDI-5 import record).

Entries are numbered 1-based in display order so that an operator can select
"2", "2.1" or "2.1.3" (patient, study, series) as well as by UID.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from .charset import decode_person_name
from .conformance import Finding, Severity


class InstanceStatus(StrEnum):
    """Whether an instance can be imported."""

    OK = "ok"
    MISSING = "missing"
    MALFORMED = "malformed"
    REFUSED = "refused"
    TOO_LARGE = "too-large"
    UNREADABLE = "unreadable"


@dataclass(slots=True)
class InstanceEntry:
    """One SOP Instance on the medium (from its DICOMDIR record and/or its header)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: str
    #: Relative POSIX path on the medium; ``None`` when the file is missing or refused.
    path: str | None
    #: Referenced File ID as written in the DICOMDIR (``\\``-joined), if any.
    file_id: str | None
    size: int | None
    sha256: str | None
    referenced: bool
    status: InstanceStatus = InstanceStatus.OK
    problem: str | None = None
    #: Patient identity as found in the file header (checked at import).
    header_patient_id: str | None = None

    @property
    def importable(self) -> bool:
        return self.status is InstanceStatus.OK and self.path is not None

    def to_dict(self) -> dict[str, object]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "instance_number": self.instance_number,
            "path": self.path,
            "file_id": self.file_id,
            "size": self.size,
            "sha256": self.sha256,
            "referenced": self.referenced,
            "status": self.status.value,
            "problem": self.problem,
        }


@dataclass(slots=True)
class SeriesEntry:
    series_instance_uid: str
    modality: str = ""
    series_number: str = ""
    description: str = ""
    institution_name: str = ""
    instances: list[InstanceEntry] = field(default_factory=list)
    index: str = ""

    @property
    def number_of_images(self) -> int:
        return len(self.instances)

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "series_number": self.series_number,
            "description": self.description,
            "institution_name": self.institution_name,
            "number_of_images": self.number_of_images,
            "instances": [i.to_dict() for i in self.instances],
        }


@dataclass(slots=True)
class StudyEntry:
    study_instance_uid: str
    study_date: str = ""
    study_time: str = ""
    description: str = ""
    accession_number: str = ""
    study_id: str = ""
    institution_name: str = ""
    series: list[SeriesEntry] = field(default_factory=list)
    index: str = ""

    @property
    def number_of_images(self) -> int:
        return sum(s.number_of_images for s in self.series)

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series if s.modality})

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "study_instance_uid": self.study_instance_uid,
            "study_date": self.study_date,
            "study_time": self.study_time,
            "description": self.description,
            "accession_number": self.accession_number,
            "study_id": self.study_id,
            "institution_name": self.institution_name,
            "modalities": self.modalities,
            "number_of_images": self.number_of_images,
            "series": [s.to_dict() for s in self.series],
        }


@dataclass(slots=True)
class PatientEntry:
    """A patient on the medium.  ``name_raw`` keeps the stored bytes (PS3.5 §6.2 PN)."""

    patient_id: str
    issuer_of_patient_id: str = ""
    name_raw: bytes = b""
    character_set: tuple[str, ...] = ()
    birth_date: str = ""
    sex: str = ""
    studies: list[StudyEntry] = field(default_factory=list)
    index: str = ""

    @property
    def name(self) -> str:
        """The name decoded for display only (all component groups)."""
        return decode_person_name(self.name_raw, self.character_set)

    @property
    def number_of_images(self) -> int:
        return sum(s.number_of_images for s in self.studies)

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "patient_id": self.patient_id,
            "issuer_of_patient_id": self.issuer_of_patient_id,
            "name": self.name,
            "name_raw_hex": self.name_raw.hex(),
            "specific_character_set": list(self.character_set),
            "birth_date": self.birth_date,
            "sex": self.sex,
            "number_of_images": self.number_of_images,
            "studies": [s.to_dict() for s in self.studies],
        }


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A file as read from the medium: path, size, SHA-256 and what it was."""

    path: str
    size: int
    sha256: str | None
    role: str

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "role": self.role}


@dataclass(slots=True)
class MediaReport:
    """Everything inspection found on a medium."""

    source_kind: str
    label: str
    dicomdir_path: str | None
    dicomdir_used: bool
    patients: list[PatientEntry] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    #: Paths of entries that are never imported (programs, autorun, viewers, links).
    never_imported: list[str] = field(default_factory=list)
    file_set_id: str = ""

    def instances(self) -> Iterator[tuple[PatientEntry, StudyEntry, SeriesEntry, InstanceEntry]]:
        for patient in self.patients:
            for study in patient.studies:
                for series in study.series:
                    for instance in series.instances:
                        yield patient, study, series, instance

    @property
    def number_of_instances(self) -> int:
        return sum(p.number_of_images for p in self.patients)

    def findings_by_code(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for f in self.findings:
            counts[f.code.value] = counts.get(f.code.value, 0) + 1
        return dict(sorted(counts.items()))

    def has_errors(self) -> bool:
        return any(f.severity is Severity.ERROR for f in self.findings)

    def file_hashes(self) -> dict[str, str]:
        return {f.path: f.sha256 for f in self.files if f.sha256 is not None}

    def number(self) -> None:
        """Assign the 1-based display indices ("1", "1.2", "1.2.3")."""
        for p_i, patient in enumerate(self.patients, start=1):
            patient.index = str(p_i)
            for s_i, study in enumerate(patient.studies, start=1):
                study.index = f"{p_i}.{s_i}"
                for r_i, series in enumerate(study.series, start=1):
                    series.index = f"{p_i}.{s_i}.{r_i}"

    def to_dict(self) -> dict[str, object]:
        return {
            "source_kind": self.source_kind,
            "label": self.label,
            "dicomdir_path": self.dicomdir_path,
            "dicomdir_used": self.dicomdir_used,
            "file_set_id": self.file_set_id,
            "patients": [p.to_dict() for p in self.patients],
            "findings": [f.to_dict() for f in self.findings],
            "findings_by_code": self.findings_by_code(),
            "files": [f.to_dict() for f in self.files],
            "never_imported": list(self.never_imported),
        }

    def to_text(self) -> str:
        """A plain-text summary for the CLI and logs meant for staff (has patient data)."""
        lines = [
            f"Medium: {self.label or '(no label)'} ({self.source_kind}); DICOMDIR: "
            + (self.dicomdir_path if self.dicomdir_used and self.dicomdir_path else "not used")
        ]
        for patient in self.patients:
            lines.append(
                f"[{patient.index}] {patient.name} ID={patient.patient_id}"
                f" issuer={patient.issuer_of_patient_id or '-'} born={patient.birth_date or '-'}"
                f" sex={patient.sex or '-'}"
            )
            for study in patient.studies:
                lines.append(
                    f"  [{study.index}] {study.study_date} {study.description}"
                    f" acc={study.accession_number or '-'} from={study.institution_name or '-'}"
                    f" images={study.number_of_images}"
                )
                for series in study.series:
                    bad = sum(1 for i in series.instances if not i.importable)
                    lines.append(
                        f"    [{series.index}] {series.modality} #{series.series_number}"
                        f" {series.description} images={series.number_of_images}"
                        + (f" not-importable={bad}" if bad else "")
                    )
        if self.findings:
            lines.append("Findings:")
            for code, count in self.findings_by_code().items():
                lines.append(f"  {code}: {count}")
        return "\n".join(lines)
