#!/usr/bin/env python3
"""PDI media import: time against ``cp -r`` + ``sha256sum`` of the same medium, and peak RSS.

Issue 4's benchmark (R-PDI, STYLE: a ratio against a peer measured in the same
run; it reports, it does not assert).  It

1. generates a medium of N CT instances (512x512, 16-bit, about 512 KiB each,
   every one with its own pixel noise) in PS3.10 names
   (``DICOM/STxxxxxx/SExxxxxx/IMxxxxxx``, 100 per series) and a DICOMDIR
   written by DCMTK ``dcmmkdir``;
2. measures the peer: ``cp -r MEDIUM COPY`` then ``sha256sum`` of every copied
   file, i.e. the least any importer must do (copy and hash once);
3. imports the whole medium into a fresh demo instance (``sekisho init``)
   with ``sekisho media import`` in a child process, which reports its own
   peak RSS (``VmHWM``) when done; the scanner is clamd if a socket is given
   or answers at the Debian default, else none;
4. repeats 3 with a medium a tenth the size, to show whether memory stays flat
   as the medium grows.

With ``--repeat N`` steps 2 and 3 run N times per medium (a fresh instance
each time, peer and import alternating) and the summary gives the median
ratio with its range: on a shared machine one pair can be off by a factor.

Target: import time <= 2x the peer.  Run from the repository root::

    python bench/pdi_import.py --quick      # 100 instances (+ 10 for the flatness check)
    python bench/pdi_import.py              # 1000 instances, about 500 MB
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmwrite

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.media_factory import DOE_ASCII, SeriesSpec, StudySpec, make_instance  # noqa: E402

ROWS = COLUMNS = 512
PER_SERIES = 100
DEFAULT_CLAMD = "/run/clamav/clamd.ctl"


def generate_medium(root: Path, count: int, seed: int = 11) -> int:
    """Write ``count`` instances and a DCMTK DICOMDIR; returns the bytes of instance files."""
    study = StudySpec(DOE_ASCII, [SeriesSpec("CT", 1)], "BENCH", "A9001")
    template_uid = "1.2.826.0.1.3680043.10.1234.9.1000000000"
    template_series = "1.2.826.0.1.3680043.10.1234.8.100000"
    study.series[0].uid = template_series
    ds = make_instance(study, study.series[0], 1, 1, sop_instance_uid=template_uid)
    ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit = ROWS, COLUMNS, 16, 15
    pixels = ROWS * COLUMNS * 2
    ds.PixelData = b"\0" * pixels
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    assert data.endswith(b"\0" * pixels)
    head = data[:-pixels]
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        series = i // PER_SERIES
        folder = root / "DICOM" / f"ST{series // 100 + 1:06d}" / f"SE{series % 100 + 1:06d}"
        if i % PER_SERIES == 0:
            folder.mkdir(parents=True, exist_ok=True)
        sop = f"1.2.826.0.1.3680043.10.1234.9.{1000000001 + i}".encode()
        ser = f"1.2.826.0.1.3680043.10.1234.8.{100001 + series}".encode()
        header = head.replace(template_uid.encode(), sop).replace(template_series.encode(), ser)
        noise = rng.integers(0, 4096, size=ROWS * COLUMNS, dtype=np.uint16).tobytes()
        path = folder / f"IM{i % PER_SERIES + 1:06d}"
        path.write_bytes(header + noise)
        total += len(header) + len(noise)
    cmd = ["dcmmkdir", "-Pgp", "+r", "+id", str(root), "+D", str(root / "DICOMDIR"), "DICOM"]
    subprocess.run(cmd, check=True, capture_output=True)
    return total


def peer_seconds(medium: Path, work: Path) -> float:
    """``cp -r`` then ``sha256sum`` of every copied file (the minimal import)."""
    copy = work / "peer-copy"
    shutil.rmtree(copy, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(medium), str(copy)], check=True)
    files = sorted(str(p) for p in copy.rglob("*") if p.is_file())
    subprocess.run(["sha256sum", *files], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    shutil.rmtree(copy, ignore_errors=True)
    return elapsed


def clamd_socket(requested: str | None) -> str | None:
    from media.scanner import ClamdScanner

    candidate = requested or (DEFAULT_CLAMD if os.path.exists(DEFAULT_CLAMD) else None)
    if candidate is None:
        return None
    try:
        return candidate if ClamdScanner(candidate, timeout=5).ping() else None
    except Exception:  # noqa: BLE001 - not running: benchmark without it
        if requested:
            raise
        return None


def new_instance(work: Path, name: str, socket: str | None, fsync: bool) -> Path:
    from tests.gateway_helpers import create_instance

    inst = create_instance(work / name)
    scanner = (
        {"kind": "clamd", "socket": socket, "required": True}
        if socket
        else {"kind": "none", "required": False}
    )
    inst.update_config({"media": {"scanner": scanner}, "store": {"fsync": fsync}})
    return inst.config


def child_import(config: str, medium: str) -> int:
    """Runs in the child: the import itself, then this process's peak RSS as JSON."""
    from gateway.cli import main

    started = time.perf_counter()
    code = main(
        [
            "media",
            "import",
            medium,
            "--config",
            config,
            "--operator",
            "bench01",
            "--operator-name",
            "Bench^Operator",
            "--patient-id",
            "BENCH0001",
            "--select",
            "patient:1",
            "--no-progress",
            "--json",
        ]
    )
    elapsed = time.perf_counter() - started
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"code": code, "seconds": elapsed, "vmhwm_kib": hwm}), file=sys.stderr)
    return code


