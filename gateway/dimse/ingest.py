"""C-STORE data sets written, hashed and indexed while they arrive (R-XCH-1/5; STYLE 7, 8).

pynetdicom hands every P-DATA fragment to the DIMSE provider on its DUL
thread, which also reads and decrypts the socket.  Hashing and writing each
fragment there (:class:`gateway.store.files.HashingWriter`) keeps that thread
from reading the next PDU, and a peer that waits for every C-STORE-RSP
(DCMTK ``storescu``) waits for all of it.  So each association that stores
has an :class:`IngestWorker`: a thread to which the DUL thread only posts the
fragments (views into the received PDUs; nothing is copied).  The worker

* opens the temporary file (one is opened ahead for the next instance, so
  that creating it costs no peer any time) and writes the PS3.10 header;
* hashes and writes every fragment (both release the GIL, so this runs
  beside the DUL thread's reads);
* parses the index attributes from the data set's first
  :data:`PREFIX_BYTES` (:class:`PrefixIndex`) as soon as they are there,
  while the pixel data is still arriving;
* at the last fragment, fdatasyncs the file when the store is durable, and
  signals the C-STORE handler, which waits for it (:meth:`StreamSink.wait`)
  before it renames the file, commits the index and answers.

What the worker has not yet written is bounded (:data:`IN_FLIGHT_BYTES`):
beyond it the DUL thread waits, and TCP pushes back on the peer, so memory
stays flat whatever the instance size.  Nothing here acknowledges anything:
durability is still decided by the handler (file fdatasync, rename,
directory fsync, metadata commit, then the response).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from io import BytesIO
from typing import Any

import pydicom

from gateway.store.files import FileStore, HashingWriter, StagedFile
from gateway.store.index import (
    InstanceIndex,
    TruncatedInstanceError,
    index_dataset,
    index_instance,
)
from pki.errors import InvalidInputError, SekishoError, StoreError

log = logging.getLogger("sekisho.dimse")

#: Leading bytes of a received file parsed for its index attributes.
PREFIX_BYTES = 64 * 1024
#: Received bytes the worker may have pending before the DUL thread waits.
IN_FLIGHT_BYTES = 8 * 1024 * 1024
#: The last index attribute :func:`gateway.store.index.index_dataset` reads
#: is (0020,0013) Instance Number; data elements come in tag order (PS3.5 7.1).
_LAST_INDEX_TAG = 0x00200013
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: PS3.4 B.2.3 statuses the worker decides.
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900


class PrefixIndex:
    """The index attributes of a Part 10 file, parsed from its leading bytes.

    Parsed as soon as the prefix is there; :meth:`result` decides, once the
    file's size is known, whether the prefix proves what ``index_instance``
    on the whole file would find.  It does when every index attribute lies
    before the last data element the prefix reaches, and that element, of
    defined length, ends exactly at the end of the file (typically the
    pixel data); otherwise :meth:`result` is None and the caller indexes the
    whole file.  An element that runs past the end of the file is a
    truncated instance, as for ``index_instance``.
    """

    def __init__(self, prefix: bytes | bytearray) -> None:
        self.prefix_size = len(prefix)
        self._usable = False
        self._end = 0
        self._last_tag = 0
        self._last_defined = False
        self._index: InstanceIndex | None = None
        self._error: InvalidInputError | None = None
        try:
            ds = pydicom.dcmread(BytesIO(prefix), defer_size=1024)
        except Exception:  # noqa: BLE001 - malformed, or cut by the prefix: decide on the file
            return
        elements = list(ds._dict.values())  # raw elements keep their offsets
        if not elements:
            return
        for elem in elements:
            tell = getattr(elem, "value_tell", None)
            length = getattr(elem, "length", None)
            if tell is not None and length not in (None, _UNDEFINED_LENGTH):
                self._end = max(self._end, tell + length)
        last = elements[-1]
        self._last_tag = int(last.tag)
        self._last_defined = getattr(last, "length", None) not in (None, _UNDEFINED_LENGTH)
        try:
            self._index = index_dataset(ds)
        except InvalidInputError as exc:
            self._error = exc
        self._usable = True

    def result(self, size: int) -> InstanceIndex | None:
        """The index of the file of ``size`` bytes, or None to index the whole file."""
        if not self._usable:
            return None
        if self._end > size:
            raise TruncatedInstanceError(
                f"instance is truncated: its data elements need {self._end} bytes "
                f"but only {size} arrived"
            )
        if self.prefix_size < size and (
            not self._last_defined or self._last_tag <= _LAST_INDEX_TAG or self._end != size
        ):
            return None
        if self._error is not None:
            raise self._error
        return self._index


class _Budget:
    """Bytes posted to the worker and not yet written; posting waits beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self._used and self._used + n > self._limit and not self._closed:
                self._cond.wait()
            self._used += n

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


