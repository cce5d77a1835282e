"""One error vocabulary: every error class has its own row (STYLE lesson 2).

Each class from :func:`pki.errors.all_error_classes` must define its own
stable code (distinct from every other class), an HTTP error status, a DIMSE
failure status and a failure audit outcome, and must render for a partner
without leaking operator details.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

from pki.errors import PeerAuthenticationError, SekishoError, all_error_classes

#: Modules known to define error classes; imported so that their classes are
#: registered as subclasses before the table is read.
KNOWN = ("pki.errors", "gateway.dicomweb.wado", "gateway.store.index")


def _import_everything() -> None:
    for name in KNOWN:
        importlib.import_module(name)
    # Best effort for the rest: a package another engineer is still writing
    # may not import yet; its own tests report that.
    for package in ("pki", "gateway", "media", "signing"):
        try:
            module = importlib.import_module(package)
        except Exception:  # noqa: BLE001
            continue
        for info in pkgutil.walk_packages(module.__path__, package + ".", onerror=lambda _n: None):
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001
                continue


_import_everything()
CLASSES = all_error_classes()

#: The stable codes of the core vocabulary: renaming one breaks partners' tooling.
STABLE_CODES = {
    "SekishoError": "SEKISHO",
    "ConfigurationError": "CONFIG",
    "PeerAuthenticationError": "PEER_AUTH",
    "AuthorizationError": "FORBIDDEN",
    "NotFoundError": "NOT_FOUND",
    "InvalidInputError": "INVALID_INPUT",
    "PayloadTooLargeError": "TOO_LARGE",
    "UnsupportedMediaTypeError": "UNSUPPORTED_MEDIA_TYPE",
    "ConflictError": "CONFLICT",
    "StoreError": "STORE",
    "TransportError": "TRANSPORT",
    "MediaImportError": "MEDIA_IMPORT",
    "MalwareDetectedError": "MALWARE",
    "ReconciliationError": "RECONCILIATION",
    "SigningError": "SIGNING",
    "TimestampError": "TIMESTAMP",
    "VerificationError": "VERIFICATION",
    "DigitizationError": "DIGITIZATION",
    "AuditWriteError": "AUDIT_WRITE",
    "AuditIntegrityError": "AUDIT_INTEGRITY",
}


def make(cls: type[SekishoError], message: str = "refused", **kw: object) -> SekishoError:
    params = inspect.signature(cls.__init__).parameters
    if "reason" in params:
        kw.setdefault("reason", "test-reason")
    return cls(message, **kw)  # type: ignore[arg-type]


def test_the_table_covers_the_core_vocabulary() -> None:
    names = {c.__name__ for c in CLASSES if c.__module__ == "pki.errors"}
    assert names == set(STABLE_CODES)
    assert CLASSES[0] is SekishoError
    assert len(CLASSES) == len(set(CLASSES))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_has_its_own_row(cls: type[SekishoError]) -> None:
    assert issubclass(cls, SekishoError)
    for attr in ("code", "http_status", "dimse_status", "audit_outcome"):
        assert any(attr in k.__dict__ for k in cls.__mro__ if issubclass(k, SekishoError))
    # The code is the class's own, not inherited: a row per class.
    assert "code" in cls.__dict__, f"{cls.__name__} inherits its code"
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", cls.code)
    assert cls.__doc__ and cls.__doc__.strip()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_statuses_and_outcomes_are_sane(cls: type[SekishoError]) -> None:
    assert isinstance(cls.http_status, int) and 400 <= cls.http_status <= 599
    # DIMSE: a failure or refusal status, never 0x0000 success or a warning (0xB...).
    assert isinstance(cls.dimse_status, int) and 0 < cls.dimse_status <= 0xFFFF
    assert cls.dimse_status & 0xF000 != 0xB000
    # PS3.15 A.5.3 EventOutcomeIndicator: an error is never "success" (0).
    assert cls.audit_outcome in (4, 8, 12)
    if cls.http_status >= 500:  # our fault or an outage: at least a serious failure
        assert cls.audit_outcome >= 8


def test_codes_are_distinct() -> None:
    codes = [c.code for c in CLASSES]
    duplicates = {code for code in codes if codes.count(code) > 1}
    assert not duplicates, f"shared codes: {duplicates}"


def test_core_codes_are_stable() -> None:
    table = {c.__name__: c.code for c in CLASSES if c.__module__ == "pki.errors"}
    assert table == STABLE_CODES


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_partners_see_code_and_message_but_never_the_detail(cls: type[SekishoError]) -> None:
    exc = make(cls, "the thing was refused", detail="/srv/secret/path and patient P-123")
    assert str(exc) == exc.message == "the thing was refused"
    shown = exc.to_dict()
    assert shown["code"] == cls.code
    assert shown["message"] == "the thing was refused"
    assert "P-123" not in repr(shown) and "/srv/secret" not in repr(shown)
    assert exc.detail == "/srv/secret/path and patient P-123"


def test_peer_authentication_carries_a_reason() -> None:
    exc = PeerAuthenticationError("the client certificate has expired", reason="expired")
    assert exc.reason == "expired"
    assert exc.http_status == 401 and exc.dimse_status == 0x0124
    with pytest.raises(TypeError):
        PeerAuthenticationError("no reason given")  # type: ignore[call-arg]
