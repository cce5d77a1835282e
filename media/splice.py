"""Write a reconciled instance by splicing raw element bytes (PS3.10 §7.1, PS3.5 §7).

A PS3.10 file is a 128-byte preamble, ``DICM``, the File Meta Information
(group 0002, always Explicit VR Little Endian, PS3.10 §7.1) and then the data
set encoded in its transfer syntax.  A data set is a sequence of data
elements in ascending tag order (PS3.5 §7.1): tag, VR (explicit VR only,
PS3.5 §7.1.2), length and value, or an undefined length closed by a Sequence
Delimitation Item (PS3.5 §7.5.2; encapsulated pixel data, PS3.5 §A.4).

Import reconciliation changes only a few top-level elements (patient
identification, Other Patient IDs, Original Attributes, Contributing
Equipment, Instance Origin Status, maybe Accession Number).  Instead of
decoding and re-encoding every element with pydicom, the splice writer

1. takes the span of every top-level element from the structure walk
   (:func:`media.dicomfile.parse_layout`);
2. lets pydicom read only the small elements (:func:`read_head`: never the
   pixel data, never an element over :data:`HEAD_ELEMENT_LIMIT`), so that
   :func:`media.reconcile.reconcile_instance` works on an ordinary
   ``Dataset``;
3. compares that data set after reconciliation with what was read
   (:func:`plan_splice`): an element that is unchanged is copied byte for
   byte from the source, a changed or added one is encoded by pydicom in the
   data set's own transfer syntax and character set, a removed one is left
   out, all in ascending tag order;
4. writes a new File Meta Information and the pieces (:func:`write_spliced`),
   hashing them on the way.

Unchanged elements keep their exact bytes, including Specific Character Set
and every ISO 2022 escape sequence (R-PDI-1).  Retired group lengths
(gggg,0000) outside group 0002 are dropped, as pydicom does when it writes
(PS3.5 §7.2).  Files this module cannot splice raise :class:`SpliceUnsupported`
and are rewritten with pydicom by the caller: deflated data sets (PS3.5
§A.5), transfer syntaxes pydicom does not know, duplicate tags, File Meta
elements inside the data set, or a data set pydicom reads differently from
the structure walk.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import (
    correct_ambiguous_vr_element,
    write_data_element,
    write_file_meta_info,
)
from pydicom.uid import UID

from .dicomfile import MAGIC, PREAMBLE_LENGTH, ElementSpan

#: Elements larger than this are never handed to pydicom; they are copied.
HEAD_ELEMENT_LIMIT = 1024 * 1024
#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.3 C.7.6.3).
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_COPY_BYTES = 1024 * 1024

Piece = ElementSpan | bytes


class SpliceUnsupported(Exception):
    """This file cannot be spliced; the caller rewrites it with pydicom instead."""


class ByteSource(Protocol):
    """Random access to the bytes of one source file, already read from the medium."""

    size: int

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``."""
        ...

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``[start, end)`` in pieces of at most 1 MiB."""
        ...

    def stream(self) -> BinaryIO:
        """A seekable stream over the whole file (for the structure walk and pydicom)."""
        ...


class MemorySource:
    """A file held in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, start: int, end: int) -> bytes:
        return self.data[start:end]

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        for pos in range(start, end, _COPY_BYTES):
            yield self.data[pos : min(end, pos + _COPY_BYTES)]  # the whole file: no copy

    def stream(self) -> BinaryIO:
        return io.BytesIO(self.data)


