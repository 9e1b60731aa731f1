"""Job configurations: YAML files loaded into dataclasses, with ``key=value`` overrides.

An unknown key, a value of the wrong type or a missing required value is an error that names the
key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that does not fit its job's schema."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, list[...], X | None)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build_config(cls: type[T], values: dict[str, Any], source: str) -> T:
    """Make a ``cls`` dataclass from ``values``, checking keys and types; ``source`` names the origin."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{source}: key {name!r}") for name, value in values.items()}
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
    cfg = cls(**kwargs)
    check = getattr(cfg, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ConfigError(str(err) if source == "defaults" else f"{source}: {err}") from None
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["key=value", ...]`` into a dict; values are parsed as YAML scalars or lists."""
    result = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        result[key.strip()] = yaml.safe_load(text)
    return result


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                **values: Any) -> T:
    """Load ``cls`` from a YAML file (optional), then apply ``values`` and ``--set`` overrides."""
    merged: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if Path(path).is_dir():
            found = ", ".join(sorted(str(p) for p in Path(path).glob("*.yaml"))[:8]) or "none"
            raise ConfigError(f"config {path} is a folder; give one YAML file (YAML files there: {found})")
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        merged.update(loaded or {})
    merged.update({k: v for k, v in values.items() if v is not None})
    if overrides:
        merged.update(parse_overrides(overrides))
        source += " with --set overrides"
    return build_config(cls, merged, source)


@dataclasses.dataclass
class LaunchOptions:
    """Fields every multi-process job shares; job configs extend it."""

    world_size: int | None = None  # None: one rank per visible GPU when there are 2 or more, else the job's CPU default
    device: str = "auto"  # auto | cuda | cpu
    timeout_s: float = 60.0  # process-group timeout: the longest any rank may wait on another
    out: str = "runs"  # folder for per-rank logs and the result JSON
    cpus_per_rank: float = 1.0  # CPUs the Ray launcher reserves for each rank

    def check(self) -> None:
        if self.world_size is not None and self.world_size < 1:
            raise ValueError(f"key 'world_size' must be at least 1, got {self.world_size}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"key 'device' must be auto, cuda or cpu, got {self.device!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"key 'timeout_s' must be positive, got {self.timeout_s}")
        if self.cpus_per_rank <= 0:
            raise ValueError(f"key 'cpus_per_rank' must be positive, got {self.cpus_per_rank}")

    def check_resolved(self) -> None:
        """Checks that need the launch's world_size and device (both set by then); raise ValueError."""


def check_choices(cfg: Any, choices: dict[str, Any]) -> None:
    """Raise ValueError naming the key when ``cfg.<key>`` (or an item of a list value) is not in its choices."""
    for key, allowed in choices.items():
        value = getattr(cfg, key)
        for item in value if isinstance(value, list) else [value]:
            if item not in allowed:
                raise ValueError(f"key {key!r} must be one of {', '.join(map(str, allowed))}, got {item!r}")
