"""Patient reconciliation and importer responsibility (R-PDI-4, R-PDI-5).

Implements the Importer side of IHE RAD TF Import Reconciliation Workflow
(IRWF.b, RAD TF-2 4.66 / RAD TF-3 4.61 for PDI import):

* Patient ID (0010,0020) and Issuer of Patient ID (0010,0021) become the
  local ones; the medium's values go into Other Patient IDs Sequence
  (0010,1002) with Type of Patient ID (0010,0022) ``TEXT`` (PS3.3 C.7.1.1);
* demographics are coerced to the local record when it gives them; the
  hospital's accession number replaces the medium's when given;
* every coerced attribute's previous value is kept in one new item of
  Original Attributes Sequence (0400,0561) with Modified Attributes Sequence
  (0400,0550), Attribute Modification DateTime, Modifying System, Source of
  Previous Values and Reason ``COERCE`` (PS3.3 C.12.1, Table C.12-1, and
  C.12.1.1.9); an attribute that was absent is recorded with zero length;
* a Contributing Equipment Sequence (0018,A001) item names the importer as
  responsible party: Purpose of Reference (MEDIM, DCM, "Portable Media
  Importer Equipment", CID 7005), Manufacturer, Institution, Station,
  Operators' Name, Operator Identification, Contribution DateTime and
  Description (PS3.3 C.12.1); Instance Origin Status (0400,0600) = IMPORTED.

UIDs are never changed.

Character sets: the instance keeps its Specific Character Set and every value
Sekisho did not change keeps its stored bytes (they are copied raw, also into
the Original Attributes and Other Patient IDs items).  Values written by
Sekisho must fit that character set (PS3.5 §7.5 does not allow a Specific
Character Set inside these items): local patient IDs and issuers must be ASCII
(:class:`LocalPatient` refuses others); a local name that does not fit is
written as its alphabetic group alone, and if even that does not fit the
medium's name is kept and a note says so; the operator's name falls back to the
alphabetic group, then to the operator ID; institution and station names that
do not fit use their configured ASCII alternative or are left out, with a note.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag

from pki.errors import InvalidInputError, ReconciliationError

from .charset import (
    alphabetic_group,
    best_person_name,
    charset_terms,
    decode_person_name,
    python_encodings,
    raw_value,
    representable,
)
from .names import names_agree
from .settings import StationInfo

PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
ISSUER_OF_PATIENT_ID = 0x00100021
ISSUER_QUALIFIERS = 0x00100024
BIRTH_DATE = 0x00100030
SEX = 0x00100040
ACCESSION_NUMBER = 0x00080050
ISSUER_OF_ACCESSION = 0x00080051
INSTITUTION_NAME = 0x00080080
INSTANCE_ORIGIN_STATUS = 0x04000600
SOURCE_OF_PREVIOUS = BaseTag(0x04000564)
SPECIFIC_CHARACTER_SET = 0x00080005
OTHER_PATIENT_IDS = 0x00101002
ORIGINAL_ATTRIBUTES = 0x04000561
CONTRIBUTING_EQUIPMENT = 0x0018A001

#: Every top-level attribute that :func:`reconcile_instance` and
#: :func:`compare_demographics` read or write.  Their outcome for a data set
#: depends on these elements alone, so the importer hands them only these
#: (see :mod:`media.splice`) and reuses the outcome for every instance whose
#: elements are byte-identical.  Keep this in step with the code below.
RECONCILED_TAGS = frozenset({
    SPECIFIC_CHARACTER_SET, ACCESSION_NUMBER, ISSUER_OF_ACCESSION, INSTITUTION_NAME, PATIENT_NAME,
    PATIENT_ID, ISSUER_OF_PATIENT_ID, ISSUER_QUALIFIERS, BIRTH_DATE, SEX, OTHER_PATIENT_IDS,
    CONTRIBUTING_EQUIPMENT, ORIGINAL_ATTRIBUTES, INSTANCE_ORIGIN_STATUS,
})  # fmt: skip

#: CID 7005 Contributing Equipment Purposes of Reference.
MEDIM = ("MEDIM", "DCM", "Portable Media Importer Equipment")

_LO_SAFE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,64}")


@dataclass(frozen=True, slots=True)
class LocalPatient:
    """The hospital's patient the medium is attached to.

    ``patient_id`` and ``issuer_of_patient_id`` must be printable ASCII without
    backslash (LO, at most 64 characters), so they fit every character set.
    ``name`` is a PN value (``Yamada^Tarou=山田^太郎=やまだ^たろう``); ``birth_date`` is
    YYYYMMDD and ``sex`` one of M, F, O.  Absent demographics are not coerced.
    """

    patient_id: str
    issuer_of_patient_id: str = ""
    name: str | None = None
    birth_date: str | None = None
    sex: str | None = None

    def __post_init__(self) -> None:
        if not _LO_SAFE.fullmatch(self.patient_id or ""):
            raise InvalidInputError(
                "the local patient ID must be 1-64 printable ASCII characters without '\\'"
            )
        if self.issuer_of_patient_id and not _LO_SAFE.fullmatch(self.issuer_of_patient_id):
            raise InvalidInputError(
                "the issuer of the local patient ID must be printable ASCII without '\\'"
            )
        if self.birth_date is not None and not re.fullmatch(r"\d{8}", self.birth_date):
            raise InvalidInputError("the local birth date must be YYYYMMDD")
        if self.sex is not None and self.sex not in ("M", "F", "O"):
            raise InvalidInputError("the local sex must be M, F or O")


@dataclass(frozen=True, slots=True)
class Operator:
    """The staff member who imports: the responsible party (R-PDI-5)."""

    operator_id: str
    #: PN value, e.g. ``Uketsuke^Hanako=受付^花子``.
    name: str

    def __post_init__(self) -> None:
        if not _LO_SAFE.fullmatch(self.operator_id or "") or len(self.operator_id) > 16:
            raise InvalidInputError("the operator ID must be 1-16 printable ASCII characters")
        if not self.name.strip():
            raise InvalidInputError("the operator's name must not be empty")


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A demographic field that differs between the medium and the local record."""

    field: str
    media_value: str
    local_value: str


