"""Examine one DICOM file from a medium: form, structure, header fields, hash.

* :func:`sniff` recognizes the PS3.10 §7.1 form (128-byte preamble + ``DICM``)
  and the tolerated form without preamble (a bare data set starting with a
  group 0002 or 0008 element), which is reported.
* :func:`parse_file` walks every element header of the file (PS3.5 §7.1 and
  §7.5: explicit/implicit VR, defined and undefined lengths, items and
  delimiters) with seeks only, so a truncated copy or a corrupt length is
  found: pydicom alone silently returns a partial data set for a truncated
  file.  On the way it keeps the raw bytes of the few top-level elements the
  report needs, so inspecting 10,000 files does not build 10,000 pydicom data
  sets.
* :func:`parse_layout` does the same walk and also returns where each
  top-level data element starts and ends (:class:`ElementSpan`), which the
  importer's splice writer (:mod:`media.splice`) copies unchanged.
* :func:`examine_stream` hashes the file in chunks and parses it from memory
  when it fits in the first chunk (the usual case), else with seeks.

Content problems raise :class:`DicomFileProblem`, which the inspector and the
importer turn into findings; nothing else is raised for hostile bytes.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO

from pydicom.charset import decode_bytes

from .charset import parse_terms, python_encodings
from .conformance import classify_content

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"

LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)  # PS3.5 Table 7.1-1: 2 reserved bytes and a 4-byte length
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_MAX_NESTING = 64
_MAX_VALUE = 4096
#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.3 C.7.6.3).
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"

#: Top-level elements whose raw value is kept: tag -> field name.
_WANTED = {
    0x00020002: "meta_sop_class",
    0x00020003: "meta_sop_instance",
    0x00020010: "transfer_syntax",
    0x00080005: "charset",
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080020: "study_date",
    0x00080030: "study_time",
    0x00080050: "accession_number",
    0x00080060: "modality",
    0x00080080: "institution_name",
    0x00081030: "study_description",
    0x0008103E: "series_description",
    0x00100010: "patient_name",
    0x00100020: "patient_id",
    0x00100021: "issuer_of_patient_id",
    0x00100030: "patient_birth_date",
    0x00100040: "patient_sex",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00200010: "study_id",
    0x00200011: "series_number",
    0x00200013: "instance_number",
    0x00280010: "rows",
}
#: Values decoded with the Specific Character Set (the rest are ASCII).
_TEXT_FIELDS = frozenset(
    {"institution_name", "study_description", "series_description", "accession_number",
     "patient_id", "issuer_of_patient_id", "study_id"}
)  # fmt: skip


class FileForm(StrEnum):
    """How a file presents itself."""

    PART10 = "part10"
    NO_PREAMBLE = "no-preamble"
    NOT_DICOM = "not-dicom"


class ProblemKind(StrEnum):
    """Why a DICOM file cannot be used."""

    NOT_DICOM = "not-dicom"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"


class DicomFileProblem(Exception):
    """A file on the medium is not usable DICOM; ``detail`` says why in plain words."""

    def __init__(self, kind: ProblemKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def sniff(prefix: bytes) -> FileForm:
    """Classify a file from its first 132 bytes (PS3.10 §7.1)."""
    if (
        len(prefix) >= PREAMBLE_LENGTH + 4
        and prefix[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == MAGIC
    ):
        return FileForm.PART10
    if len(prefix) >= 8:
        group_le = int.from_bytes(prefix[0:2], "little")
        element = int.from_bytes(prefix[2:4], "little")
        if group_le in (0x0002, 0x0008) and element < 0x0100:
            return FileForm.NO_PREAMBLE
        if int.from_bytes(prefix[0:2], "big") == 0x0008:
            return FileForm.NO_PREAMBLE
    return FileForm.NOT_DICOM


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """The header fields of one instance that inspection and import need.

    Text is decoded for display only; ``patient_name_raw`` keeps the bytes as
    stored, with ``character_set`` (the file's Specific Character Set terms).
    """

    form: FileForm
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name_raw: bytes
    character_set: tuple[str, ...]
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    study_description: str
    accession_number: str
    study_id: str
    modality: str
    series_number: str
    series_description: str
    institution_name: str
    instance_number: str
    #: The preamble starts like a Windows/Linux program (PE/DICOM polyglot).
    preamble_is_program: bool
    implicit_vr: bool
    little_endian: bool


@dataclass(frozen=True, slots=True)
class ElementSpan:
    """Where one top-level data element lies in the file (PS3.5 §7.1).

    ``start`` is the offset of its tag, ``end`` the offset just past it: past
    its value, or past the Sequence Delimitation Item of an undefined-length
    value (PS3.5 §7.5.2, §A.4 for encapsulated pixel data).
    """

    tag: int
    start: int
    end: int


class _Walker:
    """Walks element headers with reads of a few bytes and seeks."""

    def __init__(
        self, fp: BinaryIO, size: int, little: bool, spans: list[ElementSpan] | None = None
    ) -> None:
        self.fp = fp
        self.size = size
        self.endian = "<" if little else ">"
        self.values: dict[int, bytes] = {}
        self.top_level_tags: set[int] = set()
        #: Top-level elements of the data set, in file order (only when asked for).
        self.spans = spans

    def _read(self, n: int, what: str) -> bytes:
        data = self.fp.read(n)
        if len(data) < n:
            raise DicomFileProblem(
                ProblemKind.TRUNCATED, f"The file ends inside {what} at byte {self.fp.tell()}."
            )
        return data

    def _skip(self, length: int, what: str) -> None:
        pos = self.fp.tell()
        if pos + length > self.size:
            raise DicomFileProblem(
                ProblemKind.TRUNCATED,
                f"{what} at byte {pos} needs {length} bytes but the file ends at {self.size}.",
            )
        self.fp.seek(pos + length)

    def tag(self) -> int:
        group, elem = struct.unpack(self.endian + "HH", self._read(4, "an element tag"))
        return (group << 16) | elem

    def element(self, tag: int, explicit: bool, depth: int) -> None:
        """Read one element header (tag already read); keep, skip or walk its value."""
        vr = b""
        if explicit:
            vr = self._read(2, "a value representation")
            if not vr.isalpha() or not vr.isupper():
                # Some writers switch to implicit VR inside sequences; pydicom
                # tolerates it (config.assume_implicit_vr_switch), so do we.
                self.fp.seek(self.fp.tell() - 2)
                explicit = False
        if explicit and vr not in LONG_VRS:
            (length,) = struct.unpack(self.endian + "H", self._read(2, "a length"))
        else:
            if explicit:
                self._read(2, "a reserved field")
            (length,) = struct.unpack(self.endian + "L", self._read(4, "a length"))
        name = f"The element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if length != _UNDEFINED:
            if depth == 0 and tag in _WANTED and length <= _MAX_VALUE:
                self.values[tag] = self._read(length, name)
            else:
                self._skip(length, name)
            return
        if explicit and vr not in (b"SQ", b"UN", b"OB", b"OW"):
            raise DicomFileProblem(
                ProblemKind.MALFORMED,
                f"{name} has an undefined length, which its type does not allow.",
            )
        # Undefined-length UN content is implicit VR little endian (PS3.5 §6.2.2).
        self.sequence(explicit and vr != b"UN", depth + 1)

    def sequence(self, explicit: bool, depth: int) -> None:
        """Items up to the Sequence Delimitation Item (also encapsulated pixel data)."""
        if depth > _MAX_NESTING:
            raise DicomFileProblem(ProblemKind.MALFORMED, "Sequences are nested too deeply.")
        while True:
            tag = self.tag()
            (length,) = struct.unpack(self.endian + "L", self._read(4, "an item length"))
            if tag == _SEQ_DELIM:
                return
            if tag != _ITEM:
                raise DicomFileProblem(
                    ProblemKind.MALFORMED, f"Expected a sequence item at byte {self.fp.tell() - 8}."
                )
            if length != _UNDEFINED:
                self._skip(length, "A sequence item")
            else:
                self.dataset(explicit, depth + 1, in_item=True)

    def dataset(self, explicit: bool, depth: int, *, in_item: bool) -> None:
        """Elements up to the end of file (top level) or the Item Delimitation Item."""
        if depth > _MAX_NESTING:
            raise DicomFileProblem(ProblemKind.MALFORMED, "Sequences are nested too deeply.")
        while True:
            if not in_item and self.fp.tell() >= self.size:
                return
            tag = self.tag()
            if tag == 0 and not in_item and self._zero_padding():
                return
            if tag == _ITEM_DELIM:
                self._read(4, "an item delimiter")
                if in_item:
                    return
                raise DicomFileProblem(ProblemKind.MALFORMED, "A stray item delimiter was found.")
            if tag in (_ITEM, _SEQ_DELIM):
                raise DicomFileProblem(
                    ProblemKind.MALFORMED,
                    f"A stray item tag was found at byte {self.fp.tell() - 4}.",
                )
            if in_item:
                self.element(tag, explicit, depth)
                continue
            self.top_level_tags.add(tag)
            start = self.fp.tell() - 4
            self.element(tag, explicit, depth)
            if self.spans is not None:
                self.spans.append(ElementSpan(tag, start, self.fp.tell()))

    def meta(self) -> None:
        """File Meta Information: group 0002, always explicit VR little endian."""
        while self.fp.tell() < self.size:
            pos = self.fp.tell()
            head = self.fp.read(2)
            self.fp.seek(pos)
            if len(head) < 2 or int.from_bytes(head, "little") != 0x0002:
                return
            self.element(self.tag(), True, 0)

    def _zero_padding(self) -> bool:
        """Media writers sometimes pad files with zeros to a sector boundary."""
        pos = self.fp.tell()
        remaining = self.size - pos
        if remaining > 4096:
            return False
        tail = self.fp.read(remaining)
        self.fp.seek(pos)
        return len(tail) == remaining and not tail.strip(b"\x00")


def _ascii(value: bytes | None) -> str:
    if not value:
        return ""
    return value.decode("ascii", "replace").strip(" \x00")


def _encoding_of(ts: str, fp: BinaryIO, start: int) -> tuple[bool, bool]:
    """(implicit VR, little endian) for the data set (PS3.5 §10, Annex A)."""
    if ts == _IMPLICIT_LE:
        return True, True
    if ts == _EXPLICIT_BE:
        return False, False
    if ts:
        return False, True
    fp.seek(start)
    head = fp.read(6)
    fp.seek(start)
    little = not (len(head) >= 2 and int.from_bytes(head[0:2], "big") == 0x0008)
    explicit = len(head) == 6 and head[4:6].isalpha() and head[4:6].isupper()
    return not explicit, little


def parse_file(fp: BinaryIO, size: int) -> HeaderInfo:
    """Walk the whole file and return its header fields (see module docstring)."""
    return _parse(fp, size, None)


def parse_layout(fp: BinaryIO, size: int) -> tuple[HeaderInfo, list[ElementSpan] | None]:
    """:func:`parse_file`, plus the span of every top-level data set element.

    The spans cover the data set only (not the File Meta Information), in file
    order; ``None`` for a deflated data set (PS3.5 §A.5), which is not walked.
    """
    spans: list[ElementSpan] = []
    header = _parse(fp, size, spans)
    return header, (None if header.transfer_syntax_uid == _DEFLATED else spans)


def _parse(fp: BinaryIO, size: int, spans: list[ElementSpan] | None) -> HeaderInfo:
    fp.seek(0)
    prefix = fp.read(PREAMBLE_LENGTH + 4)
    form = sniff(prefix)
    if form is FileForm.NOT_DICOM:
        raise DicomFileProblem(ProblemKind.NOT_DICOM, "It does not start like a DICOM file.")
    start = PREAMBLE_LENGTH + 4 if form is FileForm.PART10 else 0
    fp.seek(start)
    walker = _Walker(fp, size, little=True)
    walker.meta()
    values = walker.values
    ts = _ascii(values.get(0x00020010))
    implicit, little = _encoding_of(ts, fp, fp.tell())
    if ts != _DEFLATED:
        body = _Walker(fp, size, little=little, spans=spans)
        body.dataset(not implicit, 0, in_item=False)
        values.update(body.values)
        if 0x00280010 in values and not body.top_level_tags & _PIXEL_TAGS:
            raise DicomFileProblem(
                ProblemKind.TRUNCATED,
                "The image description is present but the pixel data is missing "
                "(the file was probably cut short).",
            )
    return _header(form, prefix, ts, implicit, little, values)


def _header(
    form: FileForm,
    prefix: bytes,
    ts: str,
    implicit: bool,
    little: bool,
    values: dict[int, bytes],
) -> HeaderInfo:
    fields = {name: values.get(tag) for tag, name in _WANTED.items()}
    terms = parse_terms(fields["charset"] or b"")
    encodings = python_encodings(terms)

    def text(name: str) -> str:
        raw = fields[name]
        if not raw:
            return ""
        if name not in _TEXT_FIELDS:
            return _ascii(raw)
        try:
            return decode_bytes(raw, encodings, {0x5C}).strip(" \x00")
        except Exception:
            return raw.decode("latin-1").strip(" \x00")

    sop_class = text("sop_class_uid") or text("meta_sop_class")
    sop_instance = text("sop_instance_uid") or text("meta_sop_instance")
    if not sop_class or not sop_instance:
        if form is FileForm.PART10:
            raise DicomFileProblem(
                ProblemKind.MALFORMED, "The file has no SOP Class or SOP Instance UID."
            )
        raise DicomFileProblem(ProblemKind.NOT_DICOM, "The file is not a DICOM instance.")
    if not ts:
        ts = _IMPLICIT_LE if implicit else (_EXPLICIT_BE if not little else "1.2.840.10008.1.2.1")
    return HeaderInfo(
        form=form,
        transfer_syntax_uid=ts,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=text("study_instance_uid"),
        series_instance_uid=text("series_instance_uid"),
        patient_id=text("patient_id"),
        issuer_of_patient_id=text("issuer_of_patient_id"),
        patient_name_raw=(fields["patient_name"] or b"").rstrip(b" \x00"),
        character_set=terms,
        patient_birth_date=text("patient_birth_date"),
        patient_sex=text("patient_sex"),
        study_date=text("study_date"),
        study_time=text("study_time"),
        study_description=text("study_description"),
        accession_number=text("accession_number"),
        study_id=text("study_id"),
        modality=text("modality"),
        series_number=text("series_number"),
        series_description=text("series_description"),
        institution_name=text("institution_name"),
        instance_number=text("instance_number"),
        preamble_is_program=form is FileForm.PART10
        and classify_content(prefix[:PREAMBLE_LENGTH]) is not None,
        implicit_vr=implicit,
        little_endian=little,
    )


@dataclass(slots=True)
class Examination:
    """A file's SHA-256 and size, and its header or the problem found."""

    sha256: str
    size: int
    header: HeaderInfo | None
    problem: DicomFileProblem | None


def examine_stream(fp: BinaryIO, chunk_bytes: int) -> Examination:
    """Hash ``fp`` from its start and parse it (from memory when it fits one chunk)."""
    fp.seek(0)
    digest = hashlib.sha256()
    first = fp.read(chunk_bytes)
    digest.update(first)
    size = len(first)
    while True:
        chunk = fp.read(chunk_bytes)
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    source: BinaryIO = io.BytesIO(first) if size == len(first) else fp
    try:
        header: HeaderInfo | None = parse_file(source, size)
        problem = None
    except DicomFileProblem as exc:
        header, problem = None, exc
    except (struct.error, ValueError, OverflowError) as exc:
        header = None
        problem = DicomFileProblem(
            ProblemKind.MALFORMED, f"The file is damaged ({type(exc).__name__})."
        )
    return Examination(digest.hexdigest(), size, header, problem)
