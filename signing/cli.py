"""Functions behind ``sekisho sign`` and ``sekisho verify`` (R-SIG-1..8, R-AUD-5).

The gateway's CLI parses arguments, loads the configuration and audits around
these calls; nothing here prints, parses ``argv`` or touches the audit trail.

:func:`cmd_sign` applies the record type's policy *before* any cryptography
(signer certificate: HPKI role, nonRepudiation, validity, chain, revocation at
the signing time), signs the DICOM object, PDF or other file, and writes the
output atomically: the bytes go to a temporary file in the destination
directory that is renamed only when signing and timestamping have both
succeeded, so a refused or failed signing never leaves a half-signed file.
The returned report carries the TSA clock comparison so that the gateway can
raise the R-AUD-5 skew alert.

:func:`cmd_verify` returns an exit code (0 valid, 1 invalid, 2 unreadable)
and the :class:`~signing.report.VerificationReport`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.errors import InvalidDicomError

from pki.errors import ConfigurationError, SigningError, VerificationError
from signing import cades, dicom_sig, pades
from signing.dicom_sig import PURPOSES
from signing.policy import SigningPolicy, check_signer
from signing.report import VerificationReport
from signing.signers import PinPrompt, SignerSpec, open_signer
from signing.trust import TrustConfig
from signing.tsa import DEFAULT_MAX_SKEW, SekishoTimeStamper, TsaClient
from signing.verify import verify_file

__all__ = ["SigningSettings", "cmd_sign", "cmd_verify"]

Kind = Literal["dicom", "pdf", "file"]


@dataclass(frozen=True, eq=False)
class SigningSettings:
    """The ``signing`` section of the configuration, validated."""

    trust: TrustConfig
    policy: SigningPolicy
    tsa_url: str | None = None
    tsa_timeout: float = 10.0
    tsa_policy_oid: str | None = None
    max_clock_skew: timedelta = DEFAULT_MAX_SKEW

    _KEYS = frozenset(
        {"trust", "policy", "tsa_url", "tsa_timeout", "tsa_policy_oid", "max_clock_skew_seconds"}
    )

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any], path: str = "signing") -> SigningSettings:
        """Build from configuration; unknown keys are refused with their key path."""
        if not isinstance(mapping, Mapping):
            raise ConfigurationError(f"{path}: expected a mapping")
        for key in mapping:
            if key not in cls._KEYS:
                raise ConfigurationError(f"{path}.{key}: unknown key")
        if "trust" not in mapping:
            raise ConfigurationError(f"{path}.trust: required")
        url = mapping.get("tsa_url")
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://"))
        ):
            raise ConfigurationError(f"{path}.tsa_url: expected an http(s) URL")
        timeout = mapping.get("tsa_timeout", 10.0)
        skew = mapping.get("max_clock_skew_seconds", DEFAULT_MAX_SKEW.total_seconds())
        for key, value in (("tsa_timeout", timeout), ("max_clock_skew_seconds", skew)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigurationError(f"{path}.{key}: expected a positive number")
        return cls(
            trust=TrustConfig.from_config(mapping["trust"], f"{path}.trust"),
            policy=SigningPolicy.from_config(mapping.get("policy", {}), f"{path}.policy"),
            tsa_url=url,
            tsa_timeout=float(timeout),
            tsa_policy_oid=mapping.get("tsa_policy_oid"),
            max_clock_skew=timedelta(seconds=float(skew)),
        )

    def tsa_client(self) -> TsaClient | None:
        if not self.tsa_url:
            return None
        return TsaClient(
            self.tsa_url,
            self.trust,
            timeout=self.tsa_timeout,
            max_skew=self.max_clock_skew,
            policy_oid=self.tsa_policy_oid,
        )


def _write_atomically(out: Path, data: bytes) -> None:
    """Write ``data`` to ``out`` through a temporary file and a rename (never partial)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{os.urandom(4).hex()}.partial")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _encode_dicom(ds: pydicom.Dataset) -> bytes:
    import io

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