@dataclass(frozen=True, slots=True)
class MediaDemographics:
    """Name (decoded PN), birth date and sex as found on the medium."""

    name: str
    birth_date: str
    sex: str


def demographics_of(obj: Any) -> MediaDemographics:
    """Demographics from a report patient, an instance header or a dataset."""
    if isinstance(obj, MediaDemographics):
        return obj
    if isinstance(obj, Dataset):
        return MediaDemographics(
            decode_person_name(raw_value(obj, PATIENT_NAME), charset_terms(obj)),
            str(obj.get("PatientBirthDate", "") or ""),
            str(obj.get("PatientSex", "") or ""),
        )
    if hasattr(obj, "name_raw"):  # report.PatientEntry
        return MediaDemographics(obj.name, obj.birth_date, obj.sex)
    if hasattr(obj, "patient_name_raw"):  # dicomfile.HeaderInfo
        return MediaDemographics(
            decode_person_name(obj.patient_name_raw, obj.character_set),
            obj.patient_birth_date,
            obj.patient_sex,
        )
    raise TypeError(f"cannot read demographics from {type(obj).__name__}")


def compare_demographics(media_patient: Any, local_patient: LocalPatient) -> list[Mismatch]:
    """Fields where the medium disagrees with the local record (R-PDI-4).

    Names are compared script by script (see :mod:`media.names`); a name that
    shares no script with the local one cannot be verified and counts as a
    mismatch.  A value missing on either side is not a mismatch.
    """
    media = demographics_of(media_patient)
    out: list[Mismatch] = []
    if local_patient.name and media.name:
        if names_agree(media.name, local_patient.name) is not True:
            out.append(Mismatch("name", media.name, local_patient.name))
    if local_patient.birth_date and media.birth_date:
        if re.sub(r"\D", "", media.birth_date) != local_patient.birth_date:
            out.append(Mismatch("birth_date", media.birth_date, local_patient.birth_date))
    if local_patient.sex and media.sex:
        if media.sex.strip().upper() != local_patient.sex:
            out.append(Mismatch("sex", media.sex, local_patient.sex))
    return out


