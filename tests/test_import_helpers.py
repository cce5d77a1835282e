"""Builders shared by the ``test_import_*`` modules (no tests here).

* :func:`media_instance`: a demo instance (``sekisho init``) configured for
  media import, with the staff registry and allowed roots;
* :class:`Clamd`: the real ClamAV daemon (``/usr/sbin/clamd``) started in a
  temporary folder with a tiny local signature database for the EICAR test
  string (signature downloads are impossible here): an ``.hdb`` entry (MD5 of
  the whole EICAR file) and an ``.ndb`` body signature that finds the string
  anywhere, e.g. inside a DICOM file;
* :func:`dcmdump`: the DCMTK dump of a stored file, which the checks read
  instead of trusting pydicom alone;
* :func:`media_cli`: ``sekisho media ...`` with a private ``TMPDIR`` so a test
  can prove that nothing was written to the system temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import Instance, create_instance, run_sekisho

from media.scanner import ClamdScanner

DCMDUMP = "/usr/bin/dcmdump"
CLAMD = "/usr/sbin/clamd"
IMPORT_EVENT = "110107"
SECURITY_ALERT = "110113"
INSTANCES_ACCESSED = "110103"

#: The EICAR anti-virus test string, assembled so that this source file itself
#: does not match a signature.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-" + b"TEST-FILE!$H+H*"

#: Demo staff registered for the console (dev PKI roles -> staff IDs and PN names).
STAFF = {
    "reception01": ("Uketsuke^Hanako=受付^花子", "staff-reception-1"),
    "operator01": ("Sousa^Ichiro", "staff-operator-1"),
}


def media_config(instance_root: Path, **overrides: Any) -> dict[str, Any]:
    """A ``[media]`` table: no scanner unless overridden, staff registered."""
    staff = {
        sid: {"name": name, "certificate": str(instance_root / "pki" / f"{role}.crt.pem")}
        for sid, (name, role) in STAFF.items()
    }
    media: dict[str, Any] = {
        "scanner": {"kind": "none", "required": False},
        "console": {"staff": staff},
    }
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(media.get(key), Mapping):
            media[key] = {**media[key], **value}
        else:
            media[key] = value
    return {"media": media}


def media_instance(root: Path, **overrides: Any) -> Instance:
    """``sekisho init`` then the ``[media]`` table for the test."""
    inst = create_instance(root)
    inst.update_config(media_config(inst.root, **overrides))
    return inst


def media_cli(
    inst: Instance, *args: str, tmpdir: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``sekisho media ARGS --config ...``, optionally with a private TMPDIR."""
    env = {}
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = {"TMPDIR": str(tmpdir), "TMP": str(tmpdir), "TEMP": str(tmpdir)}
    return run_sekisho("media", *args, config=inst.config, timeout=timeout, env=env)


def media_ok(inst: Instance, *args: str, tmpdir: Path | None = None) -> str:
    proc = media_cli(inst, *args, tmpdir=tmpdir)
    assert proc.returncode == 0, f"sekisho media {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def dcmdump(path: Path) -> str:
    """DCMTK's dump of a file as text, failing the test if dcmdump cannot read it.

    ``+U8`` has DCMTK convert values to UTF-8.  This DCMTK build (iconv from
    glibc) has no converter for ``ISO 2022 IR 87`` (JIS X 0208), so for those
    files the dump is taken as stored bytes and its ISO 2022 escape sequences
    are decoded here; the structure and values are still DCMTK's reading.
    """
    proc = subprocess.run([DCMDUMP, "+U8", "-q", str(path)], capture_output=True)
    if proc.returncode == 0:
        return proc.stdout.decode("utf-8", "replace")
    assert b"character encoding" in proc.stderr, proc.stderr.decode(errors="replace")
    raw = subprocess.run([DCMDUMP, "-q", str(path)], capture_output=True)
    assert raw.returncode == 0, raw.stderr.decode(errors="replace")
    assert b"ISO 2022 IR 87" in raw.stdout, "only IR 87 is expected to need this path"
    return raw.stdout.decode("iso2022_jp", "replace")


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


class Clamd:
    """A real ``clamd`` in the foreground with a local EICAR signature database."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.socket = workdir / "clamd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        db = self.dir / "db"
        db.mkdir(parents=True, exist_ok=True)
        md5 = hashlib.md5(EICAR).hexdigest()
        (db / "sekisho-eicar.hdb").write_text(f"{md5}:{len(EICAR)}:Sekisho.Test.EICAR.File\n")
        (db / "sekisho-eicar.ndb").write_text(f"Sekisho.Test.EICAR.Body:0:*:{EICAR.hex()}\n")
        conf = self.dir / "clamd.conf"
        conf.write_text(
            "\n".join(
                [
                    f"LocalSocket {self.socket}",
                    f"DatabaseDirectory {db}",
                    f"TemporaryDirectory {self.dir}",
                    f"LogFile {self.dir / 'clamd.log'}",
                    f"PidFile {self.dir / 'clamd.pid'}",
                    "Foreground yes",
                    "StreamMaxLength 64M",
                    "",
                ]
            )
        )
        return conf

    def start(self, timeout: float = 60.0) -> Clamd:
        conf = self.write_config()
        self.proc = subprocess.Popen(
            [CLAMD, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clamd exited: {self.log()}")
            if self.socket.exists():
                try:
                    if ClamdScanner(str(self.socket), timeout=5).ping():
                        return self
                except Exception:  # noqa: BLE001 - not ready yet
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"clamd did not answer within {timeout}s: {self.log()}")

    def log(self) -> str:
        path = self.dir / "clamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """A real clamd for the module (skipped only where ClamAV is not installed)."""
    if not os.access(CLAMD, os.X_OK):
        pytest.skip("clamav-daemon is not installed")
    daemon = Clamd(tmp_path_factory.mktemp("clamd")).start()
    try:
        yield daemon
    finally:
        daemon.stop()
