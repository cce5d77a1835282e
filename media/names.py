"""Tolerant comparison of person names across character sets (R-PDI-4).

A Japanese name travels as up to three PN component groups (PS3.5 §6.2.1,
Annex H): alphabetic ``Yamada^Tarou``, ideographic ``山田^太郎`` and phonetic
``やまだ^たろう``.  The hospital's own record may hold only some of them, in
another group position (many HIS put kanji in the first group), with other
letter case, width (full-width ``ＹＡＭＡＤＡ``), spacing or kana script
(hiragana/katakana).  So groups are classified by script, normalized, and
compared script by script:

* normalization: Unicode NFKC (width), case folding, white space removed,
  katakana mapped to hiragana, trailing empty components dropped;
* two names agree when every script present in both agrees, and at least one
  script is present in both; otherwise they do not (an operator must confirm).
"""

from __future__ import annotations

import unicodedata
from enum import StrEnum


class Script(StrEnum):
    ALPHABETIC = "alphabetic"
    IDEOGRAPHIC = "ideographic"
    PHONETIC = "phonetic"


def _is_ideograph(ch: str) -> bool:
    code = ord(ch)
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0xF900 <= code <= 0xFAFF
        or 0x20000 <= code <= 0x2FFFF
        or ch in "々〆ヶ"
    )


def _is_kana(ch: str) -> bool:
    code = ord(ch)
    return 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9F


def _to_hiragana(text: str) -> str:
    return "".join(chr(ord(c) - 0x60) if 0x30A1 <= ord(c) <= 0x30F6 else c for c in text)


def normalize_component(text: str) -> str:
    """One name component in comparable form."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = "".join(ch for ch in folded if not ch.isspace() and ch not in ",.")
    return _to_hiragana(folded)


def classify_group(group: str) -> Script | None:
    """The script of a component group (``None`` for an empty group)."""
    letters = [ch for ch in unicodedata.normalize("NFKC", group) if ch not in "^ \u3000"]
    if not letters:
        return None
    if any(_is_ideograph(ch) for ch in letters):
        return Script.IDEOGRAPHIC
    if all(_is_kana(ch) or ch in "ー・" for ch in letters):
        return Script.PHONETIC
    return Script.ALPHABETIC


def name_groups(value: str) -> dict[Script, tuple[str, ...]]:
    """Normalized components of each script present in a PN value."""
    out: dict[Script, tuple[str, ...]] = {}
    for group in value.split("="):
        script = classify_group(group)
        if script is None or script in out:
            continue
        comps = [normalize_component(c) for c in group.split("^")]
        while comps and not comps[-1]:
            comps.pop()
        out[script] = tuple(comps)
    return out


def names_agree(a: str, b: str) -> bool | None:
    """``True``/``False`` when comparable, ``None`` when no script is shared."""
    ga, gb = name_groups(a), name_groups(b)
    shared = set(ga) & set(gb)
    if not shared:
        return None
    return all(ga[s] == gb[s] for s in shared)
