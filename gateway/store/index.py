"""Reading the index attributes of a received instance (PS3.10 file format).

``index_instance`` checks that a staged file is a complete DICOM Part 10 file
and extracts what the metadata store indexes.  It reads element headers only
(values above 1 KiB are deferred), so memory does not grow with pixel data,
and it refuses files whose declared element lengths run past the end of the
file (truncated uploads).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from pki.errors import InvalidInputError

#: Leading bytes of a received file parsed for its index attributes (PrefixIndex).
PREFIX_BYTES = 64 * 1024
#: The last index attribute :func:`index_dataset` reads is (0020,0013)
#: Instance Number; data elements come in tag order (PS3.5 7.1).
_LAST_INDEX_TAG = 0x00200013
_UNDEFINED_LENGTH = 0xFFFFFFFF


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


#: Value bytes whose text pydicom would give unchanged but for padding: printable
#: ASCII without the value delimiter (so one value, no code extensions).
_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\x00?")
_INTEGER = re.compile(rb" *[+-]?[0-9]{1,10} *\x00?")
_KEYS: dict[str, tuple[int, str]] = {}
#: The attributes index_dataset reads (besides the file meta), in tag order.
TEXT_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "Modality", "StudyDescription", "SeriesDescription",
    "ReferringPhysicianName", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "SeriesInstanceUID",
)  # fmt: skip
INTEGER_KEYWORDS = ("SeriesNumber", "InstanceNumber")
_INDEX_TAGS = frozenset(int(tag_for_keyword(k) or 0) for k in TEXT_KEYWORDS + INTEGER_KEYWORDS)


def _raw(ds: Dataset, keyword: str) -> bytes | None:
    """The value bytes of a raw (not yet converted) element of its dictionary VR.

    ``b""`` when the element is absent; None when only pydicom can say.
    """
    key = _KEYS.get(keyword)
    if key is None:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        key = _KEYS[keyword] = (tag, dictionary_VR(tag))
    elem = ds._dict.get(key[0])  # noqa: SLF001 - raw access avoids converting the value
    if elem is None:
        return b""
    if not isinstance(elem, RawDataElement) or elem.VR not in (None, key[1]):
        return None
    value = elem.value
    return value if isinstance(value, bytes) else None


# Plain ASCII values are read directly: converting them through pydicom (value
# validation, character sets) is most of the cost of indexing an instance, and
# gives the same text (tests/test_gateway_index.py compares both).
def _text(ds: Dataset, keyword: str) -> str:
    raw = _raw(ds, keyword)
    if raw is not None and _PLAIN.fullmatch(raw):
        text = raw.decode("ascii").rstrip("\x00 ")
        # pydicom keeps a person name's leading spaces; index_dataset strips the others.
        return text if _KEYS[keyword][1] == "PN" else text.strip()
    return _converted_text(ds, keyword)


def _converted_text(ds: Dataset, keyword: str) -> str:
    """The index text of an attribute, converted by pydicom."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    raw = _raw(ds, keyword)
    if raw is not None and _INTEGER.fullmatch(raw):
        return int(raw.rstrip(b"\x00"))
    return _converted_int(ds, keyword)


