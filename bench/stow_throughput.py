#!/usr/bin/env python3
"""STOW-RS ingest throughput and memory: Sekisho against Orthanc, same data, same run.

Issue 2's benchmark.  It generates N 512x512 16-bit MONOCHROME2 instances
(about 512 KiB each) over a few studies, then sends the same files by STOW-RS
(PS3.18 10.5) over mutual TLS from C concurrent partners, B instances per
request, to:

* Sekisho: a demo instance (``sekisho init`` into a temporary directory, free
  loopback ports) run by ``sekisho serve`` in a child process;
* Orthanc (Debian package + DICOMweb plugin) behind nginx with
  ``ssl_verify_client on`` and the same development PKI
  (:mod:`tests.peers.orthanc`).

Each target runs twice on a fresh store, with the first N/4 instances and with
all N (the same studies, four times larger), to show whether memory stays flat
as a study grows; RSS is also sampled during the full run.  Afterwards every
target is checked: QIDO-RS counts the instances (Sekisho's partner first gets
the patients' consent with ``sekisho consent grant``) and a few instances are
retrieved by WADO-RS and compared by SHA-256 with the files sent.

It prints tables and the ratio sekisho/orthanc (target >= 1.0) and exits 0: the
benchmark reports, it does not assert.  Run from the repository root:

    python bench/stow_throughput.py --quick            # 200 instances, smoke run
    python bench/stow_throughput.py                    # 2000 instances
    python bench/stow_throughput.py --profile          # + py-spy on the Sekisho server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BENCH_ISSUER,
    MIB,
    Corpus,
    ProcessMonitor,
    StowResult,
    child_pids,
    cpu_seconds,
    file_sha256,
    generate_instances,
    grant_consent,
    init_sekisho,
    partner_ssl_context,
    peak_rss_kib,
    qido_instance_count,
    start_sekisho,
    stow_batches,
    table,
    tree_peak_rss_kib,
    wado_sha256,
)
from pki import devpki  # noqa: E402
from tests.peers.orthanc import (  # noqa: E402
    HttpsFront,
    OrthancOptions,
    OrthancPeer,
    missing_tools,
    orthanc_version,
)

#: Demo partners of ``sekisho init`` (gateway/instance.py): both may push,
#: partner-a may also query and retrieve.
PARTNER_ROLES = ("partner-valid-1", "partner-valid-2")
QUERYING_PARTNER = "partner-a"
WADO_SAMPLES = 3


@dataclass
class Run:
    target: str
    label: str
    instances: int
    stow: StowResult
    peak_rss_kib: int
    rss_quartiles_kib: tuple[int, int, int, int]
    server_cpu: float
    proxy_cpu: float
    proxy_peak_rss_kib: int
    qido_studies: int
    qido_instances: int
    wado_ok: int
    wado_checked: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=2000, help="instances in the full run")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="Sekisho HTTPS worker processes ([https] workers; default: one per core)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 200 instances")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent partners")
    p.add_argument("--batch", type=int, default=20, help="instances per STOW-RS request")
    p.add_argument("--studies", type=int, default=4, help="studies (one patient each)")
    p.add_argument("--targets", default="sekisho,orthanc", help="comma-separated: sekisho, orthanc")
    p.add_argument("--no-quarter", action="store_true", help="skip the N/4 memory-growth runs")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="full-size runs per target, alternating targets; the ratio uses the medians",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample the Sekisho server with py-spy during its full run (slows it down)",
    )
    p.add_argument("--workdir", type=Path, help="keep data and logs here instead of a temp dir")
    args = p.parse_args(argv)
    if args.quick:
        args.instances = 200
    if min(args.instances, args.concurrency, args.batch, args.repeat) < 1:
        p.error("--instances, --concurrency, --batch and --repeat must be positive")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - {"sekisho", "orthanc"}
    if unknown:
        p.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    return args


def _contexts(pki: devpki.DevPki) -> list[ssl.SSLContext]:
    anchors = [pki.cert_path("root-ca")]
    inter = [pki.cert_path("intermediate-ca")]
    return [
        partner_ssl_context(pki.cert_path(r), pki.key_path(r), anchors, inter)
        for r in PARTNER_ROLES
    ]


async def _verify(
    base_url: str, context: ssl.SSLContext, corpus: Corpus
) -> tuple[int, int, int, int]:
    """QIDO-RS count, and WADO-RS of a few instances compared by SHA-256 with the files sent."""
    studies, count = await qido_instance_count(base_url, context)
    picks = [corpus.instances[i] for i in _spread(len(corpus.instances), WADO_SAMPLES)]
    ok = 0
    for inst in picks:
        if await wado_sha256(base_url, context, inst) == file_sha256(inst.path):
            ok += 1
    return studies, count, ok, len(picks)


def _spread(n: int, k: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(min(n, k))})


def _stow(
    url: str,
    contexts: list[ssl.SSLContext],
    corpus: Corpus,
    args: argparse.Namespace,
    monitor: ProcessMonitor,
) -> StowResult:
    def progress(done: int) -> None:
        monitor.progress = done

    return asyncio.run(
        stow_batches(
            url, contexts, corpus, batch=args.batch, concurrency=args.concurrency, progress=progress
        )
    )


def _quartiles(monitor: ProcessMonitor, total: int) -> tuple[int, int, int, int]:
    q = tuple(monitor.rss_at_fraction(f, total) for f in (0.25, 0.5, 0.75, 1.0))
    return q  # type: ignore[return-value]


def run_sekisho(
    directory: Path,
    config: Path,
    ports: tuple[int, int],
    corpus: Corpus,
    label: str,
    args: argparse.Namespace,
    profile_to: Path | None,
) -> Run:
    pki = devpki.load(directory / "pki")
    contexts = _contexts(pki)
    grant_consent(config, corpus.patient_ids, QUERYING_PARTNER, BENCH_ISSUER)
    sut = start_sekisho(directory, config, *ports)
    spy: subprocess.Popen[bytes] | None = None
    try:
        if profile_to is not None:
            spy = _start_py_spy(sut.pid, profile_to)
        with ProcessMonitor(sut.pid) as monitor:
            result = _stow(sut.dicomweb_url + "/studies", contexts, corpus, args, monitor)
        if spy is not None:
            _stop_py_spy(spy)
            spy = None
        peak = tree_peak_rss_kib(sut.pid)
        studies, count, ok, checked = asyncio.run(_verify(sut.dicomweb_url, contexts[0], corpus))
    finally:
        if spy is not None:
            _stop_py_spy(spy)
        sut.stop()
        shutil.rmtree(directory / "var", ignore_errors=True)  # free the disk early
    return Run(
        "sekisho",
        label,
        len(corpus.instances),
        result,
        peak,
        _quartiles(monitor, len(corpus.instances)),
        monitor.cpu_used,
        0.0,
        0,
        studies,
        count,
        ok,
        checked,
    )


def run_orthanc(pki: devpki.DevPki, corpus: Corpus, label: str, args: argparse.Namespace) -> Run:
    contexts = _contexts(pki)
    with OrthancPeer(OrthancOptions(https=HttpsFront.from_devpki(pki))) as peer:
        assert peer.nginx_pid is not None
        workers = child_pids(peer.nginx_pid)
        proxy_cpu_start = sum(cpu_seconds(p) for p in workers)
        url = peer.https_url + peer.dicomweb_root
        with ProcessMonitor(peer.orthanc_pid) as monitor:
            result = _stow(url + "/studies", contexts, corpus, args, monitor)
        proxy_cpu = sum(cpu_seconds(p) for p in workers) - proxy_cpu_start
        proxy_peak = sum(peak_rss_kib(p) for p in [peer.nginx_pid, *workers])
        peak = peak_rss_kib(peer.orthanc_pid)
        studies, count, ok, checked = asyncio.run(_verify(url, contexts[0], corpus))
    return Run(
        "orthanc",
        label,
        len(corpus.instances),
        result,
        peak,
        _quartiles(monitor, len(corpus.instances)),
        monitor.cpu_used,
        proxy_cpu,
        proxy_peak,
        studies,
        count,
        ok,
        checked,
    )


# -- py-spy (optional) -----------------------------------------------------------
def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("  (--profile: py-spy is not installed; no profile taken)")
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "97",
            "--threads",
            "--idle",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_py_spy(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


#: Executor tasks of a STOW request (``Gateway.run`` targets) and what they do.
EXECUTOR_TASKS = {
    "FileStore.writer": "create the temporary file (mkstemp)",
    "HashingWriter.write": "SHA-256 + write of a chunk",
    "HashingWriter.finish": "fsync of the staged file",
    "index_instance": "pydicom parse and checks",
    "FileStore.commit": "rename + chmod + directory fsync",
    "SqliteMetadataStore.add_instances": "SQLite transaction (synchronous=FULL)",
    "AuditTrail.record": "audit record (hash chain)",
    "Future.set_result": "hand the result back (wakes the event loop)",
}
#: Event-loop leaf frames by activity (substring of py-spy's "function (file:line)").
LOOP_ACTIVITIES = (
    ("idle (waiting in epoll)", ("select (selectors.py",)),
    ("TLS decrypt / socket reads", ("ssl.py", "sslproto.py", "selector_events.py")),
    ("multipart parsing (aiohttp)", ("multipart.py", "streams.py")),
    ("executor hand-offs", ("thread.py", "base_events.py", "futures.py")),
)


def summarize_profile(path: Path, top: int = 8) -> str:
    """Where the server's wall-clock time goes, from py-spy ``--idle --threads`` raw stacks.

    Executor threads are attributed to the task they run (the frame called by
    ``_WorkItem.run``), so a thread blocked in fsync counts for the task that
    called fsync; the event-loop thread is split by its innermost frame.
    """
    if not path.exists():
        return "(no profile written)"
    loop: Counter[str] = Counter()
    loop_leaves: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    worker_total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if "MainThread" in frames[0]:
            leaf = frames[-1]
            name = next(
                (n for n, needles in LOOP_ACTIVITIES if any(x in leaf for x in needles)), "other"
            )
            loop[name] += count
            if name != LOOP_ACTIVITIES[0][0]:
                loop_leaves[leaf] += count
            continue
        if not any("ThreadPoolExecutor" in f for f in frames[:1]):
            continue
        worker_total += count
        for i, frame in enumerate(frames[:-1]):
            if frame.startswith("_WorkItem.run "):
                tasks[frames[i + 1].split(" (")[0]] += count
                break
    total_loop = sum(loop.values())
    if not total_loop:
        return "(profile has no samples)"
    out = [f"event loop thread ({total_loop} samples):"]
    for name, _ in (*LOOP_ACTIVITIES, ("other", ())):
        out.append(f"  {100 * loop[name] / total_loop:5.1f}%  {name}")
    out.append("  busiest event-loop frames:")
    for leaf, count in loop_leaves.most_common(top):
        out.append(f"  {100 * count / total_loop:5.1f}%    {leaf[:100]}")
    busy = sum(tasks.values())
    threads = worker_total / total_loop if total_loop else 0
    out.append(
        f"executor threads (~{threads:.0f}; busy {100 * busy / max(1, worker_total):.0f}% of "
        "their samples), wall time by task:"
    )
    for task, count in tasks.most_common():
        what = EXECUTOR_TASKS.get(task, "")
        out.append(f"  {100 * count / max(1, busy):5.1f}%  {task}  {what}")
    return "\n".join(out)


# -- report ----------------------------------------------------------------------
def _mib(kib: int) -> float:
    return kib / 1024


def report(runs: list[Run]) -> str:
    out: list[str] = []
    rows = []
    for r in runs:
        s = r.stow
        cpu = r.server_cpu + r.proxy_cpu
        rows.append(
            [
                r.target,
                r.label,
                r.instances,
                round(s.wall_seconds, 2),
                round(s.instances_per_second, 1),
                round(s.mib_per_second, 1),
                round(s.latency(0.5), 2),
                round(s.latency(0.95), 2),
                round(cpu / max(1, r.instances) * 1000, 2),
                round(_mib(r.peak_rss_kib), 1),
                f"{s.stored}/{s.failed}",
                f"{r.qido_instances}/{r.qido_studies}",
                f"{r.wado_ok}/{r.wado_checked}",
            ]
        )
    out.append(
        table(
            [
                "target",
                "run",
                "inst",
                "wall s",
                "inst/s",
                "MiB/s",
                "p50 s",
                "p95 s",
                "cpu ms/inst",
                "peak RSS MiB",
                "stored/failed",
                "QIDO inst/studies",
                "WADO sha ok",
            ],
            rows,
        )
    )
    errors = [(r.target, r.label, e) for r in runs for e in r.stow.http_errors]
    for target, label, e in errors[:10]:
        out.append(f"  ! {target} {label}: {e}")
    out.append(
        "cpu ms/inst: server CPU time per instance (Orthanc: Orthanc + nginx workers); "
        "peak RSS: VmHWM of the server process (nginx not included: "
        + ", ".join(f"{_mib(r.proxy_peak_rss_kib):.1f} MiB" for r in runs if r.target == "orthanc")
        + ")."
    )

    out.append("")
    out.append("Memory as the studies grow (RSS MiB sampled while 25/50/75/100% acknowledged):")
    mem_rows = []
    for r in runs:
        q = [round(_mib(v), 1) for v in r.rss_quartiles_kib]
        mem_rows.append([r.target, r.label, r.instances, *q, round(_mib(r.peak_rss_kib), 1)])
    out.append(table(["target", "run", "inst", "25%", "50%", "75%", "100%", "peak"], mem_rows))
    for target in ("sekisho", "orthanc"):
        by: dict[str, Run] = {}
        for r in runs:
            if r.target == target:
                by.setdefault(r.label.split("#")[0], r)
        if "quarter" in by and "full" in by:
            a, b = by["quarter"].peak_rss_kib, by["full"].peak_rss_kib
            growth = (b - a) / a * 100 if a else 0.0
            out.append(
                f"  {target}: peak RSS {_mib(a):.1f} MiB with {by['quarter'].instances} instances,"
                f" {_mib(b):.1f} MiB with {by['full'].instances} ({growth:+.1f}%)"
            )

    full: dict[str, list[Run]] = {}
    for r in runs:
        if r.label.startswith("full"):
            full.setdefault(r.target, []).append(r)
    out.append("")
    if "sekisho" in full and "orthanc" in full:

        def med(target: str, key: str) -> float:
            return statistics.median(getattr(r.stow, key) for r in full[target])

        o_ips, o_mbs = med("orthanc", "instances_per_second"), med("orthanc", "mib_per_second")
        ratio = med("sekisho", "instances_per_second") / o_ips if o_ips else 0.0
        mb_ratio = med("sekisho", "mib_per_second") / o_mbs if o_mbs else 0.0
        verdict = "meets" if ratio >= 1.0 else "below"
        of = f" (medians of {len(full['sekisho'])} runs each)" if len(full["sekisho"]) > 1 else ""
        out.append(
            f"throughput ratio sekisho/orthanc = {ratio:.2f} (instances/s), "
            f"{mb_ratio:.2f} (MiB/s){of}; target >= 1.0: {verdict}"
        )
        s_rss = max(r.peak_rss_kib for r in full["sekisho"])
        o_rss = max(r.peak_rss_kib for r in full["orthanc"])
        out.append(
            f"peak RSS ratio sekisho/orthanc = {s_rss / max(1, o_rss):.2f} "
            f"({_mib(s_rss):.1f} MiB / {_mib(o_rss):.1f} MiB)"
        )
    for r in runs:
        if r.qido_instances != r.instances or r.stow.stored != r.instances:
            out.append(
                f"WARNING: {r.target} {r.label}: sent {r.instances}, acknowledged "
                f"{r.stow.stored}, QIDO finds {r.qido_instances}"
            )
        if r.wado_ok != r.wado_checked:
            out.append(
                f"WARNING: {r.target} {r.label}: {r.wado_checked - r.wado_ok} of "
                f"{r.wado_checked} retrieved instances differ from what was sent"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "orthanc" in args.targets and missing_tools():
        print(f"Orthanc peer unavailable ({', '.join(missing_tools())}); Sekisho only.")
        args.targets = [t for t in args.targets if t != "orthanc"]
    n = args.instances
    quarter = max(1, n // 4)
    # (label, size, target order): the N/4 runs, then the full runs, alternating
    # which target goes first so that neither always gets the warmer machine.
    plan: list[tuple[str, int, list[str]]] = []
    if not args.no_quarter and quarter < n:
        plan.append(("quarter", quarter, list(args.targets)))
    for k in range(args.repeat):
        order = list(args.targets) if k % 2 == 0 else list(reversed(args.targets))
        plan.append(("full" if args.repeat == 1 else f"full#{k + 1}", n, order))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sekisho-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None
    load = os.getloadavg()
    print(
        f"STOW-RS benchmark: {n} instances, {args.concurrency} partners, {args.batch} per request,"
        f" {args.studies} studies; {os.cpu_count()} CPUs (load {load[0]:.2f}),"
        f" Python {platform.python_version()}"
        + (
            f", Orthanc {'.'.join(map(str, orthanc_version()))}"
            if "orthanc" in args.targets
            else ""
        )
    )
    try:
        started = time.monotonic()
        corpus = generate_instances(root / "data", n, studies=args.studies)
        print(
            f"generated {n} instances, {corpus.total_bytes / MIB:.0f} MiB "
            f"({corpus.total_bytes / n / 1024:.0f} KiB each) in {time.monotonic() - started:.1f}s"
        )
        # One demo instance per Sekisho run (fresh store each time); Orthanc's
        # nginx trusts the first one's development PKI.
        instances: dict[str, tuple[Path, Path, tuple[int, int]]] = {}
        if "sekisho" in args.targets:
            for label, _, _ in plan:
                d = root / f"sekisho-{label.replace('#', '-')}"
                config, https_port, monitoring_port = init_sekisho(d, workers=args.workers)
                instances[label] = (d, config, (https_port, monitoring_port))
            pki = devpki.load(next(iter(instances.values()))[0] / "pki")
        else:
            pki = devpki.generate(root / "pki")
        runs: list[Run] = []
        profile_path = root / "sekisho-full.pyspy.txt"
        for label, size, order in plan:
            part = corpus.first(size)
            for target in order:
                print(f"  {target} {label}: {size} instances ...", flush=True)
                if target == "sekisho":
                    d, config, ports = instances[label]
                    first_full = label.startswith("full") and not profile_path.exists()
                    prof = profile_path if args.profile and first_full else None
                    runs.append(run_sekisho(d, config, ports, part, label, args, prof))
                else:
                    runs.append(run_orthanc(pki, part, label, args))
                r = runs[-1]
                print(
                    f"    {r.stow.instances_per_second:.1f} inst/s, "
                    f"{r.stow.mib_per_second:.1f} MiB/s",
                    flush=True,
                )
        print()
        print(report(runs))
        load = os.getloadavg()
        print(f"load average at the end: {load[0]:.2f} (other work on the machine skews results)")
        if args.profile:
            print()
            print("Sekisho server profile (py-spy on the first full run; it slows that run):")
            print(summarize_profile(profile_path))
    finally:
        if keep:
            print(f"data and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
