"""Malware scanning: clamd INSTREAM protocol (unit test of the edge) and import gating.

The fake server below checks the framing byte by byte and answers like clamd;
a test against a real clamd with an EICAR signature is left to the
integration suite.
"""

from __future__ import annotations

import shutil
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from media_factory import DOE_ASCII, FakeSink, SeriesSpec, StudySpec, build_media, snapshot
from pydicom import dcmread, dcmwrite

from media.inspect import inspect_media
from media.reconcile import LocalPatient, Operator
from media.scanner import ClamdScanner, NullScanner, ScanResult
from media.selection import Selection, plan_import
from media.settings import MediaSettings
from media.source import open_source
from pki.errors import MalwareDetectedError, MediaImportError

EICAR_MARK = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"


class FakeClamd:
    """Speaks clamd's INSTREAM: records the streams it got, flags EICAR."""

    def __init__(self, sock: socket.socket, reply: str | None = None) -> None:
        self.sock = sock
        self.reply = reply
        self.streams: list[bytes] = []
        self.commands: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = conn.recv(n - len(data))
            if not part:
                raise ConnectionError("client closed early")
            data += part
        return data

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                command = b""
                while not command.endswith(b"\0"):
                    command += self._recv_exact(conn, 1)
                self.commands.append(command)
                if command == b"zPING\0":
                    conn.sendall(b"PONG\0")
                    continue
                assert command == b"zINSTREAM\0"
                stream = b""
                while True:
                    (length,) = struct.unpack(">I", self._recv_exact(conn, 4))
                    if length == 0:
                        break
                    stream += self._recv_exact(conn, length)
                self.streams.append(stream)
                if self.reply is not None:
                    answer = self.reply
                elif EICAR_MARK in stream:
                    answer = "stream: Eicar-Test-Signature FOUND"
                else:
                    answer = "stream: OK"
                conn.sendall(answer.encode() + b"\0")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def unix_clamd(tmp_path: Path) -> Iterator[tuple[FakeClamd, str]]:
    path = str(tmp_path / "clamd.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4)
    server = FakeClamd(sock)
    yield server, path
    server.close()


@pytest.fixture
def tcp_clamd() -> Iterator[tuple[FakeClamd, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    server = FakeClamd(sock)
    yield server, sock.getsockname()[1]
    server.close()


def chunks_of(data: bytes, size: int) -> Iterable[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def test_clean_stream_over_unix_socket(unix_clamd: tuple[FakeClamd, str]) -> None:
    server, path = unix_clamd
    data = bytes(range(256)) * 4000  # > MAX_CHUNK, so it is split into several chunks
    result = ClamdScanner(path, timeout=5).scan_stream("DICOM/IM1", chunks_of(data, 100_000))
    assert result == ScanResult(clean=True, signature=None, engine=f"clamd ({path})")
    assert server.streams == [data]


def test_detection_over_tcp(tcp_clamd: tuple[FakeClamd, int]) -> None:
    server, port = tcp_clamd
    scanner = ClamdScanner(host="127.0.0.1", port=port, timeout=5)
    result = scanner.scan_stream("X", [b"prefix ", EICAR_MARK, b" suffix"])
    assert not result.clean and result.signature == "Eicar-Test-Signature"
    assert scanner.ping() is True
    assert server.commands == [b"zINSTREAM\0", b"zPING\0"]


def test_error_reply_raises(unix_clamd: tuple[FakeClamd, str]) -> None:
    server, path = unix_clamd
    server.reply = "INSTREAM size limit exceeded. ERROR"
    with pytest.raises(MediaImportError, match="could not scan"):
        ClamdScanner(path, timeout=5).scan_stream("BIG", [b"x" * 10])


def test_unreachable_daemon_raises_media_import_error(tmp_path: Path) -> None:
    scanner = ClamdScanner(str(tmp_path / "nothing.sock"), timeout=1)
    with pytest.raises(MediaImportError, match="cannot be reached"):
        scanner.scan_stream("X", [b"data"])


def test_daemon_that_never_answers_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "mute.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(1)
    try:
        with pytest.raises(MediaImportError):
            ClamdScanner(path, timeout=0.3).scan_stream("X", [b"data"])
    finally:
        sock.close()


def test_null_scanner_consumes_and_accepts() -> None:
    seen: list[bytes] = []

    def gen() -> Iterator[bytes]:
        for part in (b"a", b"b"):
            seen.append(part)
            yield part

    result = NullScanner().scan_stream("X", gen())
    assert result.clean and seen == [b"a", b"b"]
    assert NullScanner.performs_scan is False


# --- the importer and the scanner ---------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scan")
    build_media(root, [StudySpec(DOE_ASCII, [SeriesSpec("CT", 3)])])
    return root


def _import(root: Path, tmp_path: Path, scanner: object, settings: MediaSettings) -> FakeSink:
    sink = FakeSink()
    with open_source(root, settings) as src:
        report = inspect_media(src, settings)
        plan = plan_import(report, Selection.parse(["1"]))
        from media.importer import run_import

        run_import(
            src,
            plan,
            LocalPatient("H1"),
            Operator("u1", "Uketsuke^Hanako"),
            settings.station,
            settings,
            scanner,  # type: ignore[arg-type]
            sink,
            confirm_mismatch=True,
        )
    return sink


def test_detection_stops_the_import_before_anything_is_stored(
    pristine: Path, tmp_path: Path, unix_clamd: tuple[FakeClamd, str]
) -> None:
    server, path = unix_clamd
    root = tmp_path / "m"
    shutil.copytree(pristine, root)
    infected = root / "DICOM" / "ST000001" / "SE000001" / "IM000003"
    ds = dcmread(infected)  # a valid instance carrying the test signature in a text value
    ds.ImageComments = "X5O!P%@AP[4 " + EICAR_MARK.decode() + "!$H+H*"
    dcmwrite(infected, ds, enforce_file_format=True)
    work = tmp_path / "work"
    work.mkdir()
    settings = MediaSettings(work_dir=work)
    sink = FakeSink()
    with open_source(root, settings) as src:
        report = inspect_media(src, settings)
        plan = plan_import(report, Selection.parse(["1"]))
        from media.importer import run_import

        with pytest.raises(MalwareDetectedError) as err:
            run_import(
                src,
                plan,
                LocalPatient("H1"),
                Operator("u1", "A^B"),
                settings.station,
                settings,
                ClamdScanner(path, timeout=5),
                sink,
                confirm_mismatch=True,
            )
    assert "DICOM/ST000001/SE000001/IM000003" in err.value.message
    assert err.value.detections == [  # type: ignore[attr-defined]
        ("DICOM/ST000001/SE000001/IM000003", "Eicar-Test-Signature")
    ]
    assert sink.store_calls == 0 and list(work.iterdir()) == []
    assert len(server.streams) == 3  # every selected file was scanned


def test_clean_media_is_scanned_then_imported(
    pristine: Path, tmp_path: Path, unix_clamd: tuple[FakeClamd, str]
) -> None:
    server, path = unix_clamd
    before = snapshot(pristine)
    sink = _import(pristine, tmp_path, ClamdScanner(path, timeout=5), MediaSettings())
    assert len(sink.stored) == 3
    files = sorted(p for p in (pristine / "DICOM").rglob("IM*"))
    assert sorted(server.streams) == sorted(p.read_bytes() for p in files)
    assert snapshot(pristine) == before


def test_required_scanner_missing_is_refused(pristine: Path, tmp_path: Path) -> None:
    with pytest.raises(MediaImportError, match="required"):
        _import(pristine, tmp_path, NullScanner(), MediaSettings(scanner_required=True))


def test_optional_scanner_allows_null_scanner(pristine: Path, tmp_path: Path) -> None:
    sink = _import(pristine, tmp_path, NullScanner(), MediaSettings(scanner_required=False))
    assert len(sink.stored) == 3


def test_scanner_failure_aborts_the_import(pristine: Path, tmp_path: Path) -> None:
    broken = ClamdScanner(str(tmp_path / "gone.sock"), timeout=1)
    with pytest.raises(MediaImportError, match="cannot be reached"):
        _import(pristine, tmp_path, broken, MediaSettings())
