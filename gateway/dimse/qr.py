"""Query/Retrieve identifiers mapped onto the consent-filtered store (PS3.4 Annex C; R-XCH-2).

Patient Root and Study Root information models (PS3.4 C.6.1, C.6.2) at the
PATIENT (Patient Root only), STUDY, SERIES and IMAGE levels.  Matching uses
the same store queries as QIDO-RS with the partner's
:class:`~gateway.store.model.Visibility`, so the consent condition is part of
the SQL: an unshared patient is never matched, counted or retrieved.

Matching (PS3.4 C.2.2.2): single value, wildcard (``*`` and ``?``) on string
keys, UID lists, and date/time ranges.  Keys Sekisho does not index are
return keys (PS3.4 C.2.2.1.2: answered with zero length); keys not understood
never widen a result beyond what consent allows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from gateway.store.model import StoredInstance, StudyFilter, Visibility
from pki.errors import InvalidInputError

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
FIND_MODELS = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)
RETRIEVE_MODELS = (PATIENT_ROOT_MOVE, PATIENT_ROOT_GET, STUDY_ROOT_MOVE, STUDY_ROOT_GET)
_PATIENT_ROOT = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})

#: C-MOVE and C-GET responses count sub-operations in US elements (PS3.7 9.3.3/9.3.4).
MAX_SUBOPERATIONS = 65535

#: Keys matched in SQL (StudyFilter fields), per keyword.
_SQL_KEYS = {
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "StudyDate": "study_date",
    "AccessionNumber": "accession",
    "ModalitiesInStudy": "modality",
    "Modality": "modality",
    "StudyInstanceUID": "study_uids",
    "SeriesInstanceUID": "series_uids",
    "SOPInstanceUID": "sop_uids",
}
_NOT_RETURNED = {"QueryRetrieveLevel", "SpecificCharacterSet"}

Row = dict[str, Any]


def _row_value(column: str) -> Callable[[Row], Any]:
    return lambda row: row.get(column)


def _split(column: str) -> Callable[[Row], Any]:
    return lambda row: [v for v in str(row.get(column) or "").split(",") if v] or None


_COMMON: dict[str, Callable[[Row], Any]] = {
    "PatientID": _row_value("patient_id"),
    "IssuerOfPatientID": _row_value("issuer"),
    "PatientName": _row_value("patient_name"),
    "PatientBirthDate": _row_value("birth_date"),
    "PatientSex": _row_value("sex"),
    "StudyInstanceUID": _row_value("study_uid"),
    "StudyDate": _row_value("study_date"),
    "AccessionNumber": _row_value("accession"),
}
#: Row column per attribute keyword, per level (the store's query rows).
_ATTRIBUTES: dict[str, dict[str, Callable[[Row], Any]]] = {
    "PATIENT": {
        **_COMMON,
        "NumberOfPatientRelatedStudies": _row_value("n_studies"),
        "NumberOfPatientRelatedSeries": _row_value("n_series"),
        "NumberOfPatientRelatedInstances": _row_value("n_instances"),
    },
    "STUDY": {
        **_COMMON,
        "StudyTime": _row_value("study_time"),
        "StudyDescription": _row_value("description"),
        "ReferringPhysicianName": _row_value("referring"),
        "ModalitiesInStudy": _split("modalities"),
        "NumberOfStudyRelatedSeries": _row_value("n_series"),
        "NumberOfStudyRelatedInstances": _row_value("n_instances"),
    },
    "SERIES": {
        **_COMMON,
        "SeriesInstanceUID": _row_value("series_uid"),
        "Modality": _row_value("modality"),
        "SeriesNumber": _row_value("series_number"),
        "SeriesDescription": _row_value("description"),
        "NumberOfSeriesRelatedInstances": _row_value("n_instances"),
    },
    "IMAGE": {
        **_COMMON,
        "SeriesInstanceUID": _row_value("series_uid"),
        "Modality": _row_value("modality"),
        "SOPInstanceUID": _row_value("sop_uid"),
        "SOPClassUID": _row_value("sop_class_uid"),
        "InstanceNumber": _row_value("instance_number"),
    },
}


@dataclass(frozen=True)
class FindQuery:
    """A parsed C-FIND identifier."""

    level: str
    flt: StudyFilter
    #: (keyword, value) matching keys checked on the result rows.
    post: tuple[tuple[str, str], ...] = ()
    #: Matching keys as text, for the audit record (ParticipantObjectQuery).
    text: str = ""
    requested: tuple[Any, ...] = field(default_factory=tuple)


def is_patient_root(sop_class_uid: str) -> bool:
    return str(sop_class_uid) in _PATIENT_ROOT


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    return str(value).strip()


def _level(identifier: Dataset, patient_root: bool) -> str:
    level = _text(identifier.get("QueryRetrieveLevel")).upper()
    allowed = ("PATIENT", "STUDY", "SERIES", "IMAGE") if patient_root else (
        "STUDY", "SERIES", "IMAGE"
    )
    if level not in allowed:
        raise InvalidInputError(f"Query/Retrieve Level {level!r} is not valid for this model")
    return level


def parse_find(identifier: Dataset, sop_class_uid: str, limit: int) -> FindQuery:
    """Matching keys of a C-FIND identifier (PS3.4 C.4.1.1.3.1)."""
    level = _level(identifier, is_patient_root(sop_class_uid))
    values: dict[str, Any] = {"limit": limit}
    post: list[tuple[str, str]] = []
    text: list[str] = [f"QueryRetrieveLevel={level}"]
    for elem in identifier:
        keyword = elem.keyword
        if keyword in _NOT_RETURNED or elem.VR == "SQ":
            continue
        try:
            value = _text(elem.value)
        except Exception as exc:  # malformed values in the identifier
            raise InvalidInputError(f"cannot read the value of {keyword or elem.tag}") from exc
        if not value or value == "*":
            continue  # universal matching
        text.append(f"{keyword}={value}")
        column = _SQL_KEYS.get(keyword)
        if keyword == "ModalitiesInStudy" and level != "STUDY":
            column = None
        if column is None:
            if keyword in _ATTRIBUTES[level]:
                post.append((keyword, value))
            continue
        if column.endswith("_uids"):
            values[column] = tuple(u.strip() for u in value.split("\\") if u.strip())
        elif column == "modality":
            values[column] = value.split("\\")[0]
        else:
            values[column] = value
    return FindQuery(level, StudyFilter(**values), tuple(post), "; ".join(text)[:1000],
                     tuple(identifier))


def _matches(pattern: str, value: Any, vr: str) -> bool:
    """One value against one matching key (PS3.4 C.2.2.2.1-5)."""
    got = _text(value)
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        lo, _, hi = pattern.partition("-")
        return (not lo or got >= lo) and (not hi or got <= hi)
    if vr == "UI":
        return got in pattern.split("\\")
    if "*" in pattern or "?" in pattern:
        import fnmatch

        return fnmatch.fnmatchcase(got, pattern.replace("[", "[[]"))
    if vr in ("IS", "DS", "US", "UL", "SS", "SL"):
        try:
            return float(got) == float(pattern)
        except ValueError:
            return False
    return got == pattern


def run_find(store: Any, query: FindQuery, vis: Visibility) -> list[Row]:
    """The consent-filtered rows matching ``query`` (R-XCH-2)."""
    flt = query.flt
    if query.level == "PATIENT":
        rows = _patients(store.query_studies(flt, vis))
    elif query.level == "STUDY":
        rows = store.query_studies(flt, vis)
    elif query.level == "SERIES":
        rows = store.query_series(None, flt, vis)
    else:
        # The store matches series below the study level only as a path parameter.
        series = flt.series_uids[0] if len(flt.series_uids) == 1 else None
        rows = store.query_instances(None, series, flt, vis)
        if flt.series_uids:
            rows = [r for r in rows if r["series_uid"] in flt.series_uids]
    attributes = _ATTRIBUTES[query.level]
    out = []
    for row in rows:
        if all(
            _matches(pattern, attributes[kw](row), _vr(kw)) for kw, pattern in query.post
        ):
            out.append(row)
    return out


def _vr(keyword: str) -> str:
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "LO"


def _patients(study_rows: Iterable[Row]) -> list[Row]:
    """Patient-level rows from study rows (consent already applied)."""
    patients: dict[tuple[str, str], Row] = {}
    for row in study_rows:
        key = (str(row["patient_id"]), str(row["issuer"]))
        p = patients.setdefault(
            key, {**row, "study_uid": None, "n_studies": 0, "n_series": 0, "n_instances": 0}
        )
        p["n_studies"] += 1
        p["n_series"] += int(row.get("n_series") or 0)
        p["n_instances"] += int(row.get("n_instances") or 0)
    return list(patients.values())


def find_response(query: FindQuery, row: Row, retrieve_ae: str) -> Dataset:
    """A C-FIND pending identifier: every requested key, ours or zero length (PS3.4 C.4.1.1.4)."""
    attributes = _ATTRIBUTES[query.level]
    ds = Dataset()
    needs_utf8 = False
    ds.QueryRetrieveLevel = query.level
    for elem in query.requested:
        keyword = elem.keyword
        if keyword in _NOT_RETURNED:
            continue
        if keyword == "RetrieveAETitle":
            value: Any = retrieve_ae
        elif keyword == "InstanceAvailability":
            value = "ONLINE"
        else:
            getter = attributes.get(keyword)
            value = getter(row) if getter else None
        if elem.VR == "SQ":
            ds.add_new(elem.tag, "SQ", [])
            continue
        if value in (None, ""):
            ds.add_new(elem.tag, elem.VR, None)
            continue
        if isinstance(value, str) and not value.isascii():
            needs_utf8 = True
        ds.add_new(elem.tag, elem.VR, value)
    if needs_utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def patients_in(rows: Iterable[Row]) -> dict[tuple[str, str], set[str]]:
    """(patient id, issuer) -> study UIDs of a result, for the audit trail."""
    out: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        studies = out.setdefault((str(row["patient_id"]), str(row["issuer"])), set())
        if row.get("study_uid"):
            studies.add(str(row["study_uid"]))
    return out


# -- retrieve ------------------------------------------------------------------
def _uids(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in _text(identifier.get(keyword)).split("\\") if u.strip())


def resolve_retrieve(store: Any, identifier: Dataset, sop_class_uid: str,
                     vis: Visibility) -> list[StoredInstance]:
    """The instances a C-MOVE/C-GET identifier names that the partner may see (PS3.4 C.4.2.2.1).

    Unique keys only (no wildcards); at most :data:`MAX_SUBOPERATIONS` + 1
    instances are returned so that the caller can refuse larger requests.
    """
    level = _level(identifier, is_patient_root(sop_class_uid))
    cap = MAX_SUBOPERATIONS + 1
    found: list[StoredInstance] = []
    if level == "PATIENT":
        pid = _text(identifier.get("PatientID"))
        if not pid or "*" in pid or "?" in pid:
            raise InvalidInputError("a PATIENT level retrieve needs one Patient ID")
        rows = store.query_studies(StudyFilter(patient_id=pid, limit=cap), vis)
        for row in rows:
            if str(row["patient_id"]) == pid:
                found.extend(store.instances_of(str(row["study_uid"]), None, None, vis))
    elif level == "STUDY":
        studies = _uids(identifier, "StudyInstanceUID")
        if not studies:
            raise InvalidInputError("a STUDY level retrieve needs Study Instance UIDs")
        for study in studies:
            found.extend(store.instances_of(study, None, None, vis))
    elif level == "SERIES":
        series = _uids(identifier, "SeriesInstanceUID")
        if not series:
            raise InvalidInputError("a SERIES level retrieve needs Series Instance UIDs")
        rows = store.query_series(None, StudyFilter(series_uids=series, limit=cap), vis)
        for row in rows:
            found.extend(
                store.instances_of(str(row["study_uid"]), str(row["series_uid"]), None, vis)
            )
    else:
        sops = _uids(identifier, "SOPInstanceUID")
        if not sops:
            raise InvalidInputError("an IMAGE level retrieve needs SOP Instance UIDs")
        rows = store.query_instances(None, None, StudyFilter(sop_uids=sops, limit=cap), vis)
        found.extend(_stored(row) for row in rows)
    return list(_unique(found))[:cap]


def _stored(row: Row) -> StoredInstance:
    return StoredInstance(
        sop_instance_uid=row["sop_uid"], sop_class_uid=row["sop_class_uid"],
        study_uid=row["study_uid"], series_uid=row["series_uid"],
        transfer_syntax=row["transfer_syntax"], sha256=row["sha256"], size=row["size"],
        patient_id=row["patient_id"], issuer=row["issuer"],
        instance_number=row.get("instance_number"), received_at=row.get("received_at", ""),
        source=row.get("source", ""),
    )


def _unique(items: Iterable[StoredInstance]) -> Iterator[StoredInstance]:
    seen: set[str] = set()
    for item in items:
        if item.sop_instance_uid not in seen:
            seen.add(item.sop_instance_uid)
            yield item
