"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

A partner sees only studies of patients who consented to share with it or
with one of its networks (R-XCH-2): the consent condition is part of the SQL,
so an unshared patient never appears, not even as a count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from gateway.audit import events as ev
from gateway.dicomweb.common import require
from gateway.dicomweb.dicomjson import (
    JsonDataset,
    filter_fields,
    instance_json,
    series_json,
    study_json,
)
from gateway.peers import Principal
from gateway.service import Gateway
from gateway.store.model import StudyFilter
from pki.errors import InvalidInputError

MAX_LIMIT = 1000

#: Query keys accepted by keyword or by tag (PS3.18 8.3.4).
_KEYS = {
    "PatientID": "patient_id",
    "00100020": "patient_id",
    "PatientName": "patient_name",
    "00100010": "patient_name",
    "StudyDate": "study_date",
    "00080020": "study_date",
    "ModalitiesInStudy": "modality",
    "00080061": "modality",
    "Modality": "modality",
    "00080060": "modality",
    "AccessionNumber": "accession",
    "00080050": "accession",
    "StudyInstanceUID": "study_uids",
    "0020000D": "study_uids",
    "SeriesInstanceUID": "series_uids",
    "0020000E": "series_uids",
    "SOPInstanceUID": "sop_uids",
    "00080018": "sop_uids",
}
_KEYWORD_TAGS = {
    "StudyDate": "00080020",
    "StudyTime": "00080030",
    "AccessionNumber": "00080050",
    "ModalitiesInStudy": "00080061",
    "ReferringPhysicianName": "00080090",
    "StudyDescription": "00081030",
    "PatientName": "00100010",
    "PatientID": "00100020",
    "IssuerOfPatientID": "00100021",
    "PatientBirthDate": "00100030",
    "PatientSex": "00100040",
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
    "SeriesNumber": "00200011",
    "SeriesDescription": "0008103E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "InstanceNumber": "00200013",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
    "NumberOfSeriesRelatedInstances": "00201209",
    "RetrieveURL": "00081190",
}
_IGNORED = {"fuzzymatching", "includefield", "limit", "offset"}


def parse_filter(query: Any, *, scope: str) -> tuple[StudyFilter, set[str] | None]:
    values: dict[str, Any] = {}
    for key in query:
        if key in _IGNORED:
            continue
        field = _KEYS.get(key)
        if field is None:
            raise InvalidInputError(f"unsupported query key {key!r}")
        value = query.get(key, "")
        if field.endswith("_uids"):
            uids = tuple(u for u in value.replace("\\", ",").split(",") if u)
            values[field] = uids
        elif value:
            values[field] = value
    try:
        limit = int(query.get("limit", 100))
        offset = int(query.get("offset", 0))
    except ValueError as exc:
        raise InvalidInputError("limit and offset must be integers") from exc
    if not (0 < limit <= MAX_LIMIT) or offset < 0:
        raise InvalidInputError(f"limit must be 1..{MAX_LIMIT} and offset >= 0")
    include: set[str] | None = set()
    for inc in query.getall("includefield", []):
        for name in inc.split(","):
            if name == "all":
                include = None
                break
            tag = _KEYWORD_TAGS.get(name, name.upper())
            if len(tag) != 8 or any(c not in "0123456789ABCDEF" for c in tag):
                raise InvalidInputError(f"unknown includefield {name!r}")
            if include is not None:
                include.add(tag)
        if include is None:
            break
    if include is not None and not include:
        include = None  # no includefield: the default attribute set
    return StudyFilter(limit=limit, offset=offset, **values), include


async def _search(
    request: web.Request,
    scope: str,
    run: Callable[[Gateway, StudyFilter, Any], list[dict[str, object]]],
    to_json: Callable[[dict[str, object], str], JsonDataset],
) -> web.Response:
    gw: Gateway = request.app["gateway"]
    principal: Principal = request["principal"]
    await require(request, principal, "query")
    flt, include = parse_filter(request.query, scope=scope)
    rows = await gw.run(run, gw, flt, principal.visibility)
    base = request.app["base_url"]
    # R-AUD-1: one Query record per patient whose data was returned, or one
    # record for an empty result.
    patients: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        patients[(str(row["patient_id"]), str(row["issuer"]))].add(str(row["study_uid"]))
    query_text = request.query_string[:1000]
    if not patients:
        await gw.record(_query_event(principal, None, None, (), query_text, scope))
    for (pid, issuer), studies in patients.items():
        await gw.record(_query_event(principal, pid, issuer, studies, query_text, scope))
    body = [filter_fields(to_json(row, base), include, row) for row in rows]
    if not body:
        return web.Response(status=204)
    return web.json_response(body, content_type="application/dicom+json")


def _query_event(
    principal: Principal,
    pid: str | None,
    issuer: str | None,
    studies: Any,
    query_text: str,
    scope: str,
) -> ev.AuditEvent:
    event = ev.query(
        actor=principal.name,
        actor_kind=principal.kind,  # type: ignore[arg-type]
        source_address=principal.address,
        patient_id=pid,
        patient_issuer=(issuer or None) if pid else None,
        query_text=query_text,
        description=f"QIDO-RS {scope} search",
        cert_sha256=principal.cert_sha256,
    )
    if studies:
        event = replace(event, study_uids=tuple(sorted(studies)))
    return event


async def search_studies(request: web.Request) -> web.Response:
    return await _search(
        request, "study", lambda gw, f, v: gw.store.query_studies(f, v), study_json
    )


async def search_series(request: web.Request) -> web.Response:
    study = request.match_info.get("study")
    return await _search(
        request, "series", lambda gw, f, v: gw.store.query_series(study, f, v), series_json
    )


async def search_instances(request: web.Request) -> web.Response:
    study = request.match_info.get("study")
    series = request.match_info.get("series")
    return await _search(
        request,
        "instance",
        lambda gw, f, v: gw.store.query_instances(study, series, f, v),
        instance_json,
    )
