"""Real peers for integration tests and benchmarks (STYLE lesson 6).

Each module here starts one real implementation of "the other side" on
loopback, with a configuration generated into a temporary directory, and stops
it again: :mod:`tests.peers.orthanc` runs Orthanc (DICOMweb plugin, optional
DICOM TLS) behind nginx with mutual TLS.  This package holds the small process
and port helpers they share; it imports nothing from ``gateway``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["PeerStartError", "ManagedProcess", "free_port", "wait_until", "tcp_open", "log_tail"]

LOOPBACK = "127.0.0.1"


class PeerStartError(RuntimeError):
    """A peer did not start; the message carries the tail of its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-limit:].decode("utf-8", "replace")


class ManagedProcess:
    """A child process with its output in a log file, stopped by its own pid.

    ``stop()`` sends SIGTERM, waits, then SIGKILL; it is idempotent, so it can
    sit in a ``finally`` whatever happened before.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        log_path: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fail(self, what: str) -> PeerStartError:
        state = "still running" if self.alive() else f"exited with {self.proc.returncode}"
        tail = log_tail(self.log_path)
        return PeerStartError(f"{self.name} {what} ({state}); end of {self.log_path}:\n{tail}")

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            return self.proc.returncode
        finally:
            self._log.close()
