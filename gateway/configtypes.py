"""Building frozen settings dataclasses from TOML mappings (R-OPS-2).

A small, strict converter: every dataclass field is read from the mapping by
name, unknown keys are refused, and each error names the full key path
(``tls.min_version``) so that an operator can fix the file at once.  Relative
paths are resolved against the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pki.errors import ConfigurationError

T = TypeVar("T")

#: Keys that must never appear in a configuration file: secrets belong in
#: files with restricted permissions or on tokens (003 6.5 C-7(3)).
FORBIDDEN_KEY_WORDS = ("password", "passphrase", "pin", "secret", "private_key_pem")


def _fail(path: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"configuration key '{path}': {message}")


def build(cls: type[T], data: Any, path: str, base_dir: Path) -> T:
    """Convert ``data`` into dataclass ``cls``; ``path`` names it in errors."""
    if not isinstance(data, Mapping):
        raise _fail(path or "<root>", f"expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            lowered = str(key).lower()
            if any(word == lowered or lowered.endswith("_" + word) for word in FORBIDDEN_KEY_WORDS):
                raise _fail(
                    _join(path, key),
                    "secrets are not allowed in the configuration file; "
                    "give a path to a file readable only by the gateway instead",
                )
            known = ", ".join(sorted(fields)) or "(none)"
            raise _fail(_join(path, key), f"unknown key (known keys here: {known})")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name in data:
            values[name] = convert(hints[name], data[name], key_path, base_dir)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise _fail(key_path, "is required")
        elif not field.init:
            continue
        # Defaults are relative to the configuration file too, not to the
        # process's working directory: resolve default paths, and build omitted
        # tables (``default_factory=TheClass``) the same way.
        elif isinstance(field.default, Path) and not field.default.is_absolute():
            values[name] = base_dir / field.default
        elif field.default_factory is hints[name] and dataclasses.is_dataclass(hints[name]):
            values[name] = build(hints[name], {}, key_path, base_dir)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise _fail(path or "<root>", str(exc)) from exc


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def convert(tp: Any, value: Any, path: str, base_dir: Path) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        last: ConfigurationError | None = None
        for arg in args:
            try:
                return convert(arg, value, path, base_dir)
            except ConfigurationError as exc:
                last = exc
        assert last is not None
        raise last
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise _fail(
                path, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _fail(path, f"expected a list, got {type(value).__name__}")
        item_tp = get_args(tp)[0]
        return tuple(convert(item_tp, v, f"{path}[{i}]", base_dir) for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _fail(path, "expected a table")
        args = get_args(tp)
        item_tp = args[1] if args else Any
        return types.MappingProxyType(
            {str(k): convert(item_tp, v, _join(path, k), base_dir) for k, v in value.items()}
        )
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, base_dir)  # type: ignore[arg-type]
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise _fail(path, "expected a non-empty path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base_dir / p)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, f"expected a string, got {value!r}")
        return value
    raise _fail(path, f"unsupported setting type {tp!r}")  # pragma: no cover - programming error
