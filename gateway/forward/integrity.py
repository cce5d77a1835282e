"""What exactly leaves the gateway, and how it is checked on the way back (R-XCH-5).

A stored instance is a PS3.10 file: preamble, ``DICM``, the File Meta
Information (group 0002) and the dataset.  DIMSE carries only the dataset
(PS3.7 C-STORE Data Set), and every receiver writes its own file meta, so the
hash that can be compared end to end is the SHA-256 of the *dataset bytes*.
Before each send the stored file is read once: its whole-file SHA-256 must still
equal the hash kept on receipt (a corrupted local copy is never forwarded), and
the dataset hash and the meta bytes are recorded with the job.  On restore, the
received dataset is checked against that record, and the original file is
rebuilt from the kept meta bytes and checked against the hash kept on receipt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pynetdicom.dsutils import split_dataset

from pki.errors import StoreError

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class InstanceDigest:
    file_sha256: str
    dataset_sha256: str
    dataset_offset: int
    #: Preamble, ``DICM`` and the File Meta Information exactly as stored.
    meta: bytes


def dataset_offset(path: Path) -> int:
    """Byte offset of the dataset in a PS3.10 file (after group 0002)."""
    try:
        _meta, offset = split_dataset(path)
    except Exception as exc:  # pydicom raises many types on malformed input
        raise StoreError(f"stored instance is not a readable DICOM file: {exc}") from exc
    return int(offset)


def digest_file(path: Path) -> InstanceDigest:
    """Whole-file and dataset SHA-256 of a PS3.10 file in one pass."""
    offset = dataset_offset(path)
    whole = hashlib.sha256()
    data = hashlib.sha256()
    meta = b""
    pos = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            whole.update(block)
            end = pos + len(block)
            if end <= offset:
                meta += block
            elif pos >= offset:
                data.update(block)
            else:
                cut = offset - pos
                meta += block[:cut]
                data.update(block[cut:])
            pos = end
    return InstanceDigest(whole.hexdigest(), data.hexdigest(), offset, meta)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
