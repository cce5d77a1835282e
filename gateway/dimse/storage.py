"""C-STORE ingest: the data set streams to the content store as it arrives (R-XCH-1/5).

PS3.7 9.1.1 C-STORE and PS3.4 Annex B (Storage Service Class).  pynetdicom
collects a C-STORE data set in memory (or, with a process-wide switch, in a
temporary file elsewhere); Sekisho instead gives each association a DIMSE
provider (:class:`StreamingDimse`) whose messages hand every data set
fragment (PS3.8 Annex E, P-DATA-TF PDVs) to the association's ingest worker
(:mod:`gateway.dimse.ingest`), which writes it into the store's own
temporary directory through :class:`gateway.store.files.HashingWriter`,
after a PS3.10 header (preamble, ``DICM``, File Meta Information with the
accepted transfer syntax: :func:`part10_header`).  So:

* the data set is stored exactly as received, in the transfer syntax it came
  in (no decoding, no re-encoding), and memory does not grow with its size;
* its SHA-256 is computed on the way, and its index attributes are parsed
  from its first bytes while the rest arrives; once the last fragment is
  in, the worker fdatasyncs the file (durable store), validates it, moves it
  to its content address (directory fsync), and only then is the index
  committed and Success answered (mirroring ``gateway.dicomweb.stow``): by
  the worker itself for a command Sekisho decoded (:meth:`StorageScp.answer`),
  otherwise by pynetdicom's Storage service class calling
  :meth:`StorageScp.handle` (see :class:`_StreamingMessage`).

Failures answer with PS3.4 B.2.3 / PS3.7 C statuses: 0xA700 out of resources
(size cap, store), 0xA900 data set does not match SOP class, 0xC000 cannot
understand, 0x0111 duplicate SOP instance with different content (the stored
one is kept, as for STOW-RS), 0x0124 not authorized (no ``push`` permission).
A plain C-STORE-RSP is encoded directly (:func:`c_store_rsp_command`).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from functools import partial
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

from gateway.audit import events as ev
from gateway.dimse.ingest import IngestWorker, StreamSink
from gateway.dimse.pdata import c_store_rsp_command
from gateway.dimse.session import Session
from gateway.service import Gateway
from gateway.store.files import StagedFile
from gateway.store.index import InstanceIndex
from gateway.store.model import AddResult
from pki.errors import InvalidInputError, SekishoError

log = logging.getLogger("sekisho.dimse")

#: PS3.5 B.2 UUID-derived UID naming this implementation (PS3.7 D.3.3.2).
IMPLEMENTATION_CLASS_UID = "2.25.4207299652280197016102898825920297832"
IMPLEMENTATION_VERSION_NAME = "SEKISHO_0_1"

SUCCESS = 0x0000
NOT_AUTHORIZED = 0x0124
DUPLICATE_DIFFERENT = 0x0111
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: What pynetdicom answers when the C-STORE handler raises.
HANDLER_FAILED = 0xC211
#: Audit what an association stored at least every this many instances.
AUDIT_EVERY = 1000


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":  # reserved 2 bytes, 4-byte length
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(uid: str, what: str) -> bytes:
    if not 0 < len(uid) <= 64 or uid.strip("0123456789."):
        raise InvalidInputError(f"the C-STORE request has an invalid {what}")
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # UI pads with NUL (PS3.5 6.2)


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information for a received data set (PS3.10 7.1).

    The meta group depends only on the instance and the transfer syntax, so
    the same data set stored twice gives the same file and the same hash.
    Encoded directly (PS3.10 Table 7.1-1, Explicit VR Little Endian): the
    bytes are those pydicom's ``write_file_meta_info`` writes for the same
    values (``tests/test_dimse_fastpath.py`` compares them), in a fraction of
    the time.  Raises InvalidInputError for a UID that is not one.
    """
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _uid_value(sop_class_uid, "SOP Class UID")),
            _meta_element(0x0003, b"UI", _uid_value(sop_instance_uid, "SOP Instance UID")),
            _meta_element(0x0010, b"UI", _uid_value(transfer_syntax, "Transfer Syntax UID")),
            _meta_element(0x0012, b"UI", _uid_value(IMPLEMENTATION_CLASS_UID, "UID")),
            _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


#: Elements of a C-STORE-RQ command set (PS3.7 Table 9.3-1) that
#: :func:`parse_c_store_rq` takes; a command with any other goes to pynetdicom.
_C_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})
_COMMAND_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


