"""Builders for media tests: small DICOM studies, DCMTK DICOMDIRs, ISO images.

Studies are generated with pydicom (CT, MR, CR; tiny pixel data) in several
character sets, including the Japanese forms used on real media
(``\\ISO 2022 IR 87`` as in PS3.5 Annex H, and ``ISO_IR 192``).  Media are
made by the real writers: DCMTK ``dcmmkdir`` for DICOMDIR and ``genisoimage``
for ISO 9660 images.  Hostile media are made from these, then corrupted.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SOP_CLASS = {"CT": CT_IMAGE, "MR": MR_IMAGE, "CR": CR_IMAGE}
UID_ROOT = "1.2.826.0.1.3680043.10.1234."


@dataclass(frozen=True)
class PatientSpec:
    patient_id: str
    name: str
    birth_date: str
    sex: str
    issuer: str
    charset: tuple[str, ...]


YAMADA_IR87 = PatientSpec(
    "OTH-0001",
    "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "19700102",
    "M",
    "OTHER_HOSP",
    ("", "ISO 2022 IR 87"),
)
SUZUKI_UTF8 = PatientSpec(
    "OTH-0002",
    "Suzuki^Hanako=鈴木^花子=すずき^はなこ",
    "19851224",
    "F",
    "OTHER_HOSP",
    ("ISO_IR 192",),
)
DOE_ASCII = PatientSpec("OTH-0003", "Doe^John", "19600315", "M", "", ())


@dataclass
class SeriesSpec:
    modality: str
    count: int = 2
    description: str = ""
    uid: str = field(default_factory=lambda: generate_uid(UID_ROOT))


@dataclass
class StudySpec:
    patient: PatientSpec
    series: list[SeriesSpec]
    description: str = "CHEST"
    accession: str = "ACC001"
    institution: str = "Other Hospital"
    study_date: str = "20240105"
    uid: str = field(default_factory=lambda: generate_uid(UID_ROOT))


def make_instance(
    study: StudySpec,
    series: SeriesSpec,
    series_number: int,
    instance_number: int,
    *,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """One small image instance with the attributes DICOMDIR records need."""
    patient = study.patient
    ds = Dataset()
    if patient.charset:
        ds.SpecificCharacterSet = (
            list(patient.charset) if len(patient.charset) > 1 else patient.charset[0]
        )
    ds.SOPClassUID = SOP_CLASS[series.modality]
    ds.SOPInstanceUID = sop_instance_uid or generate_uid(UID_ROOT)
    ds.StudyDate = study.study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = "Factory"
    ds.InstitutionName = study.institution
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description or f"{series.modality} series"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    if patient.issuer:
        ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 4
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if series.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
        ds.PixelSpacing = [0.5, 0.5]
    elif series.modality == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTrainLength = 1
        ds.PixelSpacing = [0.5, 0.5]
    else:
        ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.PixelData = (np.arange(16, dtype=np.uint16) * (instance_number + 1)).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_studies(root: Path, studies: Sequence[StudySpec], *, top: str = "DICOM") -> list[Path]:
    """Write studies in PS3.10 names: ``DICOM/ST000001/SE000001/IM000001``."""
    paths: list[Path] = []
    for st_index, study in enumerate(studies, start=1):
        for se_index, series in enumerate(study.series, start=1):
            folder = root / top / f"ST{st_index:06d}" / f"SE{se_index:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            for im_index in range(1, series.count + 1):
                ds = make_instance(study, series, se_index, im_index)
                path = folder / f"IM{im_index:06d}"
                dcmwrite(path, ds, enforce_file_format=True)
                paths.append(path)
    return paths


def run_dcmmkdir(root: Path, *, profile: str = "-Pgp", inputs: Sequence[str] = ("DICOM",)) -> Path:
    """Create ``root/DICOMDIR`` with DCMTK (real peer writer)."""
    cmd = ["dcmmkdir", profile, "+r", "+id", str(root), "+D", str(root / "DICOMDIR"), *inputs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dcmmkdir failed: {proc.stderr}")
    return root / "DICOMDIR"


def make_iso(root: Path, image: Path, *, rock_ridge: bool = True, joliet: bool = True) -> Path:
    """Master an ISO 9660 image of ``root`` with genisoimage (or xorriso)."""
    tool = shutil.which("genisoimage")
    args = ["-quiet", "-V", "PDI_TEST", "-o", str(image)]
    if rock_ridge:
        args.append("-R")
    if joliet:
        args.append("-J")
    if tool is None:
        tool = shutil.which("xorriso")
        if tool is None:
            raise RuntimeError("neither genisoimage nor xorriso is installed")
        args = ["-as", "mkisofs", *args]
    subprocess.run([tool, *args, str(root)], check=True, capture_output=True)
    return image


def standard_studies() -> list[StudySpec]:
    """Three patients, CT/MR/CR, ISO 2022 IR 87, ISO_IR 192 and ASCII."""
    return [
        StudySpec(YAMADA_IR87, [SeriesSpec("CT", 3), SeriesSpec("CT", 2)], "胸部CT", "A1001"),
        StudySpec(YAMADA_IR87, [SeriesSpec("CR", 1)], "胸部X線", "A1002", study_date="20240210"),
        StudySpec(SUZUKI_UTF8, [SeriesSpec("MR", 2)], "頭部MRI", "A2001"),
        StudySpec(DOE_ASCII, [SeriesSpec("CR", 2)], "CHEST PA", "A3001"),
    ]


def build_media(
    root: Path, studies: Sequence[StudySpec] | None = None, *, profile: str = "-Pgp"
) -> list[Path]:
    """A conformant medium: PS3.10 names and a DCMTK DICOMDIR."""
    root.mkdir(parents=True, exist_ok=True)
    paths = write_studies(root, studies if studies is not None else standard_studies())
    run_dcmmkdir(root, profile=profile)
    return paths


def patch_same_length(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (padded with spaces to the same length) in a file.

    Used to corrupt a DICOMDIR written by a real writer without breaking its
    record offsets.
    """
    if len(new) > len(old):
        raise ValueError("replacement must not be longer than the original")
    data = path.read_bytes()
    if old not in data:
        raise ValueError("original bytes not found")
    path.write_bytes(data.replace(old, new.ljust(len(old), b" "), 1))


