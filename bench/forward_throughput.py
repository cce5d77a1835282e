#!/usr/bin/env python3
"""Store-and-forward throughput over DICOM TLS: Sekisho's sender against DCMTK storescu.

N synthetic 512x512 16-bit CT instances (about 513 KiB each, one study) are
stored in a fresh Sekisho store, then forwarded by the gateway's own workers
(``gateway.forward``: durable queue, one association per batch, every
confirmation written to SQLite before the next send, stored-file SHA-256
re-checked before sending) to two receivers:

* DCMTK ``storescp +tls -rc +B`` (writes every file bit-preserved);
* Orthanc with its own DICOM TLS (tests/peers/orthanc.py).

The yardstick, measured in the same run on the same files and receivers, is
DCMTK ``storescu +tls`` sending the same directory on one association (C, no
queue, no hashing).  The script prints instances/s, MiB/s and the ratio
sekisho/storescu; afterwards it checks that every instance arrived at storescp
byte for byte (dataset SHA-256).  It reports, it does not assert.

    python bench/forward_throughput.py --quick        # 100 instances
    python bench/forward_throughput.py                # 500 instances
    python bench/forward_throughput.py --instances 1000 --batch 100 --targets storescp
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pydicom.uid import generate_uid  # noqa: E402

from gateway.forward.commands import enqueue_study  # noqa: E402
from gateway.forward.queue import open_queue  # noqa: E402
from gateway.forward.worker import Forwarder  # noqa: E402
from pki import devpki  # noqa: E402
from tests.peers.orthanc import DicomTlsOptions, OrthancOptions, OrthancPeer  # noqa: E402
from tests.peers.orthanc import missing_tools as orthanc_missing  # noqa: E402
from tests.test_forward_peers import (  # noqa: E402
    ca_bundle,
    dataset_sha,
    dimse_destination,
    ingest,
    make_instance,
    open_gateway,
    received_datasets,
    sop_uid_of,
    storescp,
    write_config,
)

STORESCU = "/usr/bin/storescu"
MIB = 1024 * 1024


def generate(directory: Path, n: int, size: int) -> tuple[str, list[Path]]:
    directory.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        p = directory / f"{i:05d}.dcm"
        p.write_bytes(make_instance(study, series, i + 1, patient_id="BENCH-1", size=size))
        paths.append(p)
    return study, paths


def run_storescu(pki: devpki.DevPki, port: int, ae: str, files: Path, work: Path) -> float:
    bundle = ca_bundle(pki, work / f"storescu-ca-{port}.pem")
    cmd = [STORESCU, "+tls", str(pki.key_path("gateway-server")),
           str(pki.cert_path("gateway-server")), "+cf", str(bundle), "-aet", "SEKISHO",
           "-aec", ae, "+sd", "127.0.0.1", str(port), str(files)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True,
                          text=True, timeout=3600, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"storescu failed ({proc.returncode}): {proc.stderr[-500:]}", file=sys.stderr)
    return elapsed


def run_sekisho(config: Path, study: str, destination: str) -> float:
    gw = open_gateway(config)
    try:
        enqueue_study(gw, study, destination, "bench")

        async def drain() -> None:
            fw = Forwarder(gw)
            await gw.run(fw.prepare)
            dest = fw.destinations[destination]
            while True:  # `concurrency` workers, as `sekisho serve` runs them
                done = await asyncio.gather(
                    *(fw.run_batch(destination) for _ in range(dest.concurrency)))
                if not any(done):
                    break
            await fw.stop()

        started = time.perf_counter()
        asyncio.run(drain())
        elapsed = time.perf_counter() - started
        states = [j.state for j in open_queue(gw.settings.store.database)
                  .list_jobs(destination=destination, limit=10**6)]
        if set(states) != {"sent"}:
            print(f"warning: job states for {destination}: {sorted(set(states))}",
                  file=sys.stderr)
        return elapsed
    finally:
        gw.close()


def orthanc_peer(pki: devpki.DevPki) -> OrthancPeer:
    return OrthancPeer(OrthancOptions(
        dicom_tls=DicomTlsOptions.from_devpki(pki),
        extra_config={"DicomAlwaysAllowStore": True},
    ))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="100 instances")
    ap.add_argument("--size", type=int, default=512, help="rows = columns (512 -> 513 KiB)")
    ap.add_argument("--batch", type=int, default=100, help="instances per association")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="parallel associations of the gateway (storescp then runs --fork)")
    ap.add_argument("--targets", default="storescp,orthanc")
    ap.add_argument("--workdir", help="keep data and logs here")
    args = ap.parse_args()
    n = 100 if args.quick else args.instances
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if "orthanc" in targets and orthanc_missing():
        print(f"skipping Orthanc: missing {orthanc_missing()}")
        targets.remove("orthanc")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fwd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pki = devpki.generate(work / "pki")
        print(f"generating {n} instances of {args.size}x{args.size} ...")
        study, files = generate(work / "data", n, args.size)
        total = sum(p.stat().st_size for p in files)
        rows: list[tuple[str, str, float]] = []
        for target in targets:
            for sender in ("storescu", "sekisho"):
                recv = work / f"recv-{target}-{sender}"
                if target == "storescp":
                    fork = ("--fork",) if args.concurrency > 1 else ()
                    with storescp(pki, recv, extra=fork) as (port, _proc):
                        elapsed = measure(sender, pki, port, "DEST", work, files, study, recv,
                                          args.batch, target, args.concurrency)
                        if sender == "sekisho":
                            check(recv, files)
                else:
                    with orthanc_peer(pki) as peer:
                        elapsed = measure(sender, pki, peer.dicom_port, peer.aet, work, files,
                                          study, recv, args.batch, target, args.concurrency)
                        count = peer.statistics().get("CountInstances")
                        if count != n:
                            print(f"warning: Orthanc holds {count} of {n} instances")
                rows.append((target, sender, elapsed))
        print(f"\n{n} instances, {total / MIB:.1f} MiB, batch {args.batch}, "
              f"{args.concurrency} association(s) for sekisho, 1 for storescu; DICOM over TLS "
              "with client certificates\n")
        print(f"{'receiver':<10} {'sender':<9} {'seconds':>8} {'inst/s':>8} {'MiB/s':>8}")
        for target, sender, elapsed in rows:
            print(f"{target:<10} {sender:<9} {elapsed:>8.2f} {n / elapsed:>8.1f} "
                  f"{total / MIB / elapsed:>8.1f}")
        print()
        for target in targets:
            times = {s: e for t, s, e in rows if t == target}
            ratio = times["storescu"] / times["sekisho"]
            print(f"{target}: sekisho/storescu throughput ratio {ratio:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def measure(sender: str, pki: devpki.DevPki, port: int, ae: str, work: Path, files: list[Path],
            study: str, recv: Path, batch: int, target: str, concurrency: int) -> float:
    if sender == "storescu":
        return run_storescu(pki, port, ae, files[0].parent, work)
    gwdir = work / f"gw-{target}"
    shutil.rmtree(gwdir, ignore_errors=True)
    dest = dimse_destination("bench", pki, port, called_ae=ae,
                             extra=f"batch_size = {batch}\nconcurrency = {concurrency}")
    config = write_config(gwdir, pki, dest)
    gw = open_gateway(config)
    try:
        for p in files:
            ingest(gw, p.read_bytes())
    finally:
        gw.close()
    return run_sekisho(config, study, "bench")


def check(recv: Path, files: list[Path]) -> None:
    time.sleep(0.5)
    got = received_datasets(recv)
    expected = {sop_uid_of(p.read_bytes()): dataset_sha(p.read_bytes()) for p in files}
    same = sum(1 for uid, h in expected.items() if got.get(uid) == h)
    print(f"storescp received {len(got)} instance(s), {same}/{len(expected)} byte-identical")


if __name__ == "__main__":
    sys.exit(main())
