"""Character sets: keep raw bytes, decode for display, check repertoires.

Japanese media use ``ISO 2022 IR 87`` (JIS X 0208 kanji/kana, usually with
``ISO 2022 IR 6`` or ``ISO 2022 IR 13`` for the first group) and
``ISO_IR 192`` (UTF-8) (PS3.5 §6.1, Annex H and Annex I).  Sekisho never
re-encodes what it did not change: values are taken with
``Dataset.get_item`` (a raw element keeps its bytes) and decoded only for
display.  When Sekisho writes a value into an imported instance it must fit
the instance's existing Specific Character Set; :func:`representable` checks
that per PS3.5 repertoires (not per Python codec, which is more permissive:
Python's ``shift_jis`` also encodes kanji, JIS X 0201 does not).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from pydicom.charset import convert_encodings, python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

_CHARSET_TAG = 0x00080005


def raw_value(ds: Dataset, tag: int) -> bytes:
    """The stored bytes of a text element, without converting it (``b""`` if absent)."""
    try:
        elem = ds.get_item(tag)
    except Exception:
        return b""
    if elem is None:
        return b""
    if isinstance(elem, RawDataElement):
        value = elem.value
        return bytes(value) if isinstance(value, bytes | bytearray) else b""
    value = elem.value
    original = getattr(value, "original_string", None)
    if isinstance(original, bytes):
        return original
    if isinstance(value, bytes):
        return value
    if value is None:
        return b""
    return str(value).encode("utf-8", "replace")


def parse_terms(raw: bytes) -> tuple[str, ...]:
    """Split a raw Specific Character Set value into its defined terms."""
    text = raw.decode("ascii", "replace")
    terms = [t.strip() for t in text.split("\\")]
    if all(t == "" for t in terms):
        return ()
    return tuple(terms)


def charset_terms(ds: Dataset, inherited: Sequence[str] = ()) -> tuple[str, ...]:
    """The Specific Character Set terms of ``ds`` (or ``inherited`` when absent)."""
    if _CHARSET_TAG not in ds:
        return tuple(inherited)
    try:
        elem = ds.get_item(_CHARSET_TAG)
    except Exception:
        return tuple(inherited)
    if elem is None:
        return tuple(inherited)
    if isinstance(elem, RawDataElement):
        return parse_terms(raw_value(ds, _CHARSET_TAG))
    value = elem.value
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return parse_terms(value.encode("ascii", "replace"))
    return tuple(str(v).strip() for v in value)


def python_encodings(terms: Sequence[str]) -> list[str]:
    """Python codec names for Specific Character Set terms (pydicom's mapping)."""
    try:
        return list(convert_encodings(list(terms) or ["ISO_IR 6"]))
    except Exception:
        return ["iso8859"]


def decode_person_name(raw: bytes, terms: Sequence[str]) -> str:
    """Decode a PN value for display (all component groups, ``=``-separated)."""
    if not raw:
        return ""
    try:
        return str(PersonName(raw, encodings=python_encodings(terms))).rstrip(" \x00")
    except Exception:
        return raw.decode("latin-1", "replace").rstrip(" \x00")


# --- Repertoires (PS3.3 C.12.1.1.2, PS3.5 §6.1.2.5) --------------------------------

_ASCII_PRINTABLE = {chr(c) for c in range(0x20, 0x7F)}


def _term_accepts(term: str, ch: str) -> bool:
    if term in ("", "ISO_IR 6", "ISO 2022 IR 6"):
        return ch in _ASCII_PRINTABLE
    if term in ("ISO_IR 192",):
        return True
    if term in ("ISO_IR 13", "ISO 2022 IR 13"):
        # JIS X 0201: Roman (shared with ASCII for our purposes) + half-width katakana.
        return ch in _ASCII_PRINTABLE or 0xFF61 <= ord(ch) <= 0xFF9F
    if term == "ISO 2022 IR 87":
        if ch in _ASCII_PRINTABLE:
            return False  # G0 of IR 87 is two-byte; ASCII comes from IR 6 / IR 13
        try:
            return len(ch.encode("iso2022_jp")) > 1
        except UnicodeEncodeError:
            return False
    if term == "ISO 2022 IR 159":
        try:
            ch.encode("iso2022_jp_2")
            return ch not in _ASCII_PRINTABLE
        except UnicodeEncodeError:
            return False
    codec = python_encoding.get(term)
    if codec is None:
        return False
    try:
        codecs.lookup(codec)
        ch.encode(codec)
        return True
    except (LookupError, UnicodeEncodeError):
        return False


def representable(value: str, terms: Sequence[str]) -> bool:
    """True if every character of ``value`` is in the repertoire of ``terms``.

    With no terms, the default repertoire (ISO-IR 6, i.e. printable ASCII)
    applies.  A single ``ISO 2022 IR 87`` term implies ISO-IR 6 for G0, as in
    PS3.5 Annex H examples (``\\ISO 2022 IR 87``).
    """
    effective = list(terms) or [""]
    if effective[0].startswith("ISO 2022") and "" not in effective:
        effective.append("")
    return all(any(_term_accepts(t, ch) for t in effective) for ch in value)


def pn_fits(value: str, terms: Sequence[str]) -> bool:
    """True if a PN value (with ``^`` and ``=`` delimiters) can be written unchanged."""
    return representable(value, terms) and _round_trips(value, terms)


def _round_trips(value: str, terms: Sequence[str]) -> bool:
    encodings = python_encodings(terms)
    try:
        encoded = PersonName(value, encodings=encodings).encode(encodings)
        return str(PersonName(encoded, encodings=encodings)) == value
    except Exception:
        return False


def alphabetic_group(value: str) -> str:
    """The first (alphabetic) component group of a PN value (PS3.5 §6.2.1)."""
    return value.split("=", 1)[0]


def best_person_name(value: str, terms: Sequence[str]) -> str | None:
    """The fullest form of ``value`` that fits ``terms``, or ``None``.

    Tries the whole name (all component groups), then the alphabetic group
    alone; the existing Specific Character Set is never changed.
    """
    if value and pn_fits(value, terms):
        return value
    alpha = alphabetic_group(value)
    if alpha and pn_fits(alpha, terms):
        return alpha
    return None


def describe_terms(terms: Sequence[str]) -> str:
    """Human form of a Specific Character Set for messages."""
    return "\\".join(terms) if terms else "default (ISO-IR 6)"


def safe_text(ds: Dataset, keyword: str) -> str:
    """A decoded text value for display; ``""`` when absent or undecodable.

    Multi-valued elements are joined with ``\\``.  Any pydicom error on
    hostile bytes is swallowed: display text is never worth a crash.
    """
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    try:
        if isinstance(value, list | tuple) or value.__class__.__name__ == "MultiValue":
            return "\\".join(str(v) for v in value).strip()
        return str(value).strip()
    except Exception:
        return ""
