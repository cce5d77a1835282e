"""A bad configuration is refused at start, naming the key (R-OPS-2).

Each case writes a variant of an instance's ``sekisho.toml`` next to it (so
relative paths still resolve) and runs the real ``sekisho check-config`` and
``sekisho serve``: both must exit non-zero with one line naming the key path
or file, and ``serve`` must not start listening.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_helpers import (
    Instance,
    create_instance,
    dump_toml,
    merge,
    run_sekisho,
    sekisho_command,
)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Instance:
    return create_instance(tmp_path_factory.mktemp("config") / "gw")


def variant(instance: Instance, updates: dict[str, Any], *, extra_text: str = "") -> Path:
    path = instance.root / f"variant-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(dump_toml(merge(instance.read_config(), updates)) + extra_text)
    return path


def refused(config: Path, *words: str, serve: bool = True) -> None:
    commands = [("check-config",), ("serve",)] if serve else [("check-config",)]
    for command in commands:
        proc = run_sekisho(*command, config=config, timeout=60)
        assert proc.returncode != 0, f"{command} accepted {config.name}: {proc.stdout}"
        message = proc.stderr.strip().splitlines()[-1]
        assert message.startswith("sekisho: "), proc.stderr
        for word in words:
            assert word in message, (word, message)
        assert "Traceback" not in proc.stderr
        assert "listening" not in proc.stdout + proc.stderr


def test_generated_configuration_is_valid(instance: Instance) -> None:
    proc = run_sekisho("check-config", config=instance.config)
    assert proc.returncode == 0, proc.stderr
    assert "configuration is valid" in proc.stdout


def test_config_path_defaults_to_env_then_cwd(instance: Instance, tmp_path: Path) -> None:
    proc = run_sekisho("check-config", env={"SEKISHO_CONFIG": str(instance.config)})
    assert proc.returncode == 0, proc.stderr
    # Without --config or $SEKISHO_CONFIG: ./sekisho.toml of the working directory.
    env = {k: v for k, v in os.environ.items() if k != "SEKISHO_CONFIG"}
    here = subprocess.run(
        [*sekisho_command(), "check-config"],
        cwd=instance.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert here.returncode == 0, here.stderr
    elsewhere = subprocess.run(
        [*sekisho_command(), "check-config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert elsewhere.returncode != 0
    assert "sekisho.toml" in elsewhere.stderr


@pytest.mark.parametrize(
    ("updates", "words"),
    [
        ({"https": {"colour": "blue"}}, ["'https.colour'", "unknown key"]),
        (
            {"partners": {"revocation": {"fetch_all": True}}},
            ["'partners.revocation.fetch_all'", "unknown key"],
        ),
        ({"frobnicate": {"x": 1}}, ["'frobnicate'", "unknown key"]),
        ({"https": {"port": "eighty"}}, ["'https.port'", "expected an integer"]),
        ({"https": {"max_body_bytes": True}}, ["'https.max_body_bytes'", "expected an integer"]),
        ({"tls": {"min_version": "1.1"}}, ["'tls.min_version'", "must be one of"]),
        (
            {"partners": {"revocation": {"policy": "maybe"}}},
            ["'partners.revocation.policy'", "must be one of"],
        ),
        ({"store": {"fsync": "yes"}}, ["'store.fsync'", "expected true or false"]),
        (
            {"tls": {"trust_anchors": "pki/root-ca.crt.pem"}},
            ["'tls.trust_anchors'", "expected a list"],
        ),
        ({"https": {"port": 70000}}, ["'https'", "port must be between"]),
        ({"https": {"max_instance_bytes": -1}}, ["'https'", "size caps must be positive"]),
        ({"logging": {"level": "LOUD"}}, ["'logging.level'", "must be one of"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unknown_keys_and_bad_values_name_the_key(
    instance: Instance, updates: dict[str, Any], words: list[str]
) -> None:
    refused(variant(instance, updates), *words, serve=False)


@pytest.mark.parametrize(
    ("updates", "words"),
    [
        ({"https": {"colour": "blue"}}, ["'https.colour'", "unknown key"]),
        ({"tls": {"min_version": "1.1"}}, ["'tls.min_version'", "must be one of"]),
    ],
    ids=["unknown-key", "bad-value"],
)
def test_serve_refuses_to_start_naming_the_key(
    instance: Instance, updates: dict[str, Any], words: list[str]
) -> None:
    refused(variant(instance, updates), *words, serve=True)


def test_required_key_missing(instance: Instance) -> None:
    data = instance.read_config()
    del data["tls"]["certificate"]
    path = instance.root / "no-cert.toml"
    path.write_text(dump_toml(data))
    refused(path, "'tls.certificate'", "is required", serve=False)


def test_invalid_toml(instance: Instance) -> None:
    path = instance.root / "broken.toml"
    path.write_text("[https\nport = 1\n")
    refused(path, "not valid TOML", serve=False)


@pytest.mark.parametrize(
    ("table", "key"),
    [("tls", "password"), ("tls", "key_passphrase"), ("", "pin"), ("tls", "private_key_pem")],
)
def test_secrets_in_the_configuration_are_refused(instance: Instance, table: str, key: str) -> None:
    updates: dict[str, Any] = {table: {key: "hunter2-secret"}} if table else {key: "1234"}
    path = variant(instance, updates)
    refused(
        path,
        f"'{table + '.' if table else ''}{key}'",
        "secrets are not allowed",
        serve=key == "password",
    )
    proc = run_sekisho("check-config", config=path)
    assert "hunter2" not in proc.stdout + proc.stderr  # never echoed


def test_private_key_readable_by_others_is_refused(instance: Instance) -> None:
    loose = instance.root / "pki" / "loose.key.pem"
    shutil.copyfile(instance.root / "pki" / "gateway-server.key.pem", loose)
    os.chmod(loose, 0o644)
    refused(
        variant(instance, {"tls": {"private_key": "pki/loose.key.pem"}}),
        str(loose),
        "0644",
        "chmod 600",
    )


def test_key_that_does_not_match_the_certificate_is_refused(instance: Instance) -> None:
    path = variant(instance, {"tls": {"private_key": "pki/partner-valid-1.key.pem"}})
    refused(path, "partner-valid-1.key.pem", "does not match", "gateway-server.crt.pem")


def test_missing_tls_file_is_refused(instance: Instance) -> None:
    path = variant(instance, {"tls": {"trust_anchors": ["pki/no-such-anchor.pem"]}})
    refused(path, "no-such-anchor.pem")


def test_missing_crl_file_is_refused_by_serve(instance: Instance) -> None:
    path = variant(instance, {"partners": {"revocation": {"crl_files": ["pki/gone.crl.pem"]}}})
    proc = run_sekisho("serve", config=path, timeout=60)
    assert proc.returncode != 0
    assert "gone.crl.pem" in proc.stderr.strip().splitlines()[-1]
