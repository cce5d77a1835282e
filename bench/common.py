"""Helpers shared by Sekisho's benchmarks (STYLE: a benchmark prints a ratio
against a peer measured in the same run; it reports, it does not assert).

* :func:`generate_instances`: synthetic PS3.10 files (16-bit MONOCHROME2 CT
  images) spread over a few studies, written once and reused for every target;
* :func:`stow_batches`: STOW-RS (PS3.18 10.5) over mutual TLS from several
  concurrent partners, each with its own client certificate and keep-alive
  connection;
* :func:`qido_instance_count`, :func:`wado_sha256`: correctness checks after a run;
* :class:`ProcessMonitor`: RSS, peak RSS (``VmHWM``) and CPU time of server
  processes from ``/proc`` (no psutil);
* :func:`start_sekisho`: a demo instance (``sekisho init``) served by
  ``sekisho serve`` in a child process, stopped by its pid;
* :func:`table`: plain-text result tables.

Run benchmarks from the repository root; they put it on ``sys.path`` so that
``bench.common`` and ``tests.peers`` import.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from pki.tls import TlsEndpointSettings, client_context
from tests.peers import ManagedProcess, PeerStartError, free_port, wait_until

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
#: UID root for generated data (the pydicom root + a Sekisho-bench suffix).
UID_PREFIX = "1.2.826.0.1.3680043.8.498.7711."
BENCH_ISSUER = "SEKISHO-BENCH"
MIB = 1024 * 1024

__all__ = [
    "Corpus",
    "GeneratedInstance",
    "PeerStartError",
    "ProcessMonitor",
    "SekishoUnderTest",
    "StowResult",
    "child_pids",
    "cpu_seconds",
    "file_sha256",
    "generate_instances",
    "grant_consent",
    "init_sekisho",
    "multipart_related",
    "partner_ssl_context",
    "peak_rss_kib",
    "qido_instance_count",
    "rss_kib",
    "start_sekisho",
    "stow_batches",
    "table",
    "wado_sha256",
]


# -- synthetic instances -------------------------------------------------------
@dataclass(frozen=True)
class GeneratedInstance:
    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    size: int


@dataclass(frozen=True)
class Corpus:
    root: Path
    instances: tuple[GeneratedInstance, ...]

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.instances)

    @property
    def patient_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i.patient_id for i in self.instances))

    def first(self, n: int) -> Corpus:
        return Corpus(self.root, self.instances[:n])


def generate_instances(
    out_dir: Path,
    count: int,
    *,
    studies: int = 4,
    series_per_study: int = 2,
    rows: int = 512,
    columns: int = 512,
    seed: int = 7,
) -> Corpus:
    """Write ``count`` 16-bit MONOCHROME2 CT instances (about rows*columns*2 bytes each).

    Instances are dealt to ``studies`` studies in contiguous blocks (one patient
    per study) so that a prefix of the corpus is a smaller version of the same
    studies.  Every instance has its own pixel noise: no two files are equal.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns]
    phantom = ((xx - columns / 2) ** 2 + (yy - rows / 2) ** 2) < (min(rows, columns) / 2.5) ** 2
    base = (phantom * 1000 + 24).astype(np.uint16)
    studies = max(1, min(studies, count))
    per_study = -(-count // studies)
    layout = [
        (generate_uid(UID_PREFIX), [generate_uid(UID_PREFIX) for _ in range(series_per_study)])
        for _ in range(studies)
    ]
    made: list[GeneratedInstance] = []
    for n in range(count):
        s, k = divmod(n, per_study)
        study_uid, series_uids = layout[s]
        series_uid = series_uids[k % series_per_study]
        pid = f"BENCH{s + 1:04d}"
        sop_uid = generate_uid(UID_PREFIX)
        noise = rng.integers(0, 64, size=(rows, columns), dtype=np.uint16)
        ds = _ct_dataset(
            pid,
            s,
            study_uid,
            series_uid,
            k % series_per_study + 1,
            sop_uid,
            k + 1,
            (base + noise).tobytes(),
            rows,
            columns,
        )
        path = out_dir / f"{n:06d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        made.append(
            GeneratedInstance(path, pid, study_uid, series_uid, sop_uid, path.stat().st_size)
        )
    return Corpus(out_dir, tuple(made))


