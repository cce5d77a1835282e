"""The DICOM TLS service: one pynetdicom AE with Sekisho's listener and handlers (R-XCH-1).

Services (PS3.4): Verification (Annex A), Storage for every storage SOP
class in every transfer syntax pynetdicom knows, compressed ones included, so
that a data set is accepted in the syntax it came in (Annex B), and
Query/Retrieve in the Patient Root and Study Root models: C-FIND, C-MOVE and
C-GET (Annex C; C-GET needs the requestor's SCP role for the storage SOP
classes, which is accepted in SCP/SCU Role Selection, PS3.7 D.3.3.4).

Storage Commitment N-EVENT-REPORTs that a provider sends on an association of
its own (PS3.4 J.3.3) are accepted here and handed to
``gateway.forward.commitment.handle_n_event_report``.

Every request is decided by the certificate's partner: its permissions
(push, query, retrieve; R-XCH-3) and its consent-filtered view of the store
(R-XCH-2).  Refusals are Security Alerts (110113), queries Query records
(110112) per patient, transfers Instances Transferred (110104) (R-AUD-1).

pynetdicom must not write patient data to the operational log (STYLE 12):
request and response identifiers are not logged, and the per-PDU "standard"
debug handlers are not bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    _handlers,
    evt,
)
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.audit import events as ev
from gateway.dimse.listener import DicomTlsServer, ListenerHooks, gate_association
from gateway.dimse.qr import (
    FIND_MODELS,
    RETRIEVE_MODELS,
    find_response,
    parse_find,
    patients_in,
    run_find,
)
from gateway.dimse.retrieve import RetrieveScp
from gateway.dimse.session import SekishoAssociation, Session
from gateway.dimse.storage import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    StorageScp,
    StreamingDimse,
)
from gateway.peers import Principal
from gateway.service import Gateway
from gateway.tlsserver import Refusal
from pki.errors import InvalidInputError, PeerAuthenticationError, SekishoError
from pki.tls import client_context, server_context

log = logging.getLogger("sekisho.dimse")

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
PENDING = 0xFF00
CANCELLED = 0xFE00
NOT_AUTHORIZED = 0x0124
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
_WORDS = {"push": "store instances", "query": "query", "retrieve": "retrieve instances"}
#: Storage transfer syntaxes in order of preference.  pynetdicom, as acceptor,
#: takes the first of ours that a proposed context offers: Explicit VR Little
#: Endian first, the syntax most instances are stored in, so that a C-GET
#: requestor offering several syntaxes in one context gets them as stored.
STORAGE_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian),
]


def quiet_pynetdicom() -> None:
    """No identifiers (patient data) in pynetdicom's log (STYLE 12, R-OPS-3)."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


