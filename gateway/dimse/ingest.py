"""C-STORE data sets written, hashed and indexed while they arrive (R-XCH-1/5; STYLE 7, 8).

pynetdicom hands every P-DATA fragment to the DIMSE provider on its DUL
thread, which also reads and decrypts the socket.  Hashing and writing each
fragment there (:class:`gateway.store.files.HashingWriter`) keeps that thread
from reading the next PDU, and a peer that waits for every C-STORE-RSP
(DCMTK ``storescu``) waits for all of it.  So each association that stores
has an :class:`IngestWorker`: a thread to which the DUL thread only posts the
fragments (views into the received PDUs; nothing is copied).  The worker

* opens the temporary file (one is opened ahead for the next instance, and
  filled to the size of the last one, so that neither creating it nor
  putting its pages into the page cache costs the peer any time: see
  :meth:`HashingWriter.preallocate`) and writes the PS3.10 header;
* hashes and writes every fragment (both release the GIL, so this runs
  beside the DUL thread's reads);
* parses the index attributes from the data set's first
  :data:`PREFIX_BYTES` (:class:`PrefixIndex`, a lean scan: well under a
  tenth of a millisecond) as soon as they are there, while the pixel data
  is still arriving;
* at the last fragment, fdatasyncs the file when the store is durable,
  validates it and moves it to its content address; then, for a C-STORE
  whose command needed no pydicom (the common case), it commits the index
  and queues the C-STORE-RSP itself (:meth:`StreamSink.end`'s ``then``:
  :meth:`gateway.dimse.storage.StorageScp.answer`), and otherwise signals
  pynetdicom's C-STORE handler, which waits for it (:meth:`StreamSink.wait`)
  and does the same.

What the worker has not yet written is bounded (:data:`IN_FLIGHT_BYTES`):
beyond it the DUL thread waits, and TCP pushes back on the peer, so memory
stays flat whatever the instance size.  The order that makes an answer
durable is the same on both ways: file fdatasync, rename, directory fsync,
metadata commit, and only then the response.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from gateway.store.files import FileStore, HashingWriter, StagedFile
from gateway.store.index import PREFIX_BYTES, InstanceIndex, PrefixIndex, index_instance
from pki.errors import SekishoError, StoreError

log = logging.getLogger("sekisho.dimse")

#: Received bytes the worker may have pending before the DUL thread waits.
IN_FLIGHT_BYTES = 8 * 1024 * 1024
#: The largest size a spare temporary file is filled to ahead of its data set.
PREALLOCATE_MAX = 16 * 1024 * 1024
#: What StreamSink.name gives pynetdicom to unlink: nothing, cheaply.
_NO_FILE = "/nonexistent/sekisho-stream-sink"
#: PS3.4 B.2.3 statuses the worker decides.
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900


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
    """The thread that writes one association's C-STORE data sets, one after another."""

    def __init__(self, files: FileStore, max_bytes: int, *, fsync: bool) -> None:
        self.files = files
        self.fsync = fsync
        self._max_bytes = max_bytes
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._budget = _Budget(IN_FLIGHT_BYTES)
        self._spare: HashingWriter | None = None
        #: Size of the last data set written: the guess for the next one.
        self._last_size = 0
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
        """Open and fill the next instance's temporary file while nobody waits for it.

        The peer is reading this instance's C-STORE-RSP and sending the
        next request meanwhile; when the next data set comes, the writes
        find the file's pages in place.
        """
        if self._spare is None and not self._closed:
            spare = None
            try:
                spare = self.files.writer(self._max_bytes)
                spare.preallocate(min(self._last_size, PREALLOCATE_MAX))
            except OSError as exc:
                # Half filled, or not at its start: the next data set opens its own.
                if spare is not None:
                    spare.abort()
                log.warning("could not prepare a temporary file ahead: %s", exc.strerror)
                return
            self._spare = spare


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
        self._parsed: PrefixIndex | None = None
        self._error: SekishoError | None = None
        self._done = threading.Event()
        #: (message, DIMSE status) when the instance is refused.
        self.failure: tuple[str, int] | None = None
        self.staged: StagedFile | None = None
        self.index: InstanceIndex | None = None

    @property
    def name(self) -> str:
        """A path that names no file: pynetdicom unlinks ``name`` after the handler.

        The sink itself moves its temporary file to the store or removes it.
        Unlinking the temporary file's real path would lock the temporary
        directory, where the worker is creating the next instance's file at
        that moment, and the C-STORE response would wait for it; a path
        under a directory that does not exist fails before any lock.
        """
        return _NO_FILE

    # -- DUL thread ----------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._worker.post(self._write, data, len(data))

    def end(self, then: Callable[[StreamSink], None] | None = None) -> None:
        """The last fragment has been posted.

        ``then(sink)`` runs on the worker thread once the instance is stored
        or refused (it answers the peer: :meth:`StorageScp.answer`), before
        the worker prepares the next temporary file.
        """
        self._worker.post(self._complete, then)

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
                # Index attributes while the rest of the data set arrives.
                self._parsed = PrefixIndex(self._prefix)

    def _fail(self, exc: SekishoError) -> None:
        self._error = exc
        if self._writer is not None:
            self._writer.abort()

    def _complete(self, then: Callable[[StreamSink], None] | None) -> None:
        worker = self._worker
        try:
            self._store()
        finally:
            self._prefix, self._parsed = bytearray(), None
            worker._current = None
            self._done.set()
        if then is not None:
            then(self)
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
            worker._last_size = staged.size
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
        parsed = self._parsed if self._parsed is not None else PrefixIndex(self._prefix)
        index = parsed.result(staged.size)
        return index if index is not None else index_instance(staged.path)

    def _discard(self, _: Any) -> None:
        """The association ended in the middle of this data set: remove it."""
        if self._writer is not None and self.staged is None:
            self._writer.abort()
        self.failure = self.failure or ("the association ended", OUT_OF_RESOURCES)
        self._done.set()
