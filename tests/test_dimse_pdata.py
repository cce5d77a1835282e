"""Pre-encoded C-STORE-RQ PDUs (gateway.dimse.pdata) are the bytes pynetdicom sends.

The forwarder sends a stored instance as whole P-DATA-TF PDUs encoded here
instead of one pynetdicom P-DATA primitive per PDU.  These tests compare the
command set and every PDU, byte for byte, with what pynetdicom 3.0.4 encodes
for the same request (its file-backed data set path), for several data set
lengths and maximum PDU sizes, and check the DUL hook's behaviour.  The
pynetdicom code reproduced here is pinned in ``tests/test_dimse_fastpath.py``.
"""

from __future__ import annotations

import hashlib
import queue
from pathlib import Path
from types import SimpleNamespace

import pytest
from pynetdicom import fsm
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from gateway.dimse import pdata

CT = "1.2.840.10008.5.1.4.1.1.2"


def _request(message_id: int, instance: str, *, path: tuple[Path, int] | None = None) -> C_STORE:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = instance
    req.Priority = 2
    if path is not None:
        req._dataset_path = path
    return req


@pytest.mark.parametrize(
    ("message_id", "instance"),
    [
        (1, "1.2.3"),
        (65535, "1.2.840.10008.99"),
        (7, "1." + "2" * 62),
        (300, "2.25.1234567"),
    ],
)
def test_command_set_is_what_pynetdicom_encodes(
    tmp_path: Path, message_id: int, instance: str
) -> None:
    (tmp_path / "ds").write_bytes(b"\x00" * 10)
    message = C_STORE_RQ()
    message.primitive_to_message(_request(message_id, instance, path=(tmp_path / "ds", 0)))
    expected = encode(message.command_set, True, True)
    assert pdata.c_store_rq_command(message_id, CT, instance, 2) == expected


def _pynetdicom_pdus(path: Path, offset: int, max_pdu: int) -> list[bytes]:
    message = C_STORE_RQ()
    message.primitive_to_message(_request(5, "1.2.3.4", path=(path, offset)))
    return [P_DATA_TF(p).encode() for p in message.encode_msg(1, max_pdu)]


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384, 131072])
@pytest.mark.parametrize("length", [0, 1, 4090, 16378, 16379, 100_000, 524_288])
def test_pdus_are_what_pynetdicom_sends(tmp_path: Path, max_pdu: int, length: int) -> None:
    path = tmp_path / "instance.dcm"
    header = b"\x00" * 132  # stands in for the preamble and file meta
    path.write_bytes(header + hashlib.sha256(b"x").digest() * (length // 32) + b"y" * (length % 32))
    expected = _pynetdicom_pdus(path, len(header), max_pdu)
    command = pdata.c_store_rq_command(5, CT, "1.2.3.4", 2)
    with open(path, "rb") as fh:
        fh.seek(len(header))
        got = list(pdata.message_pdus(1, command, fh, length, max_pdu))
    assert got == expected
    # Blocks keep whole PDUs, in order.
    joined = list(pdata.blocks(iter(got), block_bytes=50_000))
    assert b"".join(joined) == b"".join(expected)
    assert all(len(b) < 50_000 + max(map(len, expected)) for b in joined)


def _fake_dul(state: str) -> SimpleNamespace:
    sent: list[bytes] = []
    fake = SimpleNamespace(
        to_provider_queue=queue.Queue(),
        event_queue=queue.Queue(),
        state_machine=SimpleNamespace(current_state=state),
        socket=SimpleNamespace(socket=SimpleNamespace(sendall=lambda v: sent.append(bytes(v)))),
        _process_recv_primitive=lambda: "original",
    )
    fake.sent = sent
    return fake


def test_the_dul_writes_encoded_blocks_in_sta6_and_leaves_the_rest_to_pynetdicom() -> None:
    fake = _fake_dul("Sta6")
    pdata.install_fast_send(fake)
    assert fake._sekisho_fast_send
    fake.to_provider_queue.put(pdata.EncodedPData(b"PDUS"))
    assert fake._process_recv_primitive() is True
    assert fake.sent == [b"PDUS"] and fake.to_provider_queue.empty()
    assert fake.event_queue.empty()  # no state machine event: DT-1 would stay in Sta6
    fake.to_provider_queue.put(P_DATA())
    assert fake._process_recv_primitive() is True  # pynetdicom's own ("original" is truthy)
    assert fake.to_provider_queue.qsize() == 1


@pytest.mark.parametrize("state", ["Sta7", "Sta8", "Sta13"])
def test_encoded_blocks_outside_data_transfer_are_dropped(state: str) -> None:
    fake = _fake_dul(state)
    pdata.install_fast_send(fake)
    fake.to_provider_queue.put(pdata.EncodedPData(b"PDUS"))
    assert fake._process_recv_primitive() is True
    assert fake.sent == [] and fake.to_provider_queue.empty()


def test_a_closed_transport_is_evt17() -> None:
    fake = _fake_dul("Sta6")

    def broken(_view: memoryview) -> None:
        raise ConnectionResetError

    fake.socket.socket.sendall = broken
    pdata.install_fast_send(fake)
    fake.to_provider_queue.put(pdata.EncodedPData(b"PDUS"))
    assert fake._process_recv_primitive() is True
    assert fake.event_queue.get_nowait() == "Evt17"


def test_dt1_is_all_the_state_machine_does_with_p_data_in_sta6() -> None:
    assert fsm.TRANSITION_TABLE[("Evt9", "Sta6")] == "DT-1"
    assert fsm.ACTIONS["DT-1"][2] == "Sta6"


def test_no_pdus_no_blocks() -> None:
    assert list(pdata.blocks(iter([]))) == []