class DimseService:
    """Starts and stops the DICOM TLS listener of one :class:`Gateway`.

    ``loop`` is the gateway's event loop, on which certificate validation runs
    (it is asynchronous and shares its cache with the HTTPS side); without
    one, the service runs a private loop thread.
    """

    def __init__(self, gw: Gateway, loop: asyncio.AbstractEventLoop | None = None) -> None:
        quiet_pynetdicom()
        self.gw = gw
        self.settings = gw.settings.dimse
        self.loop = loop
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self.authenticator = gw.authenticator()
        self.server: DicomTlsServer | None = None
        self._client_tls: Any = None
        self._active: set[Association] = set()
        self._lock = threading.Lock()
        for name, text in (
            ("sekisho_dimse_instances_total", "Instances received by C-STORE, by outcome"),
            ("sekisho_dimse_bytes_total", "Bytes of instances received by C-STORE"),
            ("sekisho_dimse_retrieved_total", "Instances sent by C-GET and C-MOVE"),
            ("sekisho_dimse_refusals_total", "Refused DICOM connections and associations"),
        ):
            gw.metrics.describe(name, text)
        self.ae = self._application_entity()
        self.storage = StorageScp(
            gw, max_instance_bytes=self.settings.max_instance_bytes,
            record=self.record, deny=self.deny,
        )
        self.retrieve = RetrieveScp(
            gw, ae=self.ae, client_tls=self._client_context, record=self.record, deny=self.deny
        )

    # -- set-up ----------------------------------------------------------------
    def _application_entity(self) -> AE:
        s = self.settings
        ae = AE(ae_title=self.gw.settings.instance.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.acse_timeout = s.acse_timeout_seconds
        ae.dimse_timeout = s.dimse_timeout_seconds
        ae.network_timeout = s.network_timeout_seconds
        ae.connection_timeout = s.connect_timeout_seconds
        ae.maximum_associations = s.max_connections
        ae.add_supported_context(Verification, DEFAULT_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            # Roles accepted as proposed: a C-GET requestor asks for the SCP role.
            ae.add_supported_context(
                str(cx.abstract_syntax), STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        for uid in (*FIND_MODELS, *RETRIEVE_MODELS):
            ae.add_supported_context(uid, DEFAULT_TRANSFER_SYNTAXES)
        # Storage Commitment results a provider sends on its own association
        # (PS3.4 J.3.3): it proposes the SCP role for itself (PS3.7 D.3.3.4).
        ae.add_supported_context(
            STORAGE_COMMITMENT_PUSH, DEFAULT_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
        )
        return ae

    def _commitment_report(self, event: Any) -> Any:
        """N-EVENT-REPORT of Storage Commitment, handled by the outbound side (gateway.forward)."""
        from gateway.forward.commitment import handle_n_event_report

        return handle_n_event_report(self.gw, event)

    def _client_context(self) -> Any:
        """The gateway's TLS client context (C-MOVE destinations), built once."""
        if self._client_tls is None:
            self._client_tls = client_context(self.gw.settings.tls)
        return self._client_tls

    def start(self) -> tuple[str, int]:
        """Bind and start accepting; returns the bound (host, port)."""
        s = self.settings
        tls = server_context(self.gw.settings.tls)
        if self.loop is None:
            self._own_loop = asyncio.new_event_loop()
            threading.Thread(
                target=self._own_loop.run_forever, name="sekisho-dimse-auth", daemon=True
            ).start()
        own_ae = self.gw.settings.instance.ae_title
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, gate_association(own_ae, self._rejected)),
            (evt.EVT_C_ECHO, lambda _event: 0x0000),
            (evt.EVT_C_STORE, self.storage.handle),
            (evt.EVT_C_FIND, self._find),
            (evt.EVT_N_EVENT_REPORT, self._commitment_report),
        ]
        hooks = ListenerHooks(
            authenticate=self._authenticate,
            refused=self._refused,
            new_association=self._new_association,
            finished=self._finished,
            limited=lambda reason: self.gw.metrics.inc(
                "sekisho_dimse_refusals_total", reason=reason
            ),
        )
        server = self.ae.make_server(
            (s.host, s.port), evt_handlers=handlers, server_class=DicomTlsServer,
            tls_context=tls, settings=s, hooks=hooks,
        )
        for event, handler in (
            (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
            (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
            (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
            (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
        ):
            try:
                server.unbind(event, handler)
            except (KeyError, ValueError):
                pass
        self.server = server  # type: ignore[assignment]
        self.ae._servers.append(server)  # noqa: SLF001 - as AE.start_server does
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2},
            name="sekisho-dimse-accept", daemon=True,
        ).start()
        host, port = server.server_address[:2]
        log.info("DICOM over TLS listening on %s:%d (AE %s)", host, port, own_ae)
        return str(host), int(port)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort what is running, audit what was received."""
        server = self.server
        if server is not None:
            server.close_connections()
            server.shutdown()
            for assoc in list(self._active):
                assoc.abort()
            deadline = time.monotonic() + timeout
            while self._active and time.monotonic() < deadline:
                time.sleep(0.05)
            self.server = None
        if self._own_loop is not None:
            self._own_loop.call_soon_threadsafe(self._own_loop.stop)
            self._own_loop = None

    # -- listener hooks ----------------------------------------------------------
    def _authenticate(self, der: bytes | None, address: str | None) -> Principal:
        loop = self.loop or self._own_loop
        assert loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self.authenticator.authenticate(der, address), loop
        )
        try:
            return future.result(timeout=self.settings.handshake_timeout_seconds + 30)
        except PeerAuthenticationError:
            raise
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise PeerAuthenticationError(
                "the client certificate could not be checked in time", reason="validation-timeout"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - fail closed
            log.exception("certificate check failed unexpectedly")
            raise PeerAuthenticationError(
                "the client certificate could not be checked", reason="validation-error"
            ) from exc

    def _new_association(self, principal: Principal, address: str | None) -> Association:
        assoc = SekishoAssociation(self.ae, MODE_ACCEPTOR)
        assoc.session = Session(principal, address, retrieve=self.retrieve)
        assoc.dimse = StreamingDimse(assoc, self.storage)
        with self._lock:
            self._active.add(assoc)
        return assoc

    def _finished(self, assoc: Association) -> None:
        session: Session = assoc.session  # type: ignore[attr-defined]
        try:
            self.storage.close_association(session)
            self.storage.audit_transfers(session)
        finally:
            with self._lock:
                self._active.discard(assoc)

    def _refused(self, refusal: Refusal) -> None:
        self.gw.metrics.inc("sekisho_dimse_refusals_total", reason=refusal.reason)
        log.warning("DICOM connection refused: %s (%s)", refusal.reason, refusal.message)
        self.record(
            ev.security_alert(
                refusal.reason,
                refusal.message,
                source_address=refusal.address,
                cert_sha256=refusal.cert_sha256,
                extra={"detail": (refusal.detail or "")[:300], "port": "dimse"},
            )
        )

    def _rejected(
        self, exc: PeerAuthenticationError, session: Session | None, calling: str
    ) -> None:
        self.gw.metrics.inc("sekisho_dimse_refusals_total", reason=exc.reason)
        log.warning("DICOM association rejected: %s (%s)", exc.reason, exc.message)
        principal = session.principal if session else None
        self.record(
            ev.security_alert(
                exc.reason,
                exc.message,
                actor=principal.name if principal else None,
                actor_kind=principal.kind if principal else "partner",  # type: ignore[arg-type]
                source_address=session.address if session else None,
                cert_sha256=principal.cert_sha256 if principal else None,
                extra={"calling_ae": calling[:16], "port": "dimse"},
            )
        )

    # -- audit helpers -------------------------------------------------------------
    def record(self, event: ev.AuditEvent) -> None:
        """Append to the audit trail from a DIMSE thread (the trail is thread-safe)."""
        try:
            self.gw.audit.record(event)
        except Exception:  # noqa: BLE001 - the operator must see it; the peer gets no detail
            log.exception("could not write an audit record")

    def deny(self, session: Session, permission: str, what: str) -> None:
        """Refuse what the partner may not do, audited once per association (R-XCH-3)."""
        if permission in session.refused:
            return
        session.refused.add(permission)
        principal = session.principal
        self.record(
            ev.security_alert(
                "not-permitted",
                f"partner is not permitted to {_WORDS.get(permission, permission)} ({what})",
                actor=principal.name,
                actor_kind=principal.kind,  # type: ignore[arg-type]
                source_address=session.address,
                cert_sha256=principal.cert_sha256,
                event_type=ev.USE_OF_RESTRICTED_FUNCTION,
                extra={"calling_ae": session.calling_ae, "port": "dimse"},
            )
        )

    # -- C-FIND ----------------------------------------------------------------------
    def _find(self, event: Any) -> Iterator[tuple[int, Any]]:
        """C-FIND SCP (PS3.4 C.4.1): consent-filtered like QIDO-RS (R-XCH-2)."""
        session: Session = event.assoc.session
        principal = session.principal
        if not principal.partner.may("query"):
            self.deny(session, "query", "C-FIND")
            yield NOT_AUTHORIZED, None
            return
        sop_class = str(event.request.AffectedSOPClassUID)
        try:
            query = parse_find(event.identifier, sop_class, self.settings.max_find_results)
            rows = run_find(self.gw.store, query, principal.visibility)
        except InvalidInputError as exc:
            log.info("C-FIND refused: %s", exc.message)
            yield IDENTIFIER_DOES_NOT_MATCH, None
            return
        except SekishoError as exc:
            log.warning("C-FIND failed: %s", exc.message)
            yield UNABLE_TO_PROCESS, None
            return
        patients = patients_in(rows)
        base = ev.query(
            actor=principal.name,
            actor_kind=principal.kind,  # type: ignore[arg-type]
            source_address=session.address,
            cert_sha256=principal.cert_sha256,
            sop_class_uid=sop_class,
            query_text=query.text,
            description=f"C-FIND {query.level} query over DICOM TLS",
            extra={"calling_ae": session.calling_ae},
        )
        if not patients:
            self.record(base)
        for (pid, issuer), studies in patients.items():
            self.record(
                replace(
                    base, patient_id=pid, patient_issuer=issuer or None,
                    study_uids=tuple(sorted(studies)),
                )
            )
        own_ae = self.gw.settings.instance.ae_title
        for row in rows:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, find_response(query, row, own_ae)
