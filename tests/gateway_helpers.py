"""Shared builders and fixtures for tests that drive a real gateway.

Everything here talks to Sekisho the way a hospital or a partner would:

* :func:`create_instance` runs ``sekisho init`` into a directory with free
  loopback ports, then edits the generated TOML for the test at hand;
* :class:`GatewayProcess` runs ``sekisho serve --config ...`` as a subprocess,
  waits until it listens, and stops it (SIGTERM, then SIGKILL) or kills it;
* :func:`curl` and :func:`s_client` are the real clients (``/usr/bin/curl``,
  ``/usr/bin/openssl``) with a certificate from the instance's dev PKI;
* :func:`build_study` makes Part 10 files with pydicom (default 512x512 16-bit
  MONOCHROME2, Explicit VR Little Endian, several series);
* :func:`multipart_related` / :func:`parse_multipart` build STOW-RS bodies and
  split WADO-RS responses.

Fixtures (registered by ``tests/conftest.py``): ``dev_pki`` (session-scoped
development PKI), ``instance_factory`` and ``gateway_factory`` (function-scoped;
every process they start is stopped at teardown).  Module-scoped gateways are
built with :func:`running_gateway`.

Network use is limited to 127.0.0.1; ports are chosen dynamically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from gateway.audit.chain import AuditRecord
from gateway.audit.trail import AuditTrail
from pki import devpki
from pki.devpki import DevPki

CURL = "/usr/bin/curl"
OPENSSL = "/usr/bin/openssl"
#: Upper bound for any single client or CLI invocation.
CLIENT_TIMEOUT = 60.0
#: Upper bound for a gateway to start listening or to stop.
START_TIMEOUT = 30.0

SECURITY_ALERT = "110113"
INSTANCES_TRANSFERRED = "110104"
QUERY = "110112"


# ----------------------------------------------------------------- processes
def sekisho_command() -> list[str]:
    """The ``sekisho`` console script of the running interpreter's environment."""
    script = Path(sys.executable).parent / "sekisho"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "gateway.cli"]