def require_confirmation(mismatches: Sequence[Mismatch], *, confirm: bool) -> None:
    """Raise :class:`ReconciliationError` naming the fields unless ``confirm`` is set."""
    if mismatches and not confirm:
        fields = ", ".join(sorted({m.field.replace("_", " ") for m in mismatches}))
        raise ReconciliationError(
            f"the patient's {fields} on the medium differ from the local record; "
            "an explicit confirmation is needed to import"
        )


def check_demographics(
    media_patient: Any, local_patient: LocalPatient, *, confirm: bool = False
) -> list[Mismatch]:
    """:func:`compare_demographics` then :func:`require_confirmation`; returns the mismatches."""
    mismatches = compare_demographics(media_patient, local_patient)
    require_confirmation(mismatches, confirm=confirm)
    return mismatches


@dataclass(slots=True)
class Reconciled:
    """The coerced dataset and what was done to it."""

    dataset: Dataset
    coerced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def format_dt(now: datetime) -> str:
    """DICOM DT (PS3.5 Table 6.2-1), with the UTC offset when ``now`` is aware."""
    text = now.strftime("%Y%m%d%H%M%S.%f")
    offset = now.strftime("%z")
    return text + offset


def _copy(ds: Dataset, tag: int) -> DataElement | RawDataElement | None:
    """The element as stored (raw bytes kept), or ``None`` when absent."""
    if tag not in ds:
        return None
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return elem
    return copy.deepcopy(elem)


def _empty(tag: int) -> DataElement:
    vr = dictionary_VR(tag)
    return DataElement(tag, vr, DicomSequence() if vr == "SQ" else None)


def _raw_text(ds: Dataset, tag: int) -> str:
    return raw_value(ds, tag).decode("latin-1").strip(" \x00")


class _Coercer:
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.terms = charset_terms(ds)
        self.encodings = python_encodings(self.terms)
        self.originals = Dataset(parent_encoding=self.encodings)
        self.result = Reconciled(ds)

    def _remember(self, tag: int) -> None:
        if tag in self.originals:
            return
        old = _copy(self.ds, tag)
        self.originals[tag] = old if old is not None else _empty(tag)

    def set(self, tag: int, keyword: str, value: Any) -> None:
        self._remember(tag)
        setattr(self.ds, keyword, value)
        self.result.coerced.append(keyword)

    def remove(self, tag: int, keyword: str) -> None:
        if tag in self.ds:
            self._remember(tag)
            del self.ds[tag]
            self.result.coerced.append(keyword)


def validate_accession_number(accession_number: str | None) -> None:
    """The hospital's accession number must be SH-compatible ASCII (at most 16)."""
    if accession_number is not None and not re.fullmatch(
        r"[\x20-\x5b\x5d-\x7e]{0,16}", accession_number
    ):
        raise InvalidInputError("the accession number must be at most 16 ASCII characters")


