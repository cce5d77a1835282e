"""SIGKILL in the middle of a STOW-RS (R-XCH-4, R-XCH-5, R-AUD-2).

Two STOWs complete and are acknowledged; then a large STOW of 200 instances is
streamed (chunked, part by part, from a generator through Python's
``http.client`` with a partner certificate) and the gateway is killed with
SIGKILL while partial uploads sit in its ``tmp`` directory.  A second large
STOW is killed just after its last byte was sent, while the gateway may be
committing.  After each restart:

* every acknowledged instance is indexed and its stored bytes hash to what
  was sent (and come back identical over WADO-RS);
* the interrupted request's instances are all indexed with correct hashes or
  all absent (one metadata transaction per request);
* the ``tmp`` directory has been swept;
* ``sekisho audit verify`` passes.
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.gateway_helpers import (
    GatewayProcess,
    Instance,
    Study,
    build_study,
    curl,
    referenced_uids,
    sha256,
    stow,
    wado_parts,
)

LARGE = 200
WAIT = 30.0


def client_context(instance: Instance, role: str = "partner-valid-1") -> ssl.SSLContext:
    pki = instance.pki
    ctx = ssl.create_default_context(cafile=str(pki.cert_path("root-ca")))
    ctx.load_cert_chain(str(pki.cert_path(role)), str(pki.key_path(role)))
    return ctx


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def streamed_stow(
    instance: Instance, gateway: GatewayProcess, study: Study, *, kill_after_parts: int | None
) -> None:
    """Stream ``study`` as a chunked STOW; SIGKILL the gateway at the chosen point.

    ``kill_after_parts``: kill once that many parts were sent *and* the gateway
    holds partial uploads in its tmp directory; ``None``: kill right after the
    closing delimiter, without waiting for the response.
    """
    boundary = f"crash-{uuid.uuid4().hex}"

    def body() -> Iterator[bytes]:
        for n, inst in enumerate(study.instances, start=1):
            yield (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + inst.data
                + b"\r\n"
            )
            if kill_after_parts is not None and n == kill_after_parts:
                wait_until(lambda: any(instance.store_tmp.iterdir()), "a partial upload")
                gateway.kill()
        yield f"--{boundary}--\r\n".encode()
        if kill_after_parts is None:
            gateway.kill()

    conn = http.client.HTTPSConnection(
        "localhost", instance.https_port, context=client_context(instance), timeout=WAIT
    )
    try:
        conn.request(
            "POST",
            "/dicomweb/studies",
            body=body(),
            encode_chunked=True,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
            },
        )
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException):
        pass  # the peer died: exactly what this test does
    finally:
        conn.close()
    assert not gateway.running


def check_integrity(instance: Instance, acknowledged: dict[str, str]) -> dict[str, str]:
    """Every acknowledged instance indexed and intact on disk; returns the index."""
    indexed = instance.indexed_instances()
    files = instance.object_files()
    for uid, digest in acknowledged.items():
        assert indexed.get(uid) == digest, f"acknowledged instance {uid} lost or changed"
    for uid, digest in indexed.items():
        path = files.get(digest)
        assert path is not None, f"indexed instance {uid} has no stored file"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{uid} is corrupt"
    return indexed


def all_or_nothing(indexed: dict[str, str], study: Study) -> bool:
    """True if the whole study is indexed with the sent hashes, False if none of it is."""
    present = {i.sop_uid for i in study.instances if i.sop_uid in indexed}
    if not present:
        return False
    assert present == {i.sop_uid for i in study.instances}, (
        f"{len(present)} of {len(study.instances)} instances of an interrupted STOW indexed"
    )
    for inst in study.instances:
        assert indexed[inst.sop_uid] == inst.sha256
    return True


def audit_verifies(instance: Instance) -> None:
    proc = instance.cli("audit", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "audit trail intact" in proc.stdout


@pytest.fixture
def instance(instance_factory) -> Instance:  # noqa: ANN001
    inst = instance_factory()
    inst.cli_ok("consent", "grant", "P-CRASH", "--partner", "partner-a", "--by", "reception01")
    return inst


def test_sigkill_during_stow_loses_no_acknowledged_instance(
    instance: Instance,
    gateway_factory,  # noqa: ANN001
) -> None:
    gateway = gateway_factory(instance)
    acknowledged: dict[str, str] = {}
    for n in range(2):
        study = build_study(
            patient_id="P-CRASH",
            study_date=f"2025040{n + 1}",
            series=(("CT", 12), ("MR", 8)),
            rows=64,
            columns=64,
        )
        r = stow(instance, [i.data for i in study.instances])
        assert r.status == 200
        assert sorted(referenced_uids(r)) == sorted(study.hashes)
        acknowledged.update(study.hashes)

    # 1. Killed while the body is still streaming in.
    interrupted = build_study(
        patient_id="P-CRASH",
        study_date="20250501",
        series=(("CT", LARGE // 2), ("MR", LARGE // 2)),
        rows=64,
        columns=64,
    )
    streamed_stow(instance, gateway, interrupted, kill_after_parts=LARGE // 2)
    assert any(instance.store_tmp.iterdir()), "the kill did not catch a partial upload"

    gateway = gateway_factory(instance)  # restart
    assert list(instance.store_tmp.iterdir()) == [], "partial uploads not swept at start"
    indexed = check_integrity(instance, acknowledged)
    assert not all_or_nothing(indexed, interrupted), "an unfinished request was indexed"
    audit_verifies(instance)

    # 2. Killed right after the last byte: the commit may or may not have happened.
    racing = build_study(
        patient_id="P-CRASH",
        study_date="20250601",
        series=(("CT", LARGE // 2), ("MR", LARGE // 2)),
        rows=64,
        columns=64,
    )
    streamed_stow(instance, gateway, racing, kill_after_parts=None)

    gateway = gateway_factory(instance)  # restart
    assert list(instance.store_tmp.iterdir()) == []
    indexed = check_integrity(instance, acknowledged)
    all_or_nothing(indexed, racing)
    audit_verifies(instance)

    # What was acknowledged comes back byte-identical, and the gateway serves on.
    r = curl(instance, "/dicomweb/studies?PatientID=P-CRASH")
    assert r.status == 200
    retrieved: set[str] = set()
    for study in r.json():
        uid = study["0020000D"]["Value"][0]
        retrieved |= {sha256(p) for p in wado_parts(curl(instance, f"/dicomweb/studies/{uid}"))}
    assert set(acknowledged.values()) <= retrieved
    assert not {i.sha256 for i in interrupted.instances} & retrieved
    gateway.stop()
    audit_verifies(instance)
