"""The gateway store as the importer's :class:`media.import_result.InstanceSink` (R-PDI-7).

``store`` files a reconciled instance exactly as the other ingest paths do
(STOW-RS, C-STORE): the file is checked as Part 10 and indexed
(:func:`gateway.store.index.index_instance`), its SHA-256 is verified, it is
fsynced and renamed to its content address, and the metadata is committed in
one durable transaction; then the instance is attributed to the import record.
The importer writes its temporary files into the store's own ``tmp`` folder
(same file system, swept at start), so an instance is moved, never copied, and
nothing from a medium is written anywhere else.

``exists`` answers with the SHA-256 of the *original* medium file for an
instance imported before (the importer compares it with the file it is about
to import), or with the stored bytes' SHA-256 for instances that arrived some
other way.  A store refusal (same UID with other bytes, or a study that
belongs to another patient) is raised as :class:`~pki.errors.ConflictError`,
which the importer reports for that instance and goes on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.imports.records import ImportRecords
from gateway.store.files import StagedFile
from gateway.store.index import index_instance
from gateway.store.model import AddResult
from media.import_result import InstanceMeta
from pki.errors import ConflictError, InvalidInputError, StoreError

if TYPE_CHECKING:
    from gateway.service import Gateway

CHUNK = 1024 * 1024


class GatewaySink:
    """Stores imported instances for one import record."""

    def __init__(self, gw: Gateway, records: ImportRecords, import_id: int) -> None:
        self.gw = gw
        self.records = records
        self.import_id = import_id
        self.source = f"media-import:{import_id}"
        #: SOP Instance UID -> medium SHA-256, for instances stored by this run.
        self._this_run: dict[str, str] = {}

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
        staged = self._stage(path, meta)
        self.gw.files.commit(staged)
        outcome = self.gw.store.add_instances([(idx, staged.sha256, staged.size)], self.source)
        if outcome[0] == AddResult.CONFLICT:
            # The content-addressed file stays as an unreferenced object (harmless).
            raise ConflictError(
                "the store refused this instance: the same SOP Instance UID with other content, "
                "or a study or series that belongs to another patient, is already stored"
            )
        self.records.add_instance(self.import_id, meta, staged.sha256)
        self._this_run[meta.sop_instance_uid] = meta.source_sha256
        return staged.sha256

    def _stage(self, path: Path, meta: InstanceMeta) -> StagedFile:
        """Verify the hash and size and make the file durable in the store's ``tmp``."""
        tmp = self.gw.files.tmp
        if path.parent.resolve() != tmp.resolve():  # another work dir: copy it in first
            writer = self.gw.files.writer(max(meta.size, 1))
            try:
                with open(path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        writer.write(chunk)
            except BaseException:
                writer.abort()
                raise
            staged = writer.finish(self.gw.settings.store.fsync)
            if staged.sha256 != meta.sha256:
                staged.path.unlink(missing_ok=True)
                raise StoreError("the reconciled file changed before it was stored")
            return staged
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
            if self.gw.settings.store.fsync:
                os.fsync(fh.fileno())
        if digest.hexdigest() != meta.sha256 or size != meta.size:
            raise StoreError("the reconciled file changed before it was stored")
        return StagedFile(path, meta.sha256, size)
