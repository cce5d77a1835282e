"""Forwarding audit records to an IHE ATNA audit record repository (R-AUD-3).

Each record is sent as an RFC 5424 syslog message whose MSG is the DICOM
PS3.15 A.5.1 ``AuditMessage`` XML (IHE ITI TF-2 3.20 "Record Audit Event"):

    <PRI>1 TIMESTAMP HOSTNAME sekisho PROCID IHE+RFC-3881 - BOM<AuditMessage ...>

PRI is facility 10 (security/authorization) with severity notice (5), or
warning (4) for events that did not succeed.  Messages are framed by octet
counting, ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 §4.3), over TLS.  The
``ssl.SSLContext`` is received, never built here: the one TLS factory decides
versions, suites and the client certificate (R-TLS-1/2).

The local trail is the source of truth.  Forwarding runs on a background
thread with a bounded queue and retries with exponential backoff; when the
queue is full or the forwarder stops with records unsent, they are counted
(``stats().lowest_unsent_seq``) and can be replayed later from the trail with
:meth:`SyslogTlsForwarder.replay` -- nothing is ever lost from the trail.

Note that syslog over TLS has no application-level acknowledgement: a record
written into a connection that the peer has just closed can be lost on the
way.  The forwarder checks for a closed connection before each send, which
covers the common case (repository restarted); the trail covers the rest.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from .chain import AuditRecord
from .dicom_xml import audit_message_bytes
from .trail import AuditTrail

_log = logging.getLogger(__name__)

FACILITY_SECURITY = 10  # RFC 5424 §6.2.1: security/authorization messages
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
IHE_MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"  # RFC 5424 §6.4: MSG-UTF8 starts with a BOM


def _header_field(value: str, limit: int) -> str:
    """RFC 5424 §6 header fields are 1*PRINTUSASCII (no spaces), or "-" when empty."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or "-"


def format_syslog_message(
    record: AuditRecord,
    msg: bytes,
    *,
    hostname: str,
    app_name: str = "sekisho",
    procid: str | None = None,
    msgid: str = IHE_MSGID,
    bom: bool = True,
) -> bytes:
    """One RFC 5424 message (§6) carrying ``msg``; structured data is NILVALUE."""
    severity = SEVERITY_NOTICE if record.event.outcome == 0 else SEVERITY_WARNING
    pri = FACILITY_SECURITY * 8 + severity
    timestamp = record.occurred_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # RFC 3339, §6.2.3
    header = " ".join(
        (
            f"<{pri}>1",
            timestamp,
            _header_field(hostname, 255),
            _header_field(app_name, 48),
            _header_field(procid if procid is not None else str(os.getpid()), 128),
            _header_field(msgid, 32),
            "-",
        )
    )
    return header.encode("ascii") + b" " + (BOM if bom else b"") + msg


