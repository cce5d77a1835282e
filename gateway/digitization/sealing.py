"""Sign at once, verify, stage: nothing unsigned enters the archive (R-DIG-4, R-SIG-1..6).

:class:`Sealer` opens the operator's signer once per digitization, checks it
against the record type's signing policy *before* any cryptography (hcRole,
nonRepudiation, validity, chain, revocation: :func:`signing.policy.check_signer`),
then for each artifact:

1. signs it: DICOM Digital Signature with Certified Timestamp (PS3.15 Annex C)
   for SC and Encapsulated PDF objects, PAdES B-LTA for PDFs;
2. writes the signed bytes to a temporary file in the store's own ``tmp``
   directory (SHA-256 on the way, fsync);
3. verifies what was written, as a verifier would, against the policy
   (:func:`signing.verify.judge`); for DICOM it also captures the validation
   data and writes the first archive timestamp into an RFC 4998 Evidence
   Record (:mod:`signing.evidence`), verified too.

Only :class:`Sealed` results reach :meth:`FileStore.commit`; any failure
removes every staged file, so a refused signer, an unreachable TSA or a bad
signature leaves nothing behind (seed 000 §5.2(1)②「遅滞なく」, 付録2 §16③).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from gateway.service import Gateway
from gateway.signatures.config import load_signing_settings
from gateway.store.files import StagedFile
from gateway.store.index import InstanceIndex, index_instance
from pki.errors import SigningError
from signing import dicom_sig, pades
from signing.cli import SigningSettings
from signing.evidence import create_evidence, verify_evidence
from signing.policy import RecordPolicy, check_signer
from signing.renew import RenewalPolicy, dicom_protection, pdf_protection
from signing.signers import PinPrompt, SekishoSigner, SignerSpec, open_signer
from signing.tsa import SekishoTimeStamper, TsaClient
from signing.validation_data import collect_validation_data
from signing.verify import judge

__all__ = ["Sealed", "Sealer", "load_signing"]


def load_signing(settings: Any) -> SigningSettings:
    """The ``[signing]`` section, paths resolved (:mod:`gateway.signatures.config`)."""
    return load_signing_settings(settings)


def _encode(ds: Dataset) -> bytes:
    import io

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class Sealed:
    """One signed, verified artifact staged in the store (not yet committed)."""

    kind: str  # "dicom" | "pdf"
    staged: StagedFile
    evidence: StagedFile | None = None
    index: InstanceIndex | None = None
    protected_until: str = ""
    protection_reason: str = ""
    timestamp_time: str = ""
    tsa: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Sealer:
    """Signing session of one operator for one digitization (use ``async with``)."""

    def __init__(
        self,
        gw: Gateway,
        signing: SigningSettings,
        record_type: str,
        spec: SignerSpec | str | None,
        *,
        pin_prompt: PinPrompt | None = None,
        renewal: RenewalPolicy | None = None,
    ) -> None:
        self.gw = gw
        self.signing = signing
        self.policy: RecordPolicy = signing.policy.for_record(record_type)
        self.spec = SignerSpec.parse(spec) if isinstance(spec, str) else spec
        self.pin_prompt = pin_prompt
        self.renewal = renewal or RenewalPolicy()
        self.tsa: TsaClient | None = signing.tsa_client()
        self.signer: SekishoSigner | None = None
        self.subject = ""
        self.role: str | None = None
        self.staged: list[StagedFile] = []

    async def __aenter__(self) -> Sealer:
        if self.policy.timestamp_required and self.tsa is None:
            raise SigningError(
                f"record type {self.policy.record_type!r} requires a timestamp; no TSA configured"
            )
        if self.spec is None:
            if self.policy.signature_required:
                raise SigningError(
                    f"record type {self.policy.record_type!r} must be signed: give --signer"
                )
            return self
        self.signer = await open_signer(self.spec, pin_prompt=self.pin_prompt)
        try:
            at = datetime.now(UTC)
            vc = self.signing.trust.signer_context(at)
            try:
                check = await check_signer(self.policy, self.signer.certificate, at, vc)
            finally:
                await vc.aclose()  # the fetchers' HTTP session, if revocation was fetched
            check.raise_if_refused()
            self.subject, self.role = check.subject, check.role
        except BaseException:
            self.signer.close()
            raise
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        if self.signer is not None:
            self.signer.close()
        if exc_type is not None:
            await self.discard()

    async def discard(self) -> None:
        """Remove every staged file (nothing half-signed may remain)."""
        for staged in self.staged:
            await self.gw.run(staged.path.unlink, missing_ok=True)
        self.staged.clear()

    async def _stage(self, data: bytes) -> StagedFile:
        gw = self.gw
        writer = await gw.run(gw.files.writer, max(len(data), 1))
        try:
            await gw.run(writer.write, data)
            staged = await gw.run(writer.finish, gw.settings.store.fsync)
        except BaseException:
            await gw.run(writer.abort)
            raise
        self.staged.append(staged)
        return staged

    def skew_alerts(self) -> list[dict[str, Any]]:
        """TSA responses whose genTime differs from our clock beyond the bound (R-AUD-5)."""
        results = self.tsa.results if self.tsa is not None else []
        return [
            {"tsa": r.token.tsa_subject, "skew_seconds": r.skew.total_seconds()}
            for r in results
            if r.skew_exceeded
        ]

    async def seal_dicom(self, ds: Dataset) -> Sealed:
        """Sign ``ds`` (Annex C + Certified Timestamp), stage, verify, add the Evidence Record."""
        trust = self.signing.trust
        if self.signer is None:
            data = await asyncio.to_thread(_encode, dicom_sig.normalize(ds))
            staged = await self._stage(data)
            return Sealed("dicom", staged, index=await self.gw.run(index_instance, staged.path))
        signed = await dicom_sig.sign_dataset(
            ds, self.signer, self.policy.dicom_profile, self.policy.default_purpose, self.tsa
        )
        data = await asyncio.to_thread(_encode, signed)
        staged = await self._stage(data)
        index = await self.gw.run(index_instance, staged.path)
        written = await asyncio.to_thread(pydicom.dcmread, staged.path)
        reports = await dicom_sig.verify_dataset(written, trust, policy=self.policy)
        problems = [p for r in reports for p in judge(r, self.policy)]
        if len(reports) != 1 or problems:
            raise SigningError("the signed object does not verify: " + "; ".join(problems))
        item = written.DigitalSignaturesSequence[-1]
        sealed = Sealed("dicom", staged, index=index)
        sealed.details = {"signature_uid": str(item.DigitalSignatureUID)}
        if "CertifiedTimestamp" not in item or self.tsa is None:
            return sealed  # policy without timestamps: no long-term evidence possible
        token = bytes(item.CertifiedTimestamp)
        at = datetime.now(UTC)
        vd = await collect_validation_data(
            trust,
            at=at,
            signer=self.signer.certificate,
            signer_chain=self.signer.chain,
            tokens=[token],
        )
        er = await create_evidence(data, vd, self.tsa)
        ev = await verify_evidence(er, data, trust)
        if not ev.ok:
            raise SigningError("the evidence record does not verify: " + "; ".join(ev.problems))
        sealed.evidence = await self._stage(er)
        prot = dicom_protection(data, er, self.renewal)
        sealed.protected_until, sealed.protection_reason = prot.expires.isoformat(), prot.reason
        ts = reports[0].timestamps[0]
        sealed.timestamp_time = ts.time.isoformat() if ts.time else ""
        sealed.tsa = ts.tsa or ""
        sealed.details["validation_items"] = len(vd)
        return sealed

    async def seal_pdf(self, pdf: bytes, *, reason: str) -> Sealed:
        """PAdES B-LTA (signature timestamp, DSS validation data, document timestamp)."""
        if self.signer is None:
            return Sealed("pdf", await self._stage(pdf))
        if self.tsa is None:
            raise SigningError("PAdES B-LTA needs a TSA; none is configured")
        trust = self.signing.trust
        signed = await pades.sign_pdf(
            pdf, self.signer, trust, SekishoTimeStamper(self.tsa), reason=reason
        )
        staged = await self._stage(signed)
        written = await self.gw.run(staged.path.read_bytes)
        reports = await pades.verify_pdf(written, trust, policy=self.policy)
        regular = [r for r in reports if r.kind != "document-timestamp"]
        problems = [p for r in reports for p in judge(r, self.policy)]
        if len(regular) != 1 or problems:
            raise SigningError("the signed PDF does not verify: " + "; ".join(problems))
        sealed = Sealed("pdf", staged)
        prot = pdf_protection(written, self.renewal)
        sealed.protected_until, sealed.protection_reason = prot.expires.isoformat(), prot.reason
        stamps = regular[0].timestamps
        if stamps and stamps[0].time:
            sealed.timestamp_time, sealed.tsa = stamps[0].time.isoformat(), stamps[0].tsa or ""
        return sealed
