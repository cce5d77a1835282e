"""Scanned paper records (referral letters, reports): PDF and optional DICOM (R-DIG-1).

Pure functions, like :mod:`media.digitize`: page images in, bytes and datasets
out; signing (PAdES for the PDF, PS3.15 Annex C for DICOM) and storage are the
gateway's job.

* :func:`read_pages` opens page scans (PNG, TIFF, JPEG; multi-page TIFF too)
  as 8-bit grayscale or RGB images and reports their resolution.
* :func:`pages_to_pdf` writes them as one PDF with Pillow's PDF writer, at the
  scan resolution so that the printed size equals the paper's (seed 000 付録2
  §16: the electronic copy must carry the same information as the paper).
* :func:`build_document_sc` makes one Secondary Capture Image (PS3.3 A.8.1)
  per page with Conversion Type SD ("Scanned Document", C.8.6.1.1) and the
  Contributing Equipment item (DOCD, DCM, "Document Digitizer Equipment")
  naming the operator and the information-creation manager.
* :func:`build_encapsulated_pdf` wraps a (signed) PDF as Encapsulated PDF
  (PS3.3 A.45.1: Encapsulated Document Module C.24.2 with the SC Equipment
  Module, Conversion Type SD) for archives that only take DICOM.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from media.secondary_capture import (
    DOCD,
    SC_IMAGE,
    Contribution,
    PatientStudy,
    SeriesInfo,
    base_dataset,
    format_da,
    format_dt,
    format_tm,
)
from pki.errors import DigitizationError, InvalidInputError

__all__ = [
    "ENCAPSULATED_PDF",
    "Page",
    "build_document_sc",
    "build_encapsulated_pdf",
    "pages_to_pdf",
    "read_pages",
]

ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
#: Resolution assumed when a scan does not state one.
DEFAULT_DPI = 200.0
MAX_PAGE_PIXELS = 15_000 * 15_000
MAX_PAGES = 500


@dataclass(frozen=True)
class Page:
    """One scanned page: 8-bit ``L`` or ``RGB`` image data and its resolution."""

    image: object  # PIL.Image.Image (kept opaque so importing this module needs no Pillow)
    dpi: float
    source_name: str

    @property
    def mode(self) -> str:
        return str(self.image.mode)  # type: ignore[attr-defined]


def _normalise(img: object, name: str) -> object:
    mode = img.mode  # type: ignore[attr-defined]
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")  # type: ignore[attr-defined]
    if mode in ("P", "RGBA", "CMYK", "LA", "YCbCr"):
        return img.convert("RGB")  # type: ignore[attr-defined]
    if mode.startswith("I"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) or 1.0
        from PIL import Image

        return Image.fromarray((arr * (255.0 / top)).round().astype(np.uint8), mode="L")
    raise InvalidInputError(f"{name}: unsupported image mode {mode}")


def read_pages(paths: list[Path], *, dpi: float | None = None) -> list[Page]:
    """Open page scans in order; ``dpi`` overrides what the files state."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PAGE_PIXELS
    pages: list[Page] = []
    for path in paths:
        try:
            with Image.open(path) as img:
                stated = img.info.get("dpi")
                resolution = dpi or (float(stated[0]) if stated and stated[0] else DEFAULT_DPI)
                for frame in ImageSequence.Iterator(img):
                    frame.load()
                    pages.append(Page(_normalise(frame.copy(), path.name), resolution, path.name))
                    if len(pages) > MAX_PAGES:
                        raise InvalidInputError(f"more than {MAX_PAGES} pages in one document")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise InvalidInputError(f"{path.name}: not a readable image: {exc}") from exc
    if not pages:
        raise InvalidInputError("no page to digitize")
    return pages


def pages_to_pdf(
    pages: list[Page], *, title: str = "", author: str = "", created: datetime | None = None
) -> bytes:
    """One PDF with a page per scan, sized by the scan's resolution."""
    if not pages:
        raise DigitizationError("no page to write")
    if len({p.dpi for p in pages}) > 1:
        raise InvalidInputError("the pages were scanned at different resolutions; use one")
    first, *rest = (p.image for p in pages)
    buf = io.BytesIO()
    info: dict[str, object] = {"title": title or "Scanned document", "producer": "Sekisho"}
    if author:
        info["author"] = author
    if created is not None:
        info["creationDate"] = created
    first.save(  # type: ignore[attr-defined]
        buf,
        format="PDF",
        save_all=True,
        append_images=rest,
        resolution=pages[0].dpi,
        **info,
    )
    data = buf.getvalue()
    # Pillow writes the free-list head as generation 65536; ISO 32000-1 §7.5.4 says 65535
    # (strict PDF readers, pyHanko's among them, refuse the file otherwise).  Same length,
    # so the cross-reference offsets stay right.
    return data.replace(b"\n0000000000 65536 f", b"\n0000000000 65535 f", 1)


def build_document_sc(
    page: Page,
    patient: PatientStudy,
    series: SeriesInfo,
    contribution: Contribution,
    *,
    sop_instance_uid: str,
    now: datetime,
) -> Dataset:
    """One page as SC Image (PS3.3 A.8.1), Conversion Type SD, with the DOCD item."""
    if contribution.purpose != DOCD:
        raise ValueError("paper digitization needs the DOCD purpose of reference")
    ds = base_dataset(
        SC_IMAGE, sop_instance_uid, patient, series, contribution, conversion_type="SD", now=now
    )
    pitch = 25.4 / page.dpi
    ds.NominalScannedPixelSpacing = [f"{pitch:.6g}", f"{pitch:.6g}"]
    ds.BurnedInAnnotation = "YES"
    arr = np.asarray(page.image, dtype=np.uint8)
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    if page.mode == "RGB":
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    return ds


def build_encapsulated_pdf(
    pdf: bytes,
    patient: PatientStudy,
    series: SeriesInfo,
    contribution: Contribution,
    *,
    sop_instance_uid: str,
    title: str,
    now: datetime,
) -> Dataset:
    """The PDF as Encapsulated PDF (PS3.3 A.45.1, C.24.2), Conversion Type SD."""
    if not pdf.startswith(b"%PDF-"):
        raise InvalidInputError("not a PDF document")
    ds = base_dataset(
        ENCAPSULATED_PDF,
        sop_instance_uid,
        patient,
        series,
        contribution,
        conversion_type="SD",
        now=now,
    )
    for keyword in (
        "ImageType",
        "PatientOrientation",
        "LossyImageCompression",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
    ):
        delattr(ds, keyword)  # image-only modules are not part of this IOD
    ds.AcquisitionDateTime = format_dt(now)
    ds.ContentDate, ds.ContentTime = format_da(now), format_tm(now)
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title[:64] or "Scanned document"
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds
