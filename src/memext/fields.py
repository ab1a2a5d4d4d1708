"""How a config record declares, checks and reads its fields.

A field is declared with its default and its help (``doc``), or, for a setting that a registry's
variants declare, with the variants' default (``variant_field``). The checks raise ``ValueError``
naming ``SECTION.FIELD``, the bad value and what is accepted. ``parse_value`` and ``coerce`` read a
value from the command line or from JSON/YAML as the field's type; ``plain`` writes it back;
``read_sections``, ``parse_setting``, ``read_mapping`` and ``write_mapping`` read and write whole
configs.
Shared by ``memext.config`` (the sections and the whole ``Config``) and ``memext.source`` (a
mixture source).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from memext.io import atomic_write_text
from memext.registry import Registry, SettingError


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and the documentation shown by ``--help``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults (configs are immutable)")
    return field(default=default, metadata={"help": help})


def variant_field(registry: Registry, setting: str, help: str) -> Any:
    """A field for a setting of ``registry``'s variants: the default they declare, and the help
    prefixed by the names of the variants that take it."""
    return doc(registry.default(setting), f"{'/'.join(registry.users(setting))}: {help}")


def names_help(registry: Registry, what: str, more: str = "") -> str:
    """'WHAT, by registered name: a, b, c.' from the registry, then ``more``."""
    return f"{what}, by registered name: {', '.join(registry.names())}." + (
        f" {more}" if more else ""
    )


def fail(section: str, name: str, value: Any, accepted: str) -> None:
    """Raise the ``ValueError`` every check raises: ``SECTION.NAME=VALUE``, what is accepted."""
    raise ValueError(f"{section}.{name}={value!r} is invalid: expected {accepted}")


def check_positive(section: str, obj: Any, *names: str) -> None:
    """Each of ``obj``'s fields ``names`` is a number > 0."""
    for name in names:
        value = getattr(obj, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and 0 < value < math.inf):  # NaN fails every comparison: refused too
            fail(section, name, value, "a number > 0")


def check_choice(section: str, obj: Any, name: str) -> None:
    """``obj``'s field ``name`` is one of its ``Literal`` type's values."""
    hint = typing.get_type_hints(type(obj))[name]
    choices = get_args(hint)
    if getattr(obj, name) not in choices:
        fail(section, name, getattr(obj, name), "one of " + ", ".join(map(repr, choices)))


def plain(value: Any) -> Any:
    """A field's value as JSON/YAML holds it: a record as a mapping, a tuple as a list."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return [plain(v) for v in value] if isinstance(value, tuple) else value


def coerce(key: str, hint: Any, value: Any) -> Any:
    """Check a value loaded from JSON/YAML against the field's type (ints may stand for floats)."""
    if isinstance(value, str) and hint is not str and get_origin(hint) is not Literal:
        return parse_value(key, hint, value)
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return coerce_record(key, hint, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} is invalid: expected a list")
        (item,) = {a for a in get_args(hint) if a is not Ellipsis}
        return tuple(coerce(key, item, v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # JSON reads NaN and Infinity, and no check downstream is written for them
        raise ValueError(f"{key}={value!r} is invalid: expected a finite number")
    expected = str if origin is Literal else hint
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} is invalid: expected {type_name(hint)}")
    return value


def coerce_record(key: str, cls: Any, value: Any) -> Any:
    """A mapping (from JSON, YAML or the command line) as the dataclass ``cls``."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{key}={value!r} is invalid: expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    bad = sorted(set(value) - set(hints))
    if bad:
        raise ValueError(
            f"{key}: unknown field(s) {', '.join(bad)}; {cls.__name__} has {', '.join(hints)}"
        )
    return cls(**{k: coerce(f"{key}.{k}", hints[k], v) for k, v in value.items()})


def type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    if get_origin(hint) is tuple:
        item = {int: "integers", float: "numbers"}.get(get_args(hint)[0], "values")
        return f"a comma-separated list of {item}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint)
    )


def parse_value(key: str, hint: Any, raw: Any) -> Any:
    """Parse a command-line string into the field's type, or raise a ValueError that says why."""
    if not isinstance(raw, str):
        return coerce(key, hint, raw)
    text = raw.strip()
    if get_origin(hint) is tuple and dataclasses.is_dataclass(get_args(hint)[0]):
        try:
            records = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{key}={raw!r} is not valid YAML: {e}") from None
        return coerce(key, hint, records or [])
    try:
        if get_origin(hint) is tuple:
            item = get_args(hint)[0]
            parts = [p for p in text.strip("()[]").split(",") if p.strip()]
            return tuple(parse_value(key, item, p) for p in parts)
        if hint is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return coerce(key, hint, float(text))
        if hint is str or get_origin(hint) is Literal:
            return text
    except ValueError:
        pass
    raise ValueError(f"{key}={raw!r} is invalid: expected {type_name(hint)}")


def read_sections(classes: dict[str, type], data: dict[str, Any], source: str) -> dict[str, Any]:
    """Each section of ``data`` (a mapping from JSON, YAML or ``to_dict``) as its record class;
    a missing section or field takes its defaults, an unknown one is refused."""
    unknown = set(data) - set(classes)
    if unknown:
        raise ValueError(
            f"{source}: unknown section(s) {sorted(unknown)}; expected {list(classes)}"
        )
    sections = {}
    for name, cls in classes.items():
        values = data.get(name)
        values = {} if values is None else values  # an empty YAML section reads as None
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping")
        hints = typing.get_type_hints(cls)
        bad = set(values) - set(hints)
        if bad:
            raise ValueError(
                f"{source}: unknown field(s) {', '.join(f'{name}.{b}' for b in sorted(bad))}"
            )
        sections[name] = cls(**{k: coerce(f"{name}.{k}", hints[k], v) for k, v in values.items()})
    return sections


def parse_setting(classes: dict[str, type], key: str, raw: Any) -> tuple[str, str, Any]:
    """``SECTION.FIELD`` and its value as the field's type; an unknown name is refused with the
    fields it may have meant."""
    section, _, name = key.partition(".")
    cls = classes.get(section)
    if cls is None or not name:
        raise ValueError(
            f"unknown setting {key!r}: expected SECTION.FIELD with SECTION one of "
            + ", ".join(classes)
        )
    hints = typing.get_type_hints(cls)
    if name not in hints:
        close = difflib.get_close_matches(name, hints, n=3)
        hint = f" (did you mean {', '.join(section + '.' + c for c in close)}?)" if close else ""
        raise ValueError(f"unknown setting {key!r}{hint}; see `memext config` for all fields")
    return section, name, parse_value(key, hints[name], raw)


def write_mapping(path: str | Path, payload: dict[str, Any]) -> None:
    """``payload`` as YAML (a ``.yaml``/``.yml`` path) or JSON, written atomically."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        atomic_write_text(path, yaml.safe_dump(payload, sort_keys=False))
    else:
        atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a config file (YAML or JSON, by suffix) holds; a missing, unreadable or
    non-mapping file is refused with its name."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(
            f"config file {str(path)!r} is not valid {path.suffix[1:] or 'JSON'}: {e}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} does not hold a mapping")
    return data


def check_variants(section: str, obj: Any, registries: dict[str, Registry]) -> None:
    """For each (field, registry): the name ``obj``'s field chooses is registered, and every
    registered variant accepts ``obj``'s settings (its own ``check``)."""
    settings = vars(obj)
    for name, registry in registries.items():
        chosen = getattr(obj, name)
        if chosen not in registry:
            fail(section, name, chosen, registry.accepted(chosen))
        # Every variant, not only the chosen one: a config holds them all, and a value one
        # cannot take fails now rather than on the day that variant is switched on.
        for variant in registry:
            try:
                registry.check(variant, settings)
            except SettingError as e:
                fail(section, e.setting, e.value, f"{e.accepted} ({registry.kind} {variant!r})")