Job = tuple[Callable[[Any], None], Any, int]


class IngestWorker:
    """The thread that writes one association's C-STORE data sets, one after another.

    ``parser`` runs the :class:`PrefixIndex` parses (pure Python, holding the
    GIL) beside the worker's hashing and writing (which release it); without
    one, or once it is shut down, the worker parses itself.
    """

    def __init__(
        self, files: FileStore, max_bytes: int, *, fsync: bool, parser: Executor | None = None
    ) -> None:
        self.files = files
        self.fsync = fsync
        self.parser = parser
        self._max_bytes = max_bytes
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._budget = _Budget(IN_FLIGHT_BYTES)
        self._spare: HashingWriter | None = None
        self._current: StreamSink | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sekisho-dimse-ingest", daemon=True)
        self._thread.start()

    # -- DUL thread ----------------------------------------------------------
    def open(self, sop_class_uid: str, header: Callable[[], bytes]) -> StreamSink:
        """A sink for the next data set of a C-STORE-RQ for ``sop_class_uid``.

        ``header()`` gives the file's PS3.10 header (preamble, file meta).
        """
        sink = StreamSink(self, sop_class_uid)
        self.post(sink._start, header)
        return sink

    def post(self, fn: Callable[[Any], None], arg: Any, size: int = 0) -> None:
        if size:
            self._budget.acquire(size)
        self._jobs.put((fn, arg, size))

    def close(self, timeout: float = 30.0) -> None:
        """Stop once everything posted is done; a data set left unfinished is removed."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._budget.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- worker thread -------------------------------------------------------
    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, arg, size = job
            try:
                fn(arg)
            except Exception:  # noqa: BLE001 - the sink keeps its own errors; never die
                log.exception("unexpected error while writing a received instance")
            finally:
                if size:
                    self._budget.release(size)
        if self._current is not None:
            self._current._discard(None)
        if self._spare is not None:
            self._spare.abort()
            self._spare = None

    def take_writer(self) -> HashingWriter:
        writer, self._spare = self._spare, None
        return writer if writer is not None else self.files.writer(self._max_bytes)

    def prepare_spare(self) -> None:
        """Open the next instance's temporary file while nobody waits for it."""
        if self._spare is None and not self._closed:
            try:
                self._spare = self.files.writer(self._max_bytes)
            except OSError as exc:
                log.warning("could not open a temporary file ahead: %s", exc.strerror)


class StreamSink:
    """One C-STORE data set on its way to the content store (see the module docstring).

    The DUL thread calls :meth:`write` and :meth:`end`; the C-STORE handler
    calls :meth:`wait` and then finds either :attr:`failure` (the message
    and DIMSE status to answer; nothing is left in the store) or the file
    at its content address (:attr:`staged`, :meth:`FileStore.commit` done,
    durably when the store is) with its validated :attr:`index`, ready for
    the metadata commit.  Errors are kept, never raised: on the DUL thread an
    exception would abort the association.
    """

    def __init__(self, worker: IngestWorker, sop_class_uid: str) -> None:
        self._worker = worker
        self._sop_class_uid = sop_class_uid
        self._writer: HashingWriter | None = None
        self._prefix = bytearray()
        self._parsed: Future[PrefixIndex] | None = None
        self._error: SekishoError | None = None
        self._done = threading.Event()
        #: (message, DIMSE status) when the instance is refused.
        self.failure: tuple[str, int] | None = None
        self.staged: StagedFile | None = None
        self.index: InstanceIndex | None = None

    @property
    def name(self) -> str:
        """The temporary file (pynetdicom unlinks this path after the handler)."""
        writer = self._writer
        return str(writer.path) if writer is not None else "/nonexistent/sekisho-pending"

    # -- DUL thread ----------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._worker.post(self._write, data, len(data))

    def end(self) -> None:
        """The last fragment has been posted."""
        self._worker.post(self._complete, None)

    # -- C-STORE handler -----------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the instance is stored or refused."""
        return self._done.wait(timeout)

    def close(self) -> None:
        """Called by pynetdicom's Storage SCP after the handler; nothing left to do."""

    # -- worker thread -------------------------------------------------------
    def _start(self, header: Callable[[], bytes]) -> None:
        worker = self._worker
        worker._current = self
        try:
            data = header()
            self._writer = worker.take_writer()
        except SekishoError as exc:
            self._error = exc
            return
        except OSError as exc:
            self._error = StoreError(f"could not write the received instance: {exc.strerror}")
            return
        self._write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        writer = self._writer
        if self._error is not None or writer is None:
            return
        try:
            writer.write(data)
        except SekishoError as exc:
            self._fail(exc)
            return
        except OSError as exc:
            self._fail(StoreError(f"could not write the received instance: {exc.strerror}"))
            return
        missing = PREFIX_BYTES - len(self._prefix)
        if missing > 0:
            self._prefix += data[:missing]
            if len(self._prefix) >= PREFIX_BYTES:
                self._parse_soon()

    def _parse_soon(self) -> None:
        """Parse the prefix beside the writing of the rest of the data set."""
        parser = self._worker.parser
        if parser is not None:
            try:
                self._parsed = parser.submit(PrefixIndex, self._prefix)
            except RuntimeError:  # shut down: parse at the end
                self._parsed = None

    def _fail(self, exc: SekishoError) -> None:
        self._error = exc
        if self._writer is not None:
            self._writer.abort()

    def _complete(self, _: Any) -> None:
        worker = self._worker
        try:
            self._store()
        finally:
            self._prefix, self._parsed = bytearray(), None
            worker._current = None
            self._done.set()
        worker.prepare_spare()

    def _store(self) -> None:
        """Finish the file, validate it, move it to its content address (or refuse it)."""
        if self._error is not None or self._writer is None:
            error = self._error or StoreError("the received instance was not written")
            self.failure = (error.message, error.dimse_status)
            return
        worker = self._worker
        try:
            staged = self._writer.finish(worker.fsync)  # fdatasync when the store is durable
        except OSError as exc:
            self._writer.path.unlink(missing_ok=True)
            self.failure = (f"could not write the instance: {exc.strerror}", OUT_OF_RESOURCES)
            return
        try:
            index = self._index_of(staged)
            if index.sop_class_uid != self._sop_class_uid:
                staged.path.unlink(missing_ok=True)
                self.failure = (
                    "the data set's SOP Class UID differs from the request's",
                    DOES_NOT_MATCH_SOP_CLASS,
                )
                return
            worker.files.commit(staged)  # rename, directory fsync when durable
        except SekishoError as exc:
            staged.path.unlink(missing_ok=True)
            self.failure = (exc.message, exc.dimse_status)
            return
        self.staged, self.index = staged, index

    def _index_of(self, staged: StagedFile) -> InstanceIndex:
        parsed = self._parsed.result() if self._parsed is not None else PrefixIndex(self._prefix)
        index = parsed.result(staged.size)
        return index if index is not None else index_instance(staged.path)

    def _discard(self, _: Any) -> None:
        """The association ended in the middle of this data set: remove it."""
        if self._writer is not None and self.staged is None:
            self._writer.abort()
        self.failure = self.failure or ("the association ended", OUT_OF_RESOURCES)
        self._done.set()