def run_import(config: Path, medium: Path) -> dict[str, float]:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(config), str(medium)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"import failed ({proc.returncode}):\n{err[-3000:]}")
    stats = json.loads(err.strip().splitlines()[-1])
    record = json.loads(out)["record"]
    return {
        "wall": wall,
        "in_process": stats["seconds"],
        "vmhwm_mib": stats["vmhwm_kib"] / 1024,
        "instances": record["instance_count"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 instances")
    parser.add_argument("--count", type=int, help="instances (default 1000, 100 with --quick)")
    parser.add_argument("--clamd", help="clamd socket (default: Debian's, if it answers)")
    parser.add_argument("--no-fsync", action="store_true", help="store.fsync = false")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--repeat", type=int, default=1, help="peer/import pairs per medium")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "MEDIUM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_import(*args.child)

    count = args.count or (100 if args.quick else 1000)
    small = max(10, count // 10)
    socket = clamd_socket(args.clamd)
    work = Path(tempfile.mkdtemp(prefix="sekisho-bench-pdi-"))
    try:
        print(f"python {platform.python_version()}, {os.cpu_count()} CPU(s), work {work}")
        results = []
        for n in (small, count):
            medium = work / f"medium-{n}"
            t = time.perf_counter()
            size = generate_medium(medium, n)
            print(
                f"medium of {n} instances, {size / 2**20:.0f} MiB, written with DICOMDIR "
                f"in {time.perf_counter() - t:.1f}s"
            )
            for r in range(max(1, args.repeat)):
                peer = peer_seconds(medium, work)
                config = new_instance(work, f"sekisho-{n}-{r}", socket, not args.no_fsync)
                got = run_import(config, medium)
                if got["instances"] != n:
                    raise SystemExit(f"imported {got['instances']} of {n} instances")
                results.append((n, size, peer, got))
        print()
        print(
            f"scanner: {'clamd at ' + socket if socket else 'none (NullScanner)'}; "
            f"store fsync: {not args.no_fsync}"
        )
        header = (
            f"{'instances':>9} {'MiB':>6} {'cp+sha256sum s':>15} {'import s':>9} "
            f"{'(in process)':>12} {'ratio':>6} {'MB/s':>7} {'peak RSS MiB':>13}"
        )
        print(header)
        for n, size, peer, got in results:
            print(
                f"{n:>9} {size / 2**20:>6.0f} {peer:>15.2f} {got['wall']:>9.2f} "
                f"{got['in_process']:>12.2f} {got['wall'] / peer:>6.2f} "
                f"{size / 1e6 / got['wall']:>7.1f} {got['vmhwm_mib']:>13.1f}"
            )
        ratios = sorted(g["wall"] / p for m, _s, p, g in results if m == count)
        spread = f" (range {ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        rss = {m: max(g["vmhwm_mib"] for k, _s, _p, g in results if k == m) for m in (small, count)}
        print(
            f"\nimport / (cp -r + sha256sum) = {statistics.median(ratios):.2f}x{spread} "
            f"(target <= 2x); peak RSS {rss[small]:.0f} MiB at {small} instances, "
            f"{rss[count]:.0f} MiB at {count}"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
