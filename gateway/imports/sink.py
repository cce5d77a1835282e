"""The gateway store as the importer's :class:`media.import_result.InstanceSink` (R-PDI-7).

``store`` files a reconciled instance as the other ingest paths do (STOW-RS,
C-STORE): the file is checked as Part 10 and indexed
(:func:`gateway.store.index.index_instance`), made durable and renamed to its
content address (its SHA-256 is the one the importer computed while writing
it in this process), and its metadata is committed durably -- in batches,
together with its attribution to the import record -- before the import is
saved.  The importer writes its temporary files into the store's own ``tmp``
folder (same file system, swept at start), so an instance is moved, never
copied, and nothing from a medium is written anywhere else.

Durability work is batched and overlapped with the importer: ``store`` takes
the file over (a rename inside ``tmp``) and starts its ``fdatasync`` in a
background thread; :meth:`GatewaySink.flush` waits for the batch's syncs,
renames the files to their content addresses, fsyncs their directories once
per batch, and only then commits the metadata.  So, as before, no metadata
row ever names a file that is not durably in place, and no file reaches its
content address before its bytes are on disk.

``exists`` answers with the SHA-256 of the *original* medium file for an
instance imported before (the importer compares it with the file it is about
to import), or with the stored bytes' SHA-256 for instances that arrived some
other way.  A store refusal (same UID with other bytes, or a study that
belongs to another patient) is raised as :class:`~pki.errors.ConflictError`,
which the importer reports for that instance and goes on.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.imports.records import ImportRecords
from gateway.store.files import StagedFile
from gateway.store.index import InstanceIndex, index_instance
from gateway.store.model import AddResult
from media.import_result import InstanceMeta
from pki.errors import ConflictError, InvalidInputError, StoreError

if TYPE_CHECKING:
    from gateway.service import Gateway

CHUNK = 1024 * 1024
#: Files synced at the same time: the disk queues them, the importer goes on.
SYNC_THREADS = 2

#: A stored file waiting for :meth:`GatewaySink.flush`: index, metadata, file, its sync.
_Pending = tuple[InstanceIndex, InstanceMeta, StagedFile, "Future[None] | None"]


class GatewaySink:
    """Stores imported instances for one import record.

    Files are made durable and moved to their content address one by one; the
    metadata rows (instances index and import attribution) are committed in
    batches of ``batch_size`` -- one durable transaction each instead of two
    per instance -- and by :meth:`flush`, which the caller must call at the
    end (also after a failure).  Placement conflicts are checked per instance
    before anything is written, so the importer still reports them per file;
    one that appears only at commit (another writer raced us) is kept in
    :attr:`late_conflicts` for the caller to report.
    """

    def __init__(
        self, gw: Gateway, records: ImportRecords, import_id: int, *, batch_size: int = 64
    ) -> None:
        self.gw = gw
        self.records = records
        self.import_id = import_id
        self.batch_size = batch_size
        self.source = f"media-import:{import_id}"
        #: SOP Instance UID -> medium SHA-256, for instances stored by this run.
        self._this_run: dict[str, str] = {}
        self._pending: list[_Pending] = []
        #: Background data syncs of the pending files (see :meth:`_stage`).
        self._syncer: ThreadPoolExecutor | None = None
        #: (study, series) placements accepted in this run, and their patient.
        self._placed: dict[tuple[str, str], tuple[str, str]] = {}
        #: SOP Instance UIDs the store refused at commit time.
        self.late_conflicts: list[str] = []

    @property
    def stored_count(self) -> int:
        """How many instances this run has stored so far."""
        return len(self._this_run)

    def exists(self, sop_instance_uid: str) -> str | None:
        known = self._this_run.get(sop_instance_uid)
        if known is not None:
            return known
        imported = self.records.source_sha256_of(sop_instance_uid)
        if imported is not None:
            return imported
        stored = self.gw.store.find_instance(sop_instance_uid)
        return stored.sha256 if stored is not None else None

    def store(self, path: Path, meta: InstanceMeta) -> str:
        path = Path(path)
        idx = index_instance(path)
        if idx.sop_instance_uid != meta.sop_instance_uid:
            raise InvalidInputError("the reconciled file names another SOP Instance UID")
        if (idx.patient_id, idx.issuer) != (meta.patient_id, meta.issuer_of_patient_id):
            raise InvalidInputError("the reconciled file does not carry the local patient ID")
        self._check_placement(idx)
        staged, synced = self._stage(path, meta)
        self._pending.append((idx, meta, staged, synced))
        self._this_run[meta.sop_instance_uid] = meta.source_sha256
        if len(self._pending) >= self.batch_size:
            self.flush()
        return staged.sha256

    def flush(self) -> None:
        """Make the pending files durable and visible, then commit their metadata at once.

        Order (R-XCH-5): every file's data synced, renamed to its content
        address, the directories synced, and only then the metadata rows and
        their attribution to the import committed in one transaction each.
        """
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        committed = 0
        try:
            for _idx, _meta, _staged, synced in batch:
                if synced is not None:
                    synced.result()
            paths = []
            for _idx, _meta, staged, _synced in batch:
                paths.append(self.gw.files.commit(staged, sync_dir=False))
                committed += 1
            self.gw.files.sync_dirs(paths)
        except BaseException as exc:
            for _idx, meta, staged, synced in batch[committed:]:
                if synced is not None:
                    wait_futures([synced])
                staged.path.unlink(missing_ok=True)
                self._this_run.pop(meta.sop_instance_uid, None)
            if isinstance(exc, OSError):
                raise StoreError(
                    f"could not store an imported instance file: {exc.strerror}"
                ) from exc
            raise
        finally:
            if self._syncer is not None:  # the next batch starts its own
                self._syncer.shutdown(wait=True)
                self._syncer = None
        outcome = self.gw.store.add_instances(
            [(idx, staged.sha256, staged.size) for idx, _m, staged, _s in batch], self.source
        )
        kept = []
        for (_idx, meta, staged, _s), result in zip(batch, outcome, strict=True):
            if result == AddResult.CONFLICT:
                self.late_conflicts.append(meta.sop_instance_uid)
                self._this_run.pop(meta.sop_instance_uid, None)
            else:
                kept.append((meta, staged.sha256))
        self.records.add_instances(self.import_id, kept)

    def _check_placement(self, idx: InstanceIndex) -> None:
        """Refuse, before writing, a study or series the store files under another patient."""
        key = (idx.study_uid, idx.series_uid)
        patient = (idx.patient_id, idx.issuer)
        if self._placed.get(key) == patient:
            return
        owner = self.records.placement_of(idx.study_uid, idx.series_uid)
        if owner is not None and owner != (idx.study_uid, *patient):
            raise ConflictError(
                "the store refused this instance: its study or series is already stored "
                "under another patient or study"
            )
        self._placed[key] = patient

    def _stage(self, path: Path, meta: InstanceMeta) -> tuple[StagedFile, Future[None] | None]:
        """Take the file over in the store's ``tmp`` and start making it durable.

        A file in ``tmp`` was written and hashed by the importer in this process
        (``meta.sha256``); it is not read again: it is renamed to a name of the
        sink's own (the importer removes whatever is left at ``path``), its size
        is checked and its ``fdatasync`` runs in the background until
        :meth:`flush`.  A file elsewhere is copied in, hashed and synced now.
        """
        tmp = self.gw.files.tmp
        fsync = self.gw.settings.store.fsync
        if path.parent != tmp and path.parent.resolve() != tmp.resolve():  # copy it in first
            writer = self.gw.files.writer(max(meta.size, 1))
            try:
                with open(path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        writer.write(chunk)
            except BaseException:
                writer.abort()
                raise
            staged = writer.finish(fsync)
            if staged.sha256 != meta.sha256:
                staged.path.unlink(missing_ok=True)
                raise StoreError("the reconciled file changed before it was stored")
            return staged, None
        owned = tmp / f"import-{self.import_id}-{meta.sha256}.part"
        try:
            os.replace(path, owned)
            os.chmod(owned, 0o400)  # read-only, as the store's own writer creates them
            size = owned.stat().st_size
        except OSError as exc:
            raise StoreError(f"could not stage an imported instance: {exc.strerror}") from exc
        if size != meta.size:
            owned.unlink(missing_ok=True)
            raise StoreError("the reconciled file changed before it was stored")
        staged = StagedFile(owned, meta.sha256, size)
        if not fsync:
            return staged, None
        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="sekisho-sync")
        return staged, self._syncer.submit(_fdatasync, owned)


def _fdatasync(path: Path) -> None:
    """Flush a file's data (and size) to disk, as the store's own writer does."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
