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
  :data:`PREFIX_BYTES` (:func:`index_prefix`) as soon as they are there,
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
from io import BytesIO
from typing import Any

import pydicom

from gateway.store.files import FileStore, HashingWriter, StagedFile
from gateway.store.index import InstanceIndex, TruncatedInstanceError, index_dataset
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


def index_prefix(prefix: bytes | bytearray, size: int) -> InstanceIndex | None:
    """The index of a Part 10 file of ``size`` bytes from its leading bytes, if they suffice.

    Returns None whenever the prefix cannot prove what ``index_instance``
    on the whole file would find: the caller then indexes the whole file.
    It suffices when every index attribute lies before the last data element
    the prefix reaches, and that element, of defined length, ends exactly
    at the end of the file (typically the pixel data).  An element that runs
    past the end of the file is a truncated instance, as for
    ``index_instance``.
    """
    whole = len(prefix) >= size
    try:
        ds = pydicom.dcmread(BytesIO(prefix), defer_size=1024)
    except Exception:  # noqa: BLE001 - malformed or cut by the prefix: decide on the file
        return None
    elements = list(ds._dict.values())  # raw elements keep their offsets
    if not elements:
        return None
    end = 0
    for elem in elements:
        tell = getattr(elem, "value_tell", None)
        length = getattr(elem, "length", None)
        if tell is None or length in (None, _UNDEFINED_LENGTH):
            if elem is elements[-1] and not whole:
                return None  # cannot tell where the data set ends
            continue
        end = max(end, tell + length)
    if end > size:
        raise TruncatedInstanceError(
            f"instance is truncated: its data elements need {end} bytes but only {size} arrived"
        )
    if not whole:
        last = elements[-1]
        if int(last.tag) <= _LAST_INDEX_TAG or end != size:
            return None
    return index_dataset(ds)


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
        self._files = files
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._budget = _Budget(IN_FLIGHT_BYTES)
        self._spare: HashingWriter | None = None
        self._current: StreamSink | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sekisho-dimse-ingest", daemon=True)
        self._thread.start()

    # -- DUL thread ----------------------------------------------------------
    def open(self, header: Callable[[], bytes]) -> StreamSink:
        """A sink for the next data set; ``header()`` gives its PS3.10 header (preamble, meta)."""
        sink = StreamSink(self)
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
        return writer if writer is not None else self._files.writer(self._max_bytes)

    def prepare_spare(self) -> None:
        """Open the next instance's temporary file while nobody waits for it."""
        if self._spare is None and not self._closed:
            try:
                self._spare = self._files.writer(self._max_bytes)
            except OSError as exc:
                log.warning("could not open a temporary file ahead: %s", exc.strerror)

    @property
    def fsync(self) -> bool:
        return self._fsync


class StreamSink:
    """One C-STORE data set on its way to the content store (see the module docstring).

    The DUL thread calls :meth:`write` and :meth:`end`; the C-STORE handler
    calls :meth:`wait`, then reads :attr:`staged`, :attr:`index` and
    :attr:`error`.  Errors (size cap, disk) are kept, not raised: on the DUL
    thread an exception would abort the association, and the handler
    answers with the error's status instead.
    """

    def __init__(self, worker: IngestWorker) -> None:
        self._worker = worker
        self._writer: HashingWriter | None = None
        self._prefix = bytearray()
        self._done = threading.Event()
        self.error: SekishoError | None = None
        self.staged: StagedFile | None = None
        #: The index attributes, when the leading bytes sufficed (:func:`index_prefix`).
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
        """Wait until the data set is written (and fdatasynced if the store is durable)."""
        return self._done.wait(timeout)

    def discard(self) -> None:
        """Remove what was written (a refused instance)."""
        self._worker.post(self._discard, None)

    def close(self) -> None:
        """Called by pynetdicom's Storage SCP after the handler; nothing left to do."""

    # -- worker thread -------------------------------------------------------
    def _start(self, header: Callable[[], bytes]) -> None:
        worker = self._worker
        worker._current = self
        try:
            self._writer = worker.take_writer()
        except OSError as exc:
            self.error = StoreError(f"could not write the received instance: {exc.strerror}")
            return
        self._write(header())

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        writer = self._writer
        if self.error is not None or writer is None:
            return
        missing = PREFIX_BYTES - len(self._prefix)
        if missing > 0:
            self._prefix += data[:missing]
        try:
            writer.write(data)
        except SekishoError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(StoreError(f"could not write the received instance: {exc.strerror}"))

    def _fail(self, exc: SekishoError) -> None:
        self.error = exc
        if self._writer is not None:
            self._writer.abort()

    def _complete(self, _: Any) -> None:
        worker = self._worker
        try:
            if self.error is None and self._writer is not None:
                try:
                    self.staged = self._writer.finish(worker.fsync)
                except OSError as exc:
                    self._writer.path.unlink(missing_ok=True)
                    self.error = StoreError(f"could not write the instance: {exc.strerror}")
                else:
                    try:
                        self.index = index_prefix(self._prefix, self.staged.size)
                    except InvalidInputError as exc:
                        self.error = exc
        finally:
            self._prefix = bytearray()
            worker._current = None
            self._done.set()
        worker.prepare_spare()

    def _discard(self, _: Any) -> None:
        if self._writer is not None and self.staged is None:
            self._writer.abort()
        elif self.staged is not None:
            self.staged.path.unlink(missing_ok=True)
        self._done.set()