def parse_c_store_rq(raw: bytes) -> C_STORE | None:
    """A C-STORE-RQ command set (Implicit VR Little Endian) as pynetdicom's primitive.

    The same primitive pynetdicom's ``decode`` and ``message_to_primitive``
    make of it (``tests/test_dimse_fastpath.py`` compares them), set through
    the primitive's own validating setters, without a pydicom data set in
    between.  None for anything else (another command, a data set type of
    "none", a Move Originator, an element out of place or of unusual size,
    a value the setters refuse): pynetdicom then decodes it as always.
    """
    values: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group or element not in _C_STORE_RQ_ELEMENTS or element in values:
            return None
        if pos + length > end:
            return None
        values[element] = raw[pos : pos + length]
        pos += length

    def us(element: int) -> int | None:
        value = values.get(element)
        return _US.unpack(value)[0] if value is not None and len(value) == 2 else None

    def ui(element: int) -> str | None:
        value = values.get(element)
        if value is None or not value.isascii():
            return None
        return value.decode("ascii").rstrip("\x00 ")

    if us(0x0100) != 0x0001 or us(0x0800) in (None, 0x0101):
        return None
    message_id, priority = us(0x0110), us(0x0700)
    sop_class, sop_instance = ui(0x0002), ui(0x1000)
    if message_id is None or priority is None or not sop_class or not sop_instance:
        return None
    primitive = C_STORE()
    try:
        primitive.MessageID = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = sop_instance
        primitive.Priority = priority
    except (TypeError, ValueError):
        return None
    return primitive


class _ParsedCStoreRQ(C_STORE_RQ):
    """A C-STORE-RQ whose primitive :func:`parse_c_store_rq` already made."""

    _primitive: C_STORE

    def message_to_primitive(self) -> C_STORE:  # type: ignore[override]
        primitive = self._primitive
        primitive.DataSet = self.data_set
        primitive._context_id = self.context_id  # noqa: SLF001 - as pynetdicom sets them
        primitive._dataset_path = self._data_set_path  # noqa: SLF001
        primitive._dataset_file = self._data_set_file  # noqa: SLF001
        return primitive


class DiscardSink:
    """Reads a data set the partner may not store, keeping nothing (R-XCH-3)."""

    name = "/nonexistent/sekisho-discarded"
    error: SekishoError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def end(self) -> None:
        pass

    def close(self) -> None:
        pass


Sink = StreamSink | DiscardSink


class _StreamingMessage(DIMSEMessage):
    """A DIMSE message whose C-STORE data set goes to a sink (PS3.7 6.3.1, PS3.8 E.2).

    Command fragments are collected and decoded as pynetdicom does (Implicit
    VR Little Endian); the class becomes pynetdicom's message class only when
    the message is complete, so every later P-DATA of this message still
    comes here.

    A C-STORE-RQ that :func:`parse_c_store_rq` decoded, whose data set went
    to a :class:`StreamSink`, is answered by the ingest worker itself once
    the data set is stored (:meth:`StorageScp.answer`): the message is then
    :attr:`answered` and never reaches pynetdicom's message queue, its
    association thread or its Storage service class.  That takes two thread
    hand-overs and pynetdicom's per-request bookkeeping off the time between
    a data set's last byte and its C-STORE-RSP, which a peer that waits for
    each response (DCMTK ``storescu``) pays on every instance.  It applies
    only while :meth:`StorageScp.handle` is the association's C-STORE handler
    and no EVT_DIMSE_RECV / EVT_DIMSE_SENT handler expects pynetdicom's
    message objects; otherwise the request goes pynetdicom's way, to the same
    checks and the same statuses.
    """

    def __init__(self, storage: StorageScp | None) -> None:  # noqa: D107 - see class
        self.context_id = None
        self.encoded_command_set = BytesIO()
        self.data_set: BytesIO = BytesIO()
        self.command_set = None  # type: ignore[assignment]
        self._data_set_path = None
        self._data_set_file = None
        self._storage = storage
        self._target: type[DIMSEMessage] | None = None
        self._sink: Sink | None = None
        #: True when the ingest worker answers this C-STORE (see the class).
        self.answered = False

    def _answers_itself(self, assoc: Any) -> bool:
        storage = self._storage
        return (
            storage is not None
            and self._target is _ParsedCStoreRQ
            and isinstance(self._sink, StreamSink)
            and assoc.get_handlers(evt.EVT_C_STORE)[0] == storage.handle
            and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
        )

    def decode_msg(self, primitive: Any, assoc: Any = None) -> bool:
        for context_id, data in primitive.presentation_data_value_list:
            header = data[0]  # message control header (PS3.8 E.2)
            if header & 0x01:  # command fragment
                self.encoded_command_set.write(data[1:])
                if not header & 0x02:
                    continue
                self.context_id = context_id
                parsed = None
                if assoc is not None and not assoc.get_handlers(evt.EVT_DIMSE_RECV):
                    parsed = parse_c_store_rq(self.encoded_command_set.getvalue())
                if parsed is not None:  # the common case, without pydicom
                    self._primitive = parsed
                    self._target = target = _ParsedCStoreRQ
                    sop_class = str(parsed.AffectedSOPClassUID)
                    sop_instance = str(parsed.AffectedSOPInstanceUID)
                else:
                    self.command_set = decode(self.encoded_command_set, True, True)
                    target = _MESSAGE_TYPES[int(self.command_set.CommandField)][1]
                    if self.command_set.CommandDataSetType == 0x0101:  # no data set
                        self.__class__ = target  # type: ignore[assignment]
                        return True
                    self._target = target
                    if target is C_STORE_RQ:
                        sop_class = str(self.command_set.AffectedSOPClassUID)
                        sop_instance = str(self.command_set.AffectedSOPInstanceUID)
                if target in (C_STORE_RQ, _ParsedCStoreRQ) and self._storage is not None:
                    self._sink = self._storage.open_sink(
                        assoc, context_id, sop_class, sop_instance
                    )
                    if self._sink is not None:
                        # message_to_primitive hands these to the C-STORE primitive.
                        self._data_set_file = self._sink  # type: ignore[assignment]
                        self._data_set_path = self._sink.name  # type: ignore[assignment]
            else:  # data set fragment
                if self._sink is not None:
                    self._sink.write(data[1:])
                else:
                    self.data_set.write(data[1:])
                if header & 0x02:
                    if self._target is None:  # a data set before any command
                        raise InvalidInputError("DIMSE data set without a command set")
                    if self._sink is not None:
                        if self._answers_itself(assoc):
                            storage, parsed = self._storage, self._primitive
                            assert storage is not None  # noqa: S101 - _answers_itself checked
                            self._sink.end(
                                partial(storage.answer, assoc, self.context_id, parsed)
                            )
                            self.answered = True
                            return False  # nothing for pynetdicom's message queue
                        self._sink.end()
                    self.__class__ = self._target  # type: ignore[assignment]
                    return True
        return False


