"""Several processes serve the HTTPS port ([https] workers, R-OPS-1).

The primary process forks HTTPS workers that share the port (SO_REUSEPORT);
instances stored through any of them land in the same store and audit chain,
and the workers leave when the primary is gone, even after SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.gateway_helpers import build_study, referenced_uids, stow


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_two_workers_share_one_store_and_audit_chain(instance_factory, gateway_factory) -> None:
    inst = instance_factory({"https": {"workers": 2}})
    gateway = gateway_factory(inst)
    workers = _children(gateway.proc.pid)
    assert len(workers) == 1, "the primary forks one HTTPS worker"
    studies = [
        build_study(patient_id=f"P-W{n}", series=(("CT", 6),), rows=32, columns=32)
        for n in range(6)
    ]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda s: stow(inst, [i.data for i in s.instances]), studies))
    for study, r in zip(studies, responses, strict=True):
        assert r.status == 200
        assert sorted(referenced_uids(r)) == sorted(study.hashes)
    indexed = inst.indexed_instances()
    for study in studies:
        for uid, digest in study.hashes.items():
            assert indexed[uid] == digest
    verify = inst.cli("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    os.kill(gateway.proc.pid, signal.SIGKILL)
    gateway.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "an orphaned HTTPS worker kept running"
