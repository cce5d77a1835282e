"""Sending a C-STORE-RQ as whole, pre-encoded P-DATA-TF PDUs (PS3.7 9.3.1, PS3.8 9.3.5, E.2).

pynetdicom sends a DIMSE message as one P-DATA primitive per PDU: each goes
through the DUL's queue, its state machine (Sta6 + Evt9 -> DT-1 -> Sta6), a
PDU object and its encoder before it reaches the socket.  With a peer that
offers 16 KiB PDUs (Orthanc's default) that is 32 trips per 512 KiB instance,
and the sender waits for all of them before the response can come.

Here the command set is encoded directly (:func:`c_store_rq_command`; the
receiver's responses likewise, :func:`c_store_rsp_command`: the bytes
pynetdicom encodes), the data set is read from the stored file, and
both are cut into exactly the PDUs pynetdicom would send (same fragment
sizes, same message control headers: ``tests/test_dimse_pdata.py`` compares
the bytes).  They reach the DUL in blocks of whole PDUs (:class:`EncodedPData`),
which :func:`install_fast_send` lets the DUL thread write in one call while
the association is in Sta6, as DT-1 would.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from types import MethodType
from typing import Any, BinaryIO

from pynetdicom import evt
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger("sekisho.dimse")

#: How many bytes of PDUs one :class:`EncodedPData` carries (at least one PDU).
BLOCK_BYTES = 1024 * 1024
_PDV_HEADER = struct.Struct(">BBIIBB")  # PDU type, reserved, PDU length, item length, ID, MCH


def _ui(element: int, uid: str) -> bytes:
    raw = uid.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"  # UI values are padded with NUL to even length (PS3.5 6.2)
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def c_store_rsp_command(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The command set of a C-STORE-RSP without data set (PS3.7 9.3.1.2, Table 9.3-2).

    Implicit VR Little Endian (PS3.7 6.3.1), elements in tag order, led by
    the Command Group Length: the same bytes pynetdicom encodes for such a
    response (``tests/test_dimse_fastpath.py`` compares them), built without a
    pydicom data set round trip.
    """
    body = b"".join(
        (
            _ui(0x0002, sop_class_uid),
            _us(0x0100, 0x8001),  # Command Field: C-STORE-RSP
            _us(0x0120, message_id),
            _us(0x0800, 0x0101),  # Command Data Set Type: none
            _us(0x0900, status),
            _ui(0x1000, sop_instance_uid),
        )
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def c_store_rq_command(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int
) -> bytes:
    """The command set of a C-STORE-RQ with a data set (PS3.7 Table 9.3-1).

    Encoded like :func:`c_store_rsp_command`, as pynetdicom encodes a request
    without Move Originator (``tests/test_dimse_pdata.py`` compares them).
    """
    body = b"".join(
        (
            _ui(0x0002, sop_class_uid),
            _us(0x0100, 0x0001),  # Command Field: C-STORE-RQ
            _us(0x0110, message_id),
            _us(0x0700, priority),
            _us(0x0800, 0x0001),  # Command Data Set Type: present
            _ui(0x1000, sop_instance_uid),
        )
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _pdu(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one PDV item (PS3.8 9.3.5)."""
    item = len(fragment) + 2
    return _PDV_HEADER.pack(0x04, 0x00, item + 4, item, context_id, control) + fragment


def message_pdus(
    context_id: int, command: bytes, data: BinaryIO, length: int, max_pdu: int
) -> Iterator[bytes]:
    """The PDUs of a message (command, then ``length`` data set bytes from ``data``).

    Fragments are ``max_pdu - 6`` bytes (``0``: no limit), message control
    headers 0x01/0x03 (command) and 0x00/0x02 (data set), as pynetdicom's
    ``DIMSEMessage.encode_msg`` cuts them.
    """
    size = max_pdu - 6 if max_pdu else max(len(command), length, 1)
    for start in range(0, len(command), size):
        last = start + size >= len(command)
        yield _pdu(context_id, 0x03 if last else 0x01, command[start : start + size])
    fragments = max(1, -(-length // size))
    for n in range(fragments):
        yield _pdu(context_id, 0x02 if n == fragments - 1 else 0x00, data.read(size))


def blocks(pdus: Iterator[bytes], block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    """Whole PDUs joined into blocks of about ``block_bytes``."""
    pending: list[bytes] = []
    size = 0
    for pdu in pdus:
        pending.append(pdu)
        size += len(pdu)
        if size >= block_bytes:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


class EncodedPData(P_DATA):
    """A block of whole P-DATA-TF PDUs, already encoded, for the DUL to write."""

    def __init__(self, encoded: bytes) -> None:
        super().__init__()
        self.encoded = encoded


def fast_send_possible(assoc: Any) -> bool:
    """True when nobody watches the PDUs and the DUL writes :class:`EncodedPData`."""
    dul = getattr(assoc, "dul", None)
    return (
        getattr(dul, "_sekisho_fast_send", False)
        and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
        and not assoc.get_handlers(evt.EVT_PDU_SENT)
        and not assoc.get_handlers(evt.EVT_DATA_SENT)
    )


def install_fast_send(dul: Any) -> None:
    """Let ``dul`` (pynetdicom's DULServiceProvider) write :class:`EncodedPData` blocks.

    The block leaves the queue and is written by the DUL thread, the only one
    that touches the socket, when the association is in Sta6; that is all the
    state machine would do with P-DATA (Sta6 + Evt9 -> DT-1 -> Sta6).  In any
    other state (the peer released or aborted meanwhile) the block is dropped:
    the request then gets no response, and the instance is not marked sent.
    Everything else takes pynetdicom's way.
    """
    original = dul._process_recv_primitive  # noqa: SLF001 - pinned in tests

    def process(self: Any) -> bool:
        queue = self.to_provider_queue
        try:
            head = queue.queue[0]
        except IndexError:
            return False
        if not isinstance(head, EncodedPData):
            return bool(original())
        queue.get(False)
        if self.state_machine.current_state != "Sta6":
            log.info("P-DATA not sent: the association left data transfer")
            return True
        sock = self.socket.socket if self.socket is not None else None
        if sock is None:
            return True
        try:
            sock.sendall(memoryview(head.encoded))
        except OSError:
            self.event_queue.put("Evt17")  # transport closed, as AssociationSocket.send
        return True

    dul._process_recv_primitive = MethodType(process, dul)  # noqa: SLF001
    dul._sekisho_fast_send = True  # noqa: SLF001


def send_c_store(
    assoc: Any,
    context_id: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    priority: int,
    data: BinaryIO,
    length: int,
) -> None:
    """Queue a C-STORE-RQ whose data set is ``length`` bytes of ``data``."""
    command = c_store_rq_command(message_id, sop_class_uid, sop_instance_uid, priority)
    max_pdu = assoc.dimse.maximum_pdu_size
    for block in blocks(message_pdus(context_id, command, data, length, max_pdu)):
        assoc.dul.send_pdu(EncodedPData(block))
