"""Film digitization: scans to DICOM Secondary Capture, and the JSRT quality gate.

Pure functions (no database, no clock of their own, no signing): the gateway
reads the files, passes plain values in, and stores, signs and audits what
comes out (STYLE "shape of the house").

* :func:`read_scan_image` reads a 16-bit grayscale PNG or TIFF written by a film
  scanner; the pixel pitch (µm) and the density range (D) the scanner covers are
  not in those files, so they come as :class:`ScanInfo` (CLI options and/or a
  sidecar JSON, :func:`scan_info_from_mapping`).
* :func:`read_digitizer_dicom` takes the DICOM object a film digitizer wrote
  and reads the pitch from Nominal Scanned Pixel Spacing (0018,2010), Imager
  Pixel Spacing (0018,1164) or Pixel Spacing (0028,0030).
* :func:`check_quality` / :func:`enforce_quality` apply the limits of JSRT
  「デジタル画像取り扱いガイドライン v3.0」 (seed 000 資料2; R-DIG-2): sampling
  pitch ≤ 200 µm, ≥ 1024 grey levels (10 bits), density range covering at least
  0.0–3.0 D.  Mammography is excepted there and gets its own configured limits.
* :func:`build_film_sc` writes the result as DICOM Secondary Capture (PS3.3
  A.8): Multi-frame Grayscale Word SC Image (A.8.5.4, MONOCHROME2) or SC Image
  (A.8.1, MONOCHROME1), with Conversion Type DF (SC Equipment Module C.8.6.1),
  Nominal Scanned Pixel Spacing (C.8.6.2/C.8.6.3) and a Contributing Equipment
  item (SOP Common Module C.12.1) with Purpose of Reference (FILMD, DCM, "Film
  Digitizer") from PS3.16 CID 7005 naming the operator and the digitizer
  (R-DIG-1).  :func:`media.secondary_capture.check_sc_iod` checks the result.

What the grey-level check looks at (R-DIG-2 "1024 grey levels"): the declared
Bits Stored must be at least the limit, *and* the pixel values themselves must
use that many bits: after removing low-order bits that are zero in every pixel
(8-bit data shifted into a 16-bit container), the largest value must need at
least ``min_bits`` bits.  An 8-bit scan saved as 16-bit PNG therefore fails
whatever its header says.  The count of distinct values is reported too but
not judged (a small or flat film legitimately uses few of its levels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from media.secondary_capture import (
    FILMD,
    MULTIFRAME_GRAYSCALE_WORD_SC,
    SC_IMAGE,
    Contribution,
    PatientStudy,
    SeriesInfo,
    base_dataset,
)
from pki.errors import DigitizationError, InvalidInputError

__all__ = [
    "PixelStats",
    "QualityFailure",
    "QualityLimits",
    "Scan",
    "ScanInfo",
    "check_quality",
    "build_film_sc",
    "enforce_quality",
    "measure_pixels",
    "read_digitizer_dicom",
    "read_scan_image",
    "read_sidecar",
    "scan_info_from_mapping",
]

Photometric = Literal["MONOCHROME1", "MONOCHROME2"]
#: Largest image accepted (pixels), so a hostile file cannot exhaust memory.
MAX_PIXELS = 20_000 * 20_000


@dataclass(frozen=True)
class QualityLimits:
    """Limits a digitized film must meet to be stored as the legal record (R-DIG-2).

    The defaults are JSRT 資料2 (1), (3), (4) (seed 000): pitch ≤ 200 µm,
    ≥ 1024 grey levels (10 bits), density range at least 0.0–3.0 D.  The
    spatial-resolution CTF criterion (2) is a property of the digitizer checked
    at acceptance testing, not of one scan, so it is not judged here.
    """

    max_pitch_um: float = 200.0
    min_bits: int = 10
    #: The declared range must reach down to at most this density ...
    density_min: float = 0.0
    #: ... and up to at least this one.
    density_max: float = 3.0

    def __post_init__(self) -> None:
        if not 0 < self.max_pitch_um <= 1000:
            raise ValueError("max_pitch_um must be between 0 and 1000")
        if not 1 <= self.min_bits <= 16:
            raise ValueError("min_bits must be between 1 and 16")
        if not 0 <= self.density_min < self.density_max <= 6:
            raise ValueError("density limits must satisfy 0 <= density_min < density_max <= 6")


#: Placeholder mammography limits (the JSRT table excepts mammography); the
#: hospital configures its own under ``[digitization.mammography]``.
MAMMOGRAPHY_LIMITS = QualityLimits(max_pitch_um=50.0, min_bits=12, density_max=3.5)


@dataclass(frozen=True)
class ScanInfo:
    """What the scanner declares about one scan (CLI options, sidecar JSON, DICOM).

    ``pitch_um`` is the sampling pitch between rows, ``pitch_col_um`` between
    columns (default: the same).  ``density_min``/``density_max`` is the optical
    density range the digitizer maps to pixel values.  ``photometric``:
    MONOCHROME2 when higher values are brighter (what PNG/TIFF viewers assume),
    MONOCHROME1 when they are denser (darker).
    """

    pitch_um: float | None = None
    pitch_col_um: float | None = None
    density_min: float | None = None
    density_max: float | None = None
    bits_stored: int | None = None
    photometric: Photometric | None = None
    manufacturer: str = ""
    model: str = ""
    serial_number: str = ""
    software_versions: str = ""
    #: Modality of the original film (e.g. "MG", "CR"); empty if unknown.
    modality: str = ""
    #: Burned-in text (film labels) in the image: "YES" unless known otherwise.
    burned_in_annotation: Literal["YES", "NO"] = "YES"

    def merged(self, override: ScanInfo) -> ScanInfo:
        """``override``'s values where set, ours elsewhere (CLI over sidecar over file)."""
        changes = {}
        for f in fields(self):
            value = getattr(override, f.name)
            if value not in (None, "") and not (
                f.name == "burned_in_annotation" and value == f.default
            ):
                changes[f.name] = value
        return replace(self, **changes)


