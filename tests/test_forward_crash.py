"""SIGKILL of ``sekisho serve`` while it forwards, then a restart (R-XCH-4, R-XCH-5).

A study arrives by STOW-RS and is routed (``[routing] on_receive``) to DCMTK
``storescp +tls`` that answers each C-STORE only after a second.  The gateway is
killed with SIGKILL after a couple of confirmations.  At that moment every job
marked ``sent`` must be on the destination; after a restart every instance must
reach the destination exactly as stored, and nothing is marked sent that the
destination does not hold.
"""

from __future__ import annotations

import os

import pytest
from test_forward_peers import (
    STORESCP,
    dataset_sha,
    dimse_destination_dict,
    free_port,
    make_study,
    received_datasets,
    sop_uid_of,
    storescp,
    wait_for,
)

from gateway.forward.queue import ForwardQueue
from tests.gateway_helpers import referenced_uids, stow

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(not os.path.exists(STORESCP), reason="DCMTK storescp not installed"),
]


def _jobs(database: os.PathLike[str]) -> dict[str, str]:
    return {j.sop_uid: j.state for j in ForwardQueue(database).list_jobs()}  # type: ignore[arg-type]


def test_sigkill_during_sending_loses_nothing_and_marks_nothing_falsely(
    instance_factory, gateway_factory, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    instance = instance_factory()
    pki = instance.pki
    port = free_port()
    instance.update_config({
        "destinations": {"pacs": dimse_destination_dict(pki, port, batch_size=50)},
        "routing": {"on_receive": ["pacs"], "scan_interval_seconds": 0.2},
        "forward": {"lease_seconds": 2, "poll_interval_seconds": 0.2},
    })
    study = make_study(2, 4, patient_id="CRASH-1")
    expected = {sop_uid_of(f): dataset_sha(f) for f in study.files}
    recv = tmp_path / "recv"

    with storescp(pki, recv, port=port, extra=("--sleep-after", "1")):
        gw = gateway_factory(instance)
        result = stow(instance, study.files)
        assert result.status == 200 and len(referenced_uids(result)) == 8
        assert wait_for(
            lambda: list(_jobs(instance.database).values()).count("sent") >= 2, 30, 0.05
        )
        gw.kill()  # SIGKILL: no shutdown code runs
        at_kill = _jobs(instance.database)
    sent_at_kill = {uid for uid, state in at_kill.items() if state == "sent"}
    assert len(at_kill) == 8 and 2 <= len(sent_at_kill) < 8
    received = received_datasets(recv)
    # Nothing is marked sent that the destination does not hold, byte for byte.
    assert all(received.get(uid) == expected[uid] for uid in sent_at_kill)

    with storescp(pki, recv, port=port):
        gateway_factory(instance)
        assert wait_for(lambda: set(_jobs(instance.database).values()) == {"sent"}, 60)
        final = received_datasets(recv)
    assert final == expected  # every instance arrived, exactly as stored
    resent = {j.sop_uid: j.attempts for j in ForwardQueue(instance.database).list_jobs()}
    assert all(resent[uid] == 1 for uid in sent_at_kill)  # confirmed ones never re-sent
    assert any(n >= 2 for n in resent.values())  # the batch in flight was sent again
