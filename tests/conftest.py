"""Test-suite wide fixtures.

The gateway fixtures live in :mod:`tests.gateway_helpers` so that other test
modules can import its builders too; importing them here registers them for
every test module.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # ``pytest`` without ``python -m`` does not add it
    sys.path.insert(0, str(_ROOT))

from tests.gateway_helpers import dev_pki, gateway_factory, instance_factory  # noqa: E402

__all__ = ["dev_pki", "gateway_factory", "instance_factory"]
