"""Experiment configs: plain dataclasses <-> JSON dicts, `--set field=value` overrides, --help listing,
and each preset's Protocol (the paper's words it follows and the choices made where the paper is silent).

Values from JSON or the command line are coerced to the field's declared type (int, float, bool, str,
tuple/list of those, Optional), and a bad value raises ValueError naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class Protocol:
    """What a preset follows, shown by `run NAME --help` and written into the run's config.json.

    follows: the sentence(s) of the paper the preset implements. Liao & Poggio's text is not available
        offline here; quotes marked "(issue 12)" are issue 12's reading of the paper's protocol, not a
        verified transcription.
    choices: one line per setting the paper does not fix (or contradicts itself on): the value and why.
    """

    follows: str
    choices: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"follows": self.follows, "choices": list(self.choices)}


def config_to_dict(config: Any) -> dict:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a JSON value or a command-line string into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        last = None
        for a in inner:
            try:
                return _coerce(value, a, name)
            except ValueError as e:
                last = e
        raise last or ValueError(f"{name}: cannot read {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            s = value.strip().strip("()[]")
            items = [x.strip() for x in s.split(",") if x.strip()] if s else []
        else:
            items = list(value)
        elem = args[0] if args else Any
        return tuple(_coerce(x, elem, name) for x in items) if origin is tuple else [
            _coerce(x, elem, name) for x in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def config_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Rebuild a Config dataclass from its JSON form; unknown keys are an error that names them."""
    types = _field_types(cls)
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} for {cls.__module__}.{cls.__name__}")
    return cls(**{k: _coerce(v, types[k], k) for k, v in d.items()})


def apply_overrides(config: Any, sets: Iterable[str]) -> Any:
    """`field=value` strings (from --set) applied to a copy of the config, with type checking."""
    types = _field_types(type(config))
    changes = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in types:
            raise ValueError(f"unknown field {key!r}; fields are: {', '.join(types)}")
        changes[key] = _coerce(value, types[key], key)
    return dataclasses.replace(config, **changes)


def describe_fields(config: Any) -> list[tuple[str, str]]:
    return [(f.name, json.dumps(v) if not isinstance(v, str) else v)
            for f, v in ((f, getattr(config, f.name)) for f in dataclasses.fields(config))]
