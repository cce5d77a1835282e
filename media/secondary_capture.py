"""Secondary Capture building blocks shared by film and paper digitization (PS3.3 A.8).

:func:`base_dataset` fills the modules every SC IOD has: Patient (C.7.1.1),
General Study (C.7.2.1), General Series (C.7.3.1), General Equipment (C.7.5.1),
SC Equipment (C.8.6.1: Conversion Type DF or SD and the digitizer's identity),
General Image (C.7.6.1) and SOP Common (C.12.1) with one Contributing
Equipment item (Table C.12-1) whose Purpose of Reference is taken from PS3.16
CID 7005 "Contributing Equipment Purposes of Reference":

* ``(FILMD, DCM, "Film Digitizer")`` for digitized films (R-DIG-1);
* ``(DOCD, DCM, "Document Digitizer Equipment")`` for scanned paper.

The item names the operator (Operators' Name (0008,1070) and Operator
Identification Sequence (0008,1072)), the digitizer (Manufacturer, Model,
Device Serial Number, Software Versions), when (Contribution DateTime) and, in
Contribution Description (0018,A003), the information-creation manager
(情報作成管理者, seed 000 §5.2(1)①) and a bulk-digitization plan if any (R-DIG-5).

:func:`check_sc_iod` is the IOD check the gateway runs on its own output
before signing (DCMTK's ``dciodvfy`` is not packaged in Debian): Type 1
attributes present and non-empty, Type 2 present, the Type 1C ones whose
condition holds, and the Image Pixel constraints of the chosen SOP Class
(A.8.1.4, A.8.5.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

__all__ = [
    "DOCD",
    "FILMD",
    "MULTIFRAME_GRAYSCALE_WORD_SC",
    "SC_IMAGE",
    "Contribution",
    "PatientStudy",
    "SeriesInfo",
    "base_dataset",
    "check_sc_iod",
    "format_da",
    "format_dt",
    "format_tm",
]

#: PS3.16 CID 7005 codes (coding scheme DCM).
FILMD = ("FILMD", "DCM", "Film Digitizer")
DOCD = ("DOCD", "DCM", "Document Digitizer Equipment")
#: PS3.4 B.5 Standard SOP Classes.
SC_IMAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_GRAYSCALE_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")
#: PS3.3 C.8.6.1.1 Conversion Type defined terms.
CONVERSION_TYPES = frozenset({"DV", "DI", "DF", "WSD", "SD", "SI", "DRW", "SYN"})


def format_da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def format_tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S")


def format_dt(moment: datetime) -> str:
    """DT with the UTC offset (PS3.5 6.2), e.g. ``20261121093000+0900``."""
    return moment.strftime("%Y%m%d%H%M%S%z")


@dataclass(frozen=True)
class PatientStudy:
    """Patient and study the digitized record belongs to (from the film receipt)."""

    patient_id: str
    study_uid: str
    issuer: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    accession: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring: str = ""


@dataclass(frozen=True)
class SeriesInfo:
    series_uid: str
    series_number: int
    instance_number: int
    description: str
    #: Modality of the original record ("MG", "CR", ...) or "OT"/"DOC".
    modality: str = "OT"


@dataclass(frozen=True)
class Contribution:
    """Who digitized, with which device, under whose responsibility (R-DIG-1, R-DIG-4)."""

    operator_id: str
    operator_name: str
    manufacturer: str
    model: str = ""
    serial_number: str = ""
    software_versions: str = ""
    institution: str = ""
    station: str = ""
    #: 情報作成管理者 named in the configuration.
    manager: str = ""
    #: "FILMD" or "DOCD" item code.
    purpose: tuple[str, str, str] = FILMD
    #: Free text appended to Contribution Description (e.g. the bulk plan).
    note: str = ""
    #: Coding scheme of operator ids (Person Identification Code Sequence).
    operator_scheme: str = "L"
    #: The gateway's own software version (General Equipment).
    gateway_version: str = ""


def _non_ascii(*texts: str) -> bool:
    return any(not t.isascii() for t in texts if t)


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _contributing_item(c: Contribution, now: datetime) -> Dataset:
    """One Contributing Equipment Sequence item (PS3.3 Table C.12-1)."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(c.purpose)])
    item.Manufacturer = c.manufacturer or "unknown"
    for keyword, value in (
        ("InstitutionName", c.institution),
        ("StationName", c.station[:16]),
        ("ManufacturerModelName", c.model),
        ("DeviceSerialNumber", c.serial_number),
        ("SoftwareVersions", c.software_versions),
    ):
        if value:
            setattr(item, keyword, value)
    item.OperatorsName = c.operator_name or c.operator_id
    person = Dataset()
    person.PersonIdentificationCodeSequence = DicomSequence(
        [_code((c.operator_id, c.operator_scheme, c.operator_name or c.operator_id))]
    )
    if c.institution:
        person.InstitutionName = c.institution
    item.OperatorIdentificationSequence = DicomSequence([person])
    item.ContributionDateTime = format_dt(now)
    what = "Film digitization" if c.purpose == FILMD else "Paper document digitization"
    text = f"{what}; operator {c.operator_id}"
    if c.manager:
        text += f"; information-creation manager (情報作成管理者) {c.manager}"
    if c.note:
        text += f"; {c.note}"
    item.ContributionDescription = text[:1024]
    return item