def frame(message: bytes) -> bytes:
    """Octet-counting framing, ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 §4.3)."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class ForwarderStats:
    sent: int
    dropped: int
    pending: int
    connected: bool
    last_error: str | None
    last_sent_seq: int | None
    lowest_unsent_seq: int | None


class SyslogTlsForwarder:
    """Background forwarder of audit records to a syslog-over-TLS collector.

    ``ssl_context`` must be a client context from the TLS factory;
    ``server_hostname`` (default ``host``) is used for SNI and name checks.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        source_id: str = "sekisho",
        hostname: str | None = None,
        queue_size: int = 10_000,
        connect_timeout: float = 10.0,
        send_timeout: float = 10.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 60.0,
    ) -> None:
        if not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError("ssl_context must be an ssl.SSLContext from the TLS factory")
        self._address = (host, port)
        self._context = ssl_context
        self._server_hostname = server_hostname or host
        self._source_id = source_id
        self._hostname = hostname or socket.getfqdn()
        self._queue: queue.Queue[AuditRecord] = queue.Queue(maxsize=queue_size)
        self._connect_timeout = connect_timeout
        self._send_timeout = send_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._stats_lock = threading.Lock()
        self._sent = 0
        self._dropped = 0
        self._last_error: str | None = None
        self._last_sent_seq: int | None = None
        self._lowest_unsent: int | None = None
        self._pending: AuditRecord | None = None
        self._sock: ssl.SSLSocket | None = None
        self._thread = threading.Thread(target=self._run, name="sekisho-audit-syslog", daemon=True)

    # -- public API ----------------------------------------------------------

    def start(self) -> SyslogTlsForwarder:
        self._thread.start()
        return self

    def attach(self, trail: AuditTrail) -> None:
        """Forward every record that ``trail`` commits from now on."""
        trail.subscribe(self.submit)

    def submit(self, record: AuditRecord) -> bool:
        """Queue ``record`` without blocking; False if it was not queued."""
        if self._closing.is_set():
            self._note_unsent(record.seq)
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._note_unsent(record.seq)
            _log.warning("audit forwarding queue full; record %d stays local only", record.seq)
            return False
        return True

    def replay(self, records: Iterable[AuditRecord], *, timeout: float | None = None) -> int:
        """Queue earlier records again (e.g. from ``trail.iter_records(after_seq=...)``).

        Blocks while the queue is full; returns how many were queued.
        """
        count = 0
        for record in records:
            try:
                self._queue.put(record, timeout=timeout)
            except queue.Full:
                self._note_unsent(record.seq)
                break
            count += 1
        return count

    def stats(self) -> ForwarderStats:
        with self._stats_lock:
            pending = self._queue.qsize() + (1 if self._pending is not None else 0)
            return ForwarderStats(
                sent=self._sent,
                dropped=self._dropped,
                pending=pending,
                connected=self._sock is not None,
                last_error=self._last_error,
                last_sent_seq=self._last_sent_seq,
                lowest_unsent_seq=self._lowest_unsent,
            )

    def close(self, timeout: float = 10.0) -> ForwarderStats:
        """Send what is queued (for up to ``timeout`` seconds), then stop."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abort.set()
                self._thread.join(self._send_timeout + 1.0)
        unsent = [self._pending] if self._pending is not None else []
        while True:
            try:
                unsent.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for record in unsent:
            self._note_unsent(record.seq)
        self._pending = None
        self._disconnect(graceful=True)
        return self.stats()

    # -- worker --------------------------------------------------------------

    def _note_unsent(self, seq: int) -> None:
        with self._stats_lock:
            self._dropped += 1
            if self._lowest_unsent is None or seq < self._lowest_unsent:
                self._lowest_unsent = seq

    def _encode(self, record: AuditRecord) -> bytes:
        xml = audit_message_bytes(record, source_id=self._source_id)
        return frame(format_syslog_message(record, xml, hostname=self._hostname))

    def _run(self) -> None:
        backoff = self._initial_backoff
        data = b""
        while not self._abort.is_set():
            if self._pending is None:
                try:
                    record = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
                try:
                    data = self._encode(record)
                except Exception:  # noqa: BLE001 - a bad record must not stop forwarding
                    _log.exception("audit record %d cannot be encoded for syslog", record.seq)
                    self._note_unsent(record.seq)
                    continue
                self._pending = record
            try:
                self._connection().sendall(data)
            except Exception as exc:  # noqa: BLE001 - OSError, SSLError, bad context...
                self._disconnect()
                with self._stats_lock:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                _log.warning(
                    "audit forwarding to %s:%d failed (%s); retrying in %.1f s",
                    *self._address,
                    type(exc).__name__,
                    backoff,
                )
                if self._abort.wait(backoff):
                    return
                backoff = min(backoff * 2, self._max_backoff)
                continue
            with self._stats_lock:
                self._sent += 1
                self._last_sent_seq = self._pending.seq
                self._pending = None
            backoff = self._initial_backoff

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and not _peer_closed(self._sock):
            return self._sock
        self._disconnect()
        raw = socket.create_connection(self._address, timeout=self._connect_timeout)
        try:
            # The handshake runs inside wrap_socket, bounded by the connect timeout.
            tls = self._context.wrap_socket(raw, server_hostname=self._server_hostname)
        except BaseException:
            raw.close()
            raise
        tls.settimeout(self._send_timeout)
        with self._stats_lock:
            self._sock = tls
        return tls

    def _disconnect(self, *, graceful: bool = False) -> None:
        with self._stats_lock:
            sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if graceful:  # send TLS close_notify so the collector sees a clean end
                sock.settimeout(1.0)
                sock.unwrap().close()
            else:
                sock.close()
        except (OSError, ValueError):
            sock.close()


def _peer_closed(sock: ssl.SSLSocket) -> bool:
    """True if the collector has closed the connection (read returns EOF)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)
