"""The ``[media]`` configuration section (R-PDI-2, R-PDI-6, R-PDI-8; STYLE §3).

Frozen dataclasses built by :func:`gateway.configtypes.build`, which refuses
unknown keys and names the key path.  They mirror the library's
:class:`media.settings.MediaSettings` (same names, same defaults) and add what
only the gateway knows: which scanner to talk to, how imports are finalized,
and who may use the staff console.  Example::

    [media]
    max_file_bytes = 4294967296

    [media.station]                   # media.settings.StationInfo; default from [instance]
    institution_name_alphabetic = "Sekisho Hospital"

    [media.scanner]
    kind = "clamd"                    # "clamd" | "none"
    socket = "/run/clamav/clamd.ctl"  # or host = "127.0.0.1" and port = 3310
    required = true

    [media.finalization]
    mode = "scheduled"                # "on-save" (default) | "scheduled"
    at = "24:00"
    responsible_id = "rad001"
    responsible_name = "Houshasen^Kachou"

    [media.console]
    port = 8444
    [media.console.staff.reception01]
    name = "Uketsuke^Hanako=受付^花子"
    certificate = "pki/staff-reception-1.crt.pem"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from media.scanner import ClamdScanner, NullScanner, Scanner
from media.settings import MediaSettings, StationInfo

_DEFAULTS = MediaSettings()
GIB = 1024**3
#: Debian's clamav-daemon socket (``LocalSocket`` in /etc/clamav/clamd.conf).
DEFAULT_CLAMD_SOCKET = "/run/clamav/clamd.ctl"
_HHMM = re.compile(r"^(?:[01]\d|2[0-3]):[0-5]\d$|^24:00$")
_STAFF_ID = re.compile(r"^[\x21-\x5b\x5d-\x7e]{1,16}$")


@dataclass(frozen=True)
class ScannerSettings:
    """The malware scanner every imported file goes through (R-PDI-2; 003 6.5 C-6).

    ``kind = "none"`` is only accepted with ``required = false``: a hospital
    that must scan cannot switch scanning off by accident.  ``scope = "all"``
    scans every regular file of the medium (viewers and programs too, which are
    never imported), ``"selected"`` only the files that will be imported.
    """

    kind: Literal["clamd", "none"] = "clamd"
    #: clamd's UNIX socket (default :data:`DEFAULT_CLAMD_SOCKET` when no host is given).
    socket: str = ""
    host: str = ""
    port: int = 3310
    timeout_seconds: float = 60.0
    required: bool = True
    scope: Literal["all", "selected"] = "all"

    def __post_init__(self) -> None:
        if self.kind == "none" and self.required:
            raise ValueError(
                "scanner.kind = 'none' needs scanner.required = false (R-PDI-2: scanning is "
                "required unless the configuration explicitly makes it optional)"
            )
        if self.socket and self.host:
            raise ValueError("give scanner.socket or scanner.host, not both")
        if not 0 < self.port < 65536:
            raise ValueError("scanner.port must be between 1 and 65535")
        if self.timeout_seconds <= 0:
            raise ValueError("scanner.timeout_seconds must be positive")

    def build(self) -> Scanner:
        """The scanner the importer uses (a new client per import; clamd is stateless)."""
        if self.kind == "none":
            return NullScanner()
        if self.host:
            return ClamdScanner(host=self.host, port=self.port, timeout=self.timeout_seconds)
        return ClamdScanner(self.socket or DEFAULT_CLAMD_SOCKET, timeout=self.timeout_seconds)


@dataclass(frozen=True)
class FinalizationSettings:
    """確定 of imported records (R-PDI-6; 000 付録1).

    ``on-save``: saving the import is its finalization by the importer.
    ``scheduled``: imports stay *saved* until the next ``at`` (local time of
    ``timezone``; ``"24:00"`` is the end of the day the import was saved) and
    are then finalized in the name of the designated responsible person.
    """

    mode: Literal["on-save", "scheduled"] = "on-save"
    at: str = "24:00"
    responsible_id: str = ""
    responsible_name: str = ""
    #: IANA time zone name (e.g. ``"Asia/Tokyo"``); empty: the host's local time.
    timezone: str = ""
    #: How often ``sekisho serve`` looks for due imports.
    check_interval_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not _HHMM.match(self.at):
            raise ValueError("finalization.at must be HH:MM between 00:00 and 24:00")
        if self.mode == "scheduled":
            if not _STAFF_ID.match(self.responsible_id):
                raise ValueError(
                    "finalization.mode = 'scheduled' needs responsible_id (1-16 ASCII characters)"
                )
            if not self.responsible_name.strip():
                raise ValueError("finalization.mode = 'scheduled' needs responsible_name")
        if self.timezone:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"finalization.timezone {self.timezone!r} is unknown") from exc
        if self.check_interval_seconds <= 0:
            raise ValueError("finalization.check_interval_seconds must be positive")


@dataclass(frozen=True)
class StaffMember:
    """One person allowed on the staff console, bound to one client certificate.

    The table key is the staff ID written as Operator Identification and in the
    audit trail; ``name`` is a DICOM PN value (``Alphabetic=Ideographic=Phonetic``).
    This registry is interim until staff accounts exist (R-USR-1).
    """

    name: str
    certificate: Path


@dataclass(frozen=True)
class ConsoleSettings:
    """The staff console HTTP API: its own listener, staff client certificates only.

    ``port = 0`` (the default) disables it.  ``allowed_roots`` are the folders a
    request may name as a medium (mount points of the CD/DVD drive or USB
    slots, or a folder of ISO images); uploaded ISO images go to ``upload_dir``.
    """

    host: str = "127.0.0.1"
    port: int = 0
    staff: Mapping[str, StaffMember] = field(default_factory=lambda: MappingProxyType({}))
    allowed_roots: tuple[Path, ...] = ()
    upload_dir: Path = Path("var/media-uploads")
    max_upload_bytes: int = 10 * GIB
    handshake_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 75.0
    max_connections_per_address: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("console.port must be between 0 and 65535")
        for staff_id in self.staff:
            if not _STAFF_ID.match(staff_id):
                raise ValueError(f"console.staff.{staff_id}: staff IDs are 1-16 ASCII characters")
        if self.max_upload_bytes <= 0 or self.max_connections_per_address < 1:
            raise ValueError("console limits must be positive")


@dataclass(frozen=True)
class MediaConfig:
    """``[media]``: caps (R-PDI-8) and the sub-tables above."""

    max_file_bytes: int = _DEFAULTS.max_file_bytes
    max_media_bytes: int = _DEFAULTS.max_media_bytes
    max_entries: int = _DEFAULTS.max_entries
    max_depth: int = _DEFAULTS.max_depth
    max_dicomdir_bytes: int = _DEFAULTS.max_dicomdir_bytes
    chunk_bytes: int = _DEFAULTS.chunk_bytes
    spool_threshold_bytes: int = _DEFAULTS.spool_threshold_bytes
    #: Importing equipment (R-PDI-5); ``institution_name`` and ``station_name``
    #: default to ``[instance] institution`` and ``station``.
    station: StationInfo | None = None
    scanner: ScannerSettings = field(default_factory=ScannerSettings)
    finalization: FinalizationSettings = field(default_factory=FinalizationSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)

    def __post_init__(self) -> None:
        self.library_settings(None)  # validates the caps with the library's own rules

    def library_settings(
        self, work_dir: Path | None, *, institution: str = "", station: str = ""
    ) -> MediaSettings:
        """The :class:`media.settings.MediaSettings` for one import or inspection."""
        info = self.station
        if info is None:
            info = StationInfo(
                station_name=station or StationInfo().station_name,
                institution_name=institution,
            )
        elif not info.institution_name and institution:
            info = replace(info, institution_name=institution)
        try:
            return MediaSettings(
                max_file_bytes=self.max_file_bytes,
                max_media_bytes=self.max_media_bytes,
                max_entries=self.max_entries,
                max_depth=self.max_depth,
                max_dicomdir_bytes=self.max_dicomdir_bytes,
                chunk_bytes=self.chunk_bytes,
                spool_threshold_bytes=self.spool_threshold_bytes,
                scanner_required=self.scanner.required,
                work_dir=work_dir,
                station=info,
            )
        except Exception as exc:  # ConfigurationError names "media.<key>"
            raise ValueError(getattr(exc, "message", str(exc))) from exc
