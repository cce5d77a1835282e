"""RFC 3161 seals of the audit chain head (R-AUD-2) with the clock check of R-AUD-5.

The audit trail is hash-chained; a complete, consistent rewrite by someone
with write access to the database and the head checkpoint would still verify.
A seal prevents that: the configured TSA timestamps the head record's hash,
and the token is stored next to the chain (:meth:`AuditTrail.seal`).

* The message imprint of the token *is* the head's ``record_hash`` (SHA-256
  of the record's canonical encoding, :mod:`gateway.audit.chain`), so anyone
  can check a seal with ordinary tools:
  ``openssl ts -verify -digest HEAD_HASH -in seal.tsr -token_in -CAfile TSA_ROOT``.
* :func:`seal_token_check` is the ``token_check`` of :meth:`AuditTrail.verify`:
  each token must carry the sealed hash as imprint, be signed by a TSA whose
  certificate chains to ``[signing.trust] tsa_anchors`` and was valid at the
  token's genTime (:func:`signing.tsa.verify_token`).
* :func:`seal_audit_trail` audits a failure as a Security Alert and a local
  clock off by more than ``max_clock_skew_seconds`` as another.
* :class:`PeriodicSealer` is the task of ``sekisho serve`` that seals every
  ``[audit] seal_interval_minutes``: failures are logged and audited, never
  fatal to the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.audit.trail import AuditTrail, Seal
from gateway.signatures.config import load_signing_settings, signing_configured
from gateway.signatures.events import clock_skew_alert, seal_failure_alert
from pki.errors import AuditWriteError, ConfigurationError, SekishoError
from signing.cli import SigningSettings
from signing.tsa import TimestampResult, TsaClient, verify_token

__all__ = [
    "PeriodicSealer",
    "SealOutcome",
    "seal_audit_trail",
    "seal_token_check",
    "token_check_for",
    "tsa_timestamper",
]

log = logging.getLogger("sekisho.audit.seal")
T = TypeVar("T")
_HEAD_HASH_BYTES = 32  # SHA-256 record hash


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even under a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def tsa_timestamper(client: TsaClient) -> Callable[[bytes], bytes]:
    """The ``timestamper`` of :meth:`AuditTrail.seal`: head hash in, token DER out.

    The 32 raw bytes of the head's SHA-256 record hash are sent as the
    message imprint (RFC 3161 §2.4.1), not hashed again.
    """

    def stamp(head_hash: bytes) -> bytes:
        if len(head_hash) != _HEAD_HASH_BYTES:
            raise AuditWriteError("the audit head hash is not a SHA-256 digest")
        result = _run(client.timestamp(digest=head_hash, hash_algorithm="sha256"))
        return result.token.der

    return stamp


def seal_token_check(signing: SigningSettings) -> Callable[[bytes, bytes], object]:
    """``token_check(token, head_hash)`` for :meth:`AuditTrail.verify`; raises when bad."""

    def check(token: bytes, head_hash: bytes) -> object:
        return _run(verify_token(token, signing.trust, imprint=head_hash))

    return check


def token_check_for(settings: Any) -> Callable[[bytes, bytes], object] | None:
    """The seal token check when ``[signing]`` is configured, else ``None``."""
    if not signing_configured(settings):
        return None
    return seal_token_check(load_signing_settings(settings))


@dataclass(frozen=True)
class SealOutcome:
    """A stored seal and the TSA's answer (R-AUD-2, R-AUD-5)."""

    seal: Seal
    result: TimestampResult

    def to_dict(self) -> dict[str, object]:
        return {
            "seal_id": self.seal.seal_id,
            "head_seq": self.seal.head_seq,
            "head_hash": self.seal.head_hash,
            "sealed_at": self.seal.sealed_at.isoformat(),
            **self.result.token.to_dict(),
            "clock_skew_seconds": self.result.skew.total_seconds(),
            "skew_alert": self.result.skew_exceeded,
        }


def seal_audit_trail(
    trail: AuditTrail, signing: SigningSettings, *, actor: str = "sekisho"
) -> SealOutcome:
    """Seal ``trail``'s head with the configured TSA (blocking: run it in a thread).

    A failure is audited as a Security Alert (``audit-seal-failed``) and
    re-raised; a clock skew above the bound is audited (``clock-skew``).
    """
    client = signing.tsa_client()
    if client is None:
        raise ConfigurationError(
            "configuration key 'signing.tsa_url': required to seal the audit trail (R-AUD-2)"
        )
    try:
        seal = trail.seal(tsa_timestamper(client))
    except Exception as exc:
        failure = exc if isinstance(exc, SekishoError) else None
        reason = failure.message if failure else type(exc).__name__
        log.error("audit seal failed: %s", reason)
        trail.record(seal_failure_alert(reason, actor=actor, code=failure.code if failure else ""))
        raise
    result = client.results[-1]
    if result.skew_exceeded:
        log.warning(
            "clock skew %.3f s against the TSA exceeds %g s",
            result.skew.total_seconds(),
            signing.max_clock_skew.total_seconds(),
        )
        trail.record(
            clock_skew_alert(
                tsa=result.token.tsa_subject,
                skew_seconds=result.skew.total_seconds(),
                bound_seconds=signing.max_clock_skew.total_seconds(),
                during="audit sealing",
            )
        )
    return SealOutcome(seal, result)


class PeriodicSealer:
    """Seal the audit trail of a running gateway every ``interval`` (R-AUD-2).

    The first seal is made at start (it covers the start record), then one
    each interval when records were added since the last seal.  Construction
    refuses a configuration without a TSA, so a gateway that is told to seal
    and cannot does not start silently without seals.
    """

    def __init__(self, gw: Any, interval_minutes: float) -> None:
        if interval_minutes <= 0:
            raise ConfigurationError("configuration key 'audit.seal_interval_minutes': must be > 0")
        try:
            self.signing = load_signing_settings(gw.settings)
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"configuration key 'audit.seal_interval_minutes': sealing needs [signing]: "
                f"{exc.message}"
            ) from exc
        if not self.signing.tsa_url:
            raise ConfigurationError(
                "configuration key 'audit.seal_interval_minutes': sealing needs [signing] tsa_url"
            )
        self.gw = gw
        self.interval = interval_minutes * 60.0
        self.sealed = 0
        self.failures = 0
        self._last_seq: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="sekisho-audit-sealer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        seals = await self.gw.run(self.gw.audit.seals)
        self._last_seq = seals[-1].head_seq if seals else None
        while True:
            await self.seal_once()
            await asyncio.sleep(self.interval)

    async def seal_once(self) -> bool:
        """One attempt; ``True`` if a seal was stored.  Never raises (but cancellation)."""
        try:
            head = await self.gw.run(self.gw.audit.head)
            if head.seq == 0 or head.seq == self._last_seq:
                return False
            outcome: SealOutcome = await self.gw.run(seal_audit_trail, self.gw.audit, self.signing)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged and audited; the server keeps running
            self.failures += 1
            if isinstance(exc, AuditWriteError):
                log.error("audit seal failed and could not be audited: %s", exc.message)
            elif not isinstance(exc, SekishoError):
                log.exception("audit seal failed unexpectedly")
            return False
        self.sealed += 1
        self._last_seq = outcome.seal.head_seq
        log.info(
            "audit trail sealed: seal %d over record %d, TSA time %s",
            outcome.seal.seal_id,
            outcome.seal.head_seq,
            outcome.result.token.gen_time.isoformat(),
        )
        return True