def reconcile_instance(
    dataset: Dataset,
    target: LocalPatient,
    *,
    importer: Operator,
    station: StationInfo,
    now: datetime,
    accession_number: str | None = None,
) -> Reconciled:
    """Coerce ``dataset`` in place (IRWF.b) and add the importer's responsibility.

    Returns the dataset with the list of coerced attributes and notes about
    values that could not be written in the instance's character set.
    """
    validate_accession_number(accession_number)
    c = _Coercer(dataset)
    media_id_elem = _copy(dataset, PATIENT_ID)
    media_issuer_elem = _copy(dataset, ISSUER_OF_PATIENT_ID)
    media_qualifiers = _copy(dataset, ISSUER_QUALIFIERS)
    media_id = _raw_text(dataset, PATIENT_ID)
    media_issuer = _raw_text(dataset, ISSUER_OF_PATIENT_ID)
    id_changes = media_id != target.patient_id or media_issuer != target.issuer_of_patient_id

    if media_id != target.patient_id:
        c.set(PATIENT_ID, "PatientID", target.patient_id)
    if target.issuer_of_patient_id and media_issuer != target.issuer_of_patient_id:
        c.set(ISSUER_OF_PATIENT_ID, "IssuerOfPatientID", target.issuer_of_patient_id)
    elif not target.issuer_of_patient_id:
        c.remove(ISSUER_OF_PATIENT_ID, "IssuerOfPatientID")
    if id_changes:
        c.remove(ISSUER_QUALIFIERS, "IssuerOfPatientIDQualifiersSequence")
    _coerce_demographics(c, target)
    if accession_number is not None and _raw_text(dataset, ACCESSION_NUMBER) != accession_number:
        c.set(ACCESSION_NUMBER, "AccessionNumber", accession_number)
        c.remove(ISSUER_OF_ACCESSION, "IssuerOfAccessionNumberSequence")

    if id_changes and media_id:
        _add_other_patient_id(c, media_id_elem, media_issuer_elem, media_qualifiers)
    if INSTANCE_ORIGIN_STATUS in dataset and _raw_text(dataset, INSTANCE_ORIGIN_STATUS) != (
        "IMPORTED"
    ):
        c.set(INSTANCE_ORIGIN_STATUS, "InstanceOriginStatus", "IMPORTED")
    if len(c.originals):
        _add_original_attributes(c, station, now)
    _add_contributing_equipment(c, importer, station, now)
    dataset.InstanceOriginStatus = "IMPORTED"
    return c.result


def reconcile(
    dataset: Dataset,
    target: LocalPatient,
    *,
    importer: Operator,
    station: StationInfo,
    now: datetime,
    accession_number: str | None = None,
) -> Dataset:
    """Reconcile ``dataset`` in place and return it (see :func:`reconcile_instance`)."""
    return reconcile_instance(
        dataset,
        target,
        importer=importer,
        station=station,
        now=now,
        accession_number=accession_number,
    ).dataset


def _coerce_demographics(c: _Coercer, target: LocalPatient) -> None:
    ds = c.ds
    current = decode_person_name(raw_value(ds, PATIENT_NAME), c.terms)
    if target.name and names_agree(current, target.name) is not True:
        chosen = best_person_name(target.name, c.terms)
        if chosen is None:
            c.result.notes.append(
                "The local patient name cannot be written in this instance's character set; "
                "the name from the medium was kept."
            )
        elif chosen != current:
            if chosen != target.name:
                c.result.notes.append(
                    "Only the alphabetic part of the local patient name fits this instance's "
                    "character set; it was written alone."
                )
            c.set(PATIENT_NAME, "PatientName", chosen)
    if target.birth_date and _raw_text(ds, BIRTH_DATE) != target.birth_date:
        c.set(BIRTH_DATE, "PatientBirthDate", target.birth_date)
    if target.sex and _raw_text(ds, SEX) != target.sex:
        c.set(SEX, "PatientSex", target.sex)


def _add_other_patient_id(
    c: _Coercer,
    id_elem: DataElement | RawDataElement | None,
    issuer_elem: DataElement | RawDataElement | None,
    qualifiers: DataElement | RawDataElement | None,
) -> None:
    """Append the medium's identifier to Other Patient IDs Sequence (PS3.3 C.7.1.1)."""
    ds = c.ds
    item = Dataset(parent_encoding=c.encodings)
    if id_elem is not None:
        item[PATIENT_ID] = id_elem
    if issuer_elem is not None:
        item[ISSUER_OF_PATIENT_ID] = issuer_elem
    item.TypeOfPatientID = "TEXT"
    if qualifiers is not None:
        item[ISSUER_QUALIFIERS] = qualifiers
    if "OtherPatientIDsSequence" not in ds:
        ds.OtherPatientIDsSequence = DicomSequence()
    ds.OtherPatientIDsSequence.append(item)


