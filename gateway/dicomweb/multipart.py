"""A streaming reader for ``multipart/related`` request bodies (RFC 2046 5.1, RFC 2387).

STOW-RS bodies are large and arrive as a stream.  This reader hands out each
part's content as views into the chunks the HTTP layer received, so a byte of
an instance is not copied between the socket buffer and the file it is
written to (aiohttp's general multipart reader copies every chunk several
times while it looks for the boundary, and that was a large share of STOW-RS
CPU time: bench/stow_throughput.py).

Only what STOW-RS needs is parsed: the delimiter lines, each part's header
fields (names and values, for ``Content-Type``), the close delimiter.
Transport padding after a delimiter is accepted, preamble and epilogue are
ignored, as RFC 2046 says.  Anything else that does not follow the grammar is
a :class:`MultipartError` naming what was wrong (STOW-RS answers it as
invalid input).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

#: The largest header section of a part (field lines and the empty line).
MAX_HEADER_BYTES = 16 * 1024
#: The longest boundary RFC 2046 allows.
MAX_BOUNDARY = 70
#: The longest preamble read while looking for the first boundary.
MAX_PREAMBLE = 64 * 1024


class MultipartError(ValueError):
    """The body does not follow the multipart grammar (the message says where)."""


class MultipartReader:
    """Reads a ``multipart/related`` body from ``read``, an awaitable returning chunks.

    ``read()`` returns the next chunk of the body, ``b""`` at its end
    (aiohttp's ``StreamReader.readany``).  Use :meth:`next_part` to move to
    the next part (it returns the part's header fields, or None after the
    close delimiter) and :meth:`read_chunk` to read its content up to the
    delimiter, which returns ``b""`` at the end of the part.
    """

    def __init__(self, read: Callable[[], Awaitable[bytes]], boundary: str) -> None:
        if not 1 <= len(boundary) <= MAX_BOUNDARY:
            raise MultipartError(f"the boundary must have 1 to {MAX_BOUNDARY} characters")
        self._read = read
        # A delimiter is CRLF "--" boundary (RFC 2046 5.1.1).  The body is read
        # as if preceded by a CRLF, so that a first delimiter at its very
        # start (no preamble) is found like every other one.
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        self._buf: bytes = b"\r\n"
        self._pos = 0
        self._state = "preamble"  # preamble -> headers -> body -> (headers | done)

    # -- the buffer ---------------------------------------------------------
    async def _more(self) -> bool:
        """Append the next chunk to what is left; False at the end of the body."""
        chunk = await self._read()
        if not chunk:
            return False
        rest = self._buf[self._pos :]
        self._buf = rest + chunk if rest else chunk
        self._pos = 0
        return True

    async def _find(self, needle: bytes, limit: int | None, what: str) -> int:
        """Index in the buffer of ``needle`` at or after the read position, reading as needed."""
        while True:
            found = self._buf.find(needle, self._pos)
            seen = (found if found >= 0 else len(self._buf)) - self._pos
            if limit is not None and seen > limit:
                raise MultipartError(f"{what} is longer than {limit} bytes")
            if found >= 0:
                return found
            if not await self._more():
                raise MultipartError(f"the body ends before {what} is complete")

    async def _need(self, n: int) -> bool:
        """At least ``n`` bytes after the read position; False if the body ends first."""
        while len(self._buf) - self._pos < n:
            if not await self._more():
                return False
        return True

    # -- parts --------------------------------------------------------------
    async def next_part(self) -> dict[str, str] | None:
        """Skip to the next part and return its header fields (lower-case names)."""
        if self._state == "done":
            return None
        if self._state == "body":
            while await self.read_chunk():  # the rest of the current part
                pass
        if self._state == "preamble":
            try:
                at = await self._find(self._delimiter, MAX_PREAMBLE, "the preamble")
            except MultipartError as exc:
                raise MultipartError(
                    f"no boundary line in the first {MAX_PREAMBLE} bytes of the body"
                ) from exc
            self._pos = at
        # The read position is at a delimiter.
        self._pos += len(self._delimiter)
        if not await self._need(2):
            raise MultipartError("the body ends right after a boundary")
        if self._buf[self._pos : self._pos + 2] == b"--":
            self._state = "done"  # close delimiter; the epilogue is ignored
            return None
        end = await self._find(b"\r\n", MAX_BOUNDARY, "a boundary line")
        if self._buf[self._pos : end].strip(b" \t"):
            raise MultipartError("unexpected characters after a boundary")
        self._pos = end + 2
        headers = await self._headers()
        self._state = "body"
        return headers

    async def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not await self._need(2):
            raise MultipartError("the body ends inside a part's header")
        if self._buf[self._pos : self._pos + 2] == b"\r\n":  # no header fields
            self._pos += 2
            return headers
        end = await self._find(b"\r\n\r\n", MAX_HEADER_BYTES, "a part's header")
        block = self._buf[self._pos : end]
        self._pos = end + 4
        try:
            text = block.decode("ascii")
        except UnicodeDecodeError as exc:
            raise MultipartError("a part's header is not ASCII") from exc
        name = ""
        for line in text.split("\r\n"):
            if line[:1] in (" ", "\t") and name:  # folded continuation (RFC 5322 2.2.3)
                headers[name] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            name = name.strip().lower()
            if not sep or not name or " " in name:
                raise MultipartError(f"malformed header line in a part: {line[:60]!r}")
            headers[name] = value.strip()
        return headers

    async def read_chunk(self) -> bytes | memoryview:
        """The next piece of the current part's content; ``b""`` at its end.

        The pieces are views into received chunks; they stay valid (the
        chunks are immutable) but should be written out, not kept.
        """
        if self._state != "body":
            return b""
        delimiter = self._delimiter
        while True:
            buf, pos = self._buf, self._pos
            found = buf.find(delimiter, pos)
            if found >= 0:
                self._pos = found
                self._state = "delimiter"
                return memoryview(buf)[pos:found]
            # No delimiter in the buffer: everything is content except a tail
            # that may be the start of a delimiter continued in the next chunk.
            safe = self._safe_end(buf, pos)
            if safe > pos:
                self._pos = safe
                return memoryview(buf)[pos:safe]
            if not await self._more():
                raise MultipartError("the body ends inside a part (no closing boundary)")

    def _safe_end(self, buf: bytes, pos: int) -> int:
        """Where content certainly ends: before a tail that could begin a delimiter."""
        delimiter = self._delimiter
        start = max(pos, len(buf) - len(delimiter) + 1)
        cr = buf.find(b"\r", start)
        while cr >= 0:
            if delimiter.startswith(buf[cr:]):
                return cr
            cr = buf.find(b"\r", cr + 1)
        return len(buf)

    def at_end(self) -> bool:
        """True once the close delimiter has been read."""
        return self._state == "done"