class FileSource:
    """A file spooled to disk (large instances: memory stays flat)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size

    def read(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as fh:
            return os.pread(fh.fileno(), end - start, start)

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            pos = start
            while pos < end:
                data = os.pread(fh.fileno(), min(_COPY_BYTES, end - pos), pos)
                if not data:
                    raise SpliceUnsupported("the spooled file is shorter than its layout")
                yield data
                pos += len(data)

    def stream(self) -> BinaryIO:
        return open(self.path, "rb")


class HashingWriter:
    """Writes to a binary file while computing SHA-256 and size of what was written."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.digest.update(data)
        self.fh.write(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()


@dataclass(slots=True)
class Head:
    """The small top-level elements read by pydicom, and a snapshot to diff against."""

    dataset: Dataset
    spans: list[ElementSpan]
    implicit_vr: bool
    little_endian: bool
    #: Tags handed to pydicom (everything else is always copied).
    loaded: frozenset[int]
    #: Elements as read (raw elements are immutable; compared by identity, then value).
    original: dict[int, Any]
    #: Elements pydicom decoded while reading (undefined-length sequences), encoded as read.
    original_encoded: dict[int, bytes]


def can_splice(transfer_syntax_uid: str) -> bool:
    """Whether the data set of this transfer syntax can be spliced (not deflated, known)."""
    uid = UID(transfer_syntax_uid)
    return uid.is_transfer_syntax and not uid.is_deflated


def _is_group_length(tag: int) -> bool:
    """Retired Group Length (gggg,0000) of a data set group (PS3.5 §7.2)."""
    return tag & 0xFFFF == 0 and tag >> 16 > 6


def read_head(
    source: ByteSource, spans: Sequence[ElementSpan], *, implicit_vr: bool, little_endian: bool
) -> Head:
    """Let pydicom read the top-level elements reconciliation may look at.

    Pixel data and any element over :data:`HEAD_ELEMENT_LIMIT` are not read.
    Raises :class:`SpliceUnsupported` when the layout cannot be spliced.
    """
    tags = [span.tag for span in spans]
    if len(set(tags)) != len(tags):
        raise SpliceUnsupported("the data set holds the same tag twice")
    if any(tag >> 16 <= 0x0002 for tag in tags):
        raise SpliceUnsupported("the data set holds command or file meta elements")
    chosen = [
        span
        for span in spans
        if span.tag not in _PIXEL_TAGS and span.end - span.start <= HEAD_ELEMENT_LIMIT
    ]
    blob = b"".join(source.read(span.start, span.end) for span in chosen)
    ds = read_dataset(io.BytesIO(blob), implicit_vr, little_endian)
    loaded = frozenset(span.tag for span in chosen)
    if set(ds.keys()) != loaded:
        raise SpliceUnsupported("pydicom reads the data set differently from the structure walk")
    if ds.original_encoding != (implicit_vr, little_endian):
        raise SpliceUnsupported("the data set is not encoded as its transfer syntax says")
    original = dict(ds._dict)
    head = Head(ds, list(spans), implicit_vr, little_endian, loaded, original, {})
    encodings = _encodings(ds)
    for tag, elem in original.items():
        if not isinstance(elem, RawDataElement):
            head.original_encoded[tag] = encode_element(head, elem, encodings)
    return head


def _encodings(ds: Dataset) -> Any:
    """The character set pydicom's own writer would use for this data set."""
    return ds.get("SpecificCharacterSet", None)


def encode_element(head: Head, elem: Any, encodings: Any) -> bytes:
    """One element encoded as the data set is (PS3.5 §7.1.2 explicit, §7.1.3 implicit VR)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR = head.implicit_vr
    fp.is_little_endian = head.little_endian
    if isinstance(elem, DataElement):
        elem = correct_ambiguous_vr_element(elem, head.dataset, head.little_endian)
    write_data_element(fp, elem, encodings)
    return bytes(fp.getvalue())


def _unchanged(head: Head, tag: int, elem: Any, encodings: Any) -> bool | bytes:
    """``True`` when ``elem`` still holds what was read, else its new encoding."""
    before = head.original[tag]
    if elem is before:
        if tag not in head.original_encoded:
            return True  # an untouched raw element
    elif isinstance(before, RawDataElement) and isinstance(elem, DataElement):
        try:  # read (hence decoded) but maybe not changed: compare values
            fresh = convert_raw_data_element(
                before, encoding=head.dataset._character_set, ds=head.dataset
            )
            if fresh.VR == elem.VR and fresh.value == elem.value:
                return True
        except Exception:  # a value pydicom cannot decode: treat as changed
            pass
    encoded = encode_element(head, elem, encodings)
    if head.original_encoded.get(tag) == encoded:
        return True  # a decoded sequence that was not modified in place
    return encoded


def plan_splice(head: Head) -> list[tuple[int, Piece]]:
    """Pieces of the new data set in ascending tag order (PS3.5 §7.1).

    An :class:`~media.dicomfile.ElementSpan` is copied from the source; bytes
    are an element encoded by pydicom.  Raises :class:`SpliceUnsupported` if
    reconciliation added an element that exists in the source but was not
    read (it would then appear twice).
    """
    current = head.dataset._dict
    encodings = _encodings(head.dataset)
    pieces: list[tuple[int, Piece]] = []
    for span in head.spans:
        if _is_group_length(span.tag):
            continue
        if span.tag not in head.loaded:
            pieces.append((span.tag, span))
            continue
        elem = current.get(span.tag)
        if elem is None:
            continue  # removed by reconciliation
        same = _unchanged(head, span.tag, elem, encodings)
        pieces.append((span.tag, span if same is True else same))  # type: ignore[arg-type]
    present = {span.tag for span in head.spans}
    for tag, elem in current.items():
        if tag in head.original or _is_group_length(tag):
            continue
        if tag in present:
            raise SpliceUnsupported("a changed element was too large to be read")
        pieces.append((int(tag), encode_element(head, elem, encodings)))
    pieces.sort(key=lambda piece: piece[0])
    return pieces


def file_meta_bytes(file_meta: FileMetaDataset) -> bytes:
    """Preamble (zeroed), ``DICM`` and File Meta Information (PS3.10 §7.1)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, file_meta, enforce_standard=True)
    return b"\x00" * PREAMBLE_LENGTH + MAGIC + bytes(fp.getvalue())


def write_spliced(
    out: HashingWriter,
    source: ByteSource,
    file_meta: FileMetaDataset,
    pieces: Sequence[tuple[int, Piece]],
) -> None:
    """Write the Part 10 file: new meta, then copied and encoded elements in tag order."""
    out.write(file_meta_bytes(file_meta))
    for _tag, piece in pieces:
        if isinstance(piece, ElementSpan):
            for chunk in source.chunks(piece.start, piece.end):
                out.write(chunk)
        else:
            out.write(piece)
