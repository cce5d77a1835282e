"""The values a transport returns for one batch (shared by DIMSE and STOW-RS senders)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.forward.integrity import InstanceDigest


@dataclass(frozen=True)
class SendItem:
    job_id: int
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str
    path: Path


@dataclass(frozen=True)
class SentInstance:
    """What the destination confirmed, for the queue (never built before the response)."""

    item: SendItem
    confirmed: str
    sent_syntax: str
    dataset_sha256: str
    digest: InstanceDigest


@dataclass
class BatchResult:
    #: job id -> (error in plain words, permanent)
    failures: dict[int, tuple[str, bool]] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)
    #: Claimed but not attempted (stop requested, association lost, context budget).
    untouched: list[int] = field(default_factory=list)
    transaction_uid: str | None = None
    committed_in_association: bool = False
    #: Why commitment could not be requested for the sent jobs ("" = requested).
    commitment_error: str = ""
