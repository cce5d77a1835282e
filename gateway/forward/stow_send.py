"""STOW-RS client with a client certificate (PS3.18 10.5; R-TLS-1, R-XCH-5).

One request per batch (one study): ``POST {service}/studies/{study}`` with a
``multipart/related; type="application/dicom"`` body whose parts are the stored
PS3.10 files, streamed from disk.  An instance counts as sent only if the
response lists its SOP Instance UID in the Referenced SOP Sequence (0008,1199);
an entry in the Failed SOP Sequence (0008,1198) carries its Failure Reason
(0008,1197, PS3.18 Table 10.5.3-1), and an instance missing from both is not
confirmed.  Each stored file's SHA-256 is re-checked before it is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import aiohttp

from gateway.forward.batch import BatchResult, SendItem, SentInstance
from gateway.forward.destinations import DestinationSettings
from gateway.forward.integrity import InstanceDigest, digest_file

log = logging.getLogger("sekisho.forward")

#: Failure reasons of PS3.18 Table 10.5.3-1 and PS3.4 Annex B, in plain words.
STOW_FAILURES = {
    0x0110: "processing failure",
    0x0111: "an instance with this UID and different content is already stored",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
#: Reasons that will not change by sending again.
PERMANENT_FAILURES = {0x0111, 0x0122, 0xC122}


def new_session(dest: DestinationSettings, ctx: ssl.SSLContext) -> aiohttp.ClientSession:
    """A session bound to this destination's client certificate and trust anchors."""
    connector = aiohttp.TCPConnector(ssl=ctx, limit=dest.concurrency)
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=dest.connect_timeout_seconds,
        sock_connect=dest.connect_timeout_seconds,
        sock_read=dest.response_timeout_seconds,
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def _uids(body: dict[str, Any], tag: str) -> dict[str, int | None]:
    """SOP Instance UIDs of a response sequence -> Failure Reason (if any)."""
    out: dict[str, int | None] = {}
    for item in (body.get(tag) or {}).get("Value") or []:
        uid = ((item.get("00081155") or {}).get("Value") or [None])[0]
        if not uid:
            continue
        reason = ((item.get("00081197") or {}).get("Value") or [None])[0]
        out[str(uid)] = int(reason) if reason is not None else None
    return out


def interpret_response(
    status: int, body: dict[str, Any], items: Sequence[SendItem]
) -> tuple[dict[int, str], dict[int, tuple[str, bool]]]:
    """(confirmed job id -> words, failed job id -> (words, permanent)); pure."""
    referenced = _uids(body, "00081199")
    failed = _uids(body, "00081198")
    ok: dict[int, str] = {}
    bad: dict[int, tuple[str, bool]] = {}
    for item in items:
        if item.sop_uid in referenced:
            ok[item.job_id] = f"STOW-RS HTTP {status}: listed in ReferencedSOPSequence"
        elif item.sop_uid in failed:
            code = failed[item.sop_uid]
            words = STOW_FAILURES.get(code or 0x0110, "failure")
            code_text = f"0x{code:04X}" if code is not None else "no reason given"
            bad[item.job_id] = (f"destination refused the instance: STOW-RS {words} "
                                f"({code_text})", code in PERMANENT_FAILURES)
        else:
            bad[item.job_id] = (
                f"the STOW-RS response (HTTP {status}) does not confirm this instance", False
            )
    return ok, bad


async def send_batch(
    session: aiohttp.ClientSession,
    dest: DestinationSettings,
    study_uid: str,
    items: Sequence[SendItem],
) -> tuple[BatchResult, list[SentInstance]]:
    """Send one study's instances in one STOW-RS request; see the module docstring."""
    result = BatchResult()
    loop = asyncio.get_running_loop()
    digests: dict[int, InstanceDigest] = {}
    ready: list[SendItem] = []
    for item in items:
        try:
            digest = await loop.run_in_executor(None, digest_file, item.path)
        except Exception as exc:  # noqa: BLE001 - unreadable local file
            result.failures[item.job_id] = (f"the local copy cannot be read: {exc}", True)
            continue
        if digest.file_sha256 != item.sha256:
            result.failures[item.job_id] = (
                "the local copy no longer matches the SHA-256 recorded on receipt; not sent", True)
            continue
        digests[item.job_id] = digest
        ready.append(item)
    if not ready:
        return result, []
    url = f"{dest.url.rstrip('/')}/studies/{study_uid}"
    boundary = uuid.uuid4().hex
    try:
        with ExitStack() as files:
            writer = aiohttp.MultipartWriter("related", boundary=boundary)
            for item in ready:
                fh = files.enter_context(open(item.path, "rb"))
                writer.append(fh, {"Content-Type": "application/dicom"})
            headers = {
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            }
            async with session.post(url, data=writer, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        error = _transport_words(dest, exc)
        for item in ready:
            result.failures[item.job_id] = (error, False)
        return result, []
    body: dict[str, Any] = {}
    if raw:
        try:
            parsed = json.loads(raw)
            body = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            body = {}
    if status not in (200, 202, 409) or (status == 409 and not body):
        error = f"STOW-RS to {dest.url} answered HTTP {status}"
        if status in (401, 403):
            error += " (our client certificate is not accepted or not authorized)"
        for item in ready:
            result.failures[item.job_id] = (error, False)
        return result, []
    ok, bad = interpret_response(status, body, ready)
    result.failures.update(bad)
    sent: list[SentInstance] = []
    for item in ready:
        if item.job_id in ok:
            d = digests[item.job_id]
            sent.append(SentInstance(item, ok[item.job_id], item.transfer_syntax,
                                     d.dataset_sha256, d))
            result.sent.append(item.job_id)
    return result, sent


def _transport_words(dest: DestinationSettings, exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS: the destination's certificate was refused ({exc.certificate_error})"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake with {dest.url} failed ({exc})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {dest.url}: {exc.os_error.strerror or exc}"
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return f"no STOW-RS response from {dest.url} in time"
    return f"STOW-RS to {dest.url} failed: {type(exc).__name__}: {exc}"
