"""Restore a study from a destination, verified and marked as a restore (R-EXT-3, R-EXT-1).

``sekisho restore --study UID --from NAME --by STAFF`` asks the destination for
the study (C-GET over TLS or WADO-RS, :mod:`.retrieve`) and, for every instance
the queue recorded as sent there:

* **verified**: the received dataset's SHA-256 equals the hash recorded when it
  was sent.  The original PS3.10 file is rebuilt from the file meta kept with
  the job and must hash to the SHA-256 kept on receipt; if the local copy is
  gone, that file is written back to the store (and indexed if its metadata is
  gone too), otherwise the local copy is already the identical file;
* **mismatch**: anything else; the received copy is kept in quarantine
  (``<store>/../restore-quarantine/<restore id>/``) and never enters the store;
* **missing**: the destination did not return it.

Each outcome is a row of the ``restores`` table (who, when, from where, what
was expected and received) and the run is audited as an Import (PS3.15
A.5.3.8, description "restore from ..."); a mismatch is also a Security Alert.
Only the hospital restores: the external storage provider itself has no query
or retrieve permission on the gateway (checked at start, R-EXT-1).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.audit import events as ev
from gateway.forward import stow_send
from gateway.forward.auditing import destination_extra
from gateway.forward.queue import Job, open_queue, utcnow
from gateway.forward.retrieve import Retrieved, cget_study, wado_study
from gateway.store.index import index_instance
from pki.errors import NotFoundError
from pki.tls import client_context

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("sekisho.forward")
CHUNK = 1024 * 1024


@dataclass
class RestoreReport:
    restore_id: str
    study_uid: str
    source: str
    verified: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    written: int = 0

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)


def _rebuild(job: Job, dataset_path: Path, target: Path) -> str:
    """Original file meta + received dataset -> ``target``; returns its SHA-256."""
    h = hashlib.sha256()
    with open(target, "wb") as out:
        head = job.meta or b""
        h.update(head)
        out.write(head)
        with open(dataset_path, "rb") as src:
            while block := src.read(CHUNK):
                h.update(block)
                out.write(block)
    return h.hexdigest()


def _write_back(gw: Gateway, job: Job, dataset_path: Path, source: str) -> tuple[str | None, bool]:
    """Rebuild the original file and check it against the hash kept on receipt; put it back
    in the local store if it is not there.  Returns (its SHA-256 or None, written back)."""
    writer = gw.files.writer(2**63 - 1)
    try:
        writer.write(job.meta or b"")
        with open(dataset_path, "rb") as src:
            while block := src.read(CHUNK):
                writer.write(block)
        staged = writer.finish(gw.settings.store.fsync)
    except BaseException:
        writer.abort()
        raise
    if staged.sha256 != job.sha256:
        staged.path.unlink(missing_ok=True)
        return None, False
    try:
        present = gw.files.verify(job.sha256)
    except Exception:  # noqa: BLE001 - missing or unreadable: write it back
        present = False
    indexed = gw.store.find_instance(job.sop_uid) is not None
    if present and indexed:
        staged.path.unlink(missing_ok=True)
        return job.sha256, False
    idx = index_instance(staged.path)
    if present:
        staged.path.unlink(missing_ok=True)
    else:
        gw.files.object_path(job.sha256).unlink(missing_ok=True)  # damaged local copy
        gw.files.commit(staged)
    if not indexed:
        gw.store.add_instances([(idx, job.sha256, job.size)], f"restore:{source}")
    return job.sha256, True


def _quarantine(gw: Gateway, restore_id: str, job: Job | None, got: Retrieved) -> Path:
    qdir = gw.settings.store.files.parent / "restore-quarantine" / restore_id
    qdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = qdir / f"{got.sop_uid or got.dataset_path.stem}.dcm"
    if job is not None and job.meta:
        _rebuild(job, got.dataset_path, target)
    else:
        shutil.copyfile(got.dataset_path, target.with_suffix(".dataset"))
        target = target.with_suffix(".dataset")
    return target


def verify_and_record(
    gw: Gateway, name: str, study_uid: str, jobs: list[Job], received: list[Retrieved],
    by: str, restore_id: str,
) -> RestoreReport:
    """Compare, write back, quarantine and record (synchronous; runs in a worker thread)."""
    dest = gw.settings.destinations.get(name)
    address = dest.address() if dest is not None else ""
    report = RestoreReport(restore_id, study_uid, name)
    by_uid: dict[str, Retrieved] = {}
    for r in received:
        by_uid.setdefault(r.sop_uid, r)
    rows: list[dict[str, object]] = []
    stamp = utcnow()

    def row(job_uid: str, expected: str, got: str | None, outcome: str, **kw: object) -> None:
        rows.append({
            "restore_id": restore_id, "study_uid": study_uid, "sop_uid": job_uid,
            "source": name, "source_address": address, "restored_by": by,
            "restored_at": stamp, "expected_sha256": expected, "received_sha256": got,
            "outcome": outcome, "stored_sha256": kw.get("stored"),
            "quarantine_path": kw.get("quarantine"), "detail": kw.get("detail", ""),
        })

    expected_uids = {j.sop_uid for j in jobs}
    for job in jobs:
        got = by_uid.get(job.sop_uid)
        expected = job.dataset_sha256 or ""
        if got is None:
            report.missing.append(job.sop_uid)
            row(job.sop_uid, expected, None, "missing", detail="not returned by the destination")
        elif got.dataset_sha256 != expected:
            report.mismatched.append(job.sop_uid)
            q = _quarantine(gw, restore_id, job, got)
            row(job.sop_uid, expected, got.dataset_sha256, "mismatch", quarantine=str(q),
                detail="the returned dataset differs from what was sent")
        else:
            stored, written = (None, False)
            if job.meta and job.sent_syntax == job.transfer_syntax:
                stored, written = _write_back(gw, job, got.dataset_path, name)
            report.written += int(written)
            report.verified.append(job.sop_uid)
            detail = ("written back to the local store" if written else
                      "identical to the local copy" if stored else
                      "dataset identical to what was sent")
            row(job.sop_uid, expected, got.dataset_sha256, "verified", stored=stored,
                detail=detail)
    for uid, got in by_uid.items():
        if uid not in expected_uids:
            report.unexpected.append(uid)
            q = _quarantine(gw, restore_id, None, got)
            row(uid, "", got.dataset_sha256, "unexpected", quarantine=str(q),
                detail="returned by the destination but never sent there")
    open_queue(gw.settings.store.database).record_restores(rows)
    _audit(gw, name, study_uid, jobs, report, by)
    return report


def _audit(
    gw: Gateway, name: str, study_uid: str, jobs: list[Job], report: RestoreReport, by: str
) -> None:
    extra = {**destination_extra(gw, name), "restore_id": report.restore_id}
    inst = gw.store.find_instance(jobs[0].sop_uid) if jobs else None
    patient_id = inst.patient_id if inst is not None else "unknown"
    issuer = (inst.issuer or None) if inst is not None else None
    problems = defaultdict(int)
    problems["mismatched"] = len(report.mismatched)
    problems["missing"] = len(report.missing)
    problems["unexpected"] = len(report.unexpected)
    text = (f"restore from {name}: {len(report.verified)} verified, "
            + ", ".join(f"{n} {k}" for k, n in problems.items()))
    gw.audit.record(ev.import_event(
        actor=by,
        actor_kind="user",
        patient_id=patient_id,
        patient_issuer=issuer,
        study_uids=[study_uid],
        instance_count=len(report.verified),
        outcome=ev.Outcome.SUCCESS if report.ok else ev.Outcome.SERIOUS_FAILURE,
        source_facility=name,
        description=text,
        reason_code=None if report.ok else "restore-not-verified",
        extra=extra,
    ))
    if report.mismatched or report.unexpected:
        gw.audit.record(ev.security_alert(
            "restore-hash-mismatch",
            f"{len(report.mismatched) + len(report.unexpected)} instance(s) restored from "
            f"{name} differ from what was sent (possible alteration at the destination); "
            "quarantined, not stored",
            actor=by,
            actor_kind="user",
            event_type=ev.OBJECT_SECURITY_ATTRIBUTES_CHANGED,
            outcome=ev.Outcome.SERIOUS_FAILURE,
            extra=extra,
        ))


async def restore_study(gw: Gateway, name: str, study_uid: str, by: str) -> RestoreReport:
    """Retrieve, verify, record and audit one study from destination ``name``."""
    dests = gw.settings.destinations
    if name not in dests:
        raise NotFoundError(f"no destination named {name!r} is configured")
    dest = dests[name]
    queue = open_queue(gw.settings.store.database)
    jobs = await gw.run(queue.sent_jobs, study_uid, name)
    if not jobs:
        raise NotFoundError(f"no instance of this study was ever confirmed by {name!r}")
    ctx = await gw.run(client_context, dest.tls)
    restore_id = uuid.uuid4().hex
    work = gw.settings.store.files.parent / "restore-work"
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix="restore-", dir=work))
    try:
        if dest.transport == "dimse":
            calling = dest.calling_ae or gw.settings.instance.ae_title
            loop = asyncio.get_running_loop()
            received = await loop.run_in_executor(
                None, cget_study, dest, ctx, calling, study_uid, jobs, tmp
            )
        else:
            async with stow_send.new_session(dest, ctx) as session:
                received = await wado_study(session, dest, study_uid, tmp)
        return await gw.run(verify_and_record, gw, name, study_uid, jobs, received, by,
                            restore_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
