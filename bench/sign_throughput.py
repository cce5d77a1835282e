#!/usr/bin/env python3
"""DICOM signing + RFC 3161 timestamp throughput: Sekisho against DCMTK dcmsign, same run.

Issue 5's benchmark.  It generates N 512x512 16-bit MONOCHROME2 CT objects
(about 512 KiB each) and signs every one of them with a PS3.15 Annex C
Digital Signature (SHA-256 MAC, RSA-2048, purpose "Author's Signature") plus a
Certified Timestamp from the same loopback TSA, through:

* Sekisho: the signing library as a digitization session uses it (one
  PKCS#12 development signer opened once, the signer checked once against
  the HPKI policy: hcRole, nonRepudiation, chain, CRL), then per object
  ``signing.dicom_sig.sign_dataset`` with a ``signing.tsa.TsaClient`` (every
  token's nonce, imprint, CMS signature and TSA chain checked) and an atomic,
  fsynced write; objects run concurrently on one event loop;
* DCMTK: per object ``dcmsign +s KEY CERT -pw +m2 +sp 1 +ts Q.tsq UID.dcm``
  (signature plus timestamp query), an HTTP POST of the query to the TSA, and
  ``dcmsign +t Q.tsq R.tsr UID.dcm`` to insert the token; the same number of
  objects in flight, from a thread pool.

The TSA is :class:`gateway.signatures.devtsa.DevTsa` (``openssl ts -reply``
behind HTTP on 127.0.0.1) with the development PKI's TSA key: both targets pay
the same TSA.  The first output of each target is checked with
``dcmsign --verify +tr``.  Finally ``openssl speed -seconds 3 rsa2048`` gives
the machine's RSA-2048 signatures per second on one core: each object costs two
(the signer's and the TSA's), which bounds what any implementation can reach.

It prints a table and the ratio sekisho/dcmsign (target >= 1.0) and exits 0:
the benchmark reports, it does not assert.  Run from the repository root::

    python bench/sign_throughput.py --quick          # 20 objects
    python bench/sign_throughput.py                  # 200 objects
    python bench/sign_throughput.py --repeat 3       # medians of three runs per target
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from bench.common import generate_instances, table  # noqa: E402
from gateway.signatures.devtsa import DevTsa  # noqa: E402
from pki import devpki  # noqa: E402
from signing.dicom_sig import sign_dataset  # noqa: E402
from signing.policy import RecordPolicy, check_signer  # noqa: E402
from signing.signers import SignerSpec, open_signer  # noqa: E402
from signing.trust import RevocationMode, TrustConfig  # noqa: E402
from signing.tsa import TsaClient  # noqa: E402

SIGNER = "hpki-signer"
POLICY = RecordPolicy(
    record_type="digitized-film",
    hpki_role_required=True,
    allowed_roles=frozenset({"Medical Doctor"}),
    timestamp_required=True,
)


@dataclass
class RunResult:
    target: str
    objects: int
    seconds: float
    cpu_seconds: float  # this process and its children (dcmsign, openssl ts)

    @property
    def rate(self) -> float:
        return self.objects / self.seconds

    @property
    def cpu_ms_per_object(self) -> float:
        return 1000 * self.cpu_seconds / self.objects


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(target: str, n: int, work: Callable[[], None]) -> RunResult:
    cpu0, t0 = _cpu(), time.perf_counter()
    work()
    return RunResult(target, n, time.perf_counter() - t0, _cpu() - cpu0)


# -- Sekisho ---------------------------------------------------------------------
def _write_atomically(path: Path, data: bytes) -> None:
    """What ``sekisho sign`` does: temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _encode(ds: pydicom.Dataset) -> bytes:
    import io

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


async def _sekisho_session(
    files: Sequence[Path], out: Path, pki: devpki.DevPki, trust: TrustConfig, tsa_url: str,
    concurrency: int,
) -> None:  # fmt: skip
    spec = SignerSpec(
        kind="pkcs12",
        pkcs12=pki.p12_path(SIGNER),
        password_file=pki.root / pki.entry(SIGNER)["p12_pass"],
    )
    tsa = TsaClient(tsa_url, trust, timeout=60)
    gate = asyncio.Semaphore(concurrency)
    async with await open_signer(spec) as signer:
        now = datetime.now(UTC)
        check = await check_signer(POLICY, signer.certificate, now, trust.signer_context(now))
        check.raise_if_refused()

        async def one(path: Path) -> None:
            async with gate:
                ds = await asyncio.to_thread(pydicom.dcmread, path)
                signed = await sign_dataset(ds, signer, POLICY.dicom_profile, "1", tsa)
                data = await asyncio.to_thread(_encode, signed)
                await asyncio.to_thread(_write_atomically, out / path.name, data)

        await asyncio.gather(*(one(p) for p in files))


def run_sekisho(files, out, pki, trust, tsa_url, concurrency) -> RunResult:  # noqa: ANN001
    out.mkdir(parents=True, exist_ok=True)
    return _measure(
        "sekisho",
        len(files),
        lambda: asyncio.run(_sekisho_session(files, out, pki, trust, tsa_url, concurrency)),
    )


# -- DCMTK dcmsign -----------------------------------------------------------------
def _post(url: str, body: bytes) -> bytes:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/timestamp-query"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback TSA
        return resp.read()


