"""``gateway.configtypes.build``: strict TOML -> frozen settings (R-OPS-2, STYLE lesson 3)."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gateway.configtypes import build
from gateway.settings import Settings, load_settings
from pki.errors import ConfigurationError
from pki.peer import RevocationSettings


@dataclass(frozen=True)
class Inner:
    level: Literal["low", "high"] = "low"
    files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Outer:
    name: str
    port: int = 1
    ratio: float = 0.5
    enabled: bool = False
    home: Path | None = None
    tags: tuple[str, ...] = ()
    limits: Mapping[str, int] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.port == 0:
            raise ValueError("port must not be 0")


BASE = Path("/etc/sekisho")


def load(text: str) -> Outer:
    return build(Outer, tomllib.loads(text), "", BASE)


def error(text: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        load(text)
    return info.value.message


def test_builds_every_supported_type() -> None:
    cfg = load(
        'name = "gw"\nport = 8443\nratio = 2\nenabled = true\nhome = "var"\n'
        'tags = ["a", "b"]\n[limits]\nx = 1\n[inner]\nlevel = "high"\n'
        'files = ["/abs/one.pem", "rel/two.pem"]\n'
    )
    assert cfg == Outer(
        name="gw",
        port=8443,
        ratio=2.0,
        enabled=True,
        home=BASE / "var",
        tags=("a", "b"),
        limits=cfg.limits,
        inner=Inner("high", (Path("/abs/one.pem"), BASE / "rel/two.pem")),
    )
    assert dict(cfg.limits) == {"x": 1}
    assert isinstance(cfg.ratio, float)


def test_defaults_apply_and_result_is_immutable() -> None:
    cfg = load('name = "gw"')
    assert (cfg.port, cfg.inner, cfg.home) == (1, Inner(), None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        load('name = "gw"\n[limits]\nx = 1').limits["y"] = 2  # type: ignore[index]


def test_home_directory_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/sekisho")
    assert load('name = "gw"\nhome = "~/data"').home == Path("/home/sekisho/data")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "gw"\ncolour = 1', "configuration key 'colour': unknown key"),
        ('name = "gw"\n[inner]\nlvl = "x"', "configuration key 'inner.lvl': unknown key"),
        ("port = 2", "configuration key 'name': is required"),
        ('name = "gw"\nport = "80"', "configuration key 'port': expected an integer, got '80'"),
        ('name = "gw"\nport = true', "configuration key 'port': expected an integer, got True"),
        ('name = "gw"\nport = 1.5', "configuration key 'port': expected an integer"),
        ('name = "gw"\nratio = false', "configuration key 'ratio': expected a number"),
        ('name = "gw"\nenabled = 1', "configuration key 'enabled': expected true or false"),
        ("name = 7", "configuration key 'name': expected a string"),
        ('name = "gw"\nhome = ""', "configuration key 'home': expected a non-empty path"),
        ('name = "gw"\ntags = "a"', "configuration key 'tags': expected a list"),
        ('name = "gw"\ntags = ["a", 2]', "configuration key 'tags[1]': expected a string"),
        ('name = "gw"\ninner = 3', "configuration key 'inner': expected a table"),
        ('name = "gw"\n[inner]\nlevel = "mid"', "configuration key 'inner.level': must be one of"),
        ('name = "gw"\n[inner]\nfiles = [1]', "configuration key 'inner.files[0]'"),
        ('name = "gw"\n[limits]\nx = "1"', "configuration key 'limits.x': expected an integer"),
        ('name = "gw"\nport = 0', "configuration key '<root>': port must not be 0"),
    ],
)
def test_errors_name_the_key_path(text: str, expected: str) -> None:
    assert expected in error(text)


def test_unknown_key_lists_the_known_ones() -> None:
    assert "known keys here: files, level" in error('name = "gw"\n[inner]\nlvl = "x"')


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "db_password",
        "pin",
        "smartcard_pin",
        "secret",
        "api_secret",
        "passphrase",
        "key_passphrase",
        "private_key_pem",
        "PASSWORD",
    ],
)
def test_secret_keys_are_refused_as_secrets(key: str) -> None:
    message = error(f'name = "gw"\n{key} = "s3cr3t-value"')
    assert f"configuration key '{key}'" in message
    assert "secrets are not allowed" in message
    assert "s3cr3t-value" not in message


@pytest.mark.parametrize("key", ["pinned", "spin", "secretary_name", "passwords_file"])
def test_similar_names_are_just_unknown_keys(key: str) -> None:
    message = error(f'name = "gw"\n{key} = "x"')
    assert "unknown key" in message and "secrets" not in message


def test_gateway_settings_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "sekisho.toml"
    path.write_text(
        '[tls]\ncertificate = "pki/c.pem"\nprivate_key = "pki/k.pem"\n'
        'trust_anchors = ["pki/root.pem"]\nmin_version = "1.3"\n'
        '[partners.revocation]\npolicy = "soft-fail"\ncrl_files = ["pki/ca.crl"]\n'
        "[https]\nport = 9443\n"
    )
    s = load_settings(path)
    assert isinstance(s, Settings)
    assert s.tls.certificate == tmp_path / "pki/c.pem"
    assert s.tls.min_version == "1.3"
    assert s.https.port == 9443 and s.https.max_body_bytes == 4 * 1024**3
    assert s.partners.revocation == RevocationSettings(
        policy="soft-fail", crl_files=(tmp_path / "pki/ca.crl",)
    )
    assert s.audit_database == s.store.database == tmp_path / "var/sekisho.sqlite"
    assert s.base_dir == tmp_path


def test_gateway_settings_refuse_base_dir_and_empty_anchors(tmp_path: Path) -> None:
    path = tmp_path / "sekisho.toml"
    tls = '[tls]\ncertificate = "c"\nprivate_key = "k"\ntrust_anchors = ["a"]\n'
    path.write_text('base_dir = "/"\n' + tls)
    with pytest.raises(ConfigurationError, match="'base_dir'"):
        load_settings(path)
    path.write_text(tls.replace('["a"]', "[]"))
    with pytest.raises(ConfigurationError, match="'tls': trust_anchors must name at least one"):
        load_settings(path)
    with pytest.raises(ConfigurationError, match="cannot read configuration file"):
        load_settings(tmp_path / "missing.toml")


@dataclass(frozen=True)
class Store:
    database: Path = Path("var/db.sqlite")
    absolute: Path = Path("/srv/objects")


@dataclass(frozen=True)
class WithDefaults:
    store: Store = field(default_factory=Store)
    custom: Inner = field(default_factory=lambda: Inner(level="high"))


def test_default_paths_are_relative_to_the_configuration_file() -> None:
    cfg = build(WithDefaults, {}, "", BASE)  # [store] omitted altogether
    assert cfg.store.database == BASE / "var/db.sqlite"
    assert cfg.store.absolute == Path("/srv/objects")
    assert cfg.custom.level == "high"  # a factory with its own values is kept as is
    partial = build(WithDefaults, {"store": {"absolute": "objects"}}, "", BASE)
    assert partial.store == Store(BASE / "var/db.sqlite", BASE / "objects")
