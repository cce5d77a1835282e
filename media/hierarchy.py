"""Build the Patient -> Study -> Series -> Instance tree of a report.

Instances are placed under their DICOMDIR PATIENT/STUDY/SERIES records
(PS3.3 F.4, the basic directory information model) when those exist and agree
with the file's own header; otherwise under the entries named by the header
(the tolerant path for media without a usable DICOMDIR).  DICOMDIR records are
preferred for display values; headers fill what the records leave out (for
example DCMTK's PATIENT records carry neither birth date nor sex).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .charset import raw_value
from .conformance import FindingCode, finding
from .dicomdir import DirectoryRecord
from .dicomfile import HeaderInfo
from .report import (
    InstanceEntry,
    InstanceStatus,
    MediaReport,
    PatientEntry,
    SeriesEntry,
    StudyEntry,
)

if TYPE_CHECKING:
    from .inspect import Examined


@dataclass(frozen=True, slots=True)
class RecordContext:
    """The DICOMDIR records above a leaf record."""

    patient: DirectoryRecord | None = None
    study: DirectoryRecord | None = None
    series: DirectoryRecord | None = None


def _fill(obj: object, name: str, value: str) -> None:
    if value and not getattr(obj, name):
        setattr(obj, name, value)


class HierarchyBuilder:
    """Accumulates instances into a :class:`MediaReport`'s patient list."""

    def __init__(self, report: MediaReport) -> None:
        self.report = report
        self._patients: dict[tuple[object, ...], PatientEntry] = {}
        self._studies: dict[str, StudyEntry] = {}
        self._series: dict[tuple[str, str], SeriesEntry] = {}
        self._study_patient: dict[str, PatientEntry] = {}
        self._series_parents: dict[int, tuple[PatientEntry, StudyEntry]] = {}

    # --- entries from DICOMDIR records --------------------------------------------
    def _patient_from_record(self, record: DirectoryRecord) -> PatientEntry:
        key: tuple[object, ...] = ("record", record.offset)
        patient = self._patients.get(key)
        if patient is None:
            patient = PatientEntry(
                patient_id=record.text("PatientID"),
                issuer_of_patient_id=record.text("IssuerOfPatientID"),
                name_raw=raw_value(record.dataset, 0x00100010),
                character_set=record.character_set,
                birth_date=record.text("PatientBirthDate"),
                sex=record.text("PatientSex"),
            )
            self._patients[key] = patient
            self.report.patients.append(patient)
        return patient

    def _study_from_record(self, record: DirectoryRecord, patient: PatientEntry) -> StudyEntry:
        uid = record.text("StudyInstanceUID") or f"(study record at byte {record.offset})"
        study = self._studies.get(uid)
        if study is None:
            study = StudyEntry(
                study_instance_uid=uid,
                study_date=record.text("StudyDate"),
                study_time=record.text("StudyTime"),
                description=record.text("StudyDescription"),
                accession_number=record.text("AccessionNumber"),
                study_id=record.text("StudyID"),
                institution_name=record.text("InstitutionName"),
            )
            self._add_study(patient, study)
        return study

    def _add_study(self, patient: PatientEntry, study: StudyEntry) -> None:
        self._studies[study.study_instance_uid] = study
        self._study_patient[study.study_instance_uid] = patient
        patient.studies.append(study)

    def _add_series(self, study: StudyEntry, series: SeriesEntry) -> None:
        self._series[(study.study_instance_uid, series.series_instance_uid)] = series
        patient = self._study_patient[study.study_instance_uid]
        self._series_parents[id(series)] = (patient, study)
        study.series.append(series)

    def _series_from_record(self, record: DirectoryRecord, study: StudyEntry) -> SeriesEntry:
        uid = record.text("SeriesInstanceUID") or f"(series record at byte {record.offset})"
        key = (study.study_instance_uid, uid)
        series = self._series.get(key)
        if series is None:
            series = SeriesEntry(
                series_instance_uid=uid,
                modality=record.text("Modality"),
                series_number=record.text("SeriesNumber"),
                description=record.text("SeriesDescription"),
                institution_name=record.text("InstitutionName"),
            )
            self._add_series(study, series)
        return series

    # --- entries from headers -------------------------------------------------------
    def _place_by_header(self, header: HeaderInfo) -> SeriesEntry:
        study = self._studies.get(header.study_instance_uid) if header.study_instance_uid else None
        if study is None:
            key: tuple[object, ...] = (
                "header",
                header.patient_id,
                header.issuer_of_patient_id,
                header.patient_name_raw,
            )
            patient = self._patients.get(key)
            if patient is None:
                patient = PatientEntry(
                    patient_id=header.patient_id,
                    issuer_of_patient_id=header.issuer_of_patient_id,
                    name_raw=header.patient_name_raw,
                    character_set=header.character_set,
                    birth_date=header.patient_birth_date,
                    sex=header.patient_sex,
                )
                self._patients[key] = patient
                self.report.patients.append(patient)
            uid = header.study_instance_uid or "(no study UID)"
            study = self._studies.get(uid)
            if study is None:
                study = StudyEntry(study_instance_uid=uid)
                self._add_study(patient, study)
        series_uid = header.series_instance_uid or "(no series UID)"
        series = self._series.get((study.study_instance_uid, series_uid))
        if series is None:
            series = SeriesEntry(series_instance_uid=series_uid)
            self._add_series(study, series)
        return series

    def _placeholder(self) -> SeriesEntry:
        key: tuple[object, ...] = ("unknown",)
        patient = self._patients.get(key)
        if patient is None:
            patient = PatientEntry(patient_id="")
            self._patients[key] = patient
            self.report.patients.append(patient)
        uid = "(unknown study)"
        study = self._studies.get(uid)
        if study is None:
            study = StudyEntry(study_instance_uid=uid)
            self._add_study(patient, study)
        series = self._series.get((uid, "(unknown series)"))
        if series is None:
            series = SeriesEntry(series_instance_uid="(unknown series)")
            self._add_series(study, series)
        return series

    def _series_for(self, ctx: RecordContext) -> SeriesEntry | None:
        if ctx.patient is None or ctx.study is None or ctx.series is None:
            return None
        patient = self._patient_from_record(ctx.patient)
        study = self._study_from_record(ctx.study, patient)
        return self._series_from_record(ctx.series, study)

    # --- public ---------------------------------------------------------------------
    def add_record_instance(
        self,
        record: DirectoryRecord,
        ctx: RecordContext,
        path: str | None,
        file_id: str,
        status: InstanceStatus,
        problem: str,
    ) -> None:
        """An instance known only from its DICOMDIR record (missing or refused file)."""
        series = self._series_for(ctx) or self._placeholder()
        series.instances.append(
            InstanceEntry(
                sop_instance_uid=record.text("ReferencedSOPInstanceUIDInFile"),
                sop_class_uid=record.text("ReferencedSOPClassUIDInFile"),
                transfer_syntax_uid=record.text("ReferencedTransferSyntaxUIDInFile"),
                instance_number=record.text("InstanceNumber"),
                path=path,
                file_id=file_id,
                size=None,
                sha256=None,
                referenced=True,
                status=status,
                problem=problem,
            )
        )

    def add_examined_instance(
        self,
        examined: Examined,
        record: DirectoryRecord | None,
        ctx: RecordContext,
        file_id: str | None,
    ) -> None:
        """An instance whose file was read (its header may be missing if malformed)."""
        header = examined.header
        series: SeriesEntry | None = None
        if header is not None and record is not None:
            differing = self._differences(header, record, ctx)
            if differing:
                self.report.findings.append(
                    finding(
                        FindingCode.RECORD_FILE_MISMATCH,
                        examined.path,
                        "Differs in: " + ", ".join(differing) + ".",
                    )
                )
            if not {"StudyInstanceUID", "SeriesInstanceUID"} & set(differing):
                series = self._series_for(ctx)
        elif header is None and record is not None:
            series = self._series_for(ctx)
        if series is None:
            series = self._place_by_header(header) if header is not None else self._placeholder()
        if header is not None:
            self._fill_from_header(series, header)

        def rec(keyword: str) -> str:
            return record.text(keyword) if record is not None else ""

        series.instances.append(
            InstanceEntry(
                sop_instance_uid=(
                    header.sop_instance_uid if header else rec("ReferencedSOPInstanceUIDInFile")
                ),
                sop_class_uid=header.sop_class_uid
                if header
                else rec("ReferencedSOPClassUIDInFile"),
                transfer_syntax_uid=(
                    header.transfer_syntax_uid
                    if header
                    else rec("ReferencedTransferSyntaxUIDInFile")
                ),
                instance_number=header.instance_number if header else rec("InstanceNumber"),
                path=examined.path,
                file_id=file_id,
                size=examined.size,
                sha256=examined.sha256,
                referenced=record is not None,
                status=examined.status if header is None else InstanceStatus.OK,
                problem=examined.problem if header is None else None,
                header_patient_id=header.patient_id if header else None,
            )
        )

    def _differences(
        self, header: HeaderInfo, record: DirectoryRecord, ctx: RecordContext
    ) -> list[str]:
        pairs = [
            (
                "SOPInstanceUID",
                header.sop_instance_uid,
                record.text("ReferencedSOPInstanceUIDInFile"),
            ),
            ("SOPClassUID", header.sop_class_uid, record.text("ReferencedSOPClassUIDInFile")),
            (
                "TransferSyntaxUID",
                header.transfer_syntax_uid,
                record.text("ReferencedTransferSyntaxUIDInFile"),
            ),
        ]
        if ctx.study is not None:
            pairs.append(
                ("StudyInstanceUID", header.study_instance_uid, ctx.study.text("StudyInstanceUID"))
            )
        if ctx.series is not None:
            pairs.append(
                (
                    "SeriesInstanceUID",
                    header.series_instance_uid,
                    ctx.series.text("SeriesInstanceUID"),
                )
            )
        if ctx.patient is not None:
            pairs.append(("PatientID", header.patient_id, ctx.patient.text("PatientID")))
        return [name for name, mine, theirs in pairs if theirs and mine != theirs]

    def _fill_from_header(self, series: SeriesEntry, header: HeaderInfo) -> None:
        _fill(series, "modality", header.modality)
        _fill(series, "series_number", header.series_number)
        _fill(series, "description", header.series_description)
        _fill(series, "institution_name", header.institution_name)
        patient, study = self._series_parents[id(series)]
        _fill(study, "study_date", header.study_date)
        _fill(study, "study_time", header.study_time)
        _fill(study, "description", header.study_description)
        _fill(study, "accession_number", header.accession_number)
        _fill(study, "study_id", header.study_id)
        _fill(study, "institution_name", header.institution_name)
        _fill(patient, "issuer_of_patient_id", header.issuer_of_patient_id)
        _fill(patient, "birth_date", header.patient_birth_date)
        _fill(patient, "sex", header.patient_sex)
        if not patient.name_raw and header.patient_name_raw:
            patient.name_raw = header.patient_name_raw
            patient.character_set = header.character_set

    def finish(self) -> None:
        """Order instances by Instance Number, then path."""
        for patient in self.report.patients:
            for study in patient.studies:
                for series in study.series:
                    series.instances.sort(key=_instance_order)


def _instance_order(inst: InstanceEntry) -> tuple[int, str]:
    try:
        number = int(inst.instance_number)
    except (TypeError, ValueError):
        number = 1 << 30
    return number, inst.path or inst.file_id or ""