def _dcmsign_one(dcmsign: str, pki: devpki.DevPki, tsa_url: str, src: Path, out: Path) -> None:
    stem = out.with_suffix("")
    pending, tsq, uid, tsr = (Path(f"{stem}.{x}") for x in ("pending", "tsq", "uid", "tsr"))
    key, cert = pki.key_path(SIGNER), pki.cert_path(SIGNER)
    subprocess.run(
        [dcmsign, "-q", "+s", str(key), str(cert), "-pw", "+m2", "+sp", "1",
         "+ts", str(tsq), str(uid), str(src), str(pending)],
        check=True, capture_output=True,
    )  # fmt: skip
    tsr.write_bytes(_post(tsa_url, tsq.read_bytes()))
    subprocess.run(
        [dcmsign, "-q", "+t", str(tsq), str(tsr), str(uid), str(pending), str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    for path in (pending, tsq, uid, tsr):
        path.unlink()


def run_dcmsign(files, out, pki, tsa_url, concurrency) -> RunResult:  # noqa: ANN001
    dcmsign = shutil.which("dcmsign")
    if dcmsign is None:
        raise SystemExit("DCMTK dcmsign is not installed")
    out.mkdir(parents=True, exist_ok=True)

    def work() -> None:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = [
                pool.submit(_dcmsign_one, dcmsign, pki, tsa_url, p, out / p.name) for p in files
            ]
            for future in futures:
                future.result()

    return _measure("dcmsign", len(files), work)


# -- checks and the ceiling --------------------------------------------------------
def dcmsign_accepts(path: Path, pki: devpki.DevPki) -> bool:
    cmd = ["dcmsign", "--verify", "+rg", "+tr"]
    for role in ("hpki-root-ca", "root-ca"):
        cmd += ["+cf", str(pki.cert_path(role))]
    return subprocess.run([*cmd, str(path)], capture_output=True).returncode == 0


def openssl_rsa2048_signs_per_second(seconds: int = 3) -> float | None:
    proc = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), "rsa2048"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    match = re.search(r"^rsa\s+2048 bits\s+\S+s\s+\S+s\s+([\d.]+)", proc.stdout, re.MULTILINE)
    return float(match.group(1)) if match else None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="20 objects")
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=4, help="objects in flight, both targets")
    ap.add_argument("--repeat", type=int, default=1, help="runs per target (medians reported)")
    ap.add_argument("--workdir", help="keep data here (default: a temporary directory)")
    args = ap.parse_args(argv)
    n = 20 if args.quick else args.objects
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="sekisho-sign-bench-")
    work = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}; {n} objects, concurrency {args.concurrency}"
    )
    try:
        corpus = generate_instances(work / "in", n, rows=512, columns=512)
        files = [i.path for i in corpus.instances]
        pki = devpki.generate(work / "pki")
        trust = TrustConfig.from_paths(
            signer_anchors=pki.trust_anchor_paths("hpki"),
            tsa_anchors=pki.trust_anchor_paths("tsa"),
            crls=[pki.crl_path(r, der=True) for r in ("root-ca", "hpki-root-ca")],
            revocation=RevocationMode.HARD_FAIL,
        )
        results: dict[str, list[RunResult]] = {"sekisho": [], "dcmsign": []}
        with DevTsa(pki.root, port=0, work_dir=work) as tsa:
            for r in range(args.repeat):
                order = ("sekisho", "dcmsign") if r % 2 == 0 else ("dcmsign", "sekisho")
                for target in order:
                    out = work / f"out-{target}-{r}"
                    if target == "sekisho":
                        res = run_sekisho(files, out, pki, trust, tsa.url, args.concurrency)
                    else:
                        res = run_dcmsign(files, out, pki, tsa.url, args.concurrency)
                    ok = dcmsign_accepts(out / files[0].name, pki)
                    print(
                        f"  run {r + 1} {target:8} {res.rate:7.1f} objects/s "
                        f"(dcmsign --verify +tr on the first output: {'OK' if ok else 'FAILED'})"
                    )
                    results[target].append(res)
            tsa_requests = tsa.requests
        ceiling = openssl_rsa2048_signs_per_second(3)
    finally:
        if tmp is not None:
            tmp.cleanup()

    med = {t: statistics.median(r.rate for r in rs) for t, rs in results.items()}
    cpu = {t: statistics.median(r.cpu_ms_per_object for r in rs) for t, rs in results.items()}
    secs = {t: statistics.median(r.seconds for r in rs) for t, rs in results.items()}
    rows = [[t, n, secs[t], med[t], 1000 / med[t], cpu[t]] for t in ("sekisho", "dcmsign")]
    print()
    print(table(["target", "objects", "wall s", "objects/s", "ms/object", "cpu ms/object"], rows))
    print(f"\nTSA requests served: {tsa_requests} (one per object and run)")
    ratio = med["sekisho"] / med["dcmsign"]
    print(f"ratio sekisho/dcmsign (objects/s): {ratio:.2f}x (target >= 1.0)")
    if ceiling:
        print(
            f"openssl speed rsa2048: {ceiling:,.0f} signs/s on one core; two RSA signatures per "
            f"object (signer + TSA) -> ceiling {ceiling / 2:,.0f} objects/s per core"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
