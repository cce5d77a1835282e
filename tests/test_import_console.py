"""The staff console API: its own mutual-TLS listener, registered staff certificates only.

``sekisho serve`` runs with ``[media.console]``; the real client is
``/usr/bin/curl`` with certificates from the instance's development PKI.
Shown here: the upload -> inspect -> preview -> import flow names the
authenticated staff member (never a name from the request) as the importer;
partner certificates, unregistered staff certificates and connections
without a certificate are refused and audited; paths outside the allowed roots
are refused and audited; the upload is capped; a changed medium is refused;
the routes do not exist on the partner listener.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import (
    GatewayProcess,
    HttpResult,
    Instance,
    curl,
    free_port,
    running_gateway,
)
from media_factory import build_media, make_iso
from test_import_helpers import IMPORT_EVENT, media_instance

from pki.certs import fingerprint_sha256, load_certificate

RECEPTION = "staff-reception-1"
MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnt")
    build_media(root / "cdrom")
    make_iso(root / "cdrom", root / "patient.iso")
    return root


@pytest.fixture(scope="module")
def console(
    media_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Instance, int, GatewayProcess]]:
    port = free_port()
    inst = media_instance(
        tmp_path_factory.mktemp("console") / "sekisho",
        console={"port": port, "allowed_roots": [str(media_root)], "max_upload_bytes": MAX_UPLOAD},
    )
    with running_gateway(inst) as gw:
        yield inst, port, gw


def call(
    console: tuple[Instance, int, GatewayProcess],
    path: str,
    body: Any = None,
    *,
    method: str | None = None,
    role: str | None = RECEPTION,
    raw: bytes | None = None,
) -> HttpResult:
    inst, port, _gw = console
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    return curl(
        inst,
        path,
        role=role,
        method=method,
        data=data,
        content_type="application/octet-stream" if raw is not None else "application/json",
        url=f"https://localhost:{port}{path}",
    )


def test_upload_inspect_preview_import_names_the_authenticated_staff_member(
    console: tuple[Instance, int, GatewayProcess], media_root: Path
) -> None:
    inst = console[0]
    image = (media_root / "patient.iso").read_bytes()
    assert len(image) < MAX_UPLOAD
    up = call(console, "/media/uploads", raw=image)
    assert up.status == 201, up.body
    upload = up.json()["upload"]
    assert up.json()["size"] == len(image)

    report = call(console, "/media/inspect", {"upload": upload})
    assert report.status == 200, report.body
    assert len(report.json()["patients"]) == 3
    fingerprint = report.json()["fingerprint"]

    body = {"upload": upload, "selection": ["1"], "patient_id": "H0100", "issuer": "SEKISHO"}
    preview = call(console, "/media/preview", body)
    assert preview.status == 200, preview.body
    assert preview.json()["files"] == 6 and preview.json()["mismatches"] == []
    assert preview.json()["local_patient"]["known"] is False

    missing = call(console, "/media/import", body)
    assert missing.status == 400 and b"fingerprint" in missing.body
    changed = call(console, "/media/import", {**body, "fingerprint": "0" * 64})
    assert changed.status == 409

    # A name in the request is ignored: the importer is the certificate's staff member.
    done = call(
        console,
        "/media/import",
        {**body, "fingerprint": fingerprint, "importer": "someone-else", "label": "PATIENT CD"},
    )
    assert done.status == 201, done.body
    record = done.json()["record"]
    staff_fp = fingerprint_sha256(load_certificate(inst.pki.cert_path(RECEPTION)))
    assert record["importer_id"] == "reception01"
    assert record["importer_name"] == "Uketsuke^Hanako=受付^花子"
    assert record["importer_cert_sha256"] == staff_fp
    assert record["source_address"] == "127.0.0.1"
    assert record["media_type"] == "ISO" and record["media_label"] == "PATIENT CD"
    assert record["instance_count"] == 6 and record["status"] == "finalized"
    event = [r.event for r in inst.audit_records(event_id=IMPORT_EVENT)][-1]
    assert (event.actor, event.actor_cert_sha256) == ("reception01", staff_fp)
    assert event.source_address == "127.0.0.1"

    # The hospital now knows H0100: the preview of another patient shows the mismatches
    # and reading the local record is audited (R-AUD-1).
    other = call(console, "/media/preview", {**body, "selection": ["3"]})
    assert {m["field"] for m in other.json()["mismatches"]} == {"name", "birth_date", "sex"}
    reads = [r.event for r in inst.audit_records(event_id="110110")]
    assert reads and reads[-1].actor == "reception01" and reads[-1].patient_id == "H0100"

    listing = call(console, "/media/imports")
    assert listing.status == 200
    assert [r["id"] for r in listing.json()["imports"]] == [record["id"]]
    one = call(console, f"/media/imports/{record['id']}")
    assert len(one.json()["instances"]) == 6
    gone = call(console, f"/media/uploads/{upload}", method="DELETE")
    assert gone.status == 200
    assert call(console, "/media/inspect", {"upload": upload}).status == 404


def test_server_side_paths_must_be_under_an_allowed_root(
    console: tuple[Instance, int, GatewayProcess], media_root: Path, tmp_path: Path
) -> None:
    inst = console[0]
    ok = call(console, "/media/inspect", {"path": str(media_root / "cdrom")})
    assert ok.status == 200 and len(ok.json()["patients"]) == 3
    outside = tmp_path / "elsewhere"
    shutil.copytree(media_root / "cdrom", outside)
    (media_root / "link-out").unlink(missing_ok=True)
    (media_root / "link-out").symlink_to(outside)
    before = len(inst.security_alerts())
    dotdot = str(media_root / os.path.relpath(outside, media_root))
    assert ".." in dotdot
    for path in (str(outside), "/etc", dotdot, str(media_root / "link-out")):
        refused = call(console, "/media/inspect", {"path": path})
        assert refused.status == 403, (path, refused.body)
    alerts = inst.security_alerts()[before:]
    assert len(alerts) == 4
    assert {a.event.reason_code for a in alerts} == {"path-not-allowed"}
    assert {a.event.actor for a in alerts} == {"reception01"}
    assert call(console, "/media/inspect", {"path": "relative/path"}).status == 400


def test_only_registered_staff_certificates_reach_the_console(
    console: tuple[Instance, int, GatewayProcess],
) -> None:
    inst = console[0]
    before = len(inst.security_alerts())
    partner = call(console, "/media/imports", role="partner-valid-1")
    assert partner.status == 403 and b"unregistered" in partner.body
    admin = call(console, "/media/imports", role="staff-admin-1")  # valid, not registered
    assert admin.status == 403
    revoked = call(console, "/media/imports", role="partner-revoked")
    assert revoked.status in (0, 403)
    anonymous = call(console, "/media/imports", role=None)
    assert anonymous.status == 0  # no certificate: no TLS session, no HTTP at all
    alerts = [a.event for a in inst.security_alerts()[before:]]
    assert {"unregistered", "revoked"} <= {a.reason_code for a in alerts}
    assert all(a.extra.get("port") == "staff-console" for a in alerts)
    operator = call(console, "/media/imports", role="staff-operator-1")
    assert operator.status == 200


def test_console_routes_do_not_exist_on_the_partner_listener(
    console: tuple[Instance, int, GatewayProcess],
) -> None:
    inst = console[0]
    for path in ("/media/imports", "/media/inspect"):
        res = curl(inst, path, role="partner-valid-1")
        assert res.status == 404, (path, res.status)


def test_upload_is_capped(console: tuple[Instance, int, GatewayProcess]) -> None:
    inst = console[0]
    big = call(console, "/media/uploads", raw=b"\0" * (MAX_UPLOAD + 1))
    assert big.status == 413
    spool = inst.root / "var" / "media-uploads"
    assert not any(p.suffix == ".part" for p in spool.glob("*")) if spool.exists() else True