def _ct_dataset(
    pid: str,
    study_no: int,
    study_uid: str,
    series_uid: str,
    series_no: int,
    sop_uid: str,
    instance_no: int,
    pixels: bytes,
    rows: int,
    columns: int,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20260401"
    ds.StudyTime = "090000"
    ds.AccessionNumber = f"BENCHACC{study_no + 1:04d}"
    ds.Modality = "CT"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Sekisho STOW benchmark"
    ds.SeriesDescription = f"synthetic series {series_no}"
    ds.PatientName = f"BENCH^PATIENT{study_no + 1}"
    ds.PatientID = pid
    ds.IssuerOfPatientID = BENCH_ISSUER
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{study_no + 1}"
    ds.SeriesNumber = series_no
    ds.InstanceNumber = instance_no
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = pixels
    return ds


# -- STOW-RS client ----------------------------------------------------------------
def partner_ssl_context(
    certificate: Path,
    private_key: Path,
    anchors: Sequence[Path],
    intermediates: Sequence[Path] = (),
) -> ssl.SSLContext:
    """A partner's client context, built by the project's one TLS factory."""
    return client_context(
        TlsEndpointSettings(
            certificate=certificate,
            private_key=private_key,
            trust_anchors=tuple(anchors),
            intermediates=tuple(intermediates),
        )
    )


def multipart_related(paths: Sequence[Path]) -> tuple[bytes, str]:
    """A STOW-RS request body (PS3.18 8.6.1.2) and its Content-Type."""
    boundary = "sekisho-bench-" + secrets.token_hex(12)
    chunks: list[bytes] = []
    for p in paths:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks.append(p.read_bytes())
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return b"".join(chunks), content_type


@dataclass
class StowResult:
    instances: int = 0
    bytes: int = 0
    wall_seconds: float = 0.0
    requests: int = 0
    stored: int = 0
    failed: int = 0
    http_errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def mib_per_second(self) -> float:
        return self.bytes / MIB / self.wall_seconds if self.wall_seconds else 0.0

    def latency(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q * 100) - 1]


def _count_sequence(body: object, tag: str) -> int:
    if not isinstance(body, dict):
        return 0
    seq = body.get(tag) or {}
    return len(seq.get("Value") or []) if isinstance(seq, dict) else 0


