"""What the operator chose to import, and the resulting plan (R-PDI-3).

Only images used for diagnosis must be kept (000 §4.2), so nothing is
selected by default.  An operator selects patients, studies or series either
by the 1-based index shown in the report ("2", "2.1", "2.1.3") or by UID
(Study/Series Instance UID; a patient by its Patient ID on the medium).
:func:`plan_import` is pure: it turns a report and a selection into the list
of files to import and the list of what is left out, each with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pki.errors import InvalidInputError

from .conformance import Finding
from .reconcile import MediaDemographics, demographics_of
from .report import InstanceEntry, MediaReport, PatientEntry, SeriesEntry, StudyEntry


class Level(StrEnum):
    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"


@dataclass(frozen=True, slots=True)
class SelectionItem:
    """One selected patient, study or series; ``ref`` is an index or an identifier."""

    level: Level
    ref: str


@dataclass(frozen=True, slots=True)
class Selection:
    """The operator's choice (empty by default: nothing is imported)."""

    items: tuple[SelectionItem, ...] = ()

    @classmethod
    def of(
        cls,
        *,
        patients: Iterable[str] = (),
        studies: Iterable[str] = (),
        series: Iterable[str] = (),
    ) -> Selection:
        items = [SelectionItem(Level.PATIENT, r) for r in patients]
        items += [SelectionItem(Level.STUDY, r) for r in studies]
        items += [SelectionItem(Level.SERIES, r) for r in series]
        return cls(tuple(items))

    @classmethod
    def parse(cls, specs: Iterable[str]) -> Selection:
        """Parse CLI-style specs: ``patient:1``, ``study:1.2.3.4``, ``series:1.1.2``.

        A bare index (``"1"``, ``"1.2"``, ``"1.2.3"``) selects by its depth.
        """
        items: list[SelectionItem] = []
        for raw in specs:
            spec = raw.strip()
            if ":" in spec:
                level_text, ref = spec.split(":", 1)
                try:
                    level = Level(level_text.strip().lower())
                except ValueError:
                    raise InvalidInputError(
                        f"unknown selection level {level_text!r} (patient, study or series)"
                    ) from None
                items.append(SelectionItem(level, ref.strip()))
            elif _is_index(spec) and spec.count(".") <= 2:
                level = (Level.PATIENT, Level.STUDY, Level.SERIES)[spec.count(".")]
                items.append(SelectionItem(level, spec))
            else:
                raise InvalidInputError(
                    f"cannot understand the selection {spec!r}; use patient:, study: or series:"
                )
        return cls(tuple(items))

    @property
    def is_empty(self) -> bool:
        return not self.items


