"""Sekisho's single error vocabulary.

Every failure that crosses a boundary (a partner, a medium, a signer, the
store, the configuration) is raised as a subclass of :class:`SekishoError`.
Each class carries one row of the table below: a stable code, an HTTP status,
a DIMSE status and the DICOM audit outcome (PS3.15 A.5.3 EventOutcomeIndicator:
0 success, 4 minor failure, 8 serious failure, 12 major failure).

The root lives in ``pki`` because ``pki`` is the lowest layer: ``media``,
``signing`` and ``gateway`` may all import it, so every library speaks the same
vocabulary without depending on the service.  ``tests/test_errors.py`` checks
that every subclass has its own row.
"""

from __future__ import annotations

from typing import ClassVar


class SekishoError(Exception):
    """Root of every error Sekisho raises on purpose.

    ``message`` is written for an operator or a partner's engineer: it says what
    was refused and why, and never carries patient data.
    """

    code: ClassVar[str] = "SEKISHO"
    http_status: ClassVar[int] = 500
    #: DIMSE status to answer with (PS3.7 C.4: 0xA700 out of resources,
    #: 0xC000 cannot understand, 0xA900 data set does not match SOP class,
    #: 0x0124 refused: not authorized).
    dimse_status: ClassVar[int] = 0xC000
    audit_outcome: ClassVar[int] = 8

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Extra operator-facing information (never sent to partners).
        self.detail = detail

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class ConfigurationError(SekishoError):
    """The configuration file or a referenced file is unusable (R-OPS-2)."""

    code = "CONFIG"
    http_status = 500
    audit_outcome = 12


class PeerAuthenticationError(SekishoError):
    """A peer's TLS handshake or certificate was refused (R-TLS-1..5)."""

    code = "PEER_AUTH"
    http_status = 401
    dimse_status = 0x0124
    audit_outcome = 4

    def __init__(self, message: str, *, reason: str, detail: str | None = None) -> None:
        super().__init__(message, detail=detail)
        #: Stable machine-readable reason (``expired``, ``revoked``, ...).
        self.reason = reason


class AuthorizationError(SekishoError):
    """An authenticated peer asked for something it is not permitted to do."""

    code = "FORBIDDEN"
    http_status = 403
    dimse_status = 0x0124
    audit_outcome = 4


class NotFoundError(SekishoError):
    """The requested object does not exist or is not visible to the requester."""

    code = "NOT_FOUND"
    http_status = 404
    dimse_status = 0xC000
    audit_outcome = 4


class InvalidInputError(SekishoError):
    """A request body or dataset is malformed or incomplete."""

    code = "INVALID_INPUT"
    http_status = 400
    dimse_status = 0xC000
    audit_outcome = 4


class PayloadTooLargeError(InvalidInputError):
    """A request body or a file is larger than the configured cap."""

    code = "TOO_LARGE"
    http_status = 413
    dimse_status = 0xA700


class UnsupportedMediaTypeError(InvalidInputError):
    """The request's content type is not one this endpoint accepts."""

    code = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415


class ConflictError(SekishoError):
    """The request conflicts with what is stored (e.g. same UID, other bytes)."""

    code = "CONFLICT"
    http_status = 409
    dimse_status = 0xA900
    audit_outcome = 4


class StoreError(SekishoError):
    """The content store or metadata database failed to persist something."""

    code = "STORE"
    http_status = 503
    dimse_status = 0xA700
    audit_outcome = 12


class TransportError(SekishoError):
    """A connection to a remote peer failed (network, TLS, association)."""

    code = "TRANSPORT"
    http_status = 502
    dimse_status = 0xA700
    audit_outcome = 8


class MediaImportError(SekishoError):
    """A patient-brought medium could not be read or imported (R-PDI)."""

    code = "MEDIA_IMPORT"
    http_status = 422
    audit_outcome = 8


class MalwareDetectedError(MediaImportError):
    """The malware scanner reported a finding; the import stops (R-PDI-2)."""

    code = "MALWARE"
    audit_outcome = 12


class ReconciliationError(SekishoError):
    """Patient reconciliation needs confirmation or failed (R-PDI-4)."""

    code = "RECONCILIATION"
    http_status = 409
    audit_outcome = 4


class SigningError(SekishoError):
    """A signature could not be created or is not allowed by policy (R-SIG)."""

    code = "SIGNING"
    http_status = 422
    audit_outcome = 8


class TimestampError(SigningError):
    """The RFC 3161 TSA failed or its response was not acceptable (R-SIG-5)."""

    code = "TIMESTAMP"
    http_status = 502


class VerificationError(SigningError):
    """A signature or timestamp does not verify (R-SIG-8)."""

    code = "VERIFICATION"
    http_status = 422


class DigitizationError(SekishoError):
    """A digitized film or paper record fails the quality gate (R-DIG-2)."""

    code = "DIGITIZATION"
    http_status = 422
    audit_outcome = 4


class AuditWriteError(SekishoError):
    """The audit trail could not be written; the action must not proceed."""

    code = "AUDIT_WRITE"
    http_status = 503
    dimse_status = 0xA700
    audit_outcome = 12


class AuditIntegrityError(SekishoError):
    """The audit chain does not verify (R-AUD-2)."""

    code = "AUDIT_INTEGRITY"
    http_status = 500
    audit_outcome = 12


def all_error_classes() -> list[type[SekishoError]]:
    """Every error class, the root included, in definition order."""
    seen: list[type[SekishoError]] = [SekishoError]
    stack = list(SekishoError.__subclasses__())
    while stack:
        cls = stack.pop(0)
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen
