"""Outbound destinations, routing rules and the transfer-syntax policy.

Configuration (documented in ``config/README.md``)::

    [destinations.ext-store]
    role = "external-storage"          # partner | pacs | external-storage
    transport = "dimse"                # dimse | dicomweb
    host = "storage.example"
    port = 2762
    called_ae = "EXTSTORE"
    storage_commitment = true
    [destinations.ext-store.tls]       # pki.tls.TlsEndpointSettings, own per destination
    certificate = "pki/gateway-server.crt.pem"
    private_key = "pki/gateway-server.key.pem"
    trust_anchors = ["pki/provider-root.crt.pem"]
    [destinations.ext-store.retry]
    max_attempts = 10

    [routing]
    on_receive = ["ext-store"]         # every stored instance goes there

Everything here is a frozen value; :func:`proposed_syntaxes` and
:func:`plan_contexts` are the pure core of R-XCH-6 (no lossy transcoding).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from pki.tls import TlsEndpointSettings

DestinationRole = Literal["partner", "pacs", "external-storage"]
Transport = Literal["dimse", "dicomweb"]

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
#: The only conversion the gateway ever makes is between these two (both
#: uncompressed little endian, lossless by construction; PS3.5 Annex A.1/A.2).
UNCOMPRESSED_LE = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
#: Storage Commitment Push Model SOP Class and its well-known instance (PS3.4 J.3).
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: pynetdicom and PS3.8 allow at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class RetrySettings:
    """Retries with exponential backoff, then a stop with an alert (R-XCH-4; METI 7.6.8(4))."""

    max_attempts: int = 10
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("retry.max_attempts must be at least 1")
        if self.backoff_base_seconds < 0 or self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("retry backoff must satisfy 0 <= base <= max")

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt: base * 2^(n-1), capped."""
        exponent = max(0, min(attempts - 1, 30))
        return float(min(self.backoff_base_seconds * (2**exponent), self.backoff_max_seconds))


