"""Typed, frozen settings loaded from one TOML file (R-OPS-2).

Every key is documented in ``config/README.md``; ``config/sekisho.example.toml``
is the fully commented example.  Unknown keys and bad values are refused with
the key path; secrets are never read from this file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from gateway.configtypes import build
from gateway.digitization.settings import DigitizationSettings, RenewalSettings
from gateway.forward.destinations import (
    DestinationSettings,
    ForwardSettings,
    RetentionSettings,
    RoutingSettings,
    check_forwarding,
)
from gateway.imports.config import MediaConfig
from pki.errors import ConfigurationError
from pki.peer import RevocationSettings
from pki.tls import TlsEndpointSettings


@dataclass(frozen=True)
class InstanceSettings:
    name: str = "sekisho"
    #: Our DICOM Application Entity title.
    ae_title: str = "SEKISHO"
    institution: str = "Sekisho Hospital"
    station: str = "SEKISHO-GW"

    def __post_init__(self) -> None:
        if not (1 <= len(self.ae_title) <= 16) or not self.ae_title.isascii():
            raise ValueError("ae_title must be 1 to 16 ASCII characters")


@dataclass(frozen=True)
class HttpsSettings:
    host: str = "127.0.0.1"
    port: int = 8443
    #: Largest accepted request body (STOW-RS), bytes.
    max_body_bytes: int = 4 * 1024**3
    #: Largest accepted single instance, bytes.
    max_instance_bytes: int = 2 * 1024**3
    handshake_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 75.0
    #: Concurrent connections allowed from one source address (R-TLS-6).
    max_connections_per_address: int = 32
    #: Public base URL used in RetrieveURL attributes (default: https://host:port).
    public_url: str = ""
    #: Processes serving the HTTPS port (SO_REUSEPORT); the first one also runs
    #: DIMSE, forwarding, sealing and the consoles (R-OPS-1 scale-out on one host).
    workers: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be between 1 and 65535")
        if not 1 <= self.workers <= 32:
            raise ValueError("workers must be between 1 and 32")
        if self.max_body_bytes <= 0 or self.max_instance_bytes <= 0:
            raise ValueError("size caps must be positive")


@dataclass(frozen=True)
class MonitoringSettings:
    """Plain-HTTP /healthz and /metrics for the hospital's monitoring (R-OPS-3).

    They reveal no patient data; keep the listener on loopback or a management
    network.  ``port = 0`` disables it.
    """

    host: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class DimseSettings:
    """The DICOM (DIMSE) listener over mutual TLS (PS3.15 B.1; R-TLS-6).

    Every network phase has its own timeout: TLS handshake, association
    negotiation (ACSE), DIMSE responses and network idle.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 2762
    handshake_timeout_seconds: float = 10.0
    #: Waiting for the A-ASSOCIATE-RQ and for release/abort replies (PS3.8 9.1.3 ARTIM).
    acse_timeout_seconds: float = 30.0
    #: Waiting for a DIMSE response (C-STORE sub-operations of C-GET and C-MOVE).
    dimse_timeout_seconds: float = 60.0
    #: An association with no traffic for this long is aborted.
    network_timeout_seconds: float = 120.0
    #: Connecting to a C-MOVE destination.
    connect_timeout_seconds: float = 10.0
    #: Concurrent connections allowed from one source address (R-TLS-6).
    max_connections_per_address: int = 16
    #: Concurrent connections in all (handshaking or associated).
    max_connections: int = 128
    #: Largest PDU we receive (PS3.8 9.3.3.2 Maximum Length), bytes.
    max_pdu_bytes: int = 131072
    #: Largest single instance accepted by C-STORE, bytes.
    max_instance_bytes: int = 2 * 1024**3
    #: Most matches returned by one C-FIND.
    max_find_results: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("port must be between 0 and 65535")
        if min(self.max_connections_per_address, self.max_connections) < 1:
            raise ValueError("connection limits must be at least 1")
        if not 4096 <= self.max_pdu_bytes <= 16 * 1024**2:
            raise ValueError("max_pdu_bytes must be between 4096 and 16777216")
        for name in ("handshake", "acse", "dimse", "network", "connect"):
            if getattr(self, f"{name}_timeout_seconds") <= 0:
                raise ValueError(f"{name}_timeout_seconds must be positive")


@dataclass(frozen=True)
class PartnerTrustSettings:
    """How partner (and staff) client certificates are validated (R-TLS-3)."""

    revocation: RevocationSettings = field(default_factory=RevocationSettings)
    #: Warn when our own or a partner's certificate expires within this many days (R-TLS-7).
    expiry_warning_days: int = 30


@dataclass(frozen=True)
class StoreSettings:
    #: Metadata database; a path means SQLite.
    database: Path = Path("var/sekisho.sqlite")
    #: Content-addressed instance files.
    files: Path = Path("var/store")
    #: fsync files and directories before acknowledging (never disable in production).
    fsync: bool = True


@dataclass(frozen=True)
class AuditSettings:
    #: Audit database (defaults to the metadata database file).
    database: Path | None = None
    #: Seal the chain head with an RFC 3161 timestamp at this interval (0 = never).
    seal_interval_minutes: int = 0


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True)
class Settings:
    tls: TlsEndpointSettings
    instance: InstanceSettings = field(default_factory=InstanceSettings)
    https: HttpsSettings = field(default_factory=HttpsSettings)
    dimse: DimseSettings = field(default_factory=DimseSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    partners: PartnerTrustSettings = field(default_factory=PartnerTrustSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    #: Outbound destinations by name, routing rules, worker tuning, local retention
    #: (store-and-forward, R-XCH-4..7, R-EXT; see gateway.forward).
    destinations: Mapping[str, DestinationSettings] = field(
        default_factory=lambda: MappingProxyType({})
    )
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    #: Patient-brought media: caps, malware scanner, finalization, staff console (R-PDI).
    media: MediaConfig = field(default_factory=MediaConfig)
    #: Film/paper digitization: information-creation manager, deadline, quality
    #: limits (R-DIG-1..5; see gateway.digitization).
    digitization: DigitizationSettings = field(default_factory=DigitizationSettings)
    #: Archive-timestamp renewal of signed records (R-SIG-6).
    renewal: RenewalSettings = field(default_factory=RenewalSettings)
    #: Signing trust anchors, TSA and per-record-type policy, validated by
    #: ``signing.cli.SigningSettings.from_config`` when signing is used (R-SIG).
    signing: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: Directory of the configuration file; relative paths were resolved against it.
    base_dir: Path = Path(".")

    def __post_init__(self) -> None:
        check_forwarding(self.destinations, self.routing)

    @property
    def audit_database(self) -> Path:
        return self.audit.database or self.store.database


def load_settings(path: Path) -> Settings:
    """Read and validate a configuration file; raise ConfigurationError naming the key."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"configuration file {path} is not valid TOML: {exc}") from exc
    if "base_dir" in data:
        raise ConfigurationError("configuration key 'base_dir': unknown key")
    base = path.resolve().parent
    data = dict(data)
    settings = build(Settings, {**data}, "", base)
    return Settings(**{**settings.__dict__, "base_dir": base})


def resolve_config_path(arg: str | None) -> Path:
    """``--config``, else ``$SEKISHO_CONFIG``, else ``./sekisho.toml``."""
    if arg:
        return Path(arg)
    env = os.environ.get("SEKISHO_CONFIG")
    if env:
        return Path(env)
    return Path("sekisho.toml")
