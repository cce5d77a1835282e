"""C-STORE receive throughput over DICOM TLS: Sekisho against DCMTK ``storescp +tls``.

The same generated study (default 500 instances of 512x512 16-bit CT, Explicit
VR Little Endian) is sent by DCMTK ``storescu +tls`` (``TCP_NODELAY=1``) into

* DCMTK ``storescp +tls +B`` (bit-preserving, writes each file, no fsync);
* Sekisho with ``store.fsync = false`` (the like-for-like comparison);
* Sekisho with ``store.fsync = true`` (the production setting: every instance
  is fsynced with its directory and its metadata commit before the C-STORE
  response, so an acknowledged instance survives power loss; R-XCH-4/5),

in the same run, with the same maximum PDU (131072 bytes, DCMTK's largest).
Each of ``--rounds`` rounds sends a freshly generated study (new UIDs, so
Sekisho stores every instance again) to the three receivers in turn, each
send after ``sync`` so that no receiver pays for the write-back of another's
files.  It prints per round and as medians: instances/s, MB/s, server CPU
time per instance, the ratio Sekisho/storescp (target >= 0.8 for the
like-for-like case) and Sekisho's peak RSS (``VmHWM`` from
``/proc/PID/status``), which must stay flat: data sets stream to disk.

Before the timed rounds, each receiver gets one untimed warm-up study
(``--warmup`` instances, 100 by default): the first data sets a freshly
started receiver takes run slower while its process and page cache settle,
and that would weigh on a round of only a few hundred instances.

Usage: ``python bench/dimse_throughput.py [--quick] [--instances N] [--size 512]
[--rounds 3] [--warmup 100] [--no-forwarding]``.

Forwarding throughput (Sekisho -> Orthanc over DICOM TLS, through the
gateway's durable queue) is measured afterwards by running
``bench/forward_throughput.py --targets orthanc`` on the same number of
instances, against DCMTK ``storescu +tls`` sending the same files to the same
Orthanc; its table and ratio are printed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
DCMTK = Path("/usr/bin")
MAX_PDU = 131072


@dataclass
class Result:
    name: str
    seconds: float
    instances: int
    nbytes: int
    peak_rss_kib: int | None = None
    cpu_per_instance: float | None = None

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.nbytes / self.seconds / 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def generate_study(out: Path, count: int, size: int) -> int:
    """``count`` CT instances of ``size``x``size`` 16-bit; returns the total bytes."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    total = 0
    for n in range(1, count + 1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = "BENCH1", "BENCH^PATIENT"
        ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20250401", "CT", 1, n
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        path = out / f"{n:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        total += path.stat().st_size
    return total


def storescu(pki: Path, port: int, calling: str, called: str, files: Path) -> float:
    args = [
        str(DCMTK / "storescu"), "+tls", str(pki / "partner-valid-1.key.pem"),
        str(pki / "partner-valid-1.crt.pem"), "+cf", str(pki / "root-ca.crt.pem"),
        "+cf", str(pki / "intermediate-ca.crt.pem"), "-aet", calling, "-aec", called,
        "+sd", "127.0.0.1", str(port), str(files),
    ]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True,
                          env={**os.environ, "TCP_NODELAY": "1"}, timeout=3600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed: {proc.stdout}{proc.stderr}")
    return elapsed


def peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Receiver:
    """A running C-STORE SCP over TLS that the study is sent to."""

    name: str
    called_ae: str
    port: int
    pki: Path
    proc: subprocess.Popen[bytes]
    log: Any = None

    def send(self, files: Path, count: int, nbytes: int) -> Result:
        os.sync()  # nobody pays for the previous receiver's write-back
        cpu = cpu_seconds(self.proc.pid)
        seconds = storescu(self.pki, self.port, "PARTNER_A", self.called_ae, files)
        result = Result(self.name, seconds, count, nbytes, peak_rss_kib(self.proc.pid))
        result.cpu_per_instance = (cpu_seconds(self.proc.pid) - cpu) / count
        return result

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        finally:
            if self.log is not None:
                self.log.close()


def start_storescp(work: Path, pki: Path) -> Receiver:
    port = free_port()
    out = work / "storescp-out"
    out.mkdir()
    proc = subprocess.Popen(
        [str(DCMTK / "storescp"), "+tls", str(pki / "gateway-server.key.pem"),
         str(pki / "gateway-server.crt.pem"), "+cf", str(pki / "root-ca.crt.pem"),
         "+cf", str(pki / "intermediate-ca.crt.pem"), "-aet", "STORESCP",
         "-pdu", str(MAX_PDU), "+B", "-dhl", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    receiver = Receiver("storescp +tls +B", "STORESCP", port, pki, proc)
    try:
        wait_port(port)
    except BaseException:
        receiver.stop()
        raise
    return receiver


def start_sekisho(work: Path, *, fsync: bool) -> Receiver:
    inst = work / f"sekisho-fsync-{fsync}"
    port = free_port()
    sekisho = [sys.executable, "-m", "gateway.cli"]
    subprocess.run(
        [*sekisho, "init", str(inst), "--https-port", str(free_port()), "--dimse-port",
         str(port), "--monitoring-port", "0"], check=True, capture_output=True, cwd=ROOT,
    )
    config = inst / "sekisho.toml"
    text = config.read_text().replace("fsync = true", f"fsync = {'true' if fsync else 'false'}")
    config.write_text(text.replace('level = "INFO"', 'level = "WARNING"'))
    log = open(inst / "serve.log", "wb")  # noqa: SIM115 - closed by Receiver.stop
    proc = subprocess.Popen([*sekisho, "serve", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    receiver = Receiver(f"Sekisho (fsync={'on' if fsync else 'off'})", "SEKISHO", port,
                        inst / "pki", proc, log)
    try:
        wait_port(port)
    except BaseException:
        receiver.stop()
        raise
    return receiver


def measure_forwarding_to_orthanc(count: int) -> list[str]:
    """The summary lines of ``bench/forward_throughput.py --targets orthanc``."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "forward_throughput.py"), "--targets", "orthanc",
         "--instances", str(count)],
        capture_output=True, text=True, cwd=ROOT, timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        return [f"forward_throughput.py failed ({proc.returncode}):", *lines[-5:],
                *proc.stderr.splitlines()[-5:]]
    start = next((i for i, line in enumerate(lines) if line.startswith("receiver")), 0)
    return lines[max(0, start - 1):]


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 instances of 256x256")
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="fresh study per round; medians")
    parser.add_argument("--warmup", type=int, default=100,
                        help="instances of the untimed warm-up study (0: none)")
    parser.add_argument("--no-forwarding", action="store_true",
                        help="skip the forwarding measurement (Sekisho -> Orthanc)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    count, size = (100, 256) if args.quick else (args.instances, args.size)
    work = Path(tempfile.mkdtemp(prefix="sekisho-bench-dimse-"))
    receivers: list[Receiver] = []
    try:
        # The PKI of the first Sekisho instance serves storescp too (same CA).
        off = start_sekisho(work, fsync=False)
        receivers.append(off)
        scp = start_storescp(work, off.pki)
        receivers.append(scp)
        durable = start_sekisho(work, fsync=True)
        receivers.append(durable)
        results: dict[str, list[Result]] = {r.name: [] for r in (scp, off, durable)}
        if args.warmup:
            files = work / "warmup"
            warm_bytes = generate_study(files, args.warmup, size)
            for receiver in (scp, off, durable):
                receiver.send(files, args.warmup, warm_bytes)
            shutil.rmtree(files)
        nbytes = 0
        for n in range(1, args.rounds + 1):
            files = work / f"study-{n}"
            nbytes = generate_study(files, count, size)
            for receiver in (scp, off, durable):
                results[receiver.name].append(receiver.send(files, count, nbytes))
            shutil.rmtree(files)
            print(f"round {n}: " + ", ".join(
                f"{name} {rs[-1].per_second:.0f} inst/s" for name, rs in results.items()
            ) + f"; ratio (fsync off) "
                f"{results[off.name][-1].per_second / results[scp.name][-1].per_second:.2f}")
        print(f"study: {count} instances of {size}x{size} 16-bit, {nbytes / 1e6:.1f} MB, "
              f"max PDU {MAX_PDU}, storescu +tls, TCP_NODELAY=1; medians of {args.rounds} "
              f"round(s) after a warm-up of {args.warmup}")
        for name, rs in results.items():
            rss = rs[-1].peak_rss_kib
            print(f"  {name:24} {median([r.seconds for r in rs]):7.2f} s  "
                  f"{median([r.per_second for r in rs]):7.1f} inst/s  "
                  f"{median([r.mb_per_second for r in rs]):7.1f} MB/s  "
                  f"CPU {median([(r.cpu_per_instance or 0) * 1e3 for r in rs]):5.2f} ms/inst  "
                  f"peak RSS {f'{rss / 1024:.0f} MiB' if rss else '?'}")
        ratios = {
            key: [
                o.per_second / s.per_second
                for o, s in zip(results[name], results[scp.name], strict=True)
            ]
            for key, name in (("off", off.name), ("on", durable.name))
        }
        print(f"ratio Sekisho/storescp (fsync off, like for like): {median(ratios['off']):.2f}  "
              f"(target >= 0.8; rounds: {', '.join(f'{r:.2f}' for r in ratios['off'])})")
        print(f"ratio Sekisho/storescp (fsync on, durable):        {median(ratios['on']):.2f}  "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios['on'])})")
        print(f"Sekisho peak RSS (VmHWM): {results[off.name][-1].peak_rss_kib} KiB (fsync off), "
              f"{results[durable.name][-1].peak_rss_kib} KiB (fsync on)")
        if not args.no_forwarding:
            print(f"forwarding to Orthanc over DICOM TLS ({count} instances, "
                  "bench/forward_throughput.py):")
            for line in measure_forwarding_to_orthanc(count):
                print(f"  {line}")
    finally:
        for receiver in receivers:
            receiver.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
