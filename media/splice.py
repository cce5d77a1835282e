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
2. hands pydicom only the elements reconciliation reads or writes
   (:func:`head_bytes`, :func:`read_head`; ``media.reconcile.RECONCILED_TAGS``),
   never the pixel data, so that :func:`media.reconcile.reconcile_instance`
   works on an ordinary ``Dataset``;
3. compares that data set after reconciliation with what was read
   (:func:`diff_head`), giving a :class:`Patch`: elements replaced (encoded
   by pydicom in the data set's own transfer syntax and character set),
   removed and added.  The patch depends only on the bytes of those elements,
   so the caller reuses it for every instance of a series that carries the
   same ones;
4. merges the patch with the spans in ascending tag order (:func:`apply_patch`)
   and writes a new File Meta Information (encoded by pydicom, reused per SOP
   Class and transfer syntax: :class:`FileMetaTemplates`), then each piece:
   copied byte for byte from the source or encoded (:func:`write_spliced`),
   hashing on the way.

Unchanged elements keep their exact bytes, including Specific Character Set
and every ISO 2022 escape sequence (R-PDI-1).  Retired group lengths
(gggg,0000) outside group 0002 are dropped, as pydicom does when it writes
(PS3.5 §7.2).  Files this module cannot splice raise :class:`SpliceUnsupported`
and are rewritten with pydicom by the caller: deflated data sets (PS3.5
§A.5), transfer syntaxes pydicom does not know, duplicate tags, File Meta
elements inside the data set, an element to reconcile over
:data:`HEAD_ELEMENT_LIMIT`, or a data set pydicom reads differently from the
structure walk.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import threading
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
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from .dicomfile import LONG_VRS, MAGIC, PREAMBLE_LENGTH, ElementSpan

#: An element to reconcile larger than this is not spliced (pydicom rewrites the file).
HEAD_ELEMENT_LIMIT = 1024 * 1024
_COPY_BYTES = 1024 * 1024

Piece = ElementSpan | bytes
_UID_TEXT = re.compile(r"[0-9.]{1,64}")
IMPLEMENTATION_VERSION_NAME = "SEKISHO_PDI"
#: Deflated Explicit VR Little Endian, JPIP Referenced Deflate, JPIP HTJ2K Referenced Deflate.
_DEFLATED = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)


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
    """The top-level elements reconciliation works on, read by pydicom, and a snapshot."""

    dataset: Dataset
    implicit_vr: bool
    little_endian: bool
    #: Elements as read (raw elements are immutable; compared by identity, then value).
    original: dict[BaseTag, Any]
    #: Elements pydicom decoded while reading (undefined-length sequences), encoded as read.
    original_encoded: dict[BaseTag, bytes]


@dataclass(frozen=True, slots=True)
class Patch:
    """How reconciliation changed the top-level data set (applied by :func:`apply_patch`)."""

    #: Elements that were read and now have other bytes.
    replaced: dict[int, bytes]
    removed: frozenset[int]
    #: Elements that were not in the data set, encoded.
    added: dict[int, bytes]


def can_splice(transfer_syntax_uid: str) -> bool:
    """Whether the data set of this transfer syntax can be spliced.

    Yes for every transfer syntax pydicom knows whose data set is not deflated
    (PS3.5 §A.5, and the JPIP Referenced Deflate ones): the native ones and all
    encapsulated ones (their data set is Explicit VR Little Endian, §A.4).
    """
    if not _UID_TEXT.fullmatch(transfer_syntax_uid):
        return False
    uid = UID(transfer_syntax_uid)
    return uid.is_transfer_syntax and not uid.is_deflated and uid not in _DEFLATED


def _is_group_length(tag: int) -> bool:
    """Retired Group Length (gggg,0000) of a data set group (PS3.5 §7.2)."""
    return tag & 0xFFFF == 0 and tag >> 16 > 6


def head_bytes(
    source: ByteSource, spans: Sequence[ElementSpan], tags: frozenset[int]
) -> tuple[bytes, frozenset[int]]:
    """The raw bytes of the top-level elements in ``tags``, in file order, and their tags.

    Raises :class:`SpliceUnsupported` for a layout that cannot be spliced:
    the same tag twice, command or File Meta elements in the data set, or
    one of these elements over :data:`HEAD_ELEMENT_LIMIT`.
    """
    seen: set[int] = set()
    parts: list[bytes] = []
    chosen: list[int] = []
    for span in spans:
        if span.tag in seen:
            raise SpliceUnsupported("the data set holds the same tag twice")
        if span.tag >> 16 <= 0x0002:
            raise SpliceUnsupported("the data set holds command or file meta elements")
        seen.add(span.tag)
        if span.tag in tags:
            if span.end - span.start > HEAD_ELEMENT_LIMIT:
                raise SpliceUnsupported("an element to reconcile is too large")
            parts.append(source.read(span.start, span.end))
            chosen.append(span.tag)
    return b"".join(parts), frozenset(chosen)


def read_head(blob: bytes, tags: frozenset[int], *, implicit_vr: bool, little_endian: bool) -> Head:
    """Let pydicom read ``blob`` (from :func:`head_bytes`, holding ``tags``) as a data set."""
    ds = read_dataset(io.BytesIO(blob), implicit_vr, little_endian)
    if ds.original_encoding != (implicit_vr, little_endian):
        raise SpliceUnsupported("the data set is not encoded as its transfer syntax says")
    if set(ds.keys()) != tags:  # pydicom stops quietly where it cannot go on
        raise SpliceUnsupported("pydicom reads the data set differently from the structure walk")
    original = dict(ds._dict)
    head = Head(ds, implicit_vr, little_endian, original, {})
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


