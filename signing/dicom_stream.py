"""The byte stream a DICOM Digital Signature covers (PS3.15 Annex C, PS3.3 C.12.1.1.3).

Pure functions, no I/O: :func:`signable`, :func:`eligible_tags`,
:func:`profile_required_tags` and :func:`build_signature_stream`.

Rules implemented (PS3.3 C.12.1.1.3.1.1 "Data Elements Signed", PS3.15 C.1):

* the elements are encoded in the MAC Calculation Transfer Syntax (Explicit VR
  Little Endian, 1.2.840.10008.1.2.1, unless the pixel data is encapsulated,
  in which case the object's own transfer syntax), in ascending tag order;
* never included: group length tags (gggg,0000), Length to End (0008,0001),
  groups below 0008 (file meta information), group FFFA (the Digital
  Signatures Sequence), the MAC Parameters Sequence (4FFE,0001), Data Set
  Trailing Padding (FFFC,FFFC), item and sequence delimitation items, elements
  with VR UN and sequences that contain UN at any depth;
* a sequence is written as its tag, ``SQ`` and the two reserved bytes *without*
  its length; each item as the Item tag (FFFE,E000) *without* its length,
  followed by all its elements; no Item Delimitation Item; and the Sequence
  Delimitation Item tag (FFFE,E0DD) *without* its length closes the sequence.
  Encapsulated pixel data is written the same way, each fragment with its tag
  and length.  This is the encoding DCMTK's ``writeSignatureFormat`` produces;
  DCMTK ``dcmsign`` is the interoperability reference (R-SIG-3);
* after the signed data elements, the attributes of the Digital Signatures
  Sequence item itself are appended in tag order, except Certificate of Signer,
  Signature, Certified Timestamp Type and Certified Timestamp (PS3.15 C.1).

The exclusions apply inside sequence items as well ("except those disallowed
above"); DCMTK 3.6.7 ``dcmsign --dump`` produces byte-identical streams, which
the tests check.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.tag import BaseTag, Tag

from pki.errors import SigningError

__all__ = [
    "AUTHORIZATION_REQUIRED_IF_PRESENT",
    "CREATOR_REQUIRED_IF_PRESENT",
    "EXCLUDED_FROM_SIGNATURE_ITEM",
    "EXPLICIT_VR_LE",
    "PROFILE_REQUIRED",
    "build_signature_stream",
    "contains_un",
    "eligible_tags",
    "encode_element",
    "profile_required_tags",
    "signable",
]

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_ITEM = b"\xfe\xff\x00\xe0"
_SEQ_DELIM = b"\xfe\xff\xdd\xe0"
_ITEM_TAG, _ITEM_DELIM_TAG, _SEQ_DELIM_TAG = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

#: Signature-item attributes not covered by the MAC (PS3.15 C.1): Certificate
#: of Signer, Signature, Certified Timestamp Type, Certified Timestamp.
EXCLUDED_FROM_SIGNATURE_ITEM = frozenset({0x04000115, 0x04000120, 0x04000305, 0x04000310})

#: Attributes both RSA profiles require unconditionally (PS3.15 C.2, C.3).
PROFILE_REQUIRED = frozenset({0x00080016, 0x00080018, 0x0020000D, 0x0020000E})

_GENERAL_IMAGE_AND_PIXEL = frozenset(
    {
        # General Image module (PS3.3 C.7.6.1)
        0x00200013,
        0x00200020,
        0x00080023,
        0x00080033,
        0x00080008,
        0x00200012,
        0x00080022,
        0x00080032,
        0x0008002A,
        0x00201002,
        0x00204000,
        0x00280300,
        0x00280301,
        0x00280302,
        0x00282110,
        0x00282112,
        0x00282114,
        0x00880200,
        0x20500020,
        0x00083010,
        0x00409096,
        0x00200062,
        0x00082218,
        0x00082228,
        # Image Pixel module (PS3.3 C.7.6.3)
        0x00280002,
        0x00280004,
        0x00280010,
        0x00280011,
        0x00280100,
        0x00280101,
        0x00280102,
        0x00280103,
        0x00280006,
        0x00280034,
        0x00280106,
        0x00280107,
        0x00281101,
        0x00281102,
        0x00281103,
        0x00281201,
        0x00281202,
        0x00281203,
        0x00282000,
        0x00282002,
        0x7FE00010,
        0x7FE00001,
        0x7FE00002,
        0x00281199,
        0x00280121,
        0x00280122,
        # Graphic Annotation, SR Document General/Content (PS3.3 C.17.2, C.17.3)
        0x00700001,
        0x0040A491,
        0x0040A492,
        0x0040A493,
        0x0040A496,
        0x0040A073,
        0x0040A078,
        0x0040A07A,
        0x0040A07C,
        0x0040A360,
        0x0040A525,
        0x0040A370,
        0x0040A372,
        0x0040A375,
        0x0040A385,
        0x0040A040,
        0x0040A043,
        0x0040A050,
        0x0040A504,
        0x0040A032,
        0x0040A171,
        0x0040A730,
        # Multi-frame Functional Groups (PS3.3 C.7.6.16)
        0x52009229,
        0x52009230,
        0x00280008,
        0x00220028,
        0x00209228,
        0x00280009,
        0x00209161,
        0x00209162,
        0x00209163,
        # Encapsulated Document (PS3.3 C.24.2): scanned paper records (R-DIG-1)
        0x00420013,
        0x00420010,
        0x0040E001,
        0x00420012,
        0x00420011,
        0x00420015,
        # SC Equipment and SC Image (PS3.3 C.8.6): film digitization (R-DIG-1)
        0x00080064,
        0x00181010,
        0x00181016,
        0x00181018,
        0x00181019,
        0x00181022,
        0x00181023,
        0x00181012,
        0x00181014,
        0x00182010,
    }
)

#: Creator RSA profile (PS3.15 C.2): SOP Class/Instance, SOP creation date
#: and time, Study/Series UIDs, General Equipment, Overlay Plane, Curve,
#: Graphic Annotation, General Image, Image Pixel, SR, Waveform, Multi-frame
#: and Encapsulated Document attributes that are present.  (Curves and
#: Overlays are repeating groups, handled by :func:`profile_required_tags`.)
CREATOR_REQUIRED_IF_PRESENT = (
    PROFILE_REQUIRED
    | _GENERAL_IMAGE_AND_PIXEL
    | frozenset(
        {
            0x00080012,
            0x00080013,  # Instance Creation Date/Time
            # General Equipment module (PS3.3 C.7.5.1)
            0x00080070,
            0x00080080,
            0x00080081,
            0x00081010,
            0x00081040,
            0x00081041,
            0x00081090,
            0x00181000,
            0x00181020,
            0x00181008,
            0x0018100A,
            0x00181002,
            0x00181050,
            0x00181200,
            0x00181201,
            0x00280120,
            # Waveform (PS3.3 C.10.9)
            0x54000100,
            0x003A0230,
            0x003A0231,
            0x003A0240,
        }
    )
)

#: Authorization RSA profile (PS3.15 C.3): as Creator, without SOP creation
#: date/time and General Equipment, plus every attribute the technician or
#: physician can verify: Sekisho's "all eligible" mode covers those.
AUTHORIZATION_REQUIRED_IF_PRESENT = PROFILE_REQUIRED | _GENERAL_IMAGE_AND_PIXEL


def _group(tag: int) -> int:
    return tag >> 16


def signable(tag: int) -> bool:
    """Whether a tag may appear in Data Elements Signed (PS3.3 C.12.1.1.3.1.1)."""
    group, element = tag >> 16, tag & 0xFFFF
    if element == 0 or tag == 0x00080001 or group < 0x0008:
        return False
    if group == 0xFFFA or tag in (0x4FFE0001, 0xFFFCFFFC):
        return False
    return tag not in (_ITEM_DELIM_TAG, _SEQ_DELIM_TAG)


def _vr_of(ds: Dataset, tag: BaseTag) -> str:
    elem = ds.get_item(tag)
    if elem is None:
        return "UN"
    if isinstance(elem, RawDataElement) and elem.VR:
        return str(elem.VR)
    return str(ds[tag].VR)


def contains_un(ds: Dataset) -> bool:
    """Whether ``ds`` holds an element with VR UN at any depth."""
    for tag in ds.keys():
        vr = _vr_of(ds, tag)
        if vr == "UN":
            return True
        if vr == "SQ" and any(contains_un(item) for item in ds[tag].value):
            return True
    return False


def eligible_tags(ds: Dataset) -> list[BaseTag]:
    """Every top-level tag that may be signed ("all eligible", PS3.15 C.1 base profile)."""
    out: list[BaseTag] = []
    for tag in sorted(ds.keys()):
        if not signable(tag):
            continue
        vr = _vr_of(ds, tag)
        if vr == "UN" or (vr == "SQ" and any(contains_un(i) for i in ds[tag].value)):
            continue
        out.append(tag)
    return out


def profile_required_tags(profile: str, ds: Dataset) -> frozenset[int]:
    """Tags the Creator or Authorization RSA profile requires, among those present."""
    if profile == "creator":
        table = CREATOR_REQUIRED_IF_PRESENT
    elif profile == "authorization":
        table = AUTHORIZATION_REQUIRED_IF_PRESENT
    else:
        return frozenset()
    present = set(ds.keys())
    # Curve (50xx) and Overlay Plane (60xx) repeating groups, PS3.5 §7.6
    repeating = {t for t in present if (_group(t) & 0xFFE1) in (0x5000, 0x6000)}
    return frozenset(t for t in present if t in table) | frozenset(repeating)


def _header(tag: int, vr: str) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")


def _encapsulated(tag: int, vr: str, value: bytes) -> bytes:
    """Encapsulated pixel data in signature format: fragments keep tag and length."""
    out = bytearray(_header(tag, vr) + b"\x00\x00")
    pos = 0
    while pos + 8 <= len(value):
        group, elem, length = struct.unpack_from("<HHL", value, pos)
        item_tag = (group << 16) | elem
        if item_tag == _SEQ_DELIM_TAG:
            break
        if item_tag != _ITEM_TAG or length == 0xFFFFFFFF:
            raise SigningError("malformed encapsulated pixel data")
        out += value[pos : pos + 8 + length]
        pos += 8 + length
    out += _SEQ_DELIM
    return bytes(out)


def encode_element(
    ds: Dataset,
    tag: BaseTag,
    *,
    little_endian_raw: bool = True,
) -> bytes:
    """One element of ``ds`` in signature format (Explicit VR Little Endian).

    ``little_endian_raw`` says raw (undecoded) values are little endian and may
    be copied verbatim, so the stream holds exactly the stored bytes.
    """
    raw = ds.get_item(tag)
    vr = _vr_of(ds, tag)
    if vr == "SQ":
        out = bytearray(_header(tag, "SQ") + b"\x00\x00")
        for item in ds[tag].value:
            out += _ITEM
            for sub in sorted(item.keys()):
                if signable(int(sub)):
                    out += encode_element(item, sub, little_endian_raw=little_endian_raw)
        out += _SEQ_DELIM
        return bytes(out)
    elem: DataElement | RawDataElement
    if isinstance(raw, RawDataElement) and little_endian_raw:
        elem = raw if raw.VR else raw._replace(VR=vr)
        if elem.length == 0xFFFFFFFF:
            return _encapsulated(int(tag), vr, bytes(elem.value or b""))
        if str(elem.VR) in ("US or SS", "OB or OW", "US or OW", "US or SS or OW"):
            elem = correct_ambiguous_vr_element(convert_raw_data_element(elem, ds=ds), ds, True)
    else:
        converted = correct_ambiguous_vr_element(ds[tag], ds, True)
        assert isinstance(converted, DataElement)
        if converted.is_undefined_length and isinstance(converted.value, bytes):
            return _encapsulated(int(tag), str(converted.VR), converted.value)
        elem = converted
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem, ds._character_set)
    return fp.getvalue()


def build_signature_stream(
    ds: Dataset,
    tags: Iterable[int],
    signature_item: Dataset,
    *,
    little_endian_raw: bool = True,
) -> tuple[bytes, list[BaseTag]]:
    """The MAC input for ``tags`` of ``ds`` plus ``signature_item`` (PS3.15 C.1).

    Returns the stream and the tags actually encoded (listed tags absent from
    ``ds`` are skipped, as DCMTK does; the MAC then no longer matches).
    Unsignable tags in ``tags`` raise :class:`SigningError`.
    """
    wanted = {int(Tag(t)) for t in tags}
    for t in wanted:
        if not signable(t):
            raise SigningError(f"tag ({t >> 16:04X},{t & 0xFFFF:04X}) may not be signed")
    out = bytearray()
    encoded: list[BaseTag] = []
    for tag in sorted(ds.keys()):
        if int(tag) not in wanted:
            continue
        vr = _vr_of(ds, tag)
        if vr == "UN" or (vr == "SQ" and any(contains_un(i) for i in ds[tag].value)):
            raise SigningError(f"element {tag} has VR UN and cannot be signed")
        out += encode_element(ds, tag, little_endian_raw=little_endian_raw)
        encoded.append(tag)
    for tag in sorted(signature_item.keys()):
        if int(tag) in EXCLUDED_FROM_SIGNATURE_ITEM or not signable(int(tag)):
            continue
        out += encode_element(signature_item, tag, little_endian_raw=little_endian_raw)
    return bytes(out), encoded
