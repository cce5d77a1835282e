"""The composition root: one object that owns the gateway's parts.

Handlers (DICOMweb, DIMSE, CLI) receive a :class:`Gateway` and never build
stores, contexts or trails themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from cryptography import x509

from gateway.audit.events import AuditEvent
from gateway.audit.trail import AuditTrail
from gateway.metrics import Metrics
from gateway.peers import PeerAuthenticator
from gateway.settings import Settings
from gateway.store.files import FileStore
from gateway.store.sqlite import SqliteMetadataStore
from pki.errors import AuditWriteError
from pki.peer import PeerCertificateValidator

log = logging.getLogger("sekisho")
T = TypeVar("T")


@dataclass
class Gateway:
    settings: Settings
    store: SqliteMetadataStore
    files: FileStore
    audit: AuditTrail
    metrics: Metrics
    executor: ThreadPoolExecutor

    @classmethod
    def open(cls, settings: Settings) -> Gateway:
        # store.fsync = false (benchmarks, never production) covers the index too.
        store = SqliteMetadataStore(settings.store.database, durable=settings.store.fsync)
        files = FileStore(settings.store.files, fsync=settings.store.fsync)
        audit = AuditTrail(settings.audit_database)
        metrics = Metrics()
        metrics.describe("sekisho_http_requests_total", "HTTP requests by endpoint and status")
        metrics.describe("sekisho_tls_refusals_total", "Refused TLS connections by reason")
        metrics.describe("sekisho_stow_instances_total", "Instances received by STOW-RS")
        metrics.describe("sekisho_stow_bytes_total", "Bytes of instances received by STOW-RS")
        return cls(settings, store, files, audit, metrics, ThreadPoolExecutor(max_workers=8))

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (SQLite, hashing, pydicom) off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))

    async def record(self, event: AuditEvent) -> None:
        """Append to the audit trail; failure to audit stops the action."""
        try:
            await self.run(self.audit.record, event)
        except AuditWriteError:
            raise
        except Exception as exc:  # pragma: no cover - defensive
            raise AuditWriteError(f"audit trail unavailable: {type(exc).__name__}") from exc

    def peer_validator(self) -> PeerCertificateValidator:
        tls = self.settings.tls
        return PeerCertificateValidator(
            tls.trust_anchors, tls.intermediates, self.settings.partners.revocation
        )

    def authenticator(self) -> PeerAuthenticator:
        return PeerAuthenticator(self.peer_validator(), self.store)

    def expiry_warnings(self, now: datetime | None = None) -> list[str]:
        """Certificates (own and partners') expiring within the window (R-TLS-7)."""
        now = now or datetime.now(UTC)
        horizon = now + timedelta(days=self.settings.partners.expiry_warning_days)
        warnings: list[str] = []
        own = x509.load_pem_x509_certificate(self.settings.tls.certificate.read_bytes())
        if own.not_valid_after_utc <= horizon:
            warnings.append(
                f"the gateway's own certificate expires on {own.not_valid_after_utc:%Y-%m-%d}"
            )
        for partner in self.store.list_partners():
            if partner.certificate_not_after:
                end = datetime.fromisoformat(partner.certificate_not_after)
                if end <= horizon:
                    warnings.append(
                        f"partner {partner.name!r} certificate expires on {end:%Y-%m-%d}"
                    )
        return warnings
