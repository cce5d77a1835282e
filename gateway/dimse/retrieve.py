"""C-GET and C-MOVE: stored instances sent exactly as received (PS3.4 C.4.2-3; PS3.7 9.1.3-4).

Sekisho serves retrieve requests itself rather than through pynetdicom's
Query/Retrieve service class, for three reasons:

* **bytes as received** (R-XCH-5/6): each C-STORE sub-operation sends the
  stored file's data set (everything after its File Meta Information) as it
  is on disk, streamed in PDU-sized fragments by pynetdicom's file-backed
  DIMSE encoder; pynetdicom's ``send_c_store`` would decode and re-encode it.
  An instance is only sent in its own transfer syntax: when the peer has not
  accepted that syntax for its SOP class, the sub-operation fails with a
  clear reason, it is never transcoded (R-XCH-6);
* **move destinations are the partner's own nodes** (R-XCH-2/3): the Move
  Destination AE title must be one registered for the same partner
  (``Partner.move_destinations``), otherwise 0xA801 and a Security Alert;
* **TLS to the destination** uses the gateway's client context from
  :func:`pki.tls.client_context` (chain to our anchors and host name checked).

Sub-operation results are reported in pending responses and the final
response counts completed, failed and warning sub-operations, with the Failed
SOP Instance UID List (PS3.4 C.4.2.3.1).  C-CANCEL stops after the current
sub-operation (0xFE00).  Every transfer is audited as Instances Transferred
(110104, EventActionCode R) per patient, naming sender and receiver (R-XCH-7).
"""

from __future__ import annotations

import logging
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode, split_dataset
from pynetdicom.presentation import build_context

from gateway.audit import events as ev
from gateway.dimse.qr import MAX_SUBOPERATIONS, resolve_retrieve
from gateway.dimse.session import Session
from gateway.service import Gateway
from gateway.store.model import StoredInstance
from pki.errors import SekishoError

log = logging.getLogger("sekisho.dimse")

SUCCESS = 0x0000
PENDING = 0xFF00
CANCELLED = 0xFE00
WARNING_SUBOPS = 0xB000
NOT_AUTHORIZED = 0x0124
UNABLE_TO_CALCULATE = 0xA701
UNABLE_TO_PERFORM_SUBOPS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
#: Presentation contexts one association may propose (PS3.8 9.3.2.2: odd IDs 1-255).
MAX_CONTEXTS = 128


def dataset_offset(path: Path) -> int:
    """Where the data set starts in a PS3.10 file: after the File Meta Information.

    Fast path: the Group Length element (0002,0000) that PS3.10 7.1 requires
    right after ``DICM``; otherwise the meta group is parsed.
    """
    with open(path, "rb") as fh:
        head = fh.read(144)
    if (
        len(head) == 144 and head[128:132] == b"DICM"
        and head[132:136] == b"\x02\x00\x00\x00" and head[136:138] == b"UL"
    ):
        (length,) = struct.unpack("<I", head[140:144])
        return 144 + length
    return split_dataset(path)[1]


def send_stored(
    assoc: Any,
    inst: StoredInstance,
    path: Path,
    message_id: int,
    *,
    move_originator: tuple[str, int] | None = None,
) -> tuple[int | None, str]:
    """One C-STORE sub-operation with the stored bytes; returns (status, reason).

    ``status`` is None when nothing could be sent (no accepted presentation
    context for the instance's own transfer syntax, or no response).
    """
    try:
        context = assoc._get_valid_context(  # noqa: SLF001 - pynetdicom's role-aware lookup
            inst.sop_class_uid, inst.transfer_syntax, "scu", allow_conversion=False
        )
    except ValueError:
        return None, (
            f"the peer accepted no presentation context for this SOP class in the instance's "
            f"own transfer syntax {inst.transfer_syntax}; the gateway does not transcode"
        )
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = inst.sop_class_uid
    request.AffectedSOPInstanceUID = inst.sop_instance_uid
    request.Priority = 0x0000
    if move_originator is not None:
        request.MoveOriginatorApplicationEntityTitle = move_originator[0]
        request.MoveOriginatorMessageID = move_originator[1]
    # The file-backed encoder sends the bytes after the meta group unchanged.
    request._dataset_path = (path, dataset_offset(path))  # noqa: SLF001
    paused = assoc.is_requestor
    if paused:  # a requestor's reactor runs: pause it as pynetdicom's send_c_store does
        assoc._reactor_checkpoint.clear()  # noqa: SLF001
        while not assoc._is_paused:  # noqa: SLF001
            time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _cx, response = assoc.dimse.get_msg(block=True)
    finally:
        if paused:
            assoc._reactor_checkpoint.set()  # noqa: SLF001
    if response is None or getattr(response, "Status", None) is None:
        assoc._handle_no_response()  # noqa: SLF001
        return None, "no C-STORE response from the peer (DIMSE timeout or connection lost)"
    return int(response.Status), ""


