"""Malware scanning of media content before import (R-PDI-2; 001 Art.10(5), 003 6.5 C-6).

:class:`Scanner` is the small interface the importer uses; :class:`ClamdScanner`
talks to a ClamAV daemon with its ``INSTREAM`` command (clamd(8)): the client
sends ``zINSTREAM\\0``, then the content as chunks each prefixed with its
length as a 4-byte unsigned big-endian integer, then a zero-length chunk; the
daemon answers one NUL-terminated line, ``stream: OK``,
``stream: <signature> FOUND`` or ``<reason> ERROR``.  Only this module touches
sockets; every failure is re-raised as :class:`~pki.errors.MediaImportError`
(STYLE §1: thin edges, one error vocabulary).

:class:`NullScanner` is for installations where configuration makes scanning
optional and no daemon exists; the importer refuses to use it when
``MediaSettings.scanner_required`` is set.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pki.errors import MediaImportError

#: clamd's default StreamMaxLength is 25 MB; chunks must stay well below it.
MAX_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Outcome of scanning one stream."""

    clean: bool
    signature: str | None
    engine: str


class Scanner(Protocol):
    """Scans a named stream of bytes; raises ``MediaImportError`` if it cannot."""

    #: Whether this scanner really inspects content (``False`` for NullScanner).
    performs_scan: bool

    def scan_stream(self, name: str, chunks: Iterable[bytes]) -> ScanResult: ...


class NullScanner:
    """Accepts everything: only for configurations where scanning is optional."""

    performs_scan = False
    engine = "none (malware scanning not configured)"

    def scan_stream(self, name: str, chunks: Iterable[bytes]) -> ScanResult:
        for _ in chunks:  # consume, so callers' hashing still sees every byte
            pass
        return ScanResult(clean=True, signature=None, engine=self.engine)


class ClamdScanner:
    """ClamAV daemon client over a UNIX socket or TCP (``INSTREAM``)."""

    performs_scan = True

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        host: str | None = None,
        port: int = 3310,
        timeout: float = 30.0,
    ) -> None:
        if (socket_path is None) == (host is None):
            raise ValueError("give either socket_path or host")
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self.timeout = timeout

    @property
    def engine(self) -> str:
        where = self.socket_path or f"{self.host}:{self.port}"
        return f"clamd ({where})"

    def _connect(self) -> socket.socket:
        try:
            if self.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
            else:
                assert self.host is not None
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
                sock.settimeout(self.timeout)
        except OSError as exc:
            raise MediaImportError(
                f"the malware scanner at {self.socket_path or self.host} cannot be reached",
                detail=str(exc),
            ) from exc
        return sock

    def ping(self) -> bool:
        """``zPING`` health check: ``True`` when the daemon answers ``PONG``."""
        sock = self._connect()
        try:
            sock.sendall(b"zPING\0")
            return _read_reply(sock) == "PONG"
        except OSError as exc:
            raise MediaImportError("the malware scanner did not answer", detail=str(exc)) from exc
        finally:
            sock.close()

    def scan_stream(self, name: str, chunks: Iterable[bytes]) -> ScanResult:
        """Stream ``chunks`` to clamd and interpret its verdict.

        ``name`` is only used in error messages (a media path, never patient data).
        """
        sock = self._connect()
        try:
            try:
                sock.sendall(b"zINSTREAM\0")
                for chunk in chunks:
                    for start in range(0, len(chunk), MAX_CHUNK):
                        part = chunk[start : start + MAX_CHUNK]
                        sock.sendall(struct.pack(">I", len(part)) + part)
                sock.sendall(struct.pack(">I", 0))
            except (BrokenPipeError, ConnectionResetError):
                # clamd closes early when the stream exceeds StreamMaxLength;
                # its reply (if any) says why.
                pass
            reply = _read_reply(sock)
        except OSError as exc:
            raise MediaImportError(
                f"the malware scanner failed while scanning {name}", detail=str(exc)
            ) from exc
        finally:
            sock.close()
        return self._interpret(name, reply)

    def _interpret(self, name: str, reply: str) -> ScanResult:
        if reply.endswith("ERROR") or not reply:
            raise MediaImportError(
                f"the malware scanner could not scan {name}", detail=reply or "no reply"
            )
        body = reply.split(":", 1)[1].strip() if ":" in reply else reply
        if body == "OK":
            return ScanResult(clean=True, signature=None, engine=self.engine)
        if body.endswith(" FOUND"):
            return ScanResult(clean=False, signature=body[: -len(" FOUND")], engine=self.engine)
        raise MediaImportError(
            f"the malware scanner gave an unexpected answer for {name}", detail=reply
        )


def _read_reply(sock: socket.socket, limit: int = 4096) -> str:
    """Read one NUL- (or newline-) terminated reply line."""
    data = b""
    while len(data) < limit:
        part = sock.recv(1024)
        if not part:
            break
        data += part
        if b"\0" in data or b"\n" in data:
            break
    line = data.split(b"\0", 1)[0].split(b"\n", 1)[0]
    return line.decode("utf-8", "replace").strip()
