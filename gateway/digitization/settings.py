"""Settings of film/paper digitization and signature renewal (R-DIG-1..5, R-SIG-6).

Frozen dataclasses built by :func:`gateway.configtypes.build` like every other
section: unknown keys are refused with their key path (R-OPS-2).  This module
imports nothing heavy: :mod:`gateway.settings` imports it at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from types import MappingProxyType
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from media.digitize import MAMMOGRAPHY_LIMITS, QualityLimits

__all__ = ["DigitizationSettings", "DigitizerSettings", "RenewalSettings"]


@dataclass(frozen=True)
class DigitizerSettings:
    """The film/document digitizer, when the scan files do not name it (PS3.3 C.12.1)."""

    manufacturer: str = ""
    model: str = ""
    serial_number: str = ""
    software_versions: str = ""


@dataclass(frozen=True)
class DigitizationSettings:
    """``[digitization]``: who answers for digitization, deadlines, quality limits."""

    #: 情報作成管理者 (seed 000 §5.2(1)①, 付録2 §16②): recorded with every
    #: digitization; digitization is refused while it is empty (R-DIG-4).
    information_manager: str = ""
    #: Business days between film receipt and digitization (seed 000 §5.2(1)③:
    #: 「1～2日程度以内」); 1 or 2 (R-DIG-3).
    deadline_business_days: int = 1
    #: Non-working days besides Saturdays and Sundays, as ISO dates.
    holidays: tuple[str, ...] = ()
    #: Time zone that decides what a business day is.
    timezone: str = "Asia/Tokyo"
    #: JSRT 資料2 limits for films (R-DIG-2) ...
    limits: QualityLimits = field(default_factory=QualityLimits)
    #: ... and the hospital's own limits for mammography, which JSRT excepts.
    mammography: QualityLimits = field(default_factory=lambda: MAMMOGRAPHY_LIMITS)
    #: Signing-policy record types ([signing.policy.<type>], R-SIG-1).
    film_record_type: str = "digitized-film"
    paper_record_type: str = "scanned-document"
    #: MONOCHROME2 films as Multi-frame Grayscale Word SC, or always SC Image.
    sop_class: Literal["multiframe", "single"] = "multiframe"
    series_number: int = 9001
    #: Coding scheme of operator ids in Operator Identification Sequence.
    operator_coding_scheme: str = "L"
    digitizer: DigitizerSettings = field(default_factory=DigitizerSettings)
    #: Largest accepted scan file, bytes.
    max_file_bytes: int = 1024**3

    def __post_init__(self) -> None:
        if self.deadline_business_days not in (1, 2):
            raise ValueError("deadline_business_days must be 1 or 2 (seed 000 §5.2(1)③)")
        for day in self.holidays:
            try:
                date.fromisoformat(day)
            except ValueError as exc:
                raise ValueError(f"holidays: {day!r} is not an ISO date (YYYY-MM-DD)") from exc
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone {self.timezone!r} is unknown") from exc
        if not 1 <= self.series_number <= 2**31 - 1:
            raise ValueError("series_number must be a positive integer")
        if self.max_file_bytes <= 0:
            raise ValueError("max_file_bytes must be positive")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def holiday_dates(self) -> frozenset[date]:
        return frozenset(date.fromisoformat(d) for d in self.holidays)


@dataclass(frozen=True)
class RenewalSettings:
    """``[renewal]``: when ``sekisho signatures renew`` renews a record (R-SIG-6)."""

    #: Renew this many days before the newest timestamp's protection ends.
    margin_days: int = 180
    #: Hash algorithm of new archive timestamps (hash-tree renewal may raise it).
    hash_algorithm: Literal["sha256", "sha384", "sha512"] = "sha256"
    #: Algorithm deprecation dates (e.g. from the CRYPTREC list): name -> ISO date.
    #: Names: "sha1", "sha256", ..., "rsa-2048", "ec-secp256r1".
    deprecations: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: TSA for renewals (default: signing.tsa_url).
    tsa_url: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.margin_days <= 3650:
            raise ValueError("margin_days must be between 1 and 3650")
        for name, value in self.deprecations.items():
            try:
                date.fromisoformat(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"deprecations.{name}: {value!r} is not an ISO date") from exc
        if self.tsa_url and not self.tsa_url.startswith(("http://", "https://")):
            raise ValueError("tsa_url must be an http(s) URL")

    def deprecation_dates(self) -> dict[str, datetime]:
        """Deprecation moments (start of the day, UTC)."""
        return {
            name.lower(): datetime.combine(date.fromisoformat(value), time(0), UTC)
            for name, value in self.deprecations.items()
        }
