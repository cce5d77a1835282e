"""The streaming multipart/related reader (gateway.dicomweb.multipart).

Bodies are fed in chunks cut at arbitrary places, so that delimiters, header
sections and CRLFs fall across chunk edges; the parts read back must be the
parts sent, byte for byte, and malformed bodies must fail with a reason.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dicomweb.multipart import MAX_HEADER_BYTES, MultipartError, MultipartReader

BOUNDARY = "sekisho-b0undary"


def _feeder(body: bytes, cuts: list[int]):  # type: ignore[no-untyped-def]
    edges = sorted({c for c in cuts if 0 < c < len(body)})
    pieces = [body[a:b] for a, b in zip([0, *edges], [*edges, len(body)], strict=True)]

    async def read() -> bytes:
        return pieces.pop(0) if pieces else b""

    return read


async def _read_all(body: bytes, cuts: list[int], boundary: str = BOUNDARY):
    reader = MultipartReader(_feeder(body, cuts), boundary)
    parts = []
    while (headers := await reader.next_part()) is not None:
        data = bytearray()
        while chunk := await reader.read_chunk():
            data += chunk
        parts.append((headers, bytes(data)))
    assert reader.at_end()
    return parts


def parse(body: bytes, cuts: list[int] | None = None, boundary: str = BOUNDARY):
    return asyncio.run(_read_all(body, cuts or [], boundary))


def build(parts: list[bytes], *, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = bytearray(preamble + (b"\r\n" if preamble else b""))
    for data in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--".encode() + epilogue
    return bytes(out)


# Content made of the pieces that confuse a delimiter search.
content = st.lists(
    st.sampled_from(
        [
            b"\r",
            b"\n",
            b"\r\n",
            b"-",
            b"--",
            b"\r\n--",
            b"\r\n--sekisho-b0und",
            b"x",
            b"\x00",
            b"DICM",
            b"sekisho-b0undary",
        ]
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(content, max_size=4),
    cuts=st.lists(st.integers(0, 600), max_size=12),
    preamble=st.sampled_from([b"", b"preamble text", b"\r\n"]),
    epilogue=st.sampled_from([b"", b"\r\n", b"\r\nepilogue"]),
)
def test_parts_come_back_byte_for_byte(parts, cuts, preamble, epilogue) -> None:  # type: ignore[no-untyped-def]
    # A part must not contain its own delimiter (RFC 2046 5.1.1).
    parts = [p for p in parts if f"\r\n--{BOUNDARY}".encode() not in b"\r\n" + p + b"\r\n"]
    body = build(parts, preamble=preamble, epilogue=epilogue)
    got = parse(body, cuts)
    assert [data for _, data in got] == parts
    assert all(h == {"content-type": "application/dicom"} for h, _ in got)


def test_every_single_cut_position() -> None:
    parts = [b"first\r\npart", b"", b"\r\n-", b"x" * 300]
    body = build(parts)
    for cut in range(len(body) + 1):
        assert [d for _, d in parse(body, [cut])] == parts
    assert [d for _, d in parse(body, list(range(len(body))))] == parts  # one byte at a time


def test_content_is_handed_out_without_copies() -> None:
    payload = b"y" * 100_000
    body = build([payload])

    async def run() -> list[object]:
        reader = MultipartReader(_feeder(body, [len(body) // 2]), BOUNDARY)
        await reader.next_part()
        return [chunk async for chunk in _chunks(reader)]

    async def _chunks(reader: MultipartReader):  # type: ignore[no-untyped-def]
        while chunk := await reader.read_chunk():
            yield chunk

    chunks = asyncio.run(run())
    assert all(isinstance(c, memoryview) for c in chunks)
    assert b"".join(bytes(c) for c in chunks) == payload


def test_headers_transport_padding_and_folding() -> None:
    body = (
        f"--{BOUNDARY}  \t\r\n"
        "Content-Type: application/dicom\r\n"
        "X-Note: first\r\n second\r\n"
        "content-location:  /x \r\n\r\n"
        "DATA\r\n"
        f"--{BOUNDARY}\r\n\r\nNOHEADERS\r\n"
        f"--{BOUNDARY}--\r\n"
    ).encode()
    (h1, d1), (h2, d2) = parse(body, [3, 40, 77])
    assert h1 == {
        "content-type": "application/dicom",
        "x-note": "first second",
        "content-location": "/x",
    }
    assert d1 == b"DATA"
    assert (h2, d2) == ({}, b"NOHEADERS")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"no boundary anywhere", "no boundary line"),
        (
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\nDATA".encode(),
            "ends inside a part",
        ),
        (f"--{BOUNDARY}\r\nContent-Type: application/dicom".encode(), "header"),
        (f"--{BOUNDARY}".encode(), "ends right after a boundary"),
        (f"--{BOUNDARY}junk\r\n\r\nDATA\r\n--{BOUNDARY}--".encode(), "after a boundary"),
        (
            f"--{BOUNDARY}\r\nbad header line\r\n\r\nD\r\n--{BOUNDARY}--".encode(),
            "malformed header line",
        ),
        (f"--{BOUNDARY}\r\nX-Big: {'a' * MAX_HEADER_BYTES}\r\n\r\nD".encode(), "longer than"),
        (f"--{BOUNDARY}\r\nX: \xff\r\n\r\nD\r\n--{BOUNDARY}--".encode("latin-1"), "not ASCII"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_bodies_fail_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MultipartError, match=reason):
        parse(body, [5, 17])


def test_a_long_preamble_is_not_buffered_without_end() -> None:
    body = b"x" * 70_000 + f"\r\n--{BOUNDARY}--".encode()
    with pytest.raises(MultipartError, match="no boundary line in the first"):
        parse(body, list(range(0, len(body), 8192)))


def test_boundary_length_is_checked() -> None:
    with pytest.raises(MultipartError, match="boundary"):
        MultipartReader(_feeder(b"", []), "b" * 71)
