"""Accepting DICOM TLS connections without ever stalling (R-TLS-1, 4, 5, 6; PS3.15 B.1).

pynetdicom's ``AssociationServer.get_request`` wraps each accepted socket in
TLS on the server's single accept thread, so one TCP peer that never sends a
byte stops every other partner (the weakness R-TLS-6 names).  Here:

* ``get_request`` only accepts: the raw socket gets ``TCP_NODELAY`` and is
  handed on; ``verify_request`` applies the per-address and total connection
  limits before any thread is spent on it;
* the connection's own thread performs the TLS handshake with a deadline
  (``settimeout`` bounds the whole ``do_handshake``), maps a failure to a
  reason with :func:`pki.tls.handshake_failure_reason` and reports it;
* the client certificate is then authenticated like on the HTTPS side
  (revocation, partner binding: :class:`gateway.peers.PeerAuthenticator`);
* only then is an association created on the TLS socket, which from now on
  has the network timeout as socket timeout, so a peer stalling in the middle
  of a PDU cannot pin a thread either;
* at A-ASSOCIATE-RQ, :func:`gate_association` checks the called AE title and
  that the calling AE title is registered for the certificate's partner
  (:func:`gateway.peers.decide_association`), otherwise it answers
  A-ASSOCIATE-RJ (PS3.8 9.3.4: rejected-permanent, service-user,
  calling/called AE title not recognized) and reports it.

Phase timeouts: handshake (``handshake_timeout_seconds``), association
(``ae.acse_timeout``: the A-ASSOCIATE-RQ must arrive in time; PS3.8 ARTIM),
DIMSE (``ae.dimse_timeout``), idle (``ae.network_timeout``).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from gateway.peers import Principal, decide_association
from gateway.settings import DimseSettings
from gateway.tlsserver import Refusal
from pki.errors import PeerAuthenticationError
from pki.tls import handshake_failure_reason

log = logging.getLogger("sekisho.dimse")

#: A-ASSOCIATE-RJ (PS3.8 Table 9-21): result, source, diagnostic.
REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNIZED = 0x03
CALLED_AE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True)
class ListenerHooks:
    """What the listener needs from the service, as plain callables."""

    #: Validate a client certificate (DER) from an address; raises PeerAuthenticationError.
    authenticate: Callable[[bytes | None, str | None], Principal]
    #: Record a refused connection or association (R-TLS-5).
    refused: Callable[[Refusal], None]
    #: Build the acceptor association for an authenticated peer.
    new_association: Callable[[Principal, str | None], Association]
    #: Called once the association has ended (audit, clean-up).
    finished: Callable[[Association], None]
    #: Count a connection closed because of a limit (metrics; never audited, see below).
    limited: Callable[[str], None] = lambda _reason: None


class ConnectionGate:
    """Per-address and total limits on concurrent connections (R-TLS-6)."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total = total
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._open = 0

    def acquire(self, address: str) -> str | None:
        """Take a slot; return None, or the reason the connection is refused."""
        with self._lock:
            if self._open >= self.total:
                return "connection-limit"
            if self._counts[address] >= self.per_address:
                return "address-limit"
            self._counts[address] += 1
            self._open += 1
            return None

    def release(self, address: str) -> None:
        with self._lock:
            self._counts[address] -= 1
            self._open -= 1
            if self._counts[address] <= 0:
                del self._counts[address]

    def count(self, address: str | None = None) -> int:
        with self._lock:
            return self._open if address is None else self._counts.get(address, 0)


class _BufferedSocket(AssociationSocket):
    """pynetdicom's socket wrapper, reading whole PDUs with ``recv_into``.

    The original reads 4 KiB at a time into a growing ``bytearray``; a PDU of
    128 KiB then costs 32 Python-level reads and copies (bench/dimse_throughput).
    """

    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        got = self.recv_into(memoryview(buf))
        if got < nr_bytes:  # connection closed: return what arrived, as pynetdicom does
            del buf[got:]
        return buf

    def recv_into(self, view: memoryview) -> int:
        """Fill ``view`` from the socket; returns the bytes read (fewer once the peer closed)."""
        sock = self.socket
        assert sock is not None
        wanted = len(view)
        got = 0
        while got < wanted:
            n = sock.recv_into(view[got:], wanted - got)
            if not n:
                break
            got += n
        return got