def _converted_int(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute, converted by pydicom."""
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
    ts = _text(meta, "TransferSyntaxUID") if meta is not None else ""
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


class PrefixIndex:
    """The index attributes of a Part 10 file, parsed from its leading bytes.

    Parsed as soon as the prefix is there; :meth:`result` decides, once the
    file's size is known, whether the prefix proves what ``index_instance``
    on the whole file would find.  It does when every index attribute lies
    before the last data element the prefix reaches, and that element, of
    defined length, ends exactly at the end of the file (typically the
    pixel data); otherwise :meth:`result` is None and the caller indexes the
    whole file.  An element that runs past the end of the file is a
    truncated instance, as for ``index_instance``.
    """

    def __init__(self, prefix: bytes | bytearray) -> None:
        self.prefix_size = len(prefix)
        self._usable = False
        self._end = 0
        self._last_tag = 0
        self._last_defined = False
        self._index: InstanceIndex | None = None
        self._error: InvalidInputError | None = None
        scanned = _scan_part10(bytes(prefix))
        if scanned is not None:
            ds, self._end, self._last_tag, self._last_defined = scanned
        else:  # anything the scanner does not handle: pydicom decides
            try:
                ds = pydicom.dcmread(BytesIO(prefix), defer_size=1024)
            except Exception:  # noqa: BLE001 - malformed, or cut by the prefix: decide on the file
                return
            elements = list(ds._dict.values())  # raw elements keep their offsets
            if not elements:
                return
            for elem in elements:
                tell = getattr(elem, "value_tell", None)
                length = getattr(elem, "length", None)
                if tell is not None and length not in (None, _UNDEFINED_LENGTH):
                    self._end = max(self._end, tell + length)
            last = elements[-1]
            self._last_tag = int(last.tag)
            self._last_defined = getattr(last, "length", None) not in (None, _UNDEFINED_LENGTH)
        try:
            self._index = index_dataset(ds)
        except InvalidInputError as exc:
            self._error = exc
        self._usable = True

    def result(self, size: int) -> InstanceIndex | None:
        """The index of the file of ``size`` bytes, or None to index the whole file."""
        if not self._usable:
            return None
        if self._end > size:
            raise TruncatedInstanceError(
                f"instance is truncated: its data elements need {self._end} bytes "
                f"but only {size} arrived"
            )
        if self.prefix_size < size and (
            not self._last_defined or self._last_tag <= _LAST_INDEX_TAG or self._end != size
        ):
            return None
        if self._error is not None:
            raise self._error
        return self._index


# -- a lean reader of a Part 10 file's leading elements ----------------------
#: Explicit VR whose length field has four bytes (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_IMPLICIT_LE = "1.2.840.10008.1.2"
#: Transfer syntaxes the scanner leaves to pydicom: big endian, deflated.
_NOT_SCANNED = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 12
_HEADER = struct.Struct("<HHL")
_EXPLICIT = struct.Struct("<HH2sH")


class _Cut(Exception):
    """The bytes end inside an element header."""


class _Unusual(Exception):
    """Something the scanner leaves to pydicom."""


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise _Cut
    if implicit:
        group, elem, length = _HEADER.unpack_from(buf, pos)
        return (group << 16) | elem, None, length, pos + 8
    group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
    tag = (group << 16) | elem
    if group == 0xFFFE:  # items and delimiters have no VR
        return tag, None, _HEADER.unpack_from(buf, pos)[2], pos + 8
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Unusual  # pydicom fails on this, rather than stopping
        return tag, vr, _HEADER.unpack_from(buf, pos + 4)[2], pos + 12
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unusual  # not an explicit VR
    return tag, vr, length, pos + 8


def _skip_items(buf: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length sequence or encapsulated pixel data."""
    if depth > _MAX_DEPTH:
        raise _Unusual
    while True:
        tag, _, length, pos = _element(buf, pos, True)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unusual
        if length != _UNDEFINED_LENGTH:
            pos += length
            continue
        while True:  # an item of undefined length: its elements, then the item delimiter
            tag, vr, length, pos = _element(buf, pos, implicit)
            if tag == _ITEM_END:
                break
            pos = _skip_value(buf, pos, vr, length, implicit, depth + 1)


def _skip_value(
    buf: bytes, pos: int, vr: bytes | None, length: int, implicit: bool, depth: int
) -> int:
    if length != _UNDEFINED_LENGTH:
        return pos + length
    if vr == b"UN":  # undefined-length UN holds implicit VR data (PS3.5 6.2.2)
        raise _Unusual
    return _skip_items(buf, pos, implicit, depth)


def _raw_element(
    buf: bytes, tag: int, vr: bytes | None, length: int, value: int, implicit: bool
) -> RawDataElement:
    """A little-endian element as pydicom's reader would make it."""
    data = buf[value : value + length]
    return RawDataElement(BaseTag(tag), vr.decode() if vr else None, length, data, value,
                          implicit, True)  # fmt: skip


def _scan_part10(buf: bytes) -> tuple[Dataset, int, int, bool] | None:
    """The top-level elements of a Part 10 file's leading bytes, as pydicom reads them.

    Returns a data set holding the raw file meta and index elements, the end
    of the furthest defined-length top-level value, and the tag and
    definedness of the last element reached; None when pydicom should read
    the bytes instead (another encoding, or elements cut or unusual).
    Same results as ``dcmread(defer_size=1024)`` for what PrefixIndex uses,
    at a fraction of the cost (tests/test_gateway_index.py).
    """
    if len(buf) < 144 or buf[128:132] != b"DICM":
        return None
    try:
        meta: dict[BaseTag, RawDataElement] = {}
        pos = 132
        while pos + 8 <= len(buf) and buf[pos : pos + 2] == b"\x02\x00":
            tag, vr, length, value = _element(buf, pos, False)
            if length == _UNDEFINED_LENGTH or value + length > len(buf):
                return None
            meta[BaseTag(tag)] = _raw_element(buf, tag, vr, length, value, False)
            pos = value + length
        ts_elem = meta.get(0x00020010)
        if ts_elem is None:
            return None
        ts = ts_elem.value.decode("ascii", "replace").rstrip("\x00 ")
        if ts in _NOT_SCANNED:
            return None
        implicit = ts == _IMPLICIT_LE
        wanted = _INDEX_TAGS
        elements: dict[BaseTag, RawDataElement] = {}
        end, last_tag, last_defined = 0, 0, False
        while pos < len(buf):
            try:
                tag, vr, length, value = _element(buf, pos, implicit)
            except _Cut:
                break  # the prefix ends inside an element header
            if tag >> 16 == 0xFFFE:
                return None
            last_tag, last_defined = tag, length != _UNDEFINED_LENGTH
            if last_defined:
                end = max(end, value + length)
                if tag in wanted:
                    if value + length > len(buf):
                        return None
                    elements[BaseTag(tag)] = _raw_element(buf, tag, vr, length, value, implicit)
                pos = value + length
            else:
                # A sequence cut by the prefix: pydicom cannot finish it either.
                pos = _skip_value(buf, value, vr, length, implicit, 0)
        if not last_tag:
            return None
    except (_Cut, _Unusual, struct.error, UnicodeDecodeError):
        return None
    ds = Dataset(elements)
    file_meta = FileMetaDataset()
    # Group 0002 only, by construction: FileMetaDataset's own check is not needed.
    file_meta._dict.update(meta)  # noqa: SLF001
    ds.file_meta = file_meta
    return ds, end, last_tag, last_defined
