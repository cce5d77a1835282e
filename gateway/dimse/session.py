"""What one DIMSE association knows about its peer and what it did (R-TLS-4, R-AUD-1, R-XCH-7).

A :class:`Session` is created once the TLS handshake and the certificate
check have succeeded, before any PDU is read: the partner (the
:class:`~gateway.peers.Principal`) comes from the certificate, never from
what the peer says.  The association that serves it is a
:class:`SekishoAssociation`, which carries the session to the event handlers
and routes C-GET and C-MOVE requests to Sekisho's own retrieve
implementation (:mod:`gateway.dimse.retrieve`) instead of pynetdicom's, so
that stored instances are sent byte for byte as received.

Instances received by C-STORE are tallied per patient in a
:class:`TransferLog` and audited as DICOM Instances Transferred (110104) when
the association ends, as IHE ATNA recommends (one message per study and
association rather than one per instance).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.presentation import PresentationContext

from gateway.peers import Principal
from gateway.store.index import InstanceIndex

log = logging.getLogger("sekisho.dimse")

#: ``retrieve(association, request, context)``: serves one C-GET or C-MOVE request.
RetrieveHandler = Callable[[Association, Any, PresentationContext], None]


@dataclass
class PatientTally:
    """Instances of one patient received on one association."""

    studies: set[str] = field(default_factory=set)
    instances: int = 0
    bytes: int = 0


class TransferLog:
    """Instances stored and refused on one association, waiting to be audited."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored: dict[tuple[str, str], PatientTally] = {}
        self._failures: list[str] = []
        self.pending = 0

    def stored(self, idx: InstanceIndex, size: int) -> None:
        with self._lock:
            tally = self._stored.setdefault((idx.patient_id, idx.issuer), PatientTally())
            tally.studies.add(idx.study_uid)
            tally.instances += 1
            tally.bytes += size
            self.pending += 1

    def failed(self, reason: str) -> None:
        with self._lock:
            self._failures.append(reason)
            self.pending += 1

    def drain(self) -> tuple[dict[tuple[str, str], PatientTally], list[str]]:
        """Everything tallied so far, and an empty log."""
        with self._lock:
            stored, failures = self._stored, self._failures
            self._stored, self._failures, self.pending = {}, [], 0
        return stored, failures


@dataclass
class Session:
    """The authenticated peer of one association and what it did."""

    principal: Principal
    address: str | None
    retrieve: RetrieveHandler | None = None
    #: The calling AE title, once the A-ASSOCIATE-RQ has been accepted.
    calling_ae: str = ""
    transfers: TransferLog = field(default_factory=TransferLog)
    #: Permissions already refused (and audited) on this association.
    refused: set[str] = field(default_factory=set)


class SekishoAssociation(Association):
    """An acceptor association that knows its :class:`Session`.

    C-GET and C-MOVE requests go to ``session.retrieve`` (PS3.4 C.4.2, C.4.3);
    everything else is served by pynetdicom's service classes and the
    handlers bound by :class:`gateway.dimse.scp.DimseService`.
    """

    session: Session

    def _serve_request(self, msg: Any, context_id: int) -> None:
        retrieve = getattr(self, "session", None) and self.session.retrieve
        context = self._accepted_cx.get(context_id)
        if (
            retrieve is None
            or not isinstance(msg, C_GET | C_MOVE)
            or self._sent_release
            or not msg.is_valid_request
            or context is None
        ):
            super()._serve_request(msg, context_id)
            return
        # As pynetdicom does around a service class: the reactor is paused and
        # C-CANCEL requests are collected for this request only.
        self.dimse.cancel_req = {}
        self._is_paused = True
        try:
            retrieve(self, msg, context)
        except Exception:  # noqa: BLE001 - one bad request must not kill the thread silently
            log.exception("retrieve request failed; aborting the association")
            self.abort()
        finally:
            self._is_paused = False
            self.dimse.cancel_req = {}