@dataclass(frozen=True)
class DestinationSettings:
    """One outbound peer: a partner, a PACS or the external storage provider (R-EXT-1)."""

    role: DestinationRole
    transport: Transport
    #: Our client identity and the anchors for *this* peer's server certificate.
    tls: TlsEndpointSettings
    # -- dimse ------------------------------------------------------------
    host: str = ""
    port: int = 2762
    called_ae: str = ""
    #: Our AE title towards this peer (default: ``instance.ae_title``).
    calling_ae: str = ""
    #: Name checked against the peer's certificate (default: ``host``).
    server_name: str = ""
    #: Request Storage Commitment after sending (PS3.4 Annex J).
    storage_commitment: bool = False
    #: How long the association is held open for an N-EVENT-REPORT.
    commitment_timeout_seconds: float = 30.0
    #: A transaction with no result after this long is requested again (new attempt).
    commitment_deadline_seconds: float = 86400.0
    #: AE title the provider uses when it reports on a new association (default: called_ae).
    commitment_ae: str = ""
    # -- dicomweb ---------------------------------------------------------
    #: DICOMweb service root, e.g. ``https://pacs.example/dicom-web`` (PS3.18 8.2).
    url: str = ""
    # -- common -----------------------------------------------------------
    #: The name under which this peer is registered as an inbound partner, if it is
    #: (for the external storage provider it must have no query/retrieve permission).
    partner: str = ""
    retry: RetrySettings = field(default_factory=RetrySettings)
    #: Instances per association / STOW-RS request (always one study).
    batch_size: int = 50
    #: Parallel associations / requests to this destination.
    concurrency: int = 1
    connect_timeout_seconds: float = 10.0
    association_timeout_seconds: float = 30.0
    response_timeout_seconds: float = 120.0
    idle_timeout_seconds: float = 60.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.transport == "dimse":
            if not self.host or not self.called_ae:
                raise ValueError("a dimse destination needs host and called_ae")
            if not 0 < self.port < 65536:
                raise ValueError("port must be between 1 and 65535")
            for label, ae in (("called_ae", self.called_ae), ("calling_ae", self.calling_ae),
                              ("commitment_ae", self.commitment_ae)):
                if ae and (len(ae) > 16 or not ae.isascii() or "\\" in ae):
                    raise ValueError(f"{label} must be at most 16 ASCII characters")
            if self.url:
                raise ValueError("url is for dicomweb destinations")
        else:
            parts = urlsplit(self.url)
            if parts.scheme != "https" or not parts.hostname:
                raise ValueError("a dicomweb destination needs an https:// url (R-TLS-1)")
            if self.storage_commitment:
                raise ValueError("storage_commitment is a DIMSE service; DICOMweb destinations "
                                 "are checked by the STOW-RS response")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("batch_size and concurrency must be at least 1")
        for name in ("connect_timeout_seconds", "association_timeout_seconds",
                     "response_timeout_seconds", "idle_timeout_seconds",
                     "commitment_timeout_seconds", "commitment_deadline_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def tls_name(self) -> str:
        if self.transport == "dicomweb":
            return urlsplit(self.url).hostname or ""
        return self.server_name or self.host

    def address(self) -> str:
        return self.url if self.transport == "dicomweb" else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RoutingSettings:
    """Rules that enqueue instances automatically (R-XCH-4).

    ``on_receive``: every instance stored by the gateway (STOW-RS, C-STORE, media
    import, digitization; already stored ones included when the rule is added) is
    queued to each named destination.  Anything else is sent on request
    (``sekisho send``, admin API).
    """

    on_receive: tuple[str, ...] = ()
    #: How often the store is scanned for new instances.
    scan_interval_seconds: float = 2.0


@dataclass(frozen=True)
class ForwardSettings:
    """Worker tuning shared by every destination."""

    #: A claimed job is re-claimable this long after its worker stopped renewing it
    #: (a crash, SIGKILL or power loss mid-send).
    lease_seconds: float = 60.0
    #: How often idle workers look for due jobs.
    poll_interval_seconds: float = 1.0
    #: Run the workers inside ``sekisho serve``.
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.lease_seconds < 1 or self.poll_interval_seconds <= 0:
            raise ValueError("forward.lease_seconds must be >= 1 and poll_interval positive")


@dataclass(frozen=True)
class RetentionSettings:
    """Local copies kept inside the hospital (R-EXT-4; 000 §8.1).

    Sekisho never deletes local instance files, whatever their forwarding state:
    every record stays readable when the provider or the network is down.
    ``keep_local_days`` is the floor any pruning (a later, separate tool) must
    honour; ``0`` (the default) means "keep all".
    """

    keep_local_days: int = 0

    def __post_init__(self) -> None:
        if self.keep_local_days < 0:
            raise ValueError("retention.keep_local_days must be 0 (keep all) or positive")


def check_forwarding(
    destinations: Mapping[str, DestinationSettings], routing: RoutingSettings
) -> None:
    """Cross-checks of ``[destinations]`` and ``[routing]``; raise ValueError naming the key."""
    for name in destinations:
        if not _NAME.match(name):
            raise ValueError(
                f"destinations.{name}: names are letters, digits, '-', '_' and '.' (max 64)"
            )
    for i, name in enumerate(routing.on_receive):
        if name not in destinations:
            known = ", ".join(sorted(destinations)) or "(none configured)"
            raise ValueError(
                f"routing.on_receive[{i}]: unknown destination {name!r} (configured: {known})"
            )
    if routing.scan_interval_seconds <= 0:
        raise ValueError("routing.scan_interval_seconds must be positive")


# --- transfer syntax policy (R-XCH-6) -------------------------------------------


def proposed_syntaxes(original: str) -> tuple[str, ...]:
    """Transfer syntaxes offered for an instance stored in ``original``.

    The instance's own syntax first (sent byte for byte); Explicit and Implicit VR
    Little Endian are interchangeable only when the original is one of them.  A
    compressed or big-endian original is offered as itself only: the gateway never
    decompresses, recompresses or converts to a lossy syntax.
    """
    if original in UNCOMPRESSED_LE:
        other = IMPLICIT_VR_LE if original == EXPLICIT_VR_LE else EXPLICIT_VR_LE
        return (original, other)
    return (original,)


@dataclass(frozen=True)
class ContextPlan:
    """Presentation contexts to propose: (abstract syntax, (transfer syntax,)) in order."""

    contexts: tuple[tuple[str, tuple[str, ...]], ...]
    #: Indexes (into the input) of items that fit in this association.
    included: tuple[int, ...]


def plan_contexts(
    items: Iterable[tuple[str, str]], *, storage_commitment: bool = False
) -> ContextPlan:
    """One context per (SOP class, original syntax), each with that syntax alone, plus a
    fallback context with the other uncompressed little-endian syntax when allowed.

    Separate single-syntax contexts make the acceptor say yes or no to exactly the
    encoding we hold, so that a byte-identical send is chosen whenever possible.
    Items whose contexts would exceed :data:`MAX_CONTEXTS` are left for another
    association.
    """
    budget = MAX_CONTEXTS - (1 if storage_commitment else 0)
    contexts: list[tuple[str, tuple[str, ...]]] = []
    seen: set[tuple[str, str]] = set()
    included: list[int] = []
    for index, (sop_class, ts) in enumerate(items):
        wanted = [(sop_class, s) for s in proposed_syntaxes(ts) if (sop_class, s) not in seen]
        if len(contexts) + len(wanted) > budget:
            continue
        for key in wanted:
            seen.add(key)
            contexts.append((key[0], (key[1],)))
        included.append(index)
    if storage_commitment:
        contexts.append((STORAGE_COMMITMENT_PUSH, (EXPLICIT_VR_LE, IMPLICIT_VR_LE)))
    return ContextPlan(tuple(contexts), tuple(included))


def choose_syntax(original: str, accepted: Iterable[str]) -> str | None:
    """The syntax to send an instance in, given the syntaxes accepted for its class."""
    accepted = set(accepted)
    for ts in proposed_syntaxes(original):
        if ts in accepted:
            return ts
    return None


def uid_name(uid: str) -> str:
    """A readable name for a SOP Class or Transfer Syntax UID (the UID when unknown)."""
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return f"{name} ({uid})" if name and name != uid else uid
    except Exception:  # noqa: BLE001 - names are cosmetic
        return uid


def no_syntax_reason(sop_class: str, original_ts: str, sop_class_supported: bool) -> str:
    """The plain-words reason a job fails when no context fits (R-XCH-6)."""
    if not sop_class_supported:
        return f"destination does not support the SOP class {uid_name(sop_class)}"
    return (
        f"destination accepts no lossless transfer syntax for {uid_name(sop_class)} "
        f"(stored as {uid_name(original_ts)}; the gateway never transcodes to a lossy syntax)"
    )