def base_dataset(
    sop_class: UID,
    sop_instance_uid: str,
    patient: PatientStudy,
    series: SeriesInfo,
    contribution: Contribution,
    *,
    conversion_type: str,
    now: datetime,
) -> Dataset:
    """The non-pixel modules of an SC instance; ``now`` is the digitization time (aware)."""
    if conversion_type not in CONVERSION_TYPES:
        raise ValueError(f"unknown Conversion Type {conversion_type!r}")
    ds = Dataset()
    texts = (
        patient.patient_name,
        patient.study_description,
        patient.referring,
        contribution.operator_name,
        contribution.manager,
        contribution.institution,
        contribution.note,
        series.description,
    )
    if _non_ascii(*texts):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 (PS3.5 6.1.2.3)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = format_da(now), format_tm(now)
    ds.TimezoneOffsetFromUTC = now.strftime("%z")
    # Patient (C.7.1.1)
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    if patient.issuer:
        ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = patient.study_uid
    ds.StudyDate, ds.StudyTime = patient.study_date, patient.study_time
    ds.ReferringPhysicianName = patient.referring
    ds.StudyID = ""
    ds.AccessionNumber = patient.accession
    if patient.study_description:
        ds.StudyDescription = patient.study_description
    # General Series (C.7.3.1)
    ds.Modality = series.modality
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDescription = series.description
    # General Equipment (C.7.5.1): the system that made the DICOM instance.
    ds.Manufacturer = "Sekisho"
    if contribution.institution:
        ds.InstitutionName = contribution.institution
    if contribution.station:
        ds.StationName = contribution.station[:16]
    if contribution.gateway_version:
        ds.SoftwareVersions = contribution.gateway_version
    # SC Equipment (C.8.6.1)
    ds.ConversionType = conversion_type
    if contribution.serial_number:
        ds.SecondaryCaptureDeviceID = contribution.serial_number
    ds.SecondaryCaptureDeviceManufacturer = contribution.manufacturer or "unknown"
    if contribution.model:
        ds.SecondaryCaptureDeviceManufacturerModelName = contribution.model
    if contribution.software_versions:
        ds.SecondaryCaptureDeviceSoftwareVersions = contribution.software_versions
    # General Image (C.7.6.1) and SC Image (C.8.6.2) dates
    ds.InstanceNumber = series.instance_number
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = format_da(now), format_tm(now)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = format_da(now), format_tm(now)
    ds.LossyImageCompression = "00"
    # SOP Common (C.12.1)
    ds.ContributingEquipmentSequence = DicomSequence([_contributing_item(contribution, now)])
    return ds


# ---------------------------------------------------------------- IOD check
_TYPE1 = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ConversionType",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
)
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "PatientOrientation",
)


def _empty(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0)


def check_sc_iod(ds: Dataset) -> list[str]:
    """Problems of ``ds`` against the SC IOD it claims (empty list: conformant)."""
    problems: list[str] = []
    for kw in _TYPE1:
        if kw not in ds:
            problems.append(f"Type 1 {kw} missing")
        elif _empty(ds, kw):
            problems.append(f"Type 1 {kw} empty")
    problems += [f"Type 2 {kw} missing" for kw in _TYPE2 if kw not in ds]
    if problems:
        return problems
    sop = str(ds.SOPClassUID)
    conversion = str(ds.ConversionType)
    if conversion not in CONVERSION_TYPES:
        problems.append(f"Conversion Type {conversion!r} is not a defined term (C.8.6.1.1)")
    samples, photometric = int(ds.SamplesPerPixel), str(ds.PhotometricInterpretation)
    allocated, stored, high = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.HighBit)
    if high != stored - 1:
        problems.append("High Bit must be Bits Stored - 1")
    if samples > 1 and "PlanarConfiguration" not in ds:
        problems.append("Planar Configuration required when Samples per Pixel > 1 (C.7.6.3)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = int(ds.Rows) * int(ds.Columns) * samples * frames * (allocated // 8)
    if len(ds.PixelData) not in (expected, expected + 1):
        problems.append(f"Pixel Data has {len(ds.PixelData)} bytes, expected {expected}")
    for item in ds.get("ContributingEquipmentSequence", []):
        if not item.get("PurposeOfReferenceCodeSequence"):
            problems.append("Contributing Equipment item lacks Purpose of Reference (Type 1)")
        if _empty(item, "Manufacturer"):
            problems.append("Contributing Equipment item lacks Manufacturer (Type 1)")
    if sop == MULTIFRAME_GRAYSCALE_WORD_SC:
        # A.8.5.4 constraints and the SC Multi-frame Image Module (C.8.6.3).
        layout = (samples, photometric, allocated, int(ds.PixelRepresentation))
        if layout != (1, "MONOCHROME2", 16, 0):
            problems.append(
                "Multi-frame Grayscale Word SC needs 1 sample, MONOCHROME2, 16 bits allocated,"
                " unsigned pixels"
            )
        if not 9 <= stored <= 16:
            problems.append("Multi-frame Grayscale Word SC needs Bits Stored 9..16")
        for kw in ("NumberOfFrames", "BurnedInAnnotation"):
            if _empty(ds, kw):
                problems.append(f"Type 1 {kw} missing")
        for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType", "PresentationLUTShape"):
            if _empty(ds, kw):
                problems.append(f"Type 1C {kw} missing (MONOCHROME2, C.8.6.3)")
        if frames > 1 and _empty(ds, "FrameIncrementPointer"):
            problems.append("Type 1C Frame Increment Pointer missing (more than one frame)")
        if conversion == "DF" and _empty(ds, "NominalScannedPixelSpacing"):
            problems.append("Type 1C Nominal Scanned Pixel Spacing missing (Conversion Type DF)")
    elif sop == SC_IMAGE:
        if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR"):
            problems.append(f"Photometric Interpretation {photometric} not allowed (A.8.1.4)")
    else:
        problems.append(f"SOP Class {sop} is not a Secondary Capture class handled here")
    return problems