class RetrieveScp:
    """C-GET and C-MOVE service, called by :class:`~gateway.dimse.session.SekishoAssociation`."""

    def __init__(
        self,
        gw: Gateway,
        *,
        ae: Any,
        client_tls: Callable[[], Any],
        record: Callable[[ev.AuditEvent], None],
        deny: Callable[[Session, str, str], None],
    ) -> None:
        self.gw = gw
        self.ae = ae
        self.client_tls = client_tls
        self.record = record
        self.deny = deny

    def __call__(self, assoc: Any, req: Any, context: Any) -> None:
        session: Session = assoc.session
        is_move = isinstance(req, C_MOVE)
        rsp = C_MOVE() if is_move else C_GET()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        what = "C-MOVE" if is_move else "C-GET"

        def final(status: int, identifier: Dataset | None = None, *, counted: bool = True) -> None:
            rsp.Status = status
            if status != CANCELLED:  # only a cancel reports what remains (PS3.4 C.4.2.1.6)
                rsp.NumberOfRemainingSuboperations = None
            if counted:
                for name in ("Completed", "Failed", "Warning"):
                    key = f"NumberOf{name}Suboperations"
                    if getattr(rsp, key) is None:
                        setattr(rsp, key, 0)
            rsp.Identifier = None
            if identifier is not None:
                ts = context.transfer_syntax[0]
                encoded = encode(identifier, ts.is_implicit_VR, ts.is_little_endian,
                                 ts.is_deflated)
                rsp.Identifier = BytesIO(encoded or b"")
            assoc.dimse.send_msg(rsp, context.context_id)

        if not session.principal.partner.may("retrieve"):
            self.deny(session, "retrieve", what)
            return final(NOT_AUTHORIZED, counted=False)
        ts = context.transfer_syntax[0]
        try:
            identifier = decode(req.Identifier, ts.is_implicit_VR, ts.is_little_endian,
                                ts.is_deflated)
            instances = resolve_retrieve(
                self.gw.store, identifier, str(req.AffectedSOPClassUID),
                session.principal.visibility,
            )
        except SekishoError as exc:
            log.info("%s refused: %s", what, exc.message)
            return final(IDENTIFIER_DOES_NOT_MATCH, counted=False)
        except Exception:  # noqa: BLE001 - undecodable identifier
            log.info("%s refused: the identifier cannot be decoded", what)
            return final(IDENTIFIER_DOES_NOT_MATCH, counted=False)
        if len(instances) > MAX_SUBOPERATIONS:
            return final(UNABLE_TO_CALCULATE, counted=False)
        target = assoc
        destination = ""
        if is_move:
            move_ae = str(req.MoveDestination or "").strip()
            address = session.principal.partner.move_destination(move_ae)
            if address is None:
                self._unknown_destination(session, move_ae)
                return final(MOVE_DESTINATION_UNKNOWN, counted=False)
            destination = f"{move_ae}@{address[0]}:{address[1]}"
            if not instances:
                return final(SUCCESS)
            target = self._open_destination(move_ae, address, instances)
            if target is None:
                self._audit(session, instances, [], destination, what,
                            failure="could not associate with the move destination")
                return final(UNABLE_TO_PERFORM_SUBOPS, counted=False)
        elif not instances:
            return final(SUCCESS)
        try:
            self._suboperations(assoc, req, context, rsp, target, instances, session,
                                destination or session.calling_ae, what, final)
        finally:
            if target is not assoc:
                target.release()

    # -- sub-operations ----------------------------------------------------
    def _suboperations(
        self, assoc: Any, req: Any, context: Any, rsp: Any, target: Any,
        instances: list[StoredInstance], session: Session, destination: str, what: str,
        final: Callable[..., None],
    ) -> None:
        remaining, completed, failed, warning = len(instances), 0, 0, 0
        failed_uids: list[str] = []
        sent: list[StoredInstance] = []
        reasons: set[str] = set()
        originator = (session.calling_ae, int(req.MessageID)) if target is not assoc else None
        for number, inst in enumerate(instances, start=1):
            if int(req.MessageID) in assoc.dimse.cancel_req:
                rsp.NumberOfRemainingSuboperations = remaining
                rsp.NumberOfCompletedSuboperations = completed
                rsp.NumberOfFailedSuboperations = failed
                rsp.NumberOfWarningSuboperations = warning
                self._audit(session, sent, failed_uids, destination, what,
                            failure="cancelled by the requestor" if failed_uids else None)
                return final(CANCELLED, _failed_list(failed_uids))
            path = self.gw.files.object_path(inst.sha256)
            status, reason = send_stored(target, inst, path, number, move_originator=originator)
            remaining -= 1
            if status == SUCCESS:
                completed += 1
                sent.append(inst)
            elif status is not None and (status & 0xF000 == 0xB000 or status == 0x0107):
                warning += 1  # stored with coercion or discarded elements (PS3.4 B.2.3)
                sent.append(inst)
            else:
                failed += 1
                failed_uids.append(inst.sop_instance_uid)
                reasons.add(reason or f"C-STORE status 0x{status:04X}")
            if not target.is_established or not assoc.is_established:
                failed += remaining
                failed_uids.extend(i.sop_instance_uid for i in instances[number:])
                remaining = 0
                reasons.add("the association with the destination ended early")
                break
            rsp.Status = PENDING
            rsp.NumberOfRemainingSuboperations = remaining
            rsp.NumberOfCompletedSuboperations = completed
            rsp.NumberOfFailedSuboperations = failed
            rsp.NumberOfWarningSuboperations = warning
            if remaining:
                assoc.dimse.send_msg(rsp, context.context_id)
        rsp.NumberOfCompletedSuboperations = completed
        rsp.NumberOfFailedSuboperations = failed
        rsp.NumberOfWarningSuboperations = warning
        for reason in reasons:
            log.info("%s sub-operation failed: %s", what, reason)
        self._audit(session, sent, failed_uids, destination, what,
                    failure="; ".join(sorted(reasons)) if reasons else None)
        if not failed and not warning:
            return final(SUCCESS)
        if not completed and not warning:
            return final(UNABLE_TO_PERFORM_SUBOPS, _failed_list(failed_uids))
        return final(WARNING_SUBOPS, _failed_list(failed_uids))

    def _open_destination(
        self, move_ae: str, address: tuple[str, int], instances: list[StoredInstance]
    ) -> Any:
        """An association to the partner's move destination over TLS (PS3.15 B.1)."""
        pairs = sorted({(i.sop_class_uid, i.transfer_syntax) for i in instances})
        if len(pairs) > MAX_CONTEXTS:
            log.warning("C-MOVE needs %d presentation contexts; proposing the first %d",
                        len(pairs), MAX_CONTEXTS)
        contexts = [build_context(sop, [ts]) for sop, ts in pairs[:MAX_CONTEXTS]]
        host, port = address
        try:
            store_assoc = self.ae.associate(
                host, port, contexts=contexts, ae_title=move_ae,
                max_pdu=self.ae.maximum_pdu_size, tls_args=(self.client_tls(), host),
            )
        except Exception:  # noqa: BLE001 - pynetdicom raises many kinds here
            log.exception("could not open an association to the move destination")
            return None
        if not store_assoc.is_established:
            log.warning("move destination %s at %s:%d refused or unreachable", move_ae, host, port)
            return None
        return store_assoc

    # -- audit ---------------------------------------------------------------
    def _unknown_destination(self, session: Session, move_ae: str) -> None:
        principal = session.principal
        self.record(
            ev.security_alert(
                "move-destination-not-registered",
                f"C-MOVE to AE title {move_ae!r}, which is not registered for this partner",
                actor=principal.name,
                actor_kind=principal.kind,  # type: ignore[arg-type]
                source_address=session.address,
                cert_sha256=principal.cert_sha256,
                event_type=ev.USE_OF_RESTRICTED_FUNCTION,
                extra={"calling_ae": session.calling_ae, "move_destination": move_ae[:16],
                       "port": "dimse"},
            )
        )

    def _audit(
        self, session: Session, sent: list[StoredInstance], failed_uids: list[str],
        destination: str, what: str, *, failure: str | None,
    ) -> None:
        """Instances Transferred (110104, R) per patient: sender us, receiver ``destination``."""
        principal = session.principal
        by_patient: dict[tuple[str, str], list[StoredInstance]] = defaultdict(list)
        for inst in sent:
            by_patient[(inst.patient_id, inst.issuer)].append(inst)
        for (pid, issuer), items in by_patient.items():
            self.record(
                ev.instances_transferred(
                    actor=principal.name,
                    actor_kind=principal.kind,  # type: ignore[arg-type]
                    patient_id=pid,
                    patient_issuer=issuer or None,
                    study_uids=sorted({i.study_uid for i in items}),
                    instance_count=len(items),
                    action=ev.Action.READ,
                    source_address=session.address,
                    destination=destination,
                    cert_sha256=principal.cert_sha256,
                    description=f"instances sent by {what} over DICOM TLS",
                    extra={"calling_ae": session.calling_ae},
                )
            )
        if failure:
            self.record(
                ev.instances_transferred(
                    actor=principal.name,
                    actor_kind=principal.kind,  # type: ignore[arg-type]
                    patient_id=None,
                    study_uids=[],
                    instance_count=max(len(failed_uids), 1),
                    action=ev.Action.READ,
                    outcome=ev.Outcome.MINOR_FAILURE,
                    source_address=session.address,
                    destination=destination,
                    cert_sha256=principal.cert_sha256,
                    description=f"{what} sub-operations failed: {failure}"[:500],
                    extra={"calling_ae": session.calling_ae},
                )
            )
        self.gw.metrics.inc("sekisho_dimse_retrieved_total", len(sent), service=what)


def _failed_list(uids: list[str]) -> Dataset | None:
    if not uids:
        return None
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = uids
    return ds