_INFO_KEYS = {f.name for f in fields(ScanInfo)}


def scan_info_from_mapping(data: Mapping[str, Any], where: str = "sidecar") -> ScanInfo:
    """Build :class:`ScanInfo` from JSON-like data; unknown keys are refused by name."""
    unknown = sorted(set(data) - _INFO_KEYS)
    if unknown:
        raise InvalidInputError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if key in ("pitch_um", "pitch_col_um", "density_min", "density_max"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"{where}: {key} must be a number")
            if not math.isfinite(value) or value < 0:
                raise InvalidInputError(f"{where}: {key} must be a finite non-negative number")
            values[key] = float(value)
        elif key == "bits_stored":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                raise InvalidInputError(f"{where}: bits_stored must be an integer 1..16")
            values[key] = value
        elif key == "photometric":
            if value not in ("MONOCHROME1", "MONOCHROME2"):
                raise InvalidInputError(f"{where}: photometric must be MONOCHROME1 or MONOCHROME2")
            values[key] = value
        elif key == "burned_in_annotation":
            if value not in ("YES", "NO"):
                raise InvalidInputError(f"{where}: burned_in_annotation must be YES or NO")
            values[key] = value
        else:
            if not isinstance(value, str) or len(value) > 64:
                raise InvalidInputError(f"{where}: {key} must be a text of at most 64 characters")
            values[key] = value
    return ScanInfo(**values)