def run_sekisho(
    *args: str,
    config: Path | None = None,
    timeout: float = CLIENT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one ``sekisho`` command; ``--config`` is appended when given."""
    cmd = [*sekisho_command(), *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- TOML edits
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML here")


def dump_toml(data: Mapping[str, Any]) -> str:
    """A minimal TOML writer for configuration files (tables of scalars and lists)."""
    lines: list[str] = []

    def table(prefix: str, mapping: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in mapping.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in mapping.items() if isinstance(v, Mapping)}
        if prefix:
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for key, value in tables.items():
            table(f"{prefix}.{key}" if prefix else key, value)

    table("", data)
    return "\n".join(lines)


def merge(base: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------- instances
@dataclass
class Instance:
    """A directory made by ``sekisho init``."""

    root: Path
    https_port: int
    monitoring_port: int

    @property
    def config(self) -> Path:
        return self.root / "sekisho.toml"

    @property
    def pki(self) -> DevPki:
        return devpki.load(self.root / "pki")

    @property
    def database(self) -> Path:
        return self.root / "var" / "sekisho.sqlite"

    @property
    def store_tmp(self) -> Path:
        return self.root / "var" / "store" / "tmp"

    @property
    def objects(self) -> Path:
        return self.root / "var" / "store" / "objects"

    def object_path(self, sha256: str) -> Path:
        """Where the content store keeps the file with this SHA-256 (FileStore.object_path)."""
        return self.objects / sha256[:2] / sha256

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def read_config(self) -> dict[str, Any]:
        return tomllib.loads(self.config.read_text())

    def update_config(self, updates: Mapping[str, Any]) -> None:
        """Merge ``updates`` (nested tables) into the configuration file."""
        self.config.write_text(dump_toml(merge(self.read_config(), updates)))

    def reassign_ports(self) -> None:
        """Move the instance to new free ports (another process took one)."""
        self.https_port, self.monitoring_port = free_port(), free_port()
        self.update_config(
            {
                "https": {"port": self.https_port},
                "monitoring": {"port": self.monitoring_port},
                "dimse": {"port": free_port()},
            }
        )

    def cli(self, *args: str, timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return run_sekisho(*args, config=self.config, timeout=timeout)

    def cli_ok(self, *args: str) -> str:
        proc = self.cli(*args)
        assert proc.returncode == 0, f"sekisho {' '.join(args)}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    # -- audit trail ---------------------------------------------------------
    def audit_records(
        self, *, after_seq: int = 0, event_id: str | None = None
    ) -> list[AuditRecord]:
        trail = AuditTrail(self.database)
        try:
            return [r for r in trail.iter_records(after_seq=after_seq, event_id=event_id)]
        finally:
            trail.close()

    def audit_head(self) -> int:
        trail = AuditTrail(self.database)
        try:
            return trail.head().seq
        finally:
            trail.close()

    def security_alerts(self, after_seq: int = 0) -> list[AuditRecord]:
        return self.audit_records(after_seq=after_seq, event_id=SECURITY_ALERT)

    # -- store ---------------------------------------------------------------
    def indexed_instances(self) -> dict[str, str]:
        """SOP Instance UID -> SHA-256 as the metadata database holds them."""
        conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30)
        try:
            return dict(conn.execute("SELECT sop_uid, sha256 FROM instances").fetchall())
        finally:
            conn.close()

    def object_files(self) -> dict[str, Path]:
        """Content-addressed files in the store: name (SHA-256) -> path."""
        return {p.name: p for p in self.objects.rglob("*") if p.is_file()}


def create_instance(directory: Path, config: Mapping[str, Any] | None = None) -> Instance:
    """``sekisho init DIR`` with free ports, then ``config`` merged into its TOML."""
    https_port, monitoring_port = free_port(), free_port()
    proc = run_sekisho(
        "init",
        str(directory),
        "--https-port",
        str(https_port),
        "--monitoring-port",
        str(monitoring_port),
        # `sekisho init` enables the DICOM TLS listener: never two gateways on 2762.
        "--dimse-port",
        str(free_port()),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    inst = Instance(directory.resolve(), https_port, monitoring_port)
    if config:
        inst.update_config(config)
    return inst


# ------------------------------------------------------------ running gateway
class GatewayProcess:
    """``sekisho serve --config ...`` as a subprocess."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = instance.root / f"serve-{uuid.uuid4().hex[:8]}.log"

    def start(self, timeout: float = START_TIMEOUT) -> GatewayProcess:
        """Start and wait until the HTTPS port listens.

        Free ports are picked when the instance is created; if another process
        took one in the meantime, new ports are written to the configuration
        and the start is retried (twice at most).
        """
        for _ in range(3):
            if self._start_once(timeout):
                return self
            self.instance.reassign_ports()
        raise RuntimeError(f"sekisho serve could not bind its ports:\n{self.log()}")

    def _start_once(self, timeout: float) -> bool:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [*sekisho_command(), "serve", "--config", str(self.instance.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.log()[offset:]
                if "address already in use" in output.lower():
                    return False
                raise RuntimeError(f"sekisho serve exited with {self.proc.returncode}:\n{output}")
            if "Sekisho listening" in self.log()[offset:] and _port_open(self.instance.https_port):
                return True
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"sekisho serve did not start listening in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = START_TIMEOUT) -> int | None:
        """SIGTERM (the gateway's clean shutdown), then SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown code of the gateway runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=START_TIMEOUT)


@contextlib.contextmanager
def running_gateway(instance: Instance) -> Iterator[GatewayProcess]:
    """A started gateway that is always stopped on exit."""
    gw = GatewayProcess(instance)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


# -------------------------------------------------------------------- clients
@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes
    exit_code: int
    stderr: str

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def _parse_header_dump(raw: str) -> dict[str, str]:
    """Headers of the last response in a ``curl -D`` dump (skips 100 Continue)."""
    blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    if not blocks:
        return {}
    headers: dict[str, str] = {}
    for line in blocks[-1].split("\n")[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return headers


def curl(
    instance: Instance,
    path: str,
    *,
    role: str | None = "partner-valid-1",
    method: str | None = None,
    data: bytes | None = None,
    content_type: str | None = None,
    headers: Sequence[str] = (),
    args: Sequence[str] = (),
    url: str | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> HttpResult:
    """One request with ``/usr/bin/curl`` using a dev-PKI client certificate.

    ``role`` names the certificate (``None``: no client certificate).  The
    status is 0 when no HTTP response arrived (refused handshake).
    """
    pki = instance.pki
    work = instance.root / "curl"
    work.mkdir(exist_ok=True)
    token = uuid.uuid4().hex
    body_file, header_file = work / f"{token}.body", work / f"{token}.headers"
    cmd = [
        CURL,
        "-sS",
        "--max-time",
        str(int(timeout)),
        "--cacert",
        str(pki.cert_path("root-ca")),
        "-o",
        str(body_file),
        "-D",
        str(header_file),
        "-w",
        "%{http_code}",
    ]
    if role is not None:
        cmd += ["--cert", str(pki.cert_path(role)), "--key", str(pki.key_path(role))]
    if method:
        cmd += ["-X", method]
    data_file = None
    if data is not None:
        data_file = work / f"{token}.data"
        data_file.write_bytes(data)
        cmd += ["--data-binary", f"@{data_file}"]
        cmd += ["-H", f"Content-Type: {content_type or 'application/octet-stream'}"]
    elif content_type:
        cmd += ["-H", f"Content-Type: {content_type}"]
    for h in headers:
        cmd += ["-H", h]
    cmd += list(args)
    cmd.append(url or instance.base_url + path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
        status = int(proc.stdout.strip() or 0)
        return HttpResult(
            status=status,
            headers=_parse_header_dump(header_file.read_text(errors="replace"))
            if header_file.exists()
            else {},
            body=body_file.read_bytes() if body_file.exists() else b"",
            exit_code=proc.returncode,
            stderr=proc.stderr,
        )
    finally:
        for f in (body_file, header_file, data_file):
            if f is not None:
                f.unlink(missing_ok=True)


@dataclass
class SClientResult:
    exit_code: int
    output: str

    @property
    def protocol(self) -> str | None:
        for line in self.output.splitlines():
            line = line.strip()
            if line.startswith("Protocol") and ":" in line:
                return line.split(":", 1)[1].strip()
        return None

    @property
    def cipher(self) -> str | None:
        for line in self.output.splitlines():
            if ", Cipher is " in line:
                return line.rsplit("Cipher is ", 1)[1].strip()
        return None

    @property
    def http_status_line(self) -> str | None:
        for line in self.output.splitlines():
            if "HTTP/1.1 " in line:
                return line[line.index("HTTP/1.1 ") :].strip()
        return None


def s_client(
    instance: Instance,
    *options: str,
    role: str | None = "partner-valid-1",
    request_path: str = "/dicomweb/studies",
    timeout: float = CLIENT_TIMEOUT,
) -> SClientResult:
    """``openssl s_client`` to the gateway, sending one HTTP request after the handshake."""
    pki = instance.pki
    cmd = [
        OPENSSL,
        "s_client",
        "-connect",
        f"127.0.0.1:{instance.https_port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(pki.cert_path("root-ca")),
        "-verify_return_error",
        "-ign_eof",
        *options,
    ]
    if role is not None:
        cmd += ["-cert", str(pki.cert_path(role)), "-key", str(pki.key_path(role))]
    request = f"GET {request_path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    proc = subprocess.run(
        cmd,
        input=request,
        capture_output=True,
        text=True,
        timeout=timeout,
        errors="replace",
    )
    return SClientResult(proc.returncode, proc.stdout + proc.stderr)


# ------------------------------------------------------------ DICOM builders
@dataclass(frozen=True)
class BuiltInstance:
    data: bytes
    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Study:
    study_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    study_date: str
    accession: str
    instances: list[BuiltInstance] = field(default_factory=list)

    @property
    def series_uids(self) -> list[str]:
        return list(dict.fromkeys(i.series_uid for i in self.instances))

    def series(self, series_uid: str) -> list[BuiltInstance]:
        return [i for i in self.instances if i.series_uid == series_uid]

    @property
    def hashes(self) -> dict[str, str]:
        return {i.sop_uid: i.sha256 for i in self.instances}


_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}


def build_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    issuer: str = "",
    modality: str = "CT",
    study_date: str = "20250401",
    accession: str = "",
    series_number: int = 1,
    instance_number: int = 1,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    study_description: str = "Sekisho test study",
    series_description: str = "",
) -> Dataset:
    """An image instance: 16-bit MONOCHROME2 pixels, Explicit VR Little Endian."""
    sop_uid = sop_uid or generate_uid()
    sop_class = _SOP_CLASSES.get(modality, CTImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyDate = study_date
    ds.StudyTime = "093000"
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description or f"{modality} series {series_number}"
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    return ds


def dataset_bytes(ds: Dataset) -> bytes:
    """A Part 10 file (preamble, DICM, file meta) as bytes."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def instance_from(ds: Dataset) -> BuiltInstance:
    return BuiltInstance(
        dataset_bytes(ds),
        str(ds.SOPInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.StudyInstanceUID),
        str(ds.SOPClassUID),
    )


def build_study(
    *,
    patient_id: str,
    patient_name: str = "YAMADA^TARO",
    issuer: str = "",
    study_date: str = "20250401",
    accession: str = "",
    series: Sequence[tuple[str, int]] = (("CT", 3), ("MR", 2)),
    rows: int = 512,
    columns: int = 512,
) -> Study:
    """A study with one series per ``(modality, instance count)`` pair."""
    study = Study(generate_uid(), patient_id, issuer, patient_name, study_date, accession)
    seed = 0
    for number, (modality, count) in enumerate(series, start=1):
        series_uid = generate_uid()
        for i in range(1, count + 1):
            seed += 1
            ds = build_dataset(
                patient_id=patient_id,
                patient_name=patient_name,
                issuer=issuer,
                study_uid=study.study_uid,
                series_uid=series_uid,
                modality=modality,
                study_date=study_date,
                accession=accession,
                series_number=number,
                instance_number=i,
                rows=rows,
                columns=columns,
                seed=seed,
            )
            study.instances.append(instance_from(ds))
    return study


def truncate_in_pixel_data(data: bytes, keep: int = 100) -> bytes:
    """Cut a Part 10 file ``keep`` bytes into the value of its Pixel Data element."""
    tag = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
    at = data.rindex(tag)
    # Explicit VR OB/OW: tag(4) VR(2) reserved(2) length(4)
    return data[: at + 12 + keep]


# ----------------------------------------------------------------- multipart
def multipart_related(
    parts: Sequence[bytes | tuple[bytes, str]],
    *,
    boundary: str | None = None,
    part_type: str = "application/dicom",
) -> tuple[bytes, str]:
    """A ``multipart/related`` body (RFC 2387) and its Content-Type header value."""
    boundary = boundary or f"sekisho-test-{uuid.uuid4().hex}"
    out = io.BytesIO()
    for part in parts:
        data, ctype = (part, part_type) if isinstance(part, bytes) else part
        out.write(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f'multipart/related; type="{part_type}"; boundary={boundary}'


def content_type_parameter(content_type: str, name: str) -> str | None:
    for item in content_type.split(";")[1:]:
        if "=" in item:
            key, value = item.split("=", 1)
            if key.strip().lower() == name:
                return value.strip().strip('"')
    return None


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a ``multipart/related`` response into (headers, content) parts."""
    assert content_type.lower().startswith("multipart/related"), content_type
    boundary = content_type_parameter(content_type, "boundary")
    assert boundary, f"no boundary in {content_type!r}"
    delimiter = b"\r\n--" + boundary.encode()
    segments = (b"\r\n" + body).split(delimiter)
    assert segments[0] == b"", "unexpected preamble"
    assert segments[-1].startswith(b"--"), "no closing delimiter"
    parts: list[tuple[dict[str, str], bytes]] = []
    for seg in segments[1:-1]:
        head, sep, content = seg.partition(b"\r\n\r\n")
        assert sep, "part without a header/body separator"
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stow(
    instance: Instance,
    parts: Sequence[bytes | tuple[bytes, str]],
    *,
    role: str = "partner-valid-1",
    path: str = "/dicomweb/studies",
    args: Sequence[str] = (),
) -> HttpResult:
    body, ctype = multipart_related(parts)
    return curl(instance, path, role=role, data=body, content_type=ctype, args=args)


def referenced_uids(result: HttpResult) -> list[str]:
    """SOP Instance UIDs in a STOW-RS response's ReferencedSOPSequence."""
    items = result.json().get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def failed_items(result: HttpResult) -> list[tuple[str | None, int]]:
    """(SOP Instance UID or None, FailureReason) from FailedSOPSequence."""
    items = result.json().get("00081198", {}).get("Value", [])
    out = []
    for item in items:
        uid = item.get("00081155", {}).get("Value", [None])[0]
        out.append((uid, int(item["00081197"]["Value"][0])))
    return out


def wado_parts(result: HttpResult) -> list[bytes]:
    assert result.status == 200, (result.status, result.body[:300])
    return [content for _h, content in parse_multipart(result.body, result.content_type)]


def qido_values(result: HttpResult, tag: str) -> list[Any]:
    """The first value of ``tag`` in each QIDO-RS result (204 -> [])."""
    if result.status == 204:
        return []
    assert result.status == 200, (result.status, result.body[:300])
    return [item.get(tag, {}).get("Value", [None])[0] for item in result.json()]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    """One development PKI for the session (unit tests of TLS and validation)."""
    return devpki.generate(tmp_path_factory.mktemp("dev-pki") / "pki")


@pytest.fixture
def instance_factory(tmp_path: Path) -> Iterator[Any]:
    """``make(config=None, name=...) -> Instance`` via ``sekisho init`` in tmp_path."""
    counter = iter(range(1000))

    def make(config: Mapping[str, Any] | None = None, name: str | None = None) -> Instance:
        return create_instance(tmp_path / (name or f"instance-{next(counter)}"), config)

    yield make


@pytest.fixture
def gateway_factory() -> Iterator[Any]:
    """``start(instance) -> GatewayProcess``; every gateway is stopped at teardown."""
    started: list[GatewayProcess] = []

    def start(instance: Instance) -> GatewayProcess:
        gw = GatewayProcess(instance)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()
