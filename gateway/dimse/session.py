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

**Event-driven reactors.**  pynetdicom 3.0.4 polls: the association thread
sleeps 1 ms per loop (``Association._run_reactor``) and the DUL thread sleeps
1 ms whenever its event queue is empty (``DULServiceProvider.run_reactor``),
so every C-STORE-RQ waits for one wake-up of each loop before it is served
and its C-STORE-RSP for one more before it is sent.  A peer that waits for
each response (DCMTK ``storescu``) pays these per instance.  Here
(:class:`EventDrivenDul`, :meth:`SekishoAssociation._run_reactor`) both
loops run the same steps in the same order, but block instead of sleeping:
the DUL thread in ``select`` on its socket and a wake-up socket that every
primitive sent by the user signals; the association thread on an
:class:`threading.Event` that the DUL sets after each state machine action.
Both still wake at least every :data:`IDLE_POLL_SECONDS` for what nobody
signals (timers, a kill flag set elsewhere).  These overrides use pynetdicom
internals; they were written against pynetdicom :data:`PYNETDICOM_VERSION`
and ``tests/test_dimse_fastpath.py`` fails loudly if that code changes.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom import _handlers, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

from gateway.peers import Principal
from gateway.store.index import InstanceIndex

if TYPE_CHECKING:
    from gateway.dimse.ingest import IngestWorker

log = logging.getLogger("sekisho.dimse")

#: ``retrieve(association, request, context)``: serves one C-GET or C-MOVE request.
RetrieveHandler = Callable[[Association, Any, PresentationContext], None]

#: The pynetdicom release whose private reactor code the classes below mirror.
PYNETDICOM_VERSION = "3.0.4"
#: Longest a reactor blocks without being signalled (timers, kill flags).
IDLE_POLL_SECONDS = 0.05
#: pynetdicom's per-association logging handlers, unbound from every association.
STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
)


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
    #: The thread writing received data sets (:class:`gateway.dimse.ingest.IngestWorker`),
    #: started by the first C-STORE and stopped when the association ends.
    ingest: IngestWorker | None = None


class _Wakeup:
    """A self-pipe (socket pair): lets one thread interrupt another's ``select``."""

    def __init__(self) -> None:
        self._recv, self._send = socket.socketpair()
        self._recv.setblocking(False)
        self._send.setblocking(False)

    def fileno(self) -> int:
        return self._recv.fileno()

    def set(self) -> None:
        try:
            self._send.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def clear(self) -> None:
        try:
            while self._recv.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError) or closed
            pass

    def close(self) -> None:
        self._recv.close()
        self._send.close()