def read_sidecar(path: Path) -> ScanInfo:
    """A sidecar JSON file (``scan.png.json``) with :class:`ScanInfo` keys."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read sidecar {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"sidecar {path.name} must hold a JSON object")
    return scan_info_from_mapping(data, f"sidecar {path.name}")


@dataclass(frozen=True)
class PixelStats:
    """What the pixel values show about the grey levels really used."""

    minimum: int
    maximum: int
    distinct: int
    #: Low-order bits that are zero in every pixel (container padding).
    padding_bits: int
    #: Bits needed by the largest value once the padding bits are removed.
    effective_bits: int


def measure_pixels(pixels: np.ndarray) -> PixelStats:
    """Grey-level statistics of an unsigned integer image (see the module notes)."""
    if pixels.size == 0:
        raise InvalidInputError("the image has no pixels")
    flat = pixels.astype(np.uint32, copy=False).ravel()
    combined = int(np.bitwise_or.reduce(flat))
    padding = 0
    if combined:
        while not combined & (1 << padding):
            padding += 1
    maximum = int(flat.max())
    return PixelStats(
        minimum=int(flat.min()),
        maximum=maximum,
        distinct=int(np.unique(flat).size),
        padding_bits=padding,
        effective_bits=(maximum >> padding).bit_length(),
    )


@dataclass(frozen=True)
class Scan:
    """One film image ready for the gate: pixels (2-D, unsigned) and resolved facts."""

    pixels: np.ndarray
    info: ScanInfo
    #: Bits of the container the values came in (8 or 16).
    container_bits: int
    source_name: str
    stats: PixelStats

    @property
    def bits_stored(self) -> int:
        """Declared Bits Stored, else what the values need (never less than that)."""
        declared = self.info.bits_stored
        needed = max(self.stats.maximum.bit_length(), 1)
        return max(declared or needed, needed)


def _finish(pixels: np.ndarray, info: ScanInfo, container: int, name: str) -> Scan:
    if pixels.ndim != 2:
        raise InvalidInputError(f"{name}: expected one grayscale image, got shape {pixels.shape}")
    if pixels.size > MAX_PIXELS:
        raise InvalidInputError(f"{name}: image larger than {MAX_PIXELS} pixels")
    if pixels.dtype.kind not in "ui":
        raise InvalidInputError(f"{name}: pixel values are not integers")
    if pixels.dtype.kind == "i" and pixels.size and int(pixels.min()) < 0:
        raise InvalidInputError(f"{name}: negative pixel values")
    stats = measure_pixels(pixels)
    if stats.maximum > 0xFFFF:
        raise InvalidInputError(f"{name}: pixel values above 65535")
    out = np.ascontiguousarray(pixels, dtype=np.uint16 if container > 8 else np.uint8)
    if info.bits_stored is not None and stats.maximum >> info.bits_stored:
        raise InvalidInputError(
            f"{name}: values up to {stats.maximum} do not fit the declared "
            f"{info.bits_stored} bits stored"
        )
    return Scan(out, info, container, name, stats)


def read_scan_image(path: Path, info: ScanInfo) -> Scan:
    """A grayscale PNG or TIFF (8- or 16-bit) written by a film scanner."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as img:
            frames = int(getattr(img, "n_frames", 1))
            if frames != 1:
                raise InvalidInputError(f"{path.name}: one film per file, found {frames}")
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                container, pixels = 16, np.asarray(img.convert("I;16"), dtype=np.uint16)
            elif mode == "I":
                container, pixels = 16, np.asarray(img, dtype=np.int64)
            elif mode == "L":
                container, pixels = 8, np.asarray(img, dtype=np.uint8)
            else:
                raise InvalidInputError(
                    f"{path.name}: image mode {mode} is not grayscale (film scans are grayscale)"
                )
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"{path.name}: not a readable PNG/TIFF image: {exc}") from exc
    if info.bits_stored is None:
        info = replace(info, bits_stored=container)
    if info.photometric is None:
        info = replace(info, photometric="MONOCHROME2")
    return _finish(np.array(pixels), info, container, path.name)


