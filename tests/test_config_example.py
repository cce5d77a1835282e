"""The shipped example configuration loads with the real settings types (R-OPS-2)."""

from __future__ import annotations

from pathlib import Path

from gateway.instance import CONFIG_TEMPLATE
from gateway.settings import load_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "sekisho.example.toml"


def test_example_configuration_is_valid() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.https.port == 8443
    assert settings.dimse.enabled is True
    assert settings.tls.min_version == "1.2"
    assert settings.tls.certificate == EXAMPLE.parent / "pki" / "gateway-server.crt.pem"


def test_example_matches_what_init_writes() -> None:
    rendered = CONFIG_TEMPLATE.format(https_port=8443, dimse_port=2762, monitoring_port=9464)
    body = lambda text: [  # noqa: E731 - comparison helper
        line for line in text.splitlines() if line and not line.startswith("#")
    ]
    assert body(EXAMPLE.read_text()) == body(rendered)
