"""Reading the index attributes of a received instance (PS3.10 file format).

``index_instance`` checks that a staged file is a complete DICOM Part 10 file
and extracts what the metadata store indexes.  It reads element headers only
(values above 1 KiB are deferred), so memory does not grow with pixel data,
and it refuses files whose declared element lengths run past the end of the
file (truncated uploads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import PersonName

from pki.errors import InvalidInputError


class MissingAttributeError(InvalidInputError):
    """A required identifying attribute is missing from an instance."""

    code = "MISSING_ATTRIBUTE"


class TruncatedInstanceError(InvalidInputError):
    """The instance ends before its last element does."""

    code = "TRUNCATED"


@dataclass(frozen=True)
class InstanceIndex:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession: str
    study_description: str
    referring: str
    modality: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    specific_character_set: str


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _check_complete(path: Path, ds: Dataset) -> None:
    size = path.stat().st_size
    end = 0
    for elem in ds._dict.values():  # raw elements keep their file offsets
        tell = getattr(elem, "value_tell", None)
        length = getattr(elem, "length", None)
        if tell is None or length in (None, 0xFFFFFFFF):
            continue
        end = max(end, tell + length)
    if end > size:
        raise TruncatedInstanceError(
            f"instance is truncated: its data elements need {end} bytes but only {size} arrived"
        )


def index_instance(path: Path) -> InstanceIndex:
    """Validate a Part 10 file and return its index attributes."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, EOFError) as exc:
        raise InvalidInputError(f"not a DICOM Part 10 file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInputError(f"malformed DICOM data: {type(exc).__name__}") from exc
    _check_complete(path, ds)
    return index_dataset(ds)


def index_dataset(ds: Dataset) -> InstanceIndex:
    """The index attributes of a parsed Part 10 data set (file meta included), validated.

    ``index_instance`` calls it once the file is known to be complete; the
    DIMSE receiver calls it on the data set's leading bytes while the rest
    is still arriving (``gateway.dimse.ingest``).
    """
    meta = ds.file_meta
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        raise MissingAttributeError("file meta information lacks the Transfer Syntax UID")
    try:
        values = {
            "sop_class_uid": _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID"),
            "sop_instance_uid": _text(ds, "SOPInstanceUID"),
            "study_uid": _text(ds, "StudyInstanceUID"),
            "series_uid": _text(ds, "SeriesInstanceUID"),
        }
        for key, label in (
            ("sop_class_uid", "SOP Class UID"),
            ("sop_instance_uid", "SOP Instance UID"),
            ("study_uid", "Study Instance UID"),
            ("series_uid", "Series Instance UID"),
        ):
            if not values[key]:
                raise MissingAttributeError(f"instance has no {label}")
            if len(values[key]) > 64 or not all(c in "0123456789." for c in values[key]):
                raise InvalidInputError(f"instance has an invalid {label}")
        meta_uid = _text(meta, "MediaStorageSOPInstanceUID")
        if meta_uid and meta_uid != values["sop_instance_uid"]:
            raise InvalidInputError(
                "Media Storage SOP Instance UID does not match the SOP Instance UID"
            )
        return InstanceIndex(
            transfer_syntax=ts,
            patient_id=_text(ds, "PatientID"),
            issuer=_text(ds, "IssuerOfPatientID"),
            patient_name=_text(ds, "PatientName"),
            birth_date=_text(ds, "PatientBirthDate"),
            sex=_text(ds, "PatientSex"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
            accession=_text(ds, "AccessionNumber"),
            study_description=_text(ds, "StudyDescription"),
            referring=_text(ds, "ReferringPhysicianName"),
            modality=_text(ds, "Modality"),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            instance_number=_int(ds, "InstanceNumber"),
            specific_character_set=_text(ds, "SpecificCharacterSet"),
            **values,
        )
    except InvalidInputError:
        raise
    except Exception as exc:  # decoding errors in malformed values
        raise InvalidInputError(f"malformed DICOM attribute values: {type(exc).__name__}") from exc