def _changed(head: Head, tag: BaseTag, elem: Any, encodings: Any) -> bytes | None:
    """``None`` when ``elem`` still holds what was read, else its new encoding."""
    before = head.original[tag]
    if elem is before:
        if tag not in head.original_encoded:
            return None  # an untouched raw element
    elif isinstance(before, RawDataElement) and isinstance(elem, DataElement):
        try:  # read (hence decoded) but maybe not changed: compare values
            fresh = convert_raw_data_element(
                before, encoding=head.dataset._character_set, ds=head.dataset
            )
            if fresh.VR == elem.VR and fresh.value == elem.value:
                return None
        except Exception:  # a value pydicom cannot decode: treat as changed
            pass
    encoded = encode_element(head, elem, encodings)
    if head.original_encoded.get(tag) == encoded:
        return None  # a decoded sequence that was not modified in place
    return encoded


def diff_head(head: Head) -> Patch:
    """Compare the data set after reconciliation with the snapshot taken when read."""
    current = head.dataset._dict
    encodings = _encodings(head.dataset)
    replaced: dict[int, bytes] = {}
    added: dict[int, bytes] = {}
    for tag in head.original:
        elem = current.get(tag)
        if elem is not None:
            encoded = _changed(head, tag, elem, encodings)
            if encoded is not None:
                replaced[int(tag)] = encoded
    for tag, elem in current.items():
        if tag not in head.original and not _is_group_length(tag):
            added[int(tag)] = encode_element(head, elem, encodings)
    removed = frozenset(int(t) for t in head.original if t not in current)
    return Patch(replaced, removed, added)


def apply_patch(spans: Sequence[ElementSpan], patch: Patch) -> list[tuple[int, Piece]]:
    """Pieces of the new data set in ascending tag order (PS3.5 §7.1).

    An :class:`~media.dicomfile.ElementSpan` is copied from the source; bytes
    are an element encoded by pydicom.  Raises :class:`SpliceUnsupported` if
    the patch adds an element the source holds but reconciliation did not see.
    """
    pieces: list[tuple[int, Piece]] = []
    for span in spans:
        tag = span.tag
        if _is_group_length(tag) or tag in patch.removed:
            continue
        if tag in patch.added:
            raise SpliceUnsupported("an added element is already in the data set")
        pieces.append((tag, patch.replaced.get(tag, span)))
    pieces.extend(patch.added.items())
    pieces.sort(key=lambda piece: piece[0])
    return _coalesce(pieces)


def _coalesce(pieces: list[tuple[int, Piece]]) -> list[tuple[int, Piece]]:
    """Join copies of elements that follow each other in the source into one copy."""
    out: list[tuple[int, Piece]] = []
    for tag, piece in pieces:
        if out and isinstance(piece, ElementSpan):
            last_tag, last = out[-1]
            if isinstance(last, ElementSpan) and last.end == piece.start:
                out[-1] = (last_tag, ElementSpan(last.tag, last.start, piece.end))
                continue
        out.append((tag, piece))
    return out


def new_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> FileMetaDataset:
    """File Meta Information for the file Sekisho writes (PS3.10 §7.1, Table 7.1-1)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def file_meta_bytes(file_meta: FileMetaDataset) -> bytes:
    """Preamble (zeroed), ``DICM`` and File Meta Information (PS3.10 §7.1)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, file_meta, enforce_standard=True)
    return b"\x00" * PREAMBLE_LENGTH + MAGIC + bytes(fp.getvalue())


class FileMetaTemplates:
    """File Meta Information bytes, encoded by pydicom once per kind of instance (thread-safe).

    Two instances with the same SOP Class, transfer syntax and length of SOP
    Instance UID have File Meta Information that differs only in the value of
    Media Storage SOP Instance UID (0002,0003): the group length is the same.
    The first is encoded by pydicom; for the others that value is replaced
    (a UI value is padded with one NUL to an even length, PS3.5 §6.2).
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[tuple[str, str, int], tuple[bytes, int]] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def encode(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
        """Preamble, ``DICM`` and File Meta Information for one instance."""
        if not _UID_TEXT.fullmatch(sop_instance_uid):  # let pydicom handle the odd ones
            return file_meta_bytes(new_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax))
        value = sop_instance_uid.encode("ascii")
        value += b"\0" * (len(value) % 2)
        key = (sop_class_uid, transfer_syntax, len(value))
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            data = file_meta_bytes(new_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax))
            offset = _meta_value_offset(data, 0x00020003)
            if offset is not None and data[offset : offset + len(value)] == value:
                with self._lock:
                    if len(self._entries) >= self._max:
                        self._entries.clear()
                    self._entries[key] = (data, offset)
            return data
        data, offset = entry
        return data[:offset] + value + data[offset + len(value) :]


def _meta_value_offset(data: bytes, wanted: int) -> int | None:
    """Offset of the value of a File Meta element (explicit VR little endian, PS3.5 §7.1.2)."""
    pos = PREAMBLE_LENGTH + len(MAGIC)
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return None
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if (group << 16) | element == wanted:
            return start
        pos = start + length
    return None


def write_spliced(
    out: HashingWriter, source: ByteSource, file_meta: bytes, pieces: Sequence[tuple[int, Piece]]
) -> None:
    """Write the Part 10 file: preamble and new meta (:class:`FileMetaTemplates`), then
    the copied and encoded elements in tag order."""
    out.write(file_meta)
    for _tag, piece in pieces:
        if isinstance(piece, ElementSpan):
            for chunk in source.chunks(piece.start, piece.end):
                out.write(chunk)
        else:
            out.write(piece)
