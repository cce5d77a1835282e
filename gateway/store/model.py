"""Records kept by the metadata store, and the interface a backend implements.

The embedded backend is SQLite (``gateway.store.sqlite``); a PostgreSQL backend
implements the same :class:`MetadataStore` protocol for scale-out (R-OPS-1).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.store.index import InstanceIndex

Permission = Literal["push", "query", "retrieve"]
ALL_PERMISSIONS: tuple[Permission, ...] = ("push", "query", "retrieve")
PartnerRole = Literal["partner", "external-storage"]


@dataclass(frozen=True)
class Partner:
    """A registered peer system: a regional partner or the storage provider."""

    name: str
    #: SHA-256 fingerprints (lower hex) of certificates bound to this partner.
    fingerprints: tuple[str, ...] = ()
    #: (issuer, subject) pairs, human-friendly form as asn1crypto renders it.
    issuer_subjects: tuple[tuple[str, str], ...] = ()
    ae_titles: tuple[str, ...] = ()
    permissions: frozenset[str] = frozenset()
    networks: tuple[str, ...] = ()
    #: Source addresses / networks allowed to connect (empty = any) (001 Art.4(1)⑥).
    allowed_addresses: tuple[str, ...] = ()
    role: PartnerRole = "partner"
    #: The partner's own DICOM nodes a C-MOVE may send to: (AE title, "host:port")
    #: pairs (PS3.4 C.4.2.1.4.1 Move Destination; reached over TLS).
    move_destinations: tuple[tuple[str, str], ...] = ()
    certificate_not_after: str = ""
    created_at: str = ""
    created_by: str = ""

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions

    def move_destination(self, ae_title: str) -> tuple[str, int] | None:
        """(host, port) of this partner's registered move destination, or None."""
        for title, address in self.move_destinations:
            if title == ae_title.strip():
                host, _, port = address.rpartition(":")
                return host.strip("[]"), int(port)
        return None

    def address_allowed(self, address: str | None) -> bool:
        if not self.allowed_addresses:
            return True
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.allowed_addresses)


@dataclass(frozen=True)
class Consent:
    id: int
    patient_id: str
    issuer: str
    scope_kind: Literal["partner", "network"]
    scope_name: str
    granted_by: str
    granted_at: str
    revoked_by: str | None = None
    revoked_at: str | None = None
    note: str = ""


@dataclass(frozen=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    sha256: str
    size: int
    patient_id: str
    issuer: str
    instance_number: int | None = None
    received_at: str = ""
    source: str = ""


@dataclass(frozen=True)
class StudyFilter:
    """QIDO-RS / C-FIND matching keys (PS3.18 8.3.4, PS3.4 C.2.2.2)."""

    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None
    modality: str | None = None
    accession: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True)
class Visibility:
    """Who is asking: ``None`` for the hospital itself (sees everything)."""

    partner: str
    networks: tuple[str, ...] = field(default_factory=tuple)


class AddResult:
    STORED = "stored"
    ALREADY_PRESENT = "already-present"
    CONFLICT = "conflict"


class MetadataStore(Protocol):
    def add_instances(
        self, items: Sequence[tuple[InstanceIndex, str, int]], source: str
    ) -> list[str]: ...

    def find_instance(self, sop_uid: str) -> StoredInstance | None: ...

    def query_studies(self, f: StudyFilter, vis: Visibility | None) -> list[dict[str, object]]: ...

    def query_series(
        self, study_uid: str | None, f: StudyFilter, vis: Visibility | None
    ) -> list[dict[str, object]]: ...

    def query_instances(
        self, study_uid: str | None, series_uid: str | None, f: StudyFilter, vis: Visibility | None
    ) -> list[dict[str, object]]: ...

    def instances_of(
        self,
        study_uid: str,
        series_uid: str | None,
        sop_uid: str | None,
        vis: Visibility | None,
    ) -> list[StoredInstance]: ...

    def add_partner(self, partner: Partner) -> None: ...

    def remove_partner(self, name: str) -> bool: ...

    def list_partners(self) -> list[Partner]: ...

    def partner_for_certificate(self, sha256: str, issuer: str, subject: str) -> Partner | None: ...

    def grant_consent(
        self, patient_id: str, issuer: str, kind: str, scope: str, by: str, note: str = ""
    ) -> Consent: ...

    def revoke_consent(
        self, patient_id: str, issuer: str, kind: str, scope: str, by: str
    ) -> int: ...

    def list_consents(self, patient_id: str | None = None) -> list[Consent]: ...
