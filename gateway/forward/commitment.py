"""Storage Commitment Push Model, SCU side (PS3.4 Annex J; PS3.7 10.1.1 and 10.1.4).

The gateway asks a destination to commit instances with an N-ACTION (Action
Type ID 1, Transaction UID, Referenced SOP Sequence).  The provider answers
with an N-EVENT-REPORT (Event Type ID 1: all committed, 2: failures exist)
either on the same association or on a new association it opens to the
gateway's DIMSE listener (PS3.4 J.3.3); real archives do both.  Both paths end
in :func:`handle_n_event_report`, which the listener registers for
``evt.EVT_N_EVENT_REPORT``::

    handlers = [(evt.EVT_N_EVENT_REPORT, lambda e: handle_n_event_report(gateway, e))]

A report is accepted only for a Transaction UID this gateway issued and only
from the AE title configured for that destination (``commitment_ae``, default
``called_ae``; the listener has already bound that AE title to the provider's
certificate, R-TLS-4).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from gateway.audit import events as ev
from gateway.forward import auditing
from gateway.forward.destinations import STORAGE_COMMITMENT_PUSH
from gateway.forward.queue import CommitmentOutcome, UnknownTransactionError, open_queue
from pki.errors import AuthorizationError, InvalidInputError

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger("sekisho.forward")

#: Failure Reason (0008,1197) values for Storage Commitment (PS3.4 J.3.2.1.2.1.5 / C.4).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
#: N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT = 0x0115
NO_SUCH_SOP_CLASS = 0x0118


def failure_words(code: int | None) -> str:
    if code is None:
        return "the storage provider did not commit the instance (no reason given)"
    words = FAILURE_REASONS.get(code, "unknown reason")
    return f"Storage Commitment failed: {words} (0x{code:04X})"


@dataclass(frozen=True)
class CommitmentReport:
    transaction_uid: str
    succeeded: tuple[tuple[str, str], ...]
    #: (SOP Class UID, SOP Instance UID, Failure Reason)
    failed: tuple[tuple[str, str, int | None], ...]


def build_action_information(transaction_uid: str, refs: list[tuple[str, str]]) -> Dataset:
    """N-ACTION Action Information (PS3.4 J.3.2.1.1.1): Transaction UID and references."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    ds.ReferencedSOPSequence = DicomSequence(items)
    return ds


def parse_event_report(event_type_id: int | None, info: Dataset) -> CommitmentReport:
    """Read an N-EVENT-REPORT Event Information (PS3.4 J.3.3.1.1); raise on malformed input."""
    if event_type_id not in (1, 2):
        raise InvalidInputError(f"Storage Commitment event type {event_type_id} is not 1 or 2")
    tx = str(info.get("TransactionUID", "") or "")
    if not tx:
        raise InvalidInputError("N-EVENT-REPORT without a Transaction UID")

    def refs(keyword: str) -> list[Dataset]:
        return list(info.get(keyword) or [])

    succeeded = tuple(
        (str(i.get("ReferencedSOPClassUID", "")), str(i.ReferencedSOPInstanceUID))
        for i in refs("ReferencedSOPSequence") if "ReferencedSOPInstanceUID" in i
    )
    failed = tuple(
        (str(i.get("ReferencedSOPClassUID", "")), str(i.ReferencedSOPInstanceUID),
         int(i.FailureReason) if "FailureReason" in i else None)
        for i in refs("FailedSOPSequence") if "ReferencedSOPInstanceUID" in i
    )
    if event_type_id == 1 and failed:
        raise InvalidInputError("event type 1 (all successful) with a Failed SOP Sequence")
    return CommitmentReport(tx, succeeded, failed)


# --- same-association waiters ------------------------------------------------------

_waiters: dict[str, threading.Event] = {}
_waiters_lock = threading.Lock()


def expect_report(transaction_uid: str) -> threading.Event:
    """An event set when the report for this transaction has been applied."""
    with _waiters_lock:
        return _waiters.setdefault(transaction_uid, threading.Event())


def forget_report(transaction_uid: str) -> None:
    with _waiters_lock:
        _waiters.pop(transaction_uid, None)


def _notify(transaction_uid: str) -> None:
    with _waiters_lock:
        waiter = _waiters.get(transaction_uid)
    if waiter is not None:
        waiter.set()


# --- applying a report --------------------------------------------------------------


def apply_report(gw: Gateway, report: CommitmentReport, remote_ae: str) -> CommitmentOutcome:
    """Check who reports, apply the result to the queue, audit failures (synchronous)."""
    queue = open_queue(gw.settings.store.database)
    name = queue.transaction_destination(report.transaction_uid)
    dest = gw.settings.destinations.get(name)
    expected = (dest.commitment_ae or dest.called_ae) if dest is not None else None
    if expected is None or remote_ae.strip() != expected:
        raise AuthorizationError(
            f"Storage Commitment report for destination {name!r} came from AE title "
            f"{remote_ae.strip()!r}, expected {expected!r}"
        )
    outcome = queue.apply_commitment(
        report.transaction_uid,
        [uid for _cls, uid in report.succeeded],
        [(uid, failure_words(code)) for _cls, uid, code in report.failed],
    )
    log.info(
        "storage commitment from %s: %d committed, %d failed, %d unknown",
        name, len(outcome.committed), len(outcome.failed), len(outcome.unknown),
    )
    auditing.sweep(gw, queue)
    _notify(report.transaction_uid)
    return outcome


def _peer_ae(event: Any) -> str:
    assoc = event.assoc
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return str(peer.ae_title or "")


def _peer_address(event: Any) -> str | None:
    assoc = event.assoc
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return getattr(peer, "address", None) or None


def handle_n_event_report(gateway: Gateway, event: Any) -> tuple[int, Dataset | None]:
    """``evt.EVT_N_EVENT_REPORT`` handler for Storage Commitment results.

    Returns the (status, Event Reply) pair pynetdicom expects.  Any refusal is
    audited as a Security Alert; the provider sees a failure status.
    """
    request = event.request
    if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
        return NO_SUCH_SOP_CLASS, None
    remote_ae = _peer_ae(event)
    try:
        report = parse_event_report(request.EventTypeID, event.event_information)
        apply_report(gateway, report, remote_ae)
    except UnknownTransactionError as exc:
        _alert(gateway, event, "unknown-transaction", exc.message)
        return INVALID_ARGUMENT, None
    except AuthorizationError as exc:
        _alert(gateway, event, "wrong-ae-title", exc.message)
        return PROCESSING_FAILURE, None
    except InvalidInputError as exc:
        log.warning("malformed Storage Commitment report from %s: %s", remote_ae, exc.message)
        return (NO_SUCH_EVENT_TYPE if "event type" in exc.message else INVALID_ARGUMENT), None
    except Exception:
        log.exception("could not apply a Storage Commitment report")
        return PROCESSING_FAILURE, None
    return SUCCESS, None


def _alert(gateway: Gateway, event: Any, reason: str, text: str) -> None:
    log.warning("Storage Commitment report refused: %s", text)
    try:
        gateway.audit.record(
            ev.security_alert(
                reason,
                f"Storage Commitment report refused: {text}",
                actor=_peer_ae(event) or "unknown AE",
                source_address=_peer_address(event),
                event_type=ev.AUTHORIZATION_DECISION,
                extra={"calling_ae": _peer_ae(event)},
            )
        )
    except Exception:  # noqa: BLE001 - the refusal stands even if auditing fails
        log.exception("could not audit a refused Storage Commitment report")