def file_id_bytes(relpath: str) -> bytes:
    """How a relative path appears as a Referenced File ID value in a DICOMDIR."""
    return relpath.replace("/", "\\").encode("ascii")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Paths with size and mtime_ns, to prove a medium was not modified."""
    out: dict[str, tuple[int, int]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def build_large_media(root: Path, count: int, *, per_series: int = 100) -> list[Path]:
    """``count`` CT instances, ``per_series`` per series, by patching one template.

    The template is written by pydicom; each copy differs only in its SOP
    Instance UID and Series Instance UID (same lengths, so the encoding stays
    valid).  The DICOMDIR is made by DCMTK (``dcmmkdir`` is quadratic in the
    number of instances per series, hence many small series).
    """
    study = StudySpec(DOE_ASCII, [SeriesSpec("CT", 1)], "BULK", "A9001")
    template_uid = "1.2.826.0.1.3680043.10.1234.9.1000000000"
    template_series = "1.2.826.0.1.3680043.10.1234.8.100000"
    study.series[0].uid = template_series
    ds = make_instance(study, study.series[0], 1, 1, sop_instance_uid=template_uid)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    old_uid = template_uid.encode("ascii")
    old_series = template_series.encode("ascii")
    paths: list[Path] = []
    for i in range(count):
        series_index = i // per_series
        folder = (
            root / "DICOM" / f"ST{series_index // 100 + 1:06d}" / f"SE{series_index % 100 + 1:06d}"
        )
        if i % per_series == 0:
            folder.mkdir(parents=True, exist_ok=True)
        new_uid = f"1.2.826.0.1.3680043.10.1234.9.{1000000001 + i}".encode("ascii")
        new_series = f"1.2.826.0.1.3680043.10.1234.8.{100001 + series_index}".encode("ascii")
        path = folder / f"IM{i % per_series + 1:06d}"
        path.write_bytes(data.replace(old_uid, new_uid).replace(old_series, new_series))
        paths.append(path)
    run_dcmmkdir(root)
    return paths


class FakeSink:
    """In-memory stand-in for the gateway store: records every write it gets.

    ``exists`` answers with the original-content SHA-256 given at ``store``,
    as the :class:`media.importer.InstanceSink` protocol asks.
    """

    def __init__(self, work_dir: Path | None = None) -> None:
        self.work_dir = work_dir
        self.stored: dict[str, bytes] = {}
        self.meta: dict[str, object] = {}
        self.source_sha: dict[str, str] = {}
        self.store_calls = 0

    def exists(self, sop_instance_uid: str) -> str | None:
        return self.source_sha.get(sop_instance_uid)

    def store(self, path: Path, meta) -> str:  # noqa: ANN001 - protocol
        import hashlib

        self.store_calls += 1
        path = Path(path)
        if self.work_dir is not None:
            assert path.parent == self.work_dir, "temporary file outside the work directory"
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        assert digest == meta.sha256, "meta.sha256 must be the hash of the handed file"
        self.stored[meta.sop_instance_uid] = data
        self.meta[meta.sop_instance_uid] = meta
        self.source_sha[meta.sop_instance_uid] = meta.source_sha256
        return digest
