"""Typed settings for reading and importing patient-brought media (R-PDI).

The gateway builds these from its configuration file with
:meth:`MediaSettings.from_mapping`, which rejects unknown keys and names the
key path in its message (STYLE §3).  ``media`` never reads configuration files
itself: it receives these frozen values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pki.errors import ConfigurationError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True, slots=True)
class StationInfo:
    """The importing equipment, written into Contributing Equipment (PS3.3 C.12.1).

    ``institution_name`` and ``station_name`` identify where the import took
    place (R-PDI-5); ``manufacturer`` is Type 1 in the Contributing Equipment
    Sequence item.  ``modifying_system`` goes into Original Attributes Sequence
    (0400,0563).  All values are plain text; they are written with the imported
    instance's own Specific Character Set, so keep them ASCII unless every media
    you receive uses a repertoire that holds them (see ``media.reconcile``).
    """

    station_name: str = "SEKISHO"
    institution_name: str = ""
    #: ASCII form of ``institution_name``, used when the instance's character set
    #: cannot hold the main form (e.g. a kanji name on an ISO_IR 100 instance).
    institution_name_alphabetic: str = ""
    institutional_department_name: str = ""
    manufacturer: str = "Sekisho"
    manufacturer_model_name: str = "Sekisho PDI Importer"
    software_versions: str = "0.1.0"
    device_serial_number: str = ""
    modifying_system: str = "SEKISHO"
    #: Coding Scheme Designator for local operator identifiers (PS3.16 8.2: "99" prefix).
    operator_coding_scheme: str = "99SEKISHO"


@dataclass(frozen=True, slots=True)
class MediaSettings:
    """Caps and policies for media inspection and import (R-PDI-2, R-PDI-8)."""

    #: Largest single file that is read (bytes).  Larger files are reported, not read.
    max_file_bytes: int = 4 * GIB
    #: Largest total of all regular files on the medium (a dual-layer BD is 50 GB).
    max_media_bytes: int = 64 * GIB
    #: Most entries (files, folders, links) listed on one medium.
    max_entries: int = 200_000
    #: Deepest folder nesting that is listed.
    max_depth: int = 32
    #: Largest DICOMDIR that is parsed (it is held in memory while parsed).
    max_dicomdir_bytes: int = 256 * MIB
    #: Read size for streaming hashes, scans and copies.
    chunk_bytes: int = 1 * MIB
    #: Instances up to this size are rewritten in memory; larger ones are spooled.
    spool_threshold_bytes: int = 64 * MIB
    #: A malware scanner must be configured for an import to run (R-PDI-2).
    scanner_required: bool = True
    #: Where temporary files for the sink are written (``None``: system temp dir).
    work_dir: Path | None = None
    #: Importer equipment identification (R-PDI-5).
    station: StationInfo = field(default_factory=StationInfo)

    def __post_init__(self) -> None:
        for name in (
            "max_file_bytes",
            "max_media_bytes",
            "max_entries",
            "max_depth",
            "max_dicomdir_bytes",
            "chunk_bytes",
            "spool_threshold_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigurationError(f"media.{name} must be a positive integer")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, path: str = "media") -> MediaSettings:
        """Build settings from a parsed configuration table.

        Unknown keys are refused with their full key path, so a typo never
        silently falls back to a default (STYLE §3).  ``station`` is a nested
        table with the fields of :class:`StationInfo`.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"unknown key {path}.{unknown[0]}")
        values: dict[str, Any] = dict(data)
        if "station" in values:
            station = values["station"]
            if not isinstance(station, Mapping):
                raise ConfigurationError(f"{path}.station must be a table")
            station_known = {f.name for f in fields(StationInfo)}
            bad = sorted(set(station) - station_known)
            if bad:
                raise ConfigurationError(f"unknown key {path}.station.{bad[0]}")
            for key, value in station.items():
                if not isinstance(value, str):
                    raise ConfigurationError(f"{path}.station.{key} must be a string")
            values["station"] = StationInfo(**station)
        if "work_dir" in values and values["work_dir"] is not None:
            values["work_dir"] = Path(values["work_dir"])
        if "scanner_required" in values and not isinstance(values["scanner_required"], bool):
            raise ConfigurationError(f"{path}.scanner_required must be true or false")
        return cls(**values)

    def with_changes(self, **changes: Any) -> MediaSettings:
        """Return a copy with some fields replaced (tests, per-request overrides)."""
        return replace(self, **changes)