async def cmd_sign(
    kind: Kind,
    inp: Path | str,
    out: Path | str,
    signer_spec: SignerSpec | str,
    purpose: str | None,
    record_type: str,
    settings: SigningSettings,
    *,
    pin_prompt: PinPrompt | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Sign ``inp`` into ``out`` under the policy for ``record_type``.

    ``kind`` is ``dicom`` (PS3.15 Annex C), ``pdf`` (PAdES B-LTA) or ``file``
    (detached CAdES-T; ``out`` is the ``.p7s``).  Raises
    :class:`SigningError` (policy refusal, with every reason) or
    :class:`TimestampError`; ``out`` then does not exist.
    """
    inp, out = Path(inp), Path(out)
    if out.exists():
        raise SigningError(f"output {out} already exists; refusing to overwrite")
    record = settings.policy.for_record(record_type)
    purpose = purpose or record.default_purpose
    if purpose not in PURPOSES:
        raise SigningError(f"unknown signature purpose {purpose!r} (ASTM codes 1..18)")
    tsa = settings.tsa_client()
    if record.timestamp_required and tsa is None:
        raise SigningError(f"record type {record_type!r} requires a timestamp; no TSA configured")
    spec = SignerSpec.parse(signer_spec) if isinstance(signer_spec, str) else signer_spec
    at = now or datetime.now(UTC)
    try:
        data = await asyncio.to_thread(inp.read_bytes)
    except OSError as exc:
        raise SigningError(f"cannot read {inp}: {exc.strerror}") from exc

    async with await open_signer(spec, pin_prompt=pin_prompt) as signer:
        check = await check_signer(
            record, signer.certificate, at, settings.trust.signer_context(at)
        )
        check.raise_if_refused()
        if kind == "dicom":
            try:
                ds = await asyncio.to_thread(pydicom.dcmread, inp)
            except (InvalidDicomError, ValueError) as exc:
                raise SigningError(f"{inp} is not a readable DICOM file: {exc}") from exc
            signed = await dicom_sig.sign_dataset(ds, signer, record.dicom_profile, purpose, tsa)
            output = await asyncio.to_thread(_encode_dicom, signed)
            item = signed.DigitalSignaturesSequence[-1]
            ident = {"signature_uid": str(item.DigitalSignatureUID)}
        elif kind == "pdf":
            if tsa is None:
                raise SigningError("PAdES B-LTA needs a TSA; none is configured")
            output = await pades.sign_pdf(
                data,
                signer,
                settings.trust,
                SekishoTimeStamper(tsa),
                reason=PURPOSES[purpose],
            )
            ident = {"field": pades.DEFAULT_FIELD}
        elif kind == "file":
            stamper = SekishoTimeStamper(tsa) if tsa is not None else None
            output = await cades.sign_detached(data, signer, stamper)
            ident = {}
        else:
            raise SigningError(f"unknown signing kind {kind!r} (dicom, pdf or file)")
        await asyncio.to_thread(_write_atomically, out, output)

    results = tsa.results if tsa is not None else []
    return {
        "kind": kind,
        "input": str(inp),
        "output": str(out),
        "output_sha256": hashlib.sha256(output).hexdigest(),
        "record_type": record_type,
        "purpose": {"code": purpose, "meaning": PURPOSES[purpose]},
        "signer": check.subject,
        "hc_role": check.role,
        "backend": spec.kind,
        **ident,
        "timestamps": [
            {
                **r.token.to_dict(),
                "clock_skew_seconds": r.skew.total_seconds(),
                "skew_alert": r.skew_exceeded,
            }
            for r in results
        ],
        "clock_skew_alert": any(r.skew_exceeded for r in results),
    }


async def cmd_verify(
    path: Path | str,
    *,
    settings: SigningSettings,
    record_type: str | None = None,
    p7s: Path | str | None = None,
) -> tuple[int, VerificationReport | dict[str, Any]]:
    """Verify ``path``; exit code 0 if valid under the policy, 1 if not, 2 if unreadable."""
    policy = settings.policy.for_record(record_type) if record_type else None
    try:
        report = await verify_file(path, p7s=p7s, trust=settings.trust, policy=policy)
    except VerificationError as exc:
        return 2, {"path": str(path), "verdict": "unreadable", "problems": [exc.message]}
    return (0 if report.ok else 1), report