def _spacing_um(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("NominalScannedPixelSpacing", "ImagerPixelSpacing", "PixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                return float(value[0]) * 1000.0, float(value[1]) * 1000.0
            except (TypeError, ValueError):
                continue
    return None


def read_digitizer_dicom(path: Path, info: ScanInfo) -> Scan:
    """The DICOM object of a film digitizer: pixels, pitch, bits and device identity.

    ``info`` (from the operator) wins over what the object says; the density
    range has no standard attribute and must come from ``info``.
    """
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInputError(f"{path.name}: not a readable DICOM image: {exc}") from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidInputError(f"{path.name}: the digitizer image is not grayscale")
    if int(ds.get("PixelRepresentation", 0)) != 0:
        raise InvalidInputError(f"{path.name}: signed pixel data is not a film scan")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    spacing = _spacing_um(ds)
    from_file = ScanInfo(
        pitch_um=spacing[0] if spacing else None,
        pitch_col_um=spacing[1] if spacing else None,
        bits_stored=int(ds.BitsStored) if "BitsStored" in ds else None,
        photometric=photometric if photometric in ("MONOCHROME1", "MONOCHROME2") else None,  # type: ignore[arg-type]
        manufacturer=str(ds.get("Manufacturer", "") or "")[:64],
        model=str(ds.get("ManufacturerModelName", "") or "")[:64],
        serial_number=str(ds.get("DeviceSerialNumber", "") or "")[:64],
        software_versions=str(ds.get("SoftwareVersions", "") or "")[:64],
    )
    merged = from_file.merged(info)
    if merged.photometric is None:
        merged = replace(merged, photometric="MONOCHROME2")
    container = 16 if int(ds.get("BitsAllocated", 16)) > 8 else 8
    return _finish(np.asarray(pixels), merged, container, path.name)


@dataclass(frozen=True)
class QualityFailure:
    """One failed limit: which, what the scan has, what the limit requires."""

    limit: str
    actual: str
    required: str

    def __str__(self) -> str:
        return f"{self.limit}: {self.actual} (required: {self.required})"


def check_quality(scan: Scan, limits: QualityLimits) -> list[QualityFailure]:
    """Every limit of R-DIG-2 the scan misses (empty: it may be the legal record)."""
    info = scan.info
    out: list[QualityFailure] = []
    pitches = [p for p in (info.pitch_um, info.pitch_col_um) if p is not None]
    if not pitches:
        out.append(
            QualityFailure("sampling pitch", "not declared", f"<= {limits.max_pitch_um:g} µm")
        )
    elif max(pitches) > limits.max_pitch_um or min(pitches) <= 0:
        out.append(
            QualityFailure(
                "sampling pitch", f"{max(pitches):g} µm", f"<= {limits.max_pitch_um:g} µm"
            )
        )
    levels = 1 << limits.min_bits
    if scan.bits_stored < limits.min_bits:
        out.append(
            QualityFailure(
                "grey levels",
                f"{1 << scan.bits_stored} levels ({scan.bits_stored} bits stored)",
                f">= {levels} levels ({limits.min_bits} bits)",
            )
        )
    elif scan.stats.effective_bits < limits.min_bits:
        out.append(
            QualityFailure(
                "grey levels",
                f"pixel values use only {scan.stats.effective_bits} bits "
                f"(max {scan.stats.maximum}, {scan.stats.padding_bits} padding bits)",
                f">= {levels} levels ({limits.min_bits} bits)",
            )
        )
    if info.density_min is None or info.density_max is None:
        out.append(
            QualityFailure(
                "density range",
                "not declared",
                f"{limits.density_min:.1f}–{limits.density_max:.1f} D or wider",
            )
        )
    elif info.density_min > limits.density_min or info.density_max < limits.density_max:
        out.append(
            QualityFailure(
                "density range",
                f"{info.density_min:.2f}–{info.density_max:.2f} D",
                f"{limits.density_min:.1f}–{limits.density_max:.1f} D or wider",
            )
        )
    return out


def enforce_quality(scan: Scan, limits: QualityLimits, *, label: str = "JSRT") -> None:
    """Raise :class:`DigitizationError` naming every failed limit (R-DIG-2)."""
    failures = check_quality(scan, limits)
    if failures:
        raise DigitizationError(
            f"{scan.source_name} refused as legal record ({label} limits): "
            + "; ".join(str(f) for f in failures),
            detail=",".join(f.limit for f in failures),
        )


def _window(stats: PixelStats) -> tuple[float, float]:
    width = max(stats.maximum - stats.minimum, 1)
    return stats.minimum + width / 2.0, float(width)


def build_film_sc(
    scan: Scan,
    patient: PatientStudy,
    series: SeriesInfo,
    contribution: Contribution,
    *,
    sop_instance_uid: str,
    now: datetime,
    prefer: Literal["multiframe", "single"] = "multiframe",
) -> Dataset:
    """The digitized film as a Secondary Capture instance (PS3.3 A.8; R-DIG-1).

    MONOCHROME2 scans become Multi-frame Grayscale Word SC Image (A.8.5.4) unless
    ``prefer="single"``; MONOCHROME1 scans, which that IOD does not allow, become
    SC Image (A.8.1).  Conversion Type DF, Nominal Scanned Pixel Spacing in mm
    (row\\column), the FILMD Contributing Equipment item and the scan's own Bits
    Stored.  ``now`` is the (timezone-aware) digitization time.
    """
    if scan.container_bits <= 8:
        raise DigitizationError(f"{scan.source_name}: 8-bit scans cannot be a film record")
    if contribution.purpose != FILMD:
        raise ValueError("film digitization needs the FILMD purpose of reference")
    info = scan.info
    photometric = info.photometric or "MONOCHROME2"
    multiframe = photometric == "MONOCHROME2" and prefer == "multiframe"
    sop_class = MULTIFRAME_GRAYSCALE_WORD_SC if multiframe else SC_IMAGE
    if not info.pitch_um:
        raise DigitizationError(f"{scan.source_name}: no sampling pitch declared")
    ds = base_dataset(
        sop_class,
        sop_instance_uid,
        patient,
        series,
        contribution,
        conversion_type="DF",
        now=now,
    )
    row = info.pitch_um / 1000.0
    col = (info.pitch_col_um or info.pitch_um) / 1000.0
    ds.NominalScannedPixelSpacing = [f"{row:.6g}", f"{col:.6g}"]
    ds.BurnedInAnnotation = info.burned_in_annotation
    # Image Pixel (C.7.6.3) with the scan's real bit depth.
    bits = scan.bits_stored
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in scan.pixels.shape)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    center, width = _window(scan.stats)
    ds.WindowCenter, ds.WindowWidth = f"{center:.1f}", f"{width:.1f}"
    if multiframe:
        # Multi-frame Module (C.7.6.6) and SC Multi-frame Image Module (C.8.6.3).
        ds.NumberOfFrames = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = scan.pixels.astype("<u2", copy=False).tobytes()
    return ds
