"""Staff console API for film intake and the overdue list (R-DIG-3, R-USR-1, R-AUD-1).

A real ``sekisho serve`` with the staff console listener; the client is
``curl`` with dev-PKI certificates.  Only a registered staff certificate gets
in; the receiver of a receipt is the authenticated staff member, not a field
of the request.
"""

# The signing fixtures are imported by name and requested as parameters.
# ruff: noqa: F401, F811

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.digitize_fixtures import digitization_config
from tests.gateway_helpers import Instance, curl, free_port
from tests.signing_fixtures import loopback_tsa, signing_pki, tsa_server


@pytest.fixture
def console(instance_factory, gateway_factory, signing_pki, loopback_tsa):
    port = free_port()
    config = digitization_config(signing_pki, loopback_tsa.url)
    config["media"] = {
        "scanner": {"kind": "none", "required": False},
        "console": {
            "port": port,
            "staff": {
                "op01": {"name": "Sousa^Ichiro", "certificate": "pki/staff-operator-1.crt.pem"}
            },
        },
    }
    inst: Instance = instance_factory(config)
    gateway_factory(inst)
    return inst, f"https://localhost:{port}"


def _call(inst: Instance, base: str, path: str, role: str | None = "staff-operator-1", **kw):
    return curl(inst, path, role=role, url=base + path, **kw)


def test_staff_member_records_a_receipt_and_sees_it_overdue(console) -> None:
    inst, base = console
    before = inst.audit_head()
    received = (datetime.now(UTC) - timedelta(days=7)).isoformat()
    body = {
        "patient_id": "P-700",
        "source_facility": "Minami Clinic",
        "films": 2,
        "received_at": received,
        "received_by": "someone-else",
    }
    res = _call(
        inst,
        base,
        "/staff/film-receipts",
        method="POST",
        data=json.dumps(body).encode(),
        content_type="application/json",
    )
    assert res.status == 400  # unknown fields are not silently taken for the actor
    del body["received_by"]
    res = _call(
        inst,
        base,
        "/staff/film-receipts",
        method="POST",
        data=json.dumps(body).encode(),
        content_type="application/json",
    )
    assert res.status == 201, res.body
    receipt = json.loads(res.body)
    assert receipt["received_by"] == "op01" and receipt["films"] == 2

    res = _call(inst, base, "/staff/digitizations/overdue")
    assert res.status == 200
    assert receipt["id"] in [r["id"] for r in json.loads(res.body)["overdue_receipts"]]
    res = _call(inst, base, "/staff/film-receipts?patient_id=P-700")
    assert [r["id"] for r in json.loads(res.body)["receipts"]] == [receipt["id"]]

    events = [r.event for r in inst.audit_records(after_seq=before)]
    created = [e for e in events if e.event_id.value == "110110"]
    assert created and created[0].actor == "op01" and created[0].patient_id == "P-700"
    queries = [e for e in events if e.event_id.value == "110112"]
    assert any(e.patient_id == "P-700" and e.actor == "op01" for e in queries)


@pytest.mark.parametrize("role", ["partner-valid-1", "staff-reception-1", None])
def test_only_registered_staff_certificates_get_in(console, role) -> None:
    inst, base = console
    res = _call(inst, base, "/staff/digitizations/overdue", role=role)
    assert res.status != 200
    partner_port = _call(
        inst, inst.base_url, "/staff/digitizations/overdue", role="partner-valid-1"
    )
    assert partner_port.status in (0, 401, 403, 404)  # not mounted for partners