class _TlsRequestHandler(RequestHandler):
    """Runs one authenticated connection's association to its end."""

    server: DicomTlsServer

    def __init__(
        self, request: ssl.SSLSocket, client_address: Any, server: DicomTlsServer,
        principal: Principal,
    ) -> None:
        self.principal = principal
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        try:
            assoc.join()
        finally:
            self.server.hooks.finished(assoc)

    def _create_association(self) -> Association:
        """An acceptor association on the TLS socket (cf. pynetdicom ``RequestHandler``)."""
        server = self.server
        assoc = server.hooks.new_association(self.principal, self.client_address[0])
        assoc._server = server  # noqa: SLF001 - pynetdicom's own link to the server
        # pynetdicom finds its acceptors by this thread name prefix.
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}-sekisho"
        assoc.set_socket(_BufferedSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        acceptor.supported_contexts = server.contexts_copy()
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():  # noqa: SLF001
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        return assoc


class DicomTlsServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake off the accept path."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[Any] | None = None,
        *,
        tls_context: ssl.SSLContext,
        settings: DimseSettings,
        hooks: ListenerHooks,
    ) -> None:
        if ssl_context is not None:
            raise ValueError("pass the TLS context as tls_context: the handshake is ours")
        self.tls_context = tls_context
        self.settings = settings
        self.hooks = hooks
        self.gate = ConnectionGate(settings.max_connections_per_address, settings.max_connections)
        self._live: set[socket.socket] = set()
        self._live_lock = threading.Lock()
        self._closing = False
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers=evt_handlers)
        self._contexts_template = list(contexts)

    def contexts_copy(self) -> list[Any]:
        """Supported contexts for a new association.

        pynetdicom deep-copies them per association (about 80 ms for every
        storage SOP class in every transfer syntax); its acceptor negotiation
        (``presentation.negotiate_as_acceptor``) only reads them and builds
        new result contexts, so the objects are shared.
        """
        return list(self._contexts_template)

    # -- accept path: no I/O beyond accept() -------------------------------
    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        reason = None if not self._closing else "stopping"
        reason = reason or self.gate.acquire(str(client_address[0]))
        if reason is None:
            return True
        # Not audited: a flood of refused connections must not flood the audit
        # trail too (the HTTPS listener does the same); it is logged and counted.
        log.warning("DICOM connection refused (%s)", reason)
        self.hooks.limited(reason)
        return False

    # -- per connection thread ---------------------------------------------
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        self._track(request)
        try:
            self._serve_connection(request, client_address)
        except Exception:  # noqa: BLE001 - never let one connection take the server down
            log.exception("unexpected error on a DICOM connection")
        finally:
            self._untrack(request)
            _close_quietly(request)
            self.gate.release(address)

    def _serve_connection(self, raw: socket.socket, client_address: Any) -> None:
        address = str(client_address[0])
        raw.settimeout(self.settings.handshake_timeout_seconds)
        tls = self.tls_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self._track(tls)
        try:
            try:
                # One deadline for the whole handshake: CPython's do_handshake
                # counts the socket timeout down across its reads and writes.
                tls.do_handshake()
            except (OSError, EOFError, ValueError) as exc:
                reason, words = handshake_failure_reason(exc)
                if reason != "connection-closed" and not self._closing:
                    self.hooks.refused(Refusal(reason, words, address, detail=str(exc)[:300]))
                return
            der = tls.getpeercert(binary_form=True)
            try:
                principal = self.hooks.authenticate(der, address)
            except PeerAuthenticationError as exc:
                self.hooks.refused(
                    Refusal(
                        exc.reason, exc.message, address,
                        cert_sha256=hashlib.sha256(der).hexdigest() if der else None,
                        detail=exc.detail,
                    )
                )
                return
            # From now on every blocking read or write is bounded by the idle timeout.
            tls.settimeout(self.settings.network_timeout_seconds)
            _TlsRequestHandler(tls, client_address, self, principal)
        finally:
            self._untrack(tls)
            _close_quietly(tls)

    def _track(self, sock: socket.socket) -> None:
        with self._live_lock:
            self._live.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._live_lock:
            self._live.discard(sock)

    def shutdown_request(self, request: Any) -> None:
        """Close a connection; the per-connection thread releases its slot."""
        _close_quietly(request)

    def close_connections(self) -> None:
        """Stop: unblock every connection still handshaking or associated."""
        self._closing = True
        with self._live_lock:
            live = list(self._live)
        for sock in live:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass


def gate_association(
    own_ae: str, rejected: Callable[[PeerAuthenticationError, Any, str], None]
) -> Callable[[Any], None]:
    """An ``EVT_REQUESTED`` handler: the calling AE must belong to the certificate (R-TLS-4).

    pynetdicom checks, after this notification, whether the handler rejected
    the association (``assoc.is_rejected``) and then skips its negotiation.
    ``rejected(error, session, calling_ae)`` reports the rejection (R-TLS-5).
    """

    def on_requested(event: Any) -> None:
        assoc = event.assoc
        session = getattr(assoc, "session", None)
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title or "").strip()
        called = str(request.called_ae_title or "").strip()
        try:
            if session is None:
                raise PeerAuthenticationError(
                    "association without an authenticated peer", reason="no-session"
                )
            decide_association(session.principal, calling, called, own_ae)
        except PeerAuthenticationError as exc:
            rejected(exc, session, calling)
            diagnostic = (
                CALLED_AE_NOT_RECOGNIZED if exc.reason == "wrong-called-ae"
                else CALLING_AE_NOT_RECOGNIZED
            )
            assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
            # As pynetdicom's own rejection does: wait until the A-ASSOCIATE-RJ
            # is out and the peer has closed (or the ARTIM timer expired).
            assoc.kill()
            return
        session.calling_ae = calling
        log.info(
            "association accepted for partner %s (calling AE %s)", session.principal.name, calling
        )

    return on_requested
