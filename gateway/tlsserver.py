"""Accepting mutual-TLS connections without ever stalling (R-TLS-1, 5, 6).

The listening socket accepts plain TCP; each connection's TLS handshake runs in
its own task with a timeout (``loop.start_tls``), so a silent or slow peer
never blocks anyone else, and a per-address limit bounds what one source can
hold open.  A failed handshake is mapped to a reason and reported; after a
successful handshake the peer is authenticated (revocation, partner binding)
and only then is the connection handed to the application protocol.

Refused-after-handshake peers get a short plain answer from ``refusal_protocol``
(HTTP 403 with the reason on the HTTPS port) so that a partner's engineer sees
why, instead of a bare reset.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import ssl
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pki.errors import PeerAuthenticationError
from pki.tls import handshake_failure_reason

log = logging.getLogger("sekisho.tls")


@dataclass(frozen=True)
class Refusal:
    """Why a connection was refused, for the audit trail (R-TLS-5)."""

    reason: str
    message: str
    address: str | None
    cert_sha256: str | None = None
    cert_subject: str | None = None
    detail: str | None = None


Authenticate = Callable[[bytes | None, str | None], Awaitable[Any]]
OnRefusal = Callable[[Refusal], Awaitable[None]]
ProtocolFactory = Callable[[], asyncio.BaseProtocol]
RefusalFactory = Callable[[Refusal], asyncio.BaseProtocol]


class _Buffering(asyncio.Protocol):
    """Holds application data that arrives before the real protocol is attached."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost: BaseException | None | bool = False

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc if exc is not None else True


class _Accepting(asyncio.Protocol):
    """The raw TCP protocol: hands the transport to the handshake task."""

    def __init__(self, server: MutualTlsServer) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.server._accepted(transport)  # noqa: SLF001

    def data_received(self, data: bytes) -> None:  # pragma: no cover - start_tls swaps us out
        pass


class MutualTlsServer:
    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        authenticate: Authenticate,
        protocol_factory: ProtocolFactory,
        *,
        on_refusal: OnRefusal,
        refusal_factory: RefusalFactory | None = None,
        handshake_timeout: float = 10.0,
        max_per_address: int = 32,
    ) -> None:
        self.ssl_context = ssl_context
        self.authenticate = authenticate
        self.protocol_factory = protocol_factory
        self.on_refusal = on_refusal
        self.refusal_factory = refusal_factory
        self.handshake_timeout = handshake_timeout
        self.max_per_address = max_per_address
        self.per_address: Counter[str] = Counter()
        #: ssl object -> authenticated principal, for the application to look up.
        self.principals: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.AbstractServer] = []

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False
    ) -> list[tuple[str, int]]:
        """Listen; ``reuse_port`` lets several worker processes share the port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Accepting(self), host, port, reuse_address=True, reuse_port=reuse_port
        )
        self._servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def principal_for(self, ssl_object: Any) -> Any:
        return self.principals.get(ssl_object)

    # -- per connection ----------------------------------------------------
    def _accepted(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = peer[0] if peer else None
        key = address or "?"
        if self.per_address[key] >= self.max_per_address:
            log.warning("connection limit reached for a source address; closing")
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.per_address[key] += 1
        task = asyncio.get_running_loop().create_task(self._handshake(transport, address))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, transport: asyncio.BaseTransport, address: str | None) -> None:
        loop = asyncio.get_running_loop()
        key = address or "?"
        buffering = _Buffering()
        released = False

        def release(_exc: object = None) -> None:
            nonlocal released
            if not released:
                released = True
                self.per_address[key] -= 1
                if self.per_address[key] <= 0:
                    del self.per_address[key]

        try:
            try:
                tls = await loop.start_tls(
                    transport,  # type: ignore[arg-type]
                    buffering,
                    self.ssl_context,
                    server_side=True,
                    ssl_handshake_timeout=self.handshake_timeout,
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError, EOFError) as exc:
                reason, words = handshake_failure_reason(exc)
                transport.close()
                release()
                if reason not in ("connection-closed",):
                    await self.on_refusal(Refusal(reason, words, address, detail=str(exc)))
                return
            if tls is None:
                release()
                return
            ssl_object = tls.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            try:
                principal = await self.authenticate(der, address)
            except PeerAuthenticationError as exc:
                refusal = Refusal(
                    exc.reason,
                    exc.message,
                    address,
                    cert_sha256=hashlib.sha256(der).hexdigest() if der else None,
                    detail=exc.detail,
                )
                await self.on_refusal(refusal)
                if self.refusal_factory is not None:
                    self._attach(tls, self.refusal_factory(refusal), buffering, release)
                else:
                    tls.close()
                    release()
                return
            self.principals[ssl_object] = principal
            self._attach(tls, self.protocol_factory(), buffering, release)
        except asyncio.CancelledError:
            transport.close()
            release()
            raise
        except Exception:  # never let one connection take the server down
            log.exception("unexpected error while accepting a connection")
            transport.close()
            release()

    @staticmethod
    def _attach(
        tls: asyncio.BaseTransport,
        protocol: asyncio.BaseProtocol,
        buffering: _Buffering,
        release: Callable[[object], None],
    ) -> None:
        wrapped = _Releasing(protocol, release)
        tls.set_protocol(wrapped)
        wrapped.connection_made(tls)
        for chunk in buffering.chunks:
            wrapped.data_received(chunk)
        if buffering.eof:
            wrapped.eof_received()
        if buffering.lost is not False:
            wrapped.connection_lost(buffering.lost if buffering.lost is not True else None)


class _Releasing(asyncio.Protocol):
    """Forwards to the real protocol and frees the per-address slot at the end."""

    def __init__(self, inner: asyncio.BaseProtocol, release: Callable[[object], None]) -> None:
        self.inner = inner
        self.release = release

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined,no-any-return]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.release(exc)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class HttpRefusal(asyncio.Protocol):
    """Answers any HTTP request with 403 and the refusal reason, then closes."""

    def __init__(self, refusal: Refusal) -> None:
        body = json.dumps(
            {"code": "PEER_AUTH", "reason": refusal.reason, "message": refusal.message}
        ).encode()
        self.response = (
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().call_later(10, transport.close)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf or len(self.buf) > 16384:
            assert self.transport is not None
            self.transport.write(self.response)
            self.transport.close()