def split_pdvs(pdu: bytearray | bytes) -> list[tuple[int, memoryview]]:
    """The PDV items of an encoded P-DATA-TF PDU, as views: no byte is copied.

    PS3.8 9.3.5 (Table 9-22): type 0x04, reserved, 4-byte length, then PDV
    items (Table 9-23): 4-byte item length, presentation context ID, and the
    message control header followed by the fragment (PS3.8 E.2).  Raises
    ``ValueError`` on any length that does not add up (an invalid PDU).
    """
    view = memoryview(pdu)
    end = len(view)
    if end < 6 or view[0] != 0x04 or 6 + struct.unpack_from(">I", view, 2)[0] != end:
        raise ValueError("not a complete P-DATA-TF PDU")
    pdvs: list[tuple[int, memoryview]] = []
    offset = 6
    while offset < end:
        if end - offset < 6:
            raise ValueError("truncated PDV item")
        (length,) = struct.unpack_from(">I", view, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError("PDV item length out of range")
        pdvs.append((view[offset + 4], view[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return pdvs


class _ReceivedPData:
    """A received P-DATA-TF PDU, as the state machine's DT-2 action uses it."""

    __slots__ = ("pdvs",)

    def __init__(self, pdvs: list[tuple[int, memoryview]]) -> None:
        self.pdvs = pdvs

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # Appended, as pynetdicom's own encoder does: the setter insists on bytes.
        primitive.presentation_data_value_list.extend(self.pdvs)  # type: ignore[arg-type]
        return primitive


class EventDrivenDul(DULServiceProvider):
    """pynetdicom's DICOM Upper Layer provider, blocking instead of sleeping (PS3.8 9.2).

    :meth:`run_reactor` is ``DULServiceProvider.run_reactor`` of pynetdicom
    3.0.4, step for step (ARTIM check, then one local primitive or one
    received PDU, then one state machine event), except that when there is
    nothing to do it waits in ``select`` for the socket or a wake-up instead
    of sleeping 1 ms.  The wake-up is signalled by :meth:`send_pdu` (the
    association sending a primitive, e.g. a C-STORE-RSP) and :meth:`kill_dul`;
    after each state machine action the association thread is signalled,
    since the action may have queued a DIMSE message or an ACSE primitive
    for it.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wakeup = _Wakeup()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wakeup.set()

    def _read_pdu_data(self) -> None:
        """Read one PDU (pynetdicom 3.0.4 ``DULServiceProvider._read_pdu_data``), fewer copies.

        The same events for the same failures: Evt17 when the connection
        closes before the PDU is complete, Evt19 for an unknown PDU type or
        an undecodable PDU.  The PDU is read straight into one buffer.  A
        P-DATA-TF in Sta6 with no other event pending goes straight to the
        DIMSE provider, which is all the state machine would do with it
        (PS3.8 Table 9-10: Sta6 + Evt10 -> DT-2 -> Sta6); anything else, or
        anything watched by an event handler, takes the state machine's way.
        """
        wrapper = self.socket
        assert wrapper is not None
        try:
            header = wrapper.recv(6)
            if len(header) < 6:
                self.event_queue.put("Evt17")  # closed (READ_PDU_EXC_B)
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if not 0x01 <= pdu_type <= 0x07:
                log.error("unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")
                return
            pdu = bytearray(6 + length)
            pdu[:6] = header
            recv_into = getattr(wrapper, "recv_into", None)
            if recv_into is not None:
                got = recv_into(memoryview(pdu)[6:])
            else:
                body = wrapper.recv(length)
                got = len(body)
                pdu[6 : 6 + got] = body
        except (OSError, TimeoutError) as exc:
            log.info("connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        if got != length:
            log.info("connection closed after %d of %d PDU bytes", 6 + got, 6 + length)
            self.event_queue.put("Evt17")
            return
        try:
            if (
                pdu_type == 0x04
                and self.state_machine.current_state == "Sta6"
                and self.event_queue.empty()
                and not self._watched(evt.EVT_FSM_TRANSITION)
                and not self._watched(evt.EVT_DATA_RECV)
                and not self._watched(evt.EVT_PDU_RECV)
            ):
                self.assoc.dimse.receive_primitive(_ReceivedPData(split_pdvs(pdu)).to_primitive())
                self._notify_user("Evt10")
                return
            decoded, event = self._decode_pdu(pdu)
        except Exception:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
            log.exception("unable to decode the received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _watched(self, event: Any) -> bool:
        return bool(self.assoc.get_handlers(event))

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        """Decode a received PDU; a P-DATA-TF without copying its fragments.

        pynetdicom copies a P-DATA-TF PDU three times (``bytes()``, PDV items,
        PDV values) before the DIMSE provider sees it; here the PDVs are views
        into the bytes read from the socket.  Only when nobody listens to
        EVT_DATA_RECV or EVT_PDU_RECV, which expect pynetdicom's PDU objects.
        """
        assoc = self.assoc
        if (
            bytestream[:1] != b"\x04"
            or assoc.get_handlers(evt.EVT_DATA_RECV)
            or assoc.get_handlers(evt.EVT_PDU_RECV)
        ):
            return super()._decode_pdu(bytestream)
        return _ReceivedPData(split_pdvs(bytestream)), "Evt10"  # type: ignore[return-value]

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wakeup.set()

    def _notify_user(self, event: str | None = None) -> None:
        """Wake the association thread if ``event``'s action may have queued work for it.

        Sending a P-DATA (Evt9) never does, and a received P-DATA-TF (Evt10)
        only when it completed a DIMSE message: waking the association thread
        for every PDU of a data set would only make it compete for the GIL.
        """
        wake: threading.Event | None = getattr(self.assoc, "wake", None)
        if wake is None or wake.is_set() or event == "Evt9":
            return
        if event == "Evt10" and not self.assoc.dimse.msg_queue.qsize():
            return
        wake.set()

    def _wait_for_work(self) -> None:
        """Block until the socket is readable, a wake-up arrives or a timer may expire."""
        timeout = IDLE_POLL_SECONDS
        remaining = self.artim_timer.remaining
        if self.artim_timer.timeout is not None and 0 <= remaining < timeout:
            timeout = remaining
        readers: list[Any] = [self._wakeup]
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None and wrapper._is_connected else None  # noqa: SLF001
        if sock is not None and sock.fileno() >= 0:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes are waiting that select cannot see
            readers.append(sock)
        try:
            select.select(readers, [], [], timeout)
        except (OSError, ValueError):  # the socket was closed under us: poll
            select.select([self._wakeup], [], [], min(timeout, 0.001))
        self._wakeup.clear()

    def run_reactor(self) -> None:
        """The DUL reactor (pynetdicom 3.0.4 ``DULServiceProvider.run_reactor``), event-driven."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():  # noqa: SLF001
                    self.assoc._dul_ready.set()  # noqa: SLF001
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                received = False
                try:
                    # One local primitive to send, or else one PDU to read.
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                        received = True
                except Exception:  # noqa: BLE001 - as pynetdicom: abort outside the FSM
                    log.exception("DUL reactor failed; aborting the association")
                    self._abort_outside_fsm()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    if not received:  # a PDU just read may be followed by more
                        self._wait_for_work()
                    continue
                self.state_machine.do_action(event)
                self._notify_user(event)
        finally:
            self._wakeup.close()
            self._notify_user()

    def _abort_outside_fsm(self) -> None:
        """Send A-ABORT bypassing the state machine and stop both reactors (as pynetdicom)."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort_pdu.encode())
        assoc = self.assoc
        assoc.is_aborted = True
        assoc.is_established = False
        assoc._kill = True  # noqa: SLF001
        self._kill_thread = True

    def stop_dul(self) -> bool:
        """Stop the reactor if the state machine is idle (Sta1); as pynetdicom, without polling."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wakeup.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True


class SekishoAssociation(Association):
    """An acceptor association that knows its :class:`Session`.

    C-GET and C-MOVE requests go to ``session.retrieve`` (PS3.4 C.4.2, C.4.3);
    everything else is served by pynetdicom's service classes and the
    handlers bound by :class:`gateway.dimse.scp.DimseService`.  Its reactors
    are event-driven (:class:`EventDrivenDul`, :meth:`_run_reactor`).
    """

    session: Session

    def __init__(self, ae: Any, mode: str) -> None:
        #: Set by the DUL thread whenever it may have queued something for this thread.
        self.wake = threading.Event()
        super().__init__(ae, mode)
        # pynetdicom binds its "standard" logging handlers to every association
        # (Association._bind_defaults): they format every PDU and DIMSE message,
        # identifiers included, which Sekisho's operational log must not carry.
        for event, handler in STANDARD_LOG_HANDLERS:
            self.unbind(event, handler)
        self.dul = EventDrivenDul(self)
        # The timeout setters configure the DUL's timers: apply them to the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def kill(self) -> None:
        self.wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        """The association reactor (pynetdicom 3.0.4 ``Association._run_reactor``), event-driven.

        The same checks in the same order (DIMSE message, A-RELEASE request,
        abort, DUL alive, idle timeout); where pynetdicom sleeps 1 ms at the
        top of every loop, this one waits for :attr:`wake`, and only when the
        previous loop found no message (more may be queued).  While it waits
        it counts as paused, as a sleeping pynetdicom reactor effectively does.
        """
        self._is_paused = False
        idle = False
        while not self._kill:
            if idle:
                self._is_paused = True
                self.wake.wait(IDLE_POLL_SECONDS)
            self.wake.clear()
            # Paused while a send_*() method or a retrieve uses the DIMSE queue.
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            idle = not msg
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released by the peer")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log.info(
                    "association aborted%s",
                    " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "",
                )
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning("DICOM network timeout reached; ending the association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

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