def _add_original_attributes(c: _Coercer, station: StationInfo, now: datetime) -> None:
    """One Original Attributes Sequence item for this coercion (PS3.3 C.12.1.1.9)."""
    ds = c.ds
    item = Dataset(parent_encoding=c.encodings)
    item.ModifiedAttributesSequence = DicomSequence([c.originals])
    item.AttributeModificationDateTime = format_dt(now)
    item.ModifyingSystem = (
        station.modifying_system if representable(station.modifying_system, c.terms) else "SEKISHO"
    )
    source = _copy(ds, INSTITUTION_NAME)
    if isinstance(source, RawDataElement):
        item[SOURCE_OF_PREVIOUS] = source._replace(tag=SOURCE_OF_PREVIOUS)
    elif source is not None:
        item.SourceOfPreviousValues = str(source.value or "")
    else:
        item.SourceOfPreviousValues = ""
    item.ReasonForTheAttributeModification = "COERCE"
    if "OriginalAttributesSequence" not in ds:
        ds.OriginalAttributesSequence = DicomSequence()
    ds.OriginalAttributesSequence.append(item)


def _fitting(c: _Coercer, label: str, *candidates: str) -> str | None:
    for value in candidates:
        if value and representable(value, c.terms):
            return value
    if any(candidates):
        c.result.notes.append(
            f"The configured {label} cannot be written in this instance's character set; "
            "it was left out of the Contributing Equipment item."
        )
    return None


def _add_contributing_equipment(
    c: _Coercer, importer: Operator, station: StationInfo, now: datetime
) -> None:
    """Contributing Equipment item naming the importer (PS3.3 C.12.1, R-PDI-5)."""
    item = Dataset(parent_encoding=c.encodings)
    code = Dataset(parent_encoding=c.encodings)
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = MEDIM
    item.PurposeOfReferenceCodeSequence = DicomSequence([code])
    item.Manufacturer = _fitting(c, "manufacturer", station.manufacturer) or "Sekisho"
    institution = _fitting(
        c, "institution name", station.institution_name, station.institution_name_alphabetic
    )
    if institution:
        item.InstitutionName = institution
    department = _fitting(c, "department name", station.institutional_department_name)
    if department:
        item.InstitutionalDepartmentName = department
    station_name = _fitting(c, "station name", station.station_name)
    if station_name:
        item.StationName = station_name[:16]
    model = _fitting(c, "model name", station.manufacturer_model_name)
    if model:
        item.ManufacturerModelName = model
    if station.device_serial_number and representable(station.device_serial_number, c.terms):
        item.DeviceSerialNumber = station.device_serial_number
    if station.software_versions and representable(station.software_versions, c.terms):
        item.SoftwareVersions = station.software_versions
    name = best_person_name(importer.name, c.terms)
    if name is None:
        c.result.notes.append(
            "The operator's name cannot be written in this instance's character set; "
            "the operator ID was written as the name."
        )
        name = importer.operator_id
    item.OperatorsName = name
    person = Dataset(parent_encoding=c.encodings)
    person_code = Dataset(parent_encoding=c.encodings)
    person_code.CodeValue = importer.operator_id
    person_code.CodingSchemeDesignator = station.operator_coding_scheme
    alpha = alphabetic_group(importer.name)
    person_code.CodeMeaning = (
        alpha if alpha and representable(alpha, c.terms) else importer.operator_id
    )
    person.PersonIdentificationCodeSequence = DicomSequence([person_code])
    if institution:
        person.InstitutionName = institution
    item.OperatorIdentificationSequence = DicomSequence([person])
    item.ContributionDateTime = format_dt(now)
    item.ContributionDescription = (
        "Imported from portable media (IHE PDI); patient identity reconciled (IHE IRWF)"
    )
    ds = c.ds
    if "ContributingEquipmentSequence" not in ds:
        ds.ContributingEquipmentSequence = DicomSequence()
    ds.ContributingEquipmentSequence.append(item)
