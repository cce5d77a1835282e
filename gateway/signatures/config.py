"""The ``[signing]`` section of ``sekisho.toml`` (R-SIG-1, R-SIG-2, R-SIG-5, R-AUD-5).

:class:`gateway.settings.Settings` keeps the section as a plain mapping; it is
validated here by :meth:`signing.cli.SigningSettings.from_config`, which
refuses unknown keys with their key path (STYLE §3).  The file paths under
``[signing.trust]`` are resolved against the directory of the configuration
file, like every other path in it.  Every key is documented in
``config/README.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pki.errors import ConfigurationError
from signing.cli import SigningSettings

__all__ = ["load_signing_settings", "plain", "signing_configured"]

#: Keys of ``[signing.trust]`` that name files (one path or a list of paths).
_TRUST_PATH_KEYS = ("signer_anchors", "tsa_anchors", "intermediates", "crls")


def plain(value: Any) -> Any:
    """A deep copy of TOML-derived data with every mapping as a ``dict``."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        return str(base / Path(value).expanduser())
    if isinstance(value, list):
        return [str(base / Path(v).expanduser()) if isinstance(v, str) else v for v in value]
    return value  # a wrong type is reported by TrustConfig.from_config with its key path


def signing_configured(settings: Any) -> bool:
    """Whether the configuration has a non-empty ``[signing]`` section."""
    return bool(getattr(settings, "signing", None))


def load_signing_settings(settings: Any) -> SigningSettings:
    """``[signing]`` as :class:`SigningSettings`; every file is loaded now.

    Raises :class:`ConfigurationError` naming the key path when the section is
    missing, has an unknown key or names an unreadable file.
    """
    raw = getattr(settings, "signing", None)
    if not raw:
        raise ConfigurationError(
            "configuration key 'signing': not configured (trust anchors, TSA and signing "
            "policy are needed to sign, verify and seal; see config/README.md)"
        )
    data = plain(raw)
    trust = data.get("trust")
    if isinstance(trust, dict):
        base = Path(getattr(settings, "base_dir", Path(".")))
        for key in _TRUST_PATH_KEYS:
            if key in trust:
                trust[key] = _resolve(trust[key], base)
    return SigningSettings.from_config(data, "signing")
