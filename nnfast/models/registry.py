"""The model registry: ``create(name, preset, **overrides)`` for every architecture.

A family registers a config dataclass, a model class (built as ``model_cls(config)``) and
named presets (dicts of config fields). Presets hold only the fields they set, so values
that ``__post_init__`` derives (head dim, MLP width, ...) are derived again after an
override instead of going stale. Overrides are type-checked against the dataclass's field
annotations; ``parse_overrides`` turns command-line strings into typed values first.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, NamedTuple

from torch import nn


class Family(NamedTuple):
    config_cls: type
    model_cls: type
    presets: dict[str, dict[str, Any]]
    default_preset: str


_REGISTRY: dict[str, Family] = {}


def register(
    name: str,
    config_cls: type,
    model_cls: type,
    presets: dict[str, dict[str, Any]],
    default_preset: str | None = None,
) -> None:
    """Make ``name`` available to ``create``. ``presets`` maps a preset name to the config
    fields it sets; every field it names must exist on ``config_cls``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls for {name!r} must be a dataclass, got {config_cls!r}")
    if not presets:
        raise ValueError(f"model {name!r} needs at least one preset")
    known = {f.name for f in dataclasses.fields(config_cls)}
    for preset, fields in presets.items():
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"preset {name}/{preset} sets unknown fields {unknown}")
    default_preset = default_preset or next(iter(presets))
    if default_preset not in presets:
        raise ValueError(f"default preset {default_preset!r} is not one of {list(presets)}")
    _REGISTRY[name] = Family(config_cls, model_cls, dict(presets), default_preset)


def list_models() -> dict[str, list[str]]:
    """``{model name: [preset names]}`` for every registered architecture."""
    return {name: list(fam.presets) for name, fam in _REGISTRY.items()}


def _family(name: str) -> Family:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def field_types(name: str) -> dict[str, Any]:
    """``{field: annotation}`` of model ``name``'s config (for command-line flags)."""
    cls = _family(name).config_cls
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _allowed(tp: Any) -> tuple[Any, ...]:
    """The concrete types an annotation allows: ``int | None`` -> (int, NoneType)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(a for arg in typing.get_args(tp) for a in _allowed(arg))
    return (tp,)


def _check_value(model: str, field: str, tp: Any, value: Any) -> Any:
    allowed = _allowed(tp)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        # bool is an int subclass in Python; a flag is not a layer count.
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " | ".join(getattr(t, "__name__", str(t)) for t in allowed)
    got = f"{value!r} ({type(value).__name__})"
    raise TypeError(f"{model}: field {field!r} expects {names}, got {got}")


def _check_field(name: str, field: str, types_: dict[str, Any]) -> None:
    if field not in types_:
        raise ValueError(
            f"{name}: unknown config field {field!r}; valid fields: {sorted(types_)}"
        )


def parse_overrides(name: str, raw: dict[str, str]) -> dict[str, Any]:
    """Command-line strings -> typed override values (``"12"`` -> 12, ``"none"`` -> None,
    ``"true"``/``"false"`` for booleans). Unknown fields raise ValueError."""
    types_ = field_types(name)
    out = {}
    for field, text in raw.items():
        _check_field(name, field, types_)
        allowed = _allowed(types_[field])
        value: Any = text
        low = text.strip().lower()
        if low in ("none", "null") and type(None) in allowed:
            value = None
        elif bool in allowed:
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise TypeError(f"{name}: field {field!r} expects a boolean, got {text!r}")
            value = low in ("true", "1", "yes")
        elif int in allowed:
            try:
                value = int(text)
            except ValueError:
                if float not in allowed:
                    msg = f"{name}: field {field!r} expects an int, got {text!r}"
                    raise TypeError(msg) from None
        if isinstance(value, str) and float in allowed:
            try:
                value = float(text)
            except ValueError:
                raise TypeError(f"{name}: field {field!r} expects a float, got {text!r}") from None
        out[field] = value
    return out


def make_config(name: str, preset: str | None = None, **overrides: Any):
    """The config of ``name``/``preset`` with ``overrides`` applied (type-checked)."""
    fam = _family(name)
    preset = preset or fam.default_preset
    if preset not in fam.presets:
        raise ValueError(
            f"unknown preset {preset!r} for model {name!r}; valid presets: {list(fam.presets)}"
        )
    types_ = field_types(name)
    for field, value in overrides.items():
        _check_field(name, field, types_)
        overrides[field] = _check_value(name, field, types_[field], value)
    return fam.config_cls(**{**fam.presets[preset], **overrides})


def create(name: str, preset: str | None = None, **overrides: Any) -> nn.Module:
    """Build model ``name`` from ``preset`` (the family's default when None) with config
    fields overridden by keyword. Build under ``with torch.device("meta"):`` to count
    parameters of a big preset without allocating it."""
    config = make_config(name, preset, **overrides)
    return _family(name).model_cls(config)
