"""The running gateway forwards what it receives, and its admin API (R-XCH-4, R-XCH-3).

``sekisho serve`` with ``[routing] on_receive`` forwards a study received by
STOW-RS to DCMTK ``storescp +tls``, byte for byte.  The admin API on the
mutual-TLS port lists jobs, queues a study and resumes stopped jobs, but only
for a client whose registration has the ``admin`` permission; a regional
partner is refused with a Security Alert.
"""

from __future__ import annotations

import json
import os

import pytest
from test_forward_peers import (
    STORESCP,
    CommitmentScp,
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
from tests.gateway_helpers import curl, stow

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(not os.path.exists(STORESCP), reason="DCMTK storescp not installed"),
]

JSON = "application/json"


def _states(instance, destination: str | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    return [j.state for j in ForwardQueue(instance.database).list_jobs(destination=destination)]


def test_received_study_is_forwarded_and_the_admin_api_needs_admin(
    instance_factory, gateway_factory, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    instance = instance_factory()
    pki = instance.pki
    port, down = free_port(), free_port()
    instance.update_config({
        "destinations": {
            "pacs": dimse_destination_dict(pki, port),
            "down": dimse_destination_dict(pki, down, retry={"max_attempts": 1}),
        },
        "routing": {"on_receive": ["pacs"], "scan_interval_seconds": 0.2},
        "forward": {"poll_interval_seconds": 0.2},
    })
    instance.cli_ok("partner", "add", "hospital-admin", "--certificate",
                    str(pki.cert_path("staff-admin-1")), "--permission", "admin")
    study = make_study(1, 3, patient_id="API-1")
    with storescp(pki, tmp_path / "recv", port=port):
        gateway_factory(instance)
        assert stow(instance, study.files).status == 200
        assert wait_for(lambda: _states(instance) == ["sent"] * 3, 30)
        assert wait_for(lambda: len(received_datasets(tmp_path / "recv")) == 3)
        assert received_datasets(tmp_path / "recv") == {
            sop_uid_of(f): dataset_sha(f) for f in study.files}

        head = instance.audit_head()
        refused = curl(instance, "/admin/forward/jobs")  # a regional partner
        assert refused.status == 403
        alerts = instance.security_alerts(after_seq=head)
        assert alerts and alerts[0].event.actor == "partner-a"

        admin = "staff-admin-1"
        listed = curl(instance, "/admin/forward/jobs?state=sent", role=admin)
        assert listed.status == 200
        assert [j["state"] for j in listed.json()["jobs"]] == ["sent"] * 3

        body = json.dumps({"study": study.study_uid, "destination": "down"}).encode()
        queued = curl(instance, "/admin/forward/send", role=admin, data=body, content_type=JSON)
        assert queued.status == 202 and queued.json()["queued"] == 3
        assert wait_for(lambda: _states(instance, "down") == ["failed"] * 3, 30)
        failed = curl(instance, "/admin/forward/jobs?state=failed", role=admin).json()
        assert failed["counts"]["down"] == {"failed": 3}
        assert "cannot connect" in failed["jobs"][0]["last_error"]

        body = json.dumps({"destination": "down"}).encode()
        resumed = curl(instance, "/admin/forward/retry", role=admin, data=body,
                       content_type=JSON)
        assert resumed.status == 200 and resumed.json() == {"resumed": 3}
        bad = curl(instance, "/admin/forward/send", role=admin, data=b"[]", content_type=JSON)
        assert bad.status == 400


def test_commitment_report_through_the_gateways_own_dimse_listener(
    instance_factory, gateway_factory
) -> None:  # type: ignore[no-untyped-def]
    """The provider reports Storage Commitment on its own association to ``[dimse]``
    (PS3.4 J.3.3), authenticated by its certificate and AE title like any partner."""
    instance = instance_factory()
    pki = instance.pki
    dimse_port = instance.read_config()["dimse"]["port"]
    instance.cli_ok("partner", "add", "provider", "--certificate",
                    str(pki.cert_path("storage-provider")), "--ae-title", "ARCHIVE",
                    "--role", "external-storage")
    study = make_study(1, 2, patient_id="SC-1")
    with CommitmentScp(pki, mode="separate",
                       report_to=("127.0.0.1", dimse_port, "SEKISHO")) as scp:
        instance.update_config({
            "destinations": {"ext-store": dimse_destination_dict(
                pki, scp.port, called_ae="ARCHIVE", role="external-storage",
                partner="provider", storage_commitment=True, commitment_timeout_seconds=0.2)},
            "routing": {"on_receive": ["ext-store"], "scan_interval_seconds": 0.2},
            "forward": {"poll_interval_seconds": 0.2},
        })
        gateway_factory(instance)
        assert stow(instance, study.files).status == 200
        assert wait_for(lambda: _states(instance) == ["committed"] * 2, 30)
        # The gateway records the commitment when the report arrives, before the
        # provider has read the N-EVENT-REPORT response.
        assert wait_for(lambda: scp.report_status is not None, 10)
        assert int(scp.report_status.Status) == 0
    jobs = ForwardQueue(instance.database).list_jobs()
    assert {j.committed_at is not None for j in jobs} == {True}
    assert len({j.commitment_uid for j in jobs}) == 1
