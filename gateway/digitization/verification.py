"""Verification of signed records as of a given time, for ``sekisho signatures verify`` (R-SIG-6).

A stored record (``--record N``) is read from the content store with its
current Evidence Record; a file given by path uses ``FILE.ers`` beside it when
present (the convention :mod:`signing.evidence` documents).  DICOM objects go
through :func:`signing.renew.verify_dicom_long_term`, PDFs through
:func:`signing.renew.verify_pdf_long_term`.  Verifying a stored record reads
patient data, so it is audited as DICOM Instances Accessed (action R).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.audit import events as ev
from gateway.digitization.records import DigitizationRecords
from gateway.digitization.renewal import renewal_policy
from gateway.digitization.sealing import load_signing
from gateway.service import Gateway
from pki.errors import InvalidInputError
from signing.renew import LongTermReport, verify_dicom_long_term, verify_pdf_long_term
from signing.trust import load_crls
from signing.verify import detect_kind

__all__ = ["verify_long_term"]


async def verify_long_term(
    gw: Gateway,
    *,
    record_id: int | None = None,
    path: Path | None = None,
    evidence: Path | None = None,
    now_text: str | None = None,
    crl_files: list[Path] | tuple[Path, ...] = (),
    record_type: str | None = None,
    actor: str = "sekisho",
) -> LongTermReport:
    """Verify one record (by number) or file as of ``now_text`` (default: now)."""
    from gateway.digitization.intake import parse_time

    if (record_id is None) == (path is None):
        raise InvalidInputError("give either a signed record number or a file")
    signing = load_signing(gw.settings)
    trust = signing.trust
    extra = tuple(der for f in crl_files for der in load_crls(f))
    if extra:
        trust = dataclasses.replace(trust, crls=(*trust.crls, *extra))
    now = parse_time(now_text, gw) if now_text else None
    algorithms = renewal_policy(gw.settings).algorithms
    rec = None
    if record_id is not None:
        rec = await gw.run(DigitizationRecords(gw.settings.store.database).signed_record, record_id)
        data = await gw.run(_read, gw, rec.sha256)
        er = await gw.run(_read, gw, rec.evidence_sha256) if rec.evidence_sha256 else None
        kind, record_type = rec.kind, record_type or rec.record_type
    else:
        assert path is not None
        kind = await gw.run(detect_kind, path)
        data = await gw.run(path.read_bytes)
        er_path = evidence or path.with_name(path.name + ".ers")
        er = await gw.run(er_path.read_bytes) if er_path.is_file() else None
    policy = signing.policy.for_record(record_type) if record_type else None
    if kind == "dicom":
        report = await verify_dicom_long_term(
            data, er, trust, policy=policy, now=now, algorithms=algorithms
        )
    elif kind == "pdf":
        report = await verify_pdf_long_term(
            data, trust, policy=policy, now=now, algorithms=algorithms
        )
    else:
        raise InvalidInputError("only DICOM objects and PDFs are verified here")
    if rec is not None:
        await gw.record(
            ev.AuditEvent(
                event_id=ev.INSTANCES_ACCESSED,
                action=ev.Action.READ,
                outcome=ev.Outcome.SUCCESS if report.ok else ev.Outcome.MINOR_FAILURE,
                actor=actor,
                actor_kind="user",
                patient_id=rec.patient_id or None,
                patient_issuer=(rec.issuer or None) if rec.patient_id else None,
                study_uids=(rec.study_uid,) if rec.study_uid else (),
                description="signed record verified" + ("" if report.ok else ": invalid"),
                extra={"signed_record": str(rec.id), "checked_at": report.checked_at.isoformat()},
            )
        )
    return report


def _read(gw: Gateway, sha256: str) -> bytes:
    with gw.files.open(sha256) as fh:
        return fh.read()