def _is_index(ref: str) -> bool:
    parts = ref.split(".")
    return all(p.isdigit() and len(p) <= 6 and not p.startswith("0") for p in parts)


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """One instance file to import, with what inspection saw of it."""

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_index: str
    size: int | None
    #: SHA-256 at inspection; the importer refuses the file if it changed since.
    expected_sha256: str | None


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Something not imported: a file, a series, or a never-imported entry."""

    what: str
    reason: str
    #: How many instances this exclusion covers (a whole series counts all).
    instances: int = 1


@dataclass(slots=True)
class ImportPlan:
    """Files to import and everything excluded, with reasons (import record)."""

    files: list[PlannedFile] = field(default_factory=list)
    excluded: list[Exclusion] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    #: Indices of the patients whose instances are in ``files``.
    patients: list[str] = field(default_factory=list)
    #: Demographics of those patients as shown in the report (checked at import).
    demographics: dict[str, MediaDemographics] = field(default_factory=dict)
    #: The inspection's conformance findings, carried into the import record.
    findings: list[Finding] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.files

    def to_dict(self) -> dict[str, object]:
        return {
            "selection": [f"{i.level.value}:{i.ref}" for i in self.selection.items],
            "files": [
                {
                    "path": f.path,
                    "sop_instance_uid": f.sop_instance_uid,
                    "sha256": f.expected_sha256,
                }
                for f in self.files
            ],
            "excluded": [
                {"what": e.what, "reason": e.reason, "instances": e.instances}
                for e in self.excluded
            ],
        }


def _match(
    item: SelectionItem, patient: PatientEntry, study: StudyEntry | None, series: SeriesEntry | None
) -> bool:
    if item.level is Level.PATIENT:
        return item.ref == patient.index or (
            not _is_index(item.ref) and bool(patient.patient_id) and item.ref == patient.patient_id
        )
    if item.level is Level.STUDY:
        return study is not None and item.ref in (study.index, study.study_instance_uid)
    return series is not None and item.ref in (series.index, series.series_instance_uid)


def plan_import(report: MediaReport, selection: Selection) -> ImportPlan:
    """Decide which files to import for ``selection`` (pure; R-PDI-3).

    Every selection item must match something in the report, otherwise
    :class:`~pki.errors.InvalidInputError` names it: a typo must never import
    nothing silently or something else.  Instances that cannot be imported
    (missing, malformed, refused, too large) are excluded with their reason;
    so are series that were not selected and everything never imported
    (programs, autorun files, viewers, links: R-PDI-2).
    """
    plan = ImportPlan(selection=selection, findings=list(report.findings))
    used = {item: False for item in selection.items}
    seen_uids: dict[str, str] = {}
    for patient in report.patients:
        patient_hit = _hits(selection, used, patient, None, None)
        for study in patient.studies:
            study_hit = patient_hit or _hits(selection, used, patient, study, None)
            for series in study.series:
                chosen = study_hit or _hits(selection, used, patient, study, series)
                if not chosen:
                    plan.excluded.append(
                        Exclusion(f"series {series.index}", "not selected", series.number_of_images)
                    )
                    continue
                for inst in series.instances:
                    reason = _not_importable(inst, seen_uids)
                    if reason is not None:
                        plan.excluded.append(
                            Exclusion(inst.path or inst.file_id or inst.sop_instance_uid, reason)
                        )
                        continue
                    assert inst.path is not None
                    seen_uids[inst.sop_instance_uid] = inst.path
                    plan.files.append(
                        PlannedFile(
                            path=inst.path,
                            sop_instance_uid=inst.sop_instance_uid,
                            sop_class_uid=inst.sop_class_uid,
                            study_instance_uid=study.study_instance_uid,
                            series_instance_uid=series.series_instance_uid,
                            patient_index=patient.index,
                            size=inst.size,
                            expected_sha256=inst.sha256,
                        )
                    )
                    if patient.index not in plan.patients:
                        plan.patients.append(patient.index)
                        plan.demographics[patient.index] = demographics_of(patient)
    unknown = [item for item, hit in used.items() if not hit]
    if unknown:
        item = unknown[0]
        raise InvalidInputError(f"the selection {item.level.value}:{item.ref} matches nothing")
    for path in report.never_imported:
        plan.excluded.append(Exclusion(path, "never imported: program, autorun, viewer or link", 0))
    return plan


def _hits(
    selection: Selection,
    used: dict[SelectionItem, bool],
    patient: PatientEntry,
    study: StudyEntry | None,
    series: SeriesEntry | None,
) -> bool:
    hit = False
    for item in selection.items:
        level_ok = (
            (item.level is Level.PATIENT and study is None)
            or (item.level is Level.STUDY and study is not None and series is None)
            or (item.level is Level.SERIES and series is not None)
        )
        if level_ok and _match(item, patient, study, series):
            used[item] = True
            hit = True
    return hit


def _not_importable(inst: InstanceEntry, seen_uids: dict[str, str]) -> str | None:
    if not inst.importable:
        return f"{inst.status.value}: {inst.problem or 'cannot be imported'}"
    if inst.sop_instance_uid in seen_uids:
        return f"same SOP Instance UID as {seen_uids[inst.sop_instance_uid]}"
    return None
