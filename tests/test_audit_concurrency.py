"""Threads and processes appending to one trail keep one valid chain (R-AUD-2)."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.audit import AuditEvent, AuditTrail, instances_transferred
from gateway.audit.checkpoint import read_checkpoint


def _event(actor: str, i: int) -> AuditEvent:
    return instances_transferred(
        actor=actor, patient_id=f"P{i % 3}", study_uids=[f"1.2.3.{i}"], instance_count=1
    )


def _assert_one_chain(db: Path, expected: int) -> list[str]:
    with AuditTrail(db) as trail:
        report = trail.verify()
        records = sorted(trail.iter_records(), key=lambda r: r.seq)
        assert report.ok, report.problems
        assert report.head_seq == report.records == expected
        assert [r.seq for r in records] == list(range(1, expected + 1))
        assert all(b.prev_hash == a.record_hash for a, b in zip(records, records[1:], strict=False))
        checkpoint = read_checkpoint(trail.head_path)
        assert checkpoint is not None and checkpoint.seq == expected
        assert checkpoint.record_hash == records[-1].record_hash
        return [r.event.actor for r in records]


def test_four_threads_share_one_trail(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    trail = AuditTrail(db)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        for i in range(25):
            seq = trail.record(_event(name, i))
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=worker, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trail.close()
    assert sorted(seqs) == list(range(1, 101))
    actors = _assert_one_chain(db, 100)
    assert Counter(actors) == {"t0": 25, "t1": 25, "t2": 25, "t3": 25}


def test_four_threads_with_their_own_connections(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"

    def worker(name: str) -> None:
        with AuditTrail(db) as own:
            for i in range(20):
                own.record(_event(name, i))

    threads = [threading.Thread(target=worker, args=(f"c{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Counter(_assert_one_chain(db, 80)) == {f"c{n}": 20 for n in range(4)}


def _process_worker(db: str, name: str, count: int, start: Any) -> None:
    start.wait(30)
    with AuditTrail(Path(db)) as trail:
        for i in range(count):
            trail.record(_event(name, i))


def test_two_processes_share_one_chain(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    AuditTrail(db).close()  # create the schema once, as the gateway's start-up would
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_process_worker, args=(str(db), f"proc{n}", 40, start)) for n in range(2)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    actors = _assert_one_chain(db, 80)
    assert Counter(actors) == {"proc0": 40, "proc1": 40}
