"""The renewal job behind ``sekisho signatures renew`` (R-SIG-6).

For every signed record whose stored protection end lies within the margin
(``[renewal].margin_days``), the job reads the stored artifact and evidence,
recomputes the protection from the files themselves (the database column is
only an index), and renews what is due:

* DICOM: a new chain in the Evidence Record (:func:`signing.renew.renew_dicom`),
  stored content-addressed like the object; the record points to it;
* PDF: a new document timestamp with fresh validation data
  (:func:`signing.renew.renew_pdf`); the new PDF revision is stored and the
  record points to it (the earlier revision stays in the store).

Each renewal is audited as DICOM Instances Accessed (PS3.15 A.5.3.3,
EventActionCode U) naming the patient and study; failures are recorded with
the record and audited as serious failures, and the job goes on with the next
record.  Renewed records are no longer due, so a second run renews nothing
new (idempotent).  ``now`` may be given to plan as of another moment; the new
timestamps themselves always carry the TSA's real time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.audit import events as ev
from gateway.digitization.records import DigitizationRecords, SignedRecord, utc_iso
from gateway.service import Gateway
from pki.errors import ConfigurationError, SekishoError, StoreError
from signing.evidence import AlgorithmPolicy
from signing.renew import (
    Protection,
    RenewalPolicy,
    dicom_protection,
    pdf_protection,
    renew_dicom,
    renew_pdf,
)
from signing.tsa import TsaClient

__all__ = ["RenewalRun", "renew_signatures", "renewal_policy"]


def renewal_policy(settings: Any) -> RenewalPolicy:
    r = settings.renewal
    return RenewalPolicy(
        margin=timedelta(days=r.margin_days),
        algorithms=AlgorithmPolicy(r.deprecation_dates()),
        hash_algorithm=r.hash_algorithm,
    )


@dataclass
class RenewalRun:
    checked_at: datetime
    dry_run: bool
    due: list[dict[str, Any]] = field(default_factory=list)
    renewed: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at.isoformat(),
            "dry_run": self.dry_run,
            "due": self.due,
            "renewed": self.renewed,
            "failed": self.failed,
        }


def _read(gw: Gateway, sha256: str) -> bytes:
    with gw.files.open(sha256) as fh:
        return fh.read()


def _protection(gw: Gateway, rec: SignedRecord, policy: RenewalPolicy) -> Protection:
    data = _read(gw, rec.sha256)
    if rec.kind == "pdf":
        return pdf_protection(data, policy)
    evidence = _read(gw, rec.evidence_sha256) if rec.evidence_sha256 else None
    return dicom_protection(data, evidence, policy)


async def _stage_and_commit(gw: Gateway, data: bytes) -> str:
    writer = await gw.run(gw.files.writer, len(data))
    try:
        await gw.run(writer.write, data)
        staged = await gw.run(writer.finish, gw.settings.store.fsync)
    except BaseException:
        await gw.run(writer.abort)
        raise
    await gw.run(gw.files.commit, staged)
    return staged.sha256


def _tsa(gw: Gateway, signing: Any) -> TsaClient:
    url = gw.settings.renewal.tsa_url or signing.tsa_url
    if not url:
        raise ConfigurationError("configuration key 'renewal.tsa_url': no TSA for renewals")
    return TsaClient(
        url,
        signing.trust,
        timeout=signing.tsa_timeout,
        max_skew=signing.max_clock_skew,
        policy_oid=signing.tsa_policy_oid,
    )


async def _renew_one(
    gw: Gateway, rec: SignedRecord, signing: Any, policy: RenewalPolicy, tsa: TsaClient
) -> Protection:
    data = await gw.run(_read, gw, rec.sha256)
    renewed_at = utc_iso(datetime.now(UTC))
    if rec.kind == "pdf":
        new_pdf = await renew_pdf(data, signing.trust, tsa, policy)
        sha = await _stage_and_commit(gw, new_pdf)
        prot = pdf_protection(new_pdf, policy)
        evidence_sha = ""
    else:
        evidence = await gw.run(_read, gw, rec.evidence_sha256) if rec.evidence_sha256 else None
        new_er = await renew_dicom(data, evidence, signing.trust, tsa, policy)
        evidence_sha, sha = await _stage_and_commit(gw, new_er), rec.sha256
        prot = dicom_protection(data, new_er, policy)
    await gw.run(
        DigitizationRecords(gw.settings.store.database).record_renewal,
        rec.id,
        sha256=sha,
        evidence_sha256=evidence_sha,
        protected_until=prot.expires.isoformat(),
        reason=prot.reason,
        renewed_at=renewed_at,
    )
    return prot


def _event(rec: SignedRecord, actor: str, outcome: int, text: str, **extra: str) -> ev.AuditEvent:
    return ev.AuditEvent(
        event_id=ev.INSTANCES_ACCESSED,
        action=ev.Action.UPDATE,
        outcome=outcome,
        actor=actor,
        actor_kind="user" if actor != "sekisho" else "system",
        patient_id=rec.patient_id or None,
        patient_issuer=(rec.issuer or None) if rec.patient_id else None,
        study_uids=(rec.study_uid,) if rec.study_uid else (),
        instance_count=1 if rec.kind == "dicom" else 0,
        description=text,
        extra={"signed_record": str(rec.id), "kind": rec.kind, "sop_uid": rec.sop_uid, **extra},
    )


async def renew_signatures(
    gw: Gateway, *, now: datetime | None = None, dry_run: bool = False, actor: str = "sekisho"
) -> RenewalRun:
    """Renew every record whose protection ends within the margin as of ``now``."""
    from gateway.digitization.sealing import load_signing

    moment = (now or datetime.now(UTC)).astimezone(UTC)
    policy = renewal_policy(gw.settings)
    run = RenewalRun(checked_at=moment, dry_run=dry_run)
    records = DigitizationRecords(gw.settings.store.database)
    candidates = await gw.run(records.signed_records, due_before=moment + policy.margin)
    signing = None
    tsa = None
    for rec in candidates:
        try:
            prot = await gw.run(_protection, gw, rec, policy)
        except (SekishoError, OSError) as exc:
            message = exc.message if isinstance(exc, SekishoError) else str(exc)
            run.failed.append({"record": rec.id, "error": message})
            await gw.run(records.record_renewal_error, rec.id, message)
            continue
        if not prot.due(moment, policy.margin):
            continue
        entry = {
            "record": rec.id,
            "kind": rec.kind,
            "sop_uid": rec.sop_uid,
            "protected_until": prot.expires.isoformat(),
            "reason": prot.reason,
        }
        run.due.append(entry)
        if dry_run:
            continue
        if signing is None:
            signing = load_signing(gw.settings)
            tsa = _tsa(gw, signing)
        assert tsa is not None
        try:
            new = await _renew_one(gw, rec, signing, policy, tsa)
        except (SekishoError, StoreError) as exc:
            await gw.run(records.record_renewal_error, rec.id, exc.message)
            run.failed.append({**entry, "error": exc.message})
            await gw.record(
                _event(
                    rec,
                    actor,
                    ev.Outcome.SERIOUS_FAILURE,
                    "signature renewal failed",
                    reason=exc.message[:300],
                )
            )
            continue
        done = {**entry, "new_protected_until": new.expires.isoformat(), "new_tsa": new.tsa}
        run.renewed.append(done)
        await gw.record(
            _event(
                rec,
                actor,
                ev.Outcome.SUCCESS,
                "archive timestamp renewed (R-SIG-6)",
                previous_end=prot.expires.isoformat(),
                new_end=new.expires.isoformat(),
                tsa=new.tsa[:200],
            )
        )
    return run