async def stow_batches(
    url: str,
    contexts: Sequence[ssl.SSLContext],
    corpus: Corpus,
    *,
    batch: int,
    concurrency: int,
    progress: Callable[[int], None] | None = None,
    timeout: float = 600.0,
) -> StowResult:
    """Send ``corpus`` to ``url`` by STOW-RS, ``batch`` instances per request.

    ``concurrency`` partners work in parallel, partner ``i`` with
    ``contexts[i % len(contexts)]`` over one keep-alive connection.  Request
    bodies are read from disk in a thread so that the client's event loop
    keeps sending while the next body is read.
    """
    batches = [
        [i.path for i in corpus.instances[k : k + batch]]
        for k in range(0, len(corpus.instances), batch)
    ]
    queue: asyncio.Queue[list[Path]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    result = StowResult(instances=len(corpus.instances), bytes=corpus.total_bytes)
    done = 0

    async def partner(n: int) -> None:
        nonlocal done
        connector = aiohttp.TCPConnector(ssl=contexts[n % len(contexts)], limit=1)
        client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            while True:
                try:
                    paths = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body, content_type = await asyncio.to_thread(multipart_related, paths)
                started = time.perf_counter()
                result.requests += 1
                try:
                    async with session.post(
                        url,
                        data=body,
                        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
                    ) as resp:
                        text = await resp.text()
                        status = resp.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    result.http_errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                finally:
                    del body
                result.latencies.append(time.perf_counter() - started)
                try:
                    doc = json.loads(text) if text else {}
                except ValueError:
                    doc = {}
                result.stored += _count_sequence(doc, "00081199")
                result.failed += _count_sequence(doc, "00081198")
                if status not in (200, 202):
                    result.http_errors.append(f"HTTP {status}: {text[:200]}")
                done += len(paths)
                if progress is not None:
                    progress(done)

    started = time.perf_counter()
    await asyncio.gather(*(partner(n) for n in range(concurrency)))
    result.wall_seconds = time.perf_counter() - started
    return result


async def qido_instance_count(base_url: str, context: ssl.SSLContext) -> tuple[int, int]:
    """(studies, instances) visible by QIDO-RS ``/studies`` (NumberOfStudyRelatedInstances)."""
    connector = aiohttp.TCPConnector(ssl=context, limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(
            f"{base_url}/studies",
            params={"includefield": "00201208", "limit": "1000"},
            headers={"Accept": "application/dicom+json"},
        ) as resp:
            if resp.status == 204:
                return 0, 0
            resp.raise_for_status()
            studies = await resp.json(content_type=None)
    total = 0
    for study in studies:
        values = (study.get("00201208") or {}).get("Value") or [0]
        total += int(values[0])
    return len(studies), total


async def wado_sha256(
    base_url: str, context: ssl.SSLContext, instance: GeneratedInstance
) -> str | None:
    """SHA-256 of the one part of a WADO-RS instance retrieval (None if not 200)."""
    url = (
        f"{base_url}/studies/{instance.study_uid}/series/{instance.series_uid}"
        f"/instances/{instance.sop_uid}"
    )
    connector = aiohttp.TCPConnector(ssl=context, limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(
            url, headers={"Accept": 'multipart/related; type="application/dicom"'}
        ) as resp:
            if resp.status != 200:
                return None
            reader = aiohttp.MultipartReader.from_response(resp)
            part = await reader.next()
            if part is None:
                return None
            h = hashlib.sha256()
            while chunk := await part.read_chunk(MIB):  # type: ignore[union-attr]
                h.update(chunk)
            return h.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- processes: memory and CPU from /proc ---------------------------------------------
def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (for example nginx's workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size (``VmHWM``) since the process started."""
    return _status_kib(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (``/proc/PID/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class ProcessMonitor:
    """Samples a process's RSS in a thread, tagging samples with a progress count."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.progress = 0
        self.samples: list[tuple[float, int, int]] = []  # (time, progress, rss KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self.cpu_start = 0.0
        self.cpu_end = 0.0

    def __enter__(self) -> ProcessMonitor:
        self.cpu_start = sum(cpu_seconds(p) for p in tree_pids(self.pid))
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_end = sum(cpu_seconds(p) for p in tree_pids(self.pid))
        self._sample()

    def _sample(self) -> None:
        rss = sum(rss_kib(p) for p in tree_pids(self.pid))
        self.samples.append((time.monotonic(), self.progress, rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def cpu_used(self) -> float:
        return self.cpu_end - self.cpu_start

    def rss_at_fraction(self, fraction: float, total: int) -> int:
        """Largest RSS sampled before ``fraction`` of ``total`` was acknowledged."""
        limit = fraction * total
        values = [rss for _, done, rss in self.samples if done <= limit]
        return max(values) if values else 0


# -- Sekisho under test ---------------------------------------------------------
@dataclass
class SekishoUnderTest:
    directory: Path
    config: Path
    https_port: int
    monitoring_port: int
    process: ManagedProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def dicomweb_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}/dicomweb"

    def stop(self) -> None:
        self.process.stop(timeout=30)


def sekisho_command() -> list[str]:
    exe = shutil.which("sekisho")
    return [exe] if exe else [sys.executable, "-m", "gateway.cli"]


def tree_pids(pid: int) -> list[int]:
    """A process and its direct children (Sekisho's HTTPS worker processes)."""
    return [pid, *child_pids(pid)]


def tree_peak_rss_kib(pid: int) -> int:
    """Sum of the peak RSS of a process and its direct children."""
    return sum(peak_rss_kib(p) for p in tree_pids(pid))


def init_sekisho(
    directory: Path, *, dimse: bool = False, workers: int = 1
) -> tuple[Path, int, int]:
    """A demo instance (``gateway.instance.init_instance``) on free loopback ports.

    The DIMSE listener is switched off unless ``dimse`` is true: DICOMweb
    benchmarks do not use it, and it is one process fewer competing for CPU.
    """
    from gateway.instance import init_instance

    https_port, dimse_port, monitoring_port = free_port(), free_port(), free_port()
    result = init_instance(
        directory, https_port=https_port, dimse_port=dimse_port, monitoring_port=monitoring_port
    )
    if not dimse:
        _set_dimse_enabled(result.config, False)
    if workers != 1:
        text = result.config.read_text()
        text = re.sub(r"(?m)^workers = 1\b", f"workers = {workers}", text, count=1)
        result.config.write_text(text)
    return result.config, https_port, monitoring_port


def _set_dimse_enabled(config: Path, enabled: bool) -> None:
    """Set ``[dimse] enabled`` in a generated configuration, keeping its comments."""
    lines = config.read_text().splitlines(keepends=True)
    section = ""
    for n, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped.strip("[]").strip()
        elif section == "dimse" and re.match(r"enabled\s*=", stripped):
            lines[n] = f"enabled = {'true' if enabled else 'false'}\n"
            config.write_text("".join(lines))
            return


def grant_consent(config: Path, patient_ids: Iterable[str], partner: str, issuer: str) -> None:
    """``sekisho consent grant`` for each patient, as a hospital operator would."""
    for pid in patient_ids:
        subprocess.run(
            [
                *sekisho_command(),
                "consent",
                "grant",
                pid,
                "--issuer",
                issuer,
                "--partner",
                partner,
                "--by",
                "bench",
                "--config",
                str(config),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def start_sekisho(
    directory: Path, config: Path, https_port: int, monitoring_port: int, timeout: float = 60
) -> SekishoUnderTest:
    """``sekisho serve`` in a child process; returns once /healthz answers."""
    proc = ManagedProcess(
        "sekisho serve",
        [*sekisho_command(), "serve", "--config", config],
        directory / "serve.log",
        cwd=directory,
    )
    sut = SekishoUnderTest(directory, config, https_port, monitoring_port, proc)

    def healthy() -> bool:
        if not proc.alive():
            raise proc.fail("exited during start-up")
        try:
            url = f"http://127.0.0.1:{monitoring_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
                return resp.status == 200
        except OSError:
            return False

    try:
        if not wait_until(healthy, timeout, 0.2):
            raise proc.fail("did not become healthy")
    except BaseException:
        proc.stop()
        raise
    return sut


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = []
        for i, c in enumerate(row):
            numeric = n > 0 and _is_number(c)
            parts.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%x"))
        return True
    except ValueError:
        return False
