"""C-STORE SCU over TLS with Storage Commitment (PS3.4 Annex B and J; PS3.7 9.1.1, 10.1.4).

:func:`send_batch` runs in a worker thread (pynetdicom is blocking).  It opens
one association per batch (one destination, one study) and, per instance:

1. re-reads the stored file: its SHA-256 must equal the hash kept on receipt;
2. picks the accepted presentation context: the instance's own transfer syntax
   (sent byte for byte from the file, never decoded), else the other
   uncompressed little-endian syntax; nothing else is ever offered (R-XCH-6);
3. sends the C-STORE and reports success to the caller only after the peer's
   response with a success or warning status (PS3.4 B.2.3).

With Storage Commitment the caller persists the Transaction UID, then an
N-ACTION asks for commitment, and the association stays open for
``commitment_timeout_seconds`` in case the provider reports on it (the
N-EVENT-REPORT handler given by the caller applies the result).  Every phase has
a timeout: connect and TLS handshake (``connect_timeout_seconds``), association
(``association_timeout_seconds``), each DIMSE response
(``response_timeout_seconds``) and idle network (``idle_timeout_seconds``).

An instance in its own syntax goes through pynetdicom's file-backed DIMSE
encoder (the request's ``_dataset_path``): the bytes after the stored file's
meta group are streamed in PDU-sized fragments, never decoded, so memory stays
flat and the bytes on the wire are the stored bytes.  This is what
``send_c_store`` does with ``_config.STORE_SEND_CHUNKED_DATASET``; doing it here
avoids flipping that process-wide switch under other pynetdicom users.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, _handlers, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from gateway.dimse import pdata
from gateway.forward import commitment
from gateway.forward.batch import BatchResult, SendItem, SentInstance
from gateway.forward.destinations import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    DestinationSettings,
    choose_syntax,
    no_syntax_reason,
    plan_contexts,
)
from gateway.forward.integrity import InstanceDigest, digest_file, sha256_bytes

log = logging.getLogger("sekisho.forward")

#: C-STORE warning statuses: stored, possibly with coercion (PS3.4 B.2.3).
WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
#: pynetdicom presentation context results (PS3.8 9.3.3.2).
_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
#: pynetdicom's DUL reactor sleeps this long whenever its event queue is empty
#: (default 1 ms), i.e. whenever it has caught up with the sender and while a
#: C-STORE response is awaited; 0.1 ms while a batch is sent (measured with
#: bench/forward_throughput.py).  Restored to the default while the association
#: only waits for a Storage Commitment report.
_BUSY_LOOP_DELAY = 0.0001
#: C-STORE-RQ Priority: low, as pynetdicom's default (PS3.7 9.3.1.1).
_PRIORITY = 0x0002
_IDLE_LOOP_DELAY = 0.001


def _loop_delay(assoc: Any, seconds: float) -> None:
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = seconds


def _tune(assoc: Any) -> None:
    """Make an established association fit for bulk sending.

    * ``TCP_NODELAY``: pynetdicom leaves Nagle's algorithm on, so the short last
      P-DATA PDU of each dataset waits for the peer's delayed ACK (most of the
      time per instance on loopback);
    * pynetdicom's per-PDU debug-logging handlers are unbound (the gateway logs
      no DIMSE content anyway, STYLE lesson 12).
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    for event, handler in (
        (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
        (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
        (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
        (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    ):
        try:
            assoc.unbind(event, handler)
        except (KeyError, ValueError):
            pass


class SendCallbacks(Protocol):
    def sent(self, result: SentInstance) -> None: ...

    def flush(self) -> None: ...

    def begin_commitment(self, transaction_uid: str, job_ids: Sequence[int]) -> None: ...


EventReportHandler = Callable[[Any], tuple[int, Any]]


def _new_ae(dest: DestinationSettings, calling_ae: str) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = dest.connect_timeout_seconds
    ae.acse_timeout = dest.association_timeout_seconds
    ae.dimse_timeout = dest.response_timeout_seconds
    ae.network_timeout = dest.idle_timeout_seconds
    return ae


def diagnose_connection(dest: DestinationSettings, ctx: ssl.SSLContext) -> str:
    """Why an association could not be opened, in plain words (for ``last_error``)."""
    try:
        sock = socket.create_connection(
            (dest.host, dest.port), timeout=dest.connect_timeout_seconds
        )
    except OSError as exc:
        return f"cannot connect to {dest.host}:{dest.port}: {exc.strerror or exc}"
    try:
        with ctx.wrap_socket(sock, server_hostname=dest.tls_name) as tls:
            tls.settimeout(2)
            try:
                tls.recv(1)
            except (TimeoutError, ssl.SSLError, OSError):
                pass
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the destination's certificate was refused ({exc.verify_message})"
    except ssl.SSLError as exc:
        return f"TLS handshake with {dest.host}:{dest.port} failed ({exc.reason or exc})"
    except TimeoutError:
        return f"TLS handshake with {dest.host}:{dest.port} timed out"
    except OSError as exc:
        return f"TLS connection to {dest.host}:{dest.port} failed: {exc.strerror or exc}"
    finally:
        sock.close()
    return (
        f"TLS works but no DICOM association with {dest.called_ae}@{dest.host}:{dest.port} "
        "(no answer, aborted, or our certificate was refused)"
    )


def _association_failure(assoc: Any, dest: DestinationSettings, ctx: ssl.SSLContext) -> str:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        try:
            return (
                f"association rejected by {dest.called_ae}@{dest.host}:{dest.port}: "
                f"{rsp.reason_str} ({rsp.result_str}, {rsp.source_str})"
            )
        except Exception:  # noqa: BLE001
            return f"association rejected by {dest.called_ae}@{dest.host}:{dest.port}"
    return diagnose_connection(dest, ctx)


def _accepted(assoc: Any, sop_class: str) -> list[str]:
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == sop_class and cx.as_scu is not False
    ]


def _class_supported(assoc: Any, sop_class: str) -> bool:
    results = [cx.result for cx in assoc.rejected_contexts if cx.abstract_syntax == sop_class]
    return not results or any(r != _ABSTRACT_SYNTAX_NOT_SUPPORTED for r in results)


def _no_syntax(assoc: Any, item: SendItem) -> tuple[str, bool]:
    """The permanent failure of an instance no accepted context can carry (R-XCH-6)."""
    supported = _class_supported(assoc, item.sop_class_uid)
    return no_syntax_reason(item.sop_class_uid, item.transfer_syntax, supported), True


def _store_one(assoc: Any, item: SendItem, ts: str, msg_id: int) -> tuple[Any, str, InstanceDigest]:
    digest = digest_file(item.path)
    if digest.file_sha256 != item.sha256:
        raise _LocalCorruption(
            "the local copy no longer matches the SHA-256 recorded on receipt; not sent"
        )
    if ts == item.transfer_syntax:
        status = _send_c_store(
            assoc, item, ts, msg_id, dataset_path=(item.path, digest.dataset_offset)
        )
        return status, digest.dataset_sha256, digest
    # Explicit <-> Implicit VR Little Endian only (lossless; see destinations.proposed_syntaxes).
    target = UID(ts)
    data = encode(dcmread(item.path), target.is_implicit_VR, target.is_little_endian, False)
    if data is None:
        raise _LocalCorruption("the instance could not be re-encoded in " + target.name)
    status = _send_c_store(assoc, item, ts, msg_id, data=data)
    return status, sha256_bytes(data), digest


def _send_c_store(
    assoc: Any,
    item: SendItem,
    ts: str,
    msg_id: int,
    *,
    dataset_path: tuple[Path, int] | None = None,
    data: bytes | None = None,
) -> Any:
    """One C-STORE request and its response (PS3.7 9.1.1); returns the status dataset.

    ``dataset_path``: (stored file, dataset offset), sent unchanged as pre-encoded
    P-DATA-TF PDUs (:mod:`gateway.dimse.pdata`), or by pynetdicom's file-backed encoder
    when a handler watches what is sent; ``data``: an already encoded dataset.  The
    caller holds the association's reactor paused (:func:`_reactor_paused`).
    """
    context = assoc._get_valid_context(  # noqa: SLF001 - pynetdicom's role-aware lookup
        item.sop_class_uid, ts, "scu", allow_conversion=False
    )
    if dataset_path is not None and pdata.fast_send_possible(assoc):
        path, offset = dataset_path
        with open(path, "rb") as fh:
            length = fh.seek(0, 2) - offset
            fh.seek(offset)
            pdata.send_c_store(
                assoc,
                context.context_id,
                msg_id,
                item.sop_class_uid,
                item.sop_uid,
                _PRIORITY,
                fh,
                length,
            )
        return _await_response(assoc)
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = item.sop_class_uid
    req.AffectedSOPInstanceUID = item.sop_uid
    req.Priority = _PRIORITY
    if dataset_path is not None:
        req._dataset_path = dataset_path  # noqa: SLF001 - file-backed encoder
    else:
        req.DataSet = BytesIO(data or b"")
    assoc.dimse.send_msg(req, context.context_id)
    return _await_response(assoc)


def _await_response(assoc: Any) -> Any:
    _cx, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._handle_no_response()  # noqa: SLF001
        return None
    return assoc._check_received_status(rsp)  # noqa: SLF001


@contextmanager
def _reactor_paused(assoc: Any, settle: float = 0.005) -> Iterator[None]:
    """Hold the requestor's reactor for a whole run of C-STOREs.

    pynetdicom's reactor thread takes any DIMSE message it finds off the queue
    unless it is paused; ``send_c_store`` pauses and resumes it around every
    request, and a reactor that passed its checkpoint just before the pause can
    still take the response ("Received unexpected C-STORE service message") when
    the peer answers within a millisecond.  Pausing once per batch, and checking
    again after ``settle`` seconds, closes that window and saves a pause per
    instance.
    """
    checkpoint = assoc._reactor_checkpoint  # noqa: SLF001
    checkpoint.clear()

    def wait_paused() -> None:
        deadline = time.monotonic() + 5
        while not assoc._is_paused and assoc.is_established:  # noqa: SLF001
            if time.monotonic() > deadline:
                break
            time.sleep(0.0001)

    try:
        wait_paused()
        time.sleep(settle)
        wait_paused()
        yield
    finally:
        checkpoint.set()


class _LocalCorruption(Exception):
    pass


def _status_words(status: Any) -> tuple[bool, str]:
    code = int(status.Status)
    if code == 0x0000:
        return True, "C-STORE success (0x0000)"
    if code in WARNINGS:
        return True, f"C-STORE warning 0x{code:04X} ({WARNINGS[code]})"
    comment = str(status.get("ErrorComment", "") or "")[:200]
    kind = (
        "out of resources"
        if 0xA700 <= code <= 0xA7FF
        else (
            "data set does not match SOP class"
            if 0xA900 <= code <= 0xA9FF
            else ("cannot understand" if 0xC000 <= code <= 0xCFFF else "refused")
        )
    )
    text = f"destination refused the instance: C-STORE 0x{code:04X} ({kind}) {comment}"
    return False, text.strip()


def send_batch(
    dest: DestinationSettings,
    ctx: ssl.SSLContext,
    calling_ae: str,
    items: Sequence[SendItem],
    callbacks: SendCallbacks,
    stop: threading.Event,
    on_event_report: EventReportHandler | None = None,
) -> BatchResult:
    """Send one batch over one association; see the module docstring."""
    result = BatchResult()
    plan = plan_contexts(
        [(i.sop_class_uid, i.transfer_syntax) for i in items],
        storage_commitment=dest.storage_commitment,
    )
    chosen = [items[i] for i in plan.included]
    result.untouched = [i.job_id for n, i in enumerate(items) if n not in set(plan.included)]
    ae = _new_ae(dest, calling_ae)
    for abstract, syntaxes in plan.contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    handlers: list[Any] = []
    if on_event_report is not None:
        handlers.append((evt.EVT_N_EVENT_REPORT, on_event_report))
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.called_ae,
        tls_args=(ctx, dest.tls_name),
        evt_handlers=handlers,
    )
    try:
        if not assoc.is_established:
            if assoc.rejected_contexts and not assoc.accepted_contexts:
                for item in chosen:
                    result.failures[item.job_id] = _no_syntax(assoc, item)
                return result
            error = _association_failure(assoc, dest, ctx)
            for item in chosen:
                result.failures[item.job_id] = (error, False)
            return result
        if dest.storage_commitment and not _accepted(assoc, STORAGE_COMMITMENT_PUSH):
            for item in chosen:
                result.failures[item.job_id] = (
                    "destination does not accept the Storage Commitment Push Model SOP Class "
                    "(configured storage_commitment = true)",
                    True,
                )
            return result
        _tune(assoc)
        pdata.install_fast_send(assoc.dul)
        _loop_delay(assoc, _BUSY_LOOP_DELAY)
        with _reactor_paused(assoc):
            _send_all(assoc, chosen, callbacks, stop, result)
        if dest.storage_commitment and result.sent:
            _request_commitment(assoc, dest, chosen, callbacks, stop, result)
    finally:
        try:
            callbacks.flush()
        finally:
            if assoc.is_established:
                assoc.release()
    return result


def _send_all(
    assoc: Any,
    chosen: Sequence[SendItem],
    callbacks: SendCallbacks,
    stop: threading.Event,
    result: BatchResult,
) -> None:
    for n, item in enumerate(chosen):
        if stop.is_set() or not assoc.is_established:
            result.untouched.extend(i.job_id for i in chosen[n:])
            return
        ts = choose_syntax(item.transfer_syntax, _accepted(assoc, item.sop_class_uid))
        if ts is None:
            result.failures[item.job_id] = _no_syntax(assoc, item)
            continue
        try:
            status, dataset_sha, digest = _store_one(assoc, item, ts, msg_id=(n % 65535) + 1)
        except _LocalCorruption as exc:
            result.failures[item.job_id] = (str(exc), True)
            continue
        except (OSError, ValueError, AttributeError, RuntimeError) as exc:
            result.failures[item.job_id] = (f"could not send the instance: {exc}", False)
            continue
        if not status or "Status" not in status:
            result.failures[item.job_id] = (
                "no C-STORE response (timeout, or the destination aborted the association)",
                False,
            )
            # The association is unusable: give the rest back without counting an attempt.
            result.untouched.extend(i.job_id for i in chosen[n + 1 :])
            if assoc.is_established:
                assoc.abort()
            return
        ok, words = _status_words(status)
        if not ok:
            result.failures[item.job_id] = (words, False)
            continue
        callbacks.sent(SentInstance(item, words, ts, dataset_sha, digest))
        result.sent.append(item.job_id)


def _request_commitment(
    assoc: Any,
    dest: DestinationSettings,
    chosen: Sequence[SendItem],
    callbacks: SendCallbacks,
    stop: threading.Event,
    result: BatchResult,
) -> None:
    """N-ACTION Request Storage Commitment, then wait for the report (PS3.4 J.3.2, J.3.3)."""
    if not assoc.is_established:
        result.commitment_error = "the association ended before Storage Commitment was requested"
        return
    sent = set(result.sent)
    refs = [(i.sop_class_uid, i.sop_uid) for i in chosen if i.job_id in sent]
    tx = generate_uid()
    callbacks.begin_commitment(tx, result.sent)  # durable before the request leaves
    result.transaction_uid = tx
    waiter = commitment.expect_report(tx)
    try:
        status, _reply = assoc.send_n_action(
            commitment.build_action_information(tx, refs),
            1,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        if not status or "Status" not in status:
            result.commitment_error = "no N-ACTION response to the Storage Commitment request"
            return
        if int(status.Status) != 0x0000:
            result.commitment_error = (
                f"the Storage Commitment request was refused (N-ACTION 0x{int(status.Status):04X})"
            )
            return
        _loop_delay(assoc, _IDLE_LOOP_DELAY)
        remaining = dest.commitment_timeout_seconds
        while remaining > 0 and not waiter.is_set() and not stop.is_set() and assoc.is_established:
            waiter.wait(min(0.2, remaining))
            remaining -= 0.2
        result.committed_in_association = waiter.is_set()
    finally:
        commitment.forget_report(tx)
