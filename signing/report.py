"""Verification report types shared by DICOM, PAdES and CAdES verification (R-SIG-8).

One :class:`SignatureReport` per signature (or document timestamp) says what
R-SIG-8 asks: integrity, signer, qualification (hcRole), chain, revocation
status at signing time, timestamp time and TSA, and what the signature covers
(DICOM attributes or PDF byte ranges).  :class:`VerificationReport` gathers
them for one artifact with the overall verdict against the signing policy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["SignatureReport", "TimestampReport", "VerificationReport"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


@dataclass(kw_only=True)
class TimestampReport:
    """One RFC 3161 token: signature, certified (DICOM) or document timestamp."""

    kind: str  # "certified" (DICOM CMS_TSP), "signature", "document", "archive"
    ok: bool
    time: datetime | None = None
    tsa: str | None = None
    problem: str | None = None


@dataclass(kw_only=True)
class SignatureReport:
    """What one signature proves (R-SIG-8).

    ``revocation`` is ``"good"``, ``"revoked"``, ``"unknown"`` or
    ``"unchecked"`` *at signing time* (the timestamp time when there is a valid
    timestamp, else the signer's claimed time).  ``coverage`` holds DICOM tags
    (``covered_attributes``) or PDF ``byte_range`` and whether the whole file
    is covered.  ``problems`` lists every reason this signature fails the
    policy; it is filled by the verifier.
    """

    kind: str  # "dicom", "pades", "cades", "document-timestamp"
    intact: bool
    integrity_problem: str | None = None
    signer_subject: str | None = None
    signer_sha256: str | None = None
    hc_role: str | None = None
    chain_ok: bool = False
    chain_problem: str | None = None
    revocation: str = "unchecked"
    signing_time: datetime | None = None
    claimed_time: datetime | None = None
    timestamps: list[TimestampReport] = field(default_factory=list)
    coverage: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def timestamp_ok(self) -> bool:
        return any(t.ok for t in self.timestamps)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timestamp_ok"] = self.timestamp_ok
        data["ok"] = not self.problems
        return _jsonable(data)


@dataclass(kw_only=True)
class VerificationReport:
    """All signatures of one artifact and the verdict (``ok``) against the policy."""

    path: str
    artifact: str  # "dicom", "pdf", "file+p7s"
    record_type: str | None
    signatures: list[SignatureReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and all(not s.problems for s in self.signatures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "artifact": self.artifact,
            "record_type": self.record_type,
            "verdict": "valid" if self.ok else "invalid",
            "problems": list(self.problems),
            "details": _jsonable(self.details),
            "signatures": [s.to_dict() for s in self.signatures],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, sort_keys=False)