class StreamingDimse(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with C-STORE data sets streamed to a sink."""

    def __init__(self, assoc: Any, storage: StorageScp | None) -> None:
        super().__init__(assoc)
        self._storage = storage

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            self.message = _StreamingMessage(self._storage)
        message = self.message
        super().receive_primitive(primitive)
        if getattr(message, "answered", False):  # the ingest worker answers it
            self.message = None

    def send_c_store_rsp(
        self, context_id: int, message_id: int, sop_class: str, sop_instance: str, status: int
    ) -> None:
        """Send a C-STORE-RSP with ``status`` and no Error Comment (PS3.7 9.3.1.2)."""
        command = c_store_rsp_command(message_id, sop_class, sop_instance, status)
        # The peer's Maximum Length bounds the PDV items (PS3.8 D.1): item
        # length (4), context ID (1), message control header (1), fragment.
        limit = self.maximum_pdu_size
        if not limit or len(command) + 6 <= limit:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            self.dul.send_pdu(pdata)
            return
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = sop_class
        rsp.AffectedSOPInstanceUID = sop_instance
        rsp.Status = status
        super().send_msg(rsp, context_id)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; a plain C-STORE-RSP is encoded directly.

        pynetdicom builds every command set as a pydicom data set, about half a
        millisecond per response: a peer that waits for each response before
        sending the next instance pays it on every instance.  Responses with an
        Error Comment or Offending Element, and every other message, go the
        usual way, as does everything when an EVT_DIMSE_SENT handler is bound
        (it expects pynetdicom's message object).
        """
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            self.send_c_store_rsp(
                context_id,
                int(primitive.MessageIDBeingRespondedTo),
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                int(primitive.Status),
            )
            return
        super().send_msg(primitive, context_id)


class StorageScp:
    """The C-STORE handler and its sinks (PS3.4 B.2)."""

    def __init__(
        self,
        gw: Gateway,
        *,
        max_instance_bytes: int,
        record: Callable[[ev.AuditEvent], None],
        deny: Callable[[Session, str, str], None],
    ) -> None:
        self.gw = gw
        self.max_instance_bytes = max_instance_bytes
        self.record = record
        self.deny = deny

    # -- on the DUL thread, when a C-STORE-RQ command has been decoded -------
    def open_sink(
        self, assoc: Any, context_id: int, sop_class: str, sop_instance: str
    ) -> Sink | None:
        session: Session | None = getattr(assoc, "session", None)
        if session is None or not session.principal.partner.may("push"):
            return DiscardSink()
        context = assoc._accepted_cx.get(context_id)  # noqa: SLF001
        if context is None:
            return None  # pynetdicom answers an unknown context itself
        if session.ingest is None:
            session.ingest = IngestWorker(
                self.gw.files,
                self.max_instance_bytes,
                fsync=self.gw.settings.store.fsync,
            )
        return session.ingest.open(
            sop_class,
            partial(
                part10_header,
                sop_class,
                sop_instance,
                str(context.transfer_syntax[0]),
            ),
        )

    def close_association(self, session: Session) -> None:
        """Stop the association's ingest worker (its unfinished data set is removed)."""
        worker, session.ingest = session.ingest, None
        if worker is not None:
            worker.close()

    # -- on the association thread: EVT_C_STORE ------------------------------
    def handle(self, event: Any) -> int:
        """Answer once the instance is durable: file and directory synced, index committed."""
        session: Session = event.assoc.session
        sink = getattr(event.request, "_dataset_file", None)
        if not isinstance(sink, StreamSink):
            return self._outcome(session, None)
        # The ingest worker writes, fdatasyncs, validates and moves the file
        # (gateway.dimse.ingest), or refuses it.
        sink.wait()
        return self._outcome(session, sink)

    # -- on the ingest worker's thread: a C-STORE it answers itself -----------
    def answer(self, assoc: Any, context_id: int, request: C_STORE, sink: StreamSink) -> None:
        """Commit and answer a C-STORE whose data set ``sink`` has just finished.

        What :meth:`handle` and pynetdicom's Storage service class do
        together, on the thread that stored the data set (see
        ``_StreamingMessage``): the same checks, the same statuses; an
        unexpected error answers 0xC211 as pynetdicom does for a failing
        handler, and nothing is sent once the association has ended.
        """
        session: Session = assoc.session
        try:
            status = self._outcome(session, sink)
        except Exception:  # noqa: BLE001 - the peer gets a status, the operator the trace
            log.exception("C-STORE handling failed")
            status = HANDLER_FAILED
        if assoc.is_established:
            assoc.dimse.send_c_store_rsp(
                context_id,
                int(request.MessageID),  # type: ignore[arg-type]
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                status,
            )

    def _outcome(self, session: Session, sink: StreamSink | None) -> int:
        """The status of a finished C-STORE: stored, or why not (PS3.4 B.2.3)."""
        if not session.principal.partner.may("push"):
            self.deny(session, "push", "C-STORE")
            return NOT_AUTHORIZED
        if sink is None:
            return CANNOT_UNDERSTAND
        if sink.failure is not None or sink.staged is None or sink.index is None:
            message, status = sink.failure or ("the instance was not stored", OUT_OF_RESOURCES)
            return self._failed(session, message, status)
        return self._store(session, sink.staged, sink.index)

    def _store(self, session: Session, staged: StagedFile, idx: InstanceIndex) -> int:
        gw = self.gw
        try:
            result = gw.store.add_instances(
                [(idx, staged.sha256, staged.size)], session.principal.name
            )[0]
        except SekishoError as exc:
            return self._failed(session, exc.message, exc.dimse_status)
        if result == AddResult.CONFLICT:
            return self._failed(
                session,
                "an instance with this SOP Instance UID and different content is stored",
                DUPLICATE_DIFFERENT,
            )
        session.transfers.stored(idx, staged.size)
        gw.metrics.inc("sekisho_dimse_instances_total", outcome="stored")
        gw.metrics.inc("sekisho_dimse_bytes_total", staged.size)
        if session.transfers.pending >= AUDIT_EVERY:
            self.audit_transfers(session)
        return SUCCESS

    def _failed(self, session: Session, message: str, status: int) -> int:
        log.info("C-STORE refused (0x%04X): %s", status, message)
        session.transfers.failed(message)
        self.gw.metrics.inc("sekisho_dimse_instances_total", outcome="failed")
        return status

    def audit_transfers(self, session: Session) -> None:
        """Instances Transferred (110104) per patient for what the session stored (R-AUD-1)."""
        stored, failures = session.transfers.drain()
        principal = session.principal
        own_ae = self.gw.settings.instance.ae_title
        for (pid, issuer), tally in stored.items():
            self.record(
                ev.instances_transferred(
                    actor=principal.name,
                    actor_kind=principal.kind,  # type: ignore[arg-type]
                    patient_id=pid,
                    patient_issuer=issuer or None,
                    study_uids=sorted(tally.studies),
                    instance_count=tally.instances,
                    source_address=session.address,
                    destination=own_ae,
                    cert_sha256=principal.cert_sha256,
                    description="instances received by C-STORE over DICOM TLS",
                    extra={"calling_ae": session.calling_ae, "bytes": str(tally.bytes)},
                )
            )
        if failures:
            self.record(
                ev.instances_transferred(
                    actor=principal.name,
                    actor_kind=principal.kind,  # type: ignore[arg-type]
                    patient_id=None,
                    study_uids=[],
                    instance_count=len(failures),
                    outcome=ev.Outcome.MINOR_FAILURE,
                    source_address=session.address,
                    destination=own_ae,
                    cert_sha256=principal.cert_sha256,
                    description="; ".join(sorted(set(failures)))[:500],
                    extra={"calling_ae": session.calling_ae},
                )
            )
