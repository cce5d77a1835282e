"""DICOM JSON model (PS3.18 Annex F) for QIDO-RS results and STOW-RS responses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

JsonDataset = dict[str, dict[str, Any]]


def attr(vr: str, *values: Any) -> dict[str, Any]:
    vals = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": vals} if vals else {"vr": vr}


def pn(value: str | None) -> dict[str, Any]:
    """PN in DICOM JSON: component groups Alphabetic=Ideographic=Phonetic (F.2.2)."""
    if not value:
        return {"vr": "PN"}
    groups = value.split("=")
    item = {
        k: g for k, g in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False) if g
    }
    return {"vr": "PN", "Value": [item]} if item else {"vr": "PN"}


def study_json(row: Mapping[str, Any], base_url: str) -> JsonDataset:
    uid = str(row["study_uid"])
    mods = [m for m in str(row.get("modalities") or "").split(",") if m]
    return {
        "00080005": attr("CS", row.get("charset") or "ISO_IR 192"),
        "00080020": attr("DA", row.get("study_date")),
        "00080030": attr("TM", row.get("study_time")),
        "00080050": attr("SH", row.get("accession")),
        "00080061": attr("CS", *mods),
        "00080090": pn(row.get("referring")),
        "00081030": attr("LO", row.get("description")),
        "00081190": attr("UR", f"{base_url}/studies/{uid}"),
        "00100010": pn(row.get("patient_name")),
        "00100020": attr("LO", row.get("patient_id")),
        "00100021": attr("LO", row.get("issuer")),
        "00100030": attr("DA", row.get("birth_date")),
        "00100040": attr("CS", row.get("sex")),
        "0020000D": attr("UI", uid),
        "00201206": attr("IS", int(row.get("n_series") or 0)),
        "00201208": attr("IS", int(row.get("n_instances") or 0)),
    }


def series_json(row: Mapping[str, Any], base_url: str) -> JsonDataset:
    study, series = str(row["study_uid"]), str(row["series_uid"])
    return {
        "00080060": attr("CS", row.get("modality")),
        "0008103E": attr("LO", row.get("description")),
        "00081190": attr("UR", f"{base_url}/studies/{study}/series/{series}"),
        "0020000D": attr("UI", study),
        "0020000E": attr("UI", series),
        "00200011": attr("IS", row.get("series_number")),
        "00201209": attr("IS", int(row.get("n_instances") or 0)),
    }


def instance_json(row: Mapping[str, Any], base_url: str) -> JsonDataset:
    study, series, sop = str(row["study_uid"]), str(row["series_uid"]), str(row["sop_uid"])
    return {
        "00080016": attr("UI", row.get("sop_class_uid")),
        "00080018": attr("UI", sop),
        "00083002": attr("UI", row.get("transfer_syntax")),
        "00081190": attr("UR", f"{base_url}/studies/{study}/series/{series}/instances/{sop}"),
        "0020000D": attr("UI", study),
        "0020000E": attr("UI", series),
        "00200013": attr("IS", row.get("instance_number")),
    }


#: Attributes ``includefield`` can add to a level's default set: tag ->
#: (row key, builder).  Every row the store returns carries the patient; series
#: rows also carry study attributes and instance rows the modality.
_INCLUDABLE: dict[str, tuple[str, Any]] = {
    "00100010": ("patient_name", lambda v: pn(v)),
    "00100020": ("patient_id", lambda v: attr("LO", v)),
    "00100021": ("issuer", lambda v: attr("LO", v)),
    "00080020": ("study_date", lambda v: attr("DA", v)),
    "00080050": ("accession", lambda v: attr("SH", v)),
    "00080060": ("modality", lambda v: attr("CS", v)),
}


def filter_fields(
    ds: JsonDataset, include: Iterable[str] | None, row: Mapping[str, Any] | None = None
) -> JsonDataset:
    """Apply ``includefield`` (PS3.18 8.3.4.3): the named attributes are returned
    *in addition to* the level's default set, when the row has them; ``None``
    (no includefield, or ``all``) returns the default set."""
    if include is None:
        return ds
    out = dict(ds)
    for tag in include:
        if tag in out or row is None or tag not in _INCLUDABLE:
            continue
        key, build = _INCLUDABLE[tag]
        if key in row:
            out[tag] = build(row[key])
    return out
