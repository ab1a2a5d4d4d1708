"""The settings reference, generated from the field docs: ``memext train --help``'s epilog,
``memext config`` and docs/configuration.md (a test keeps that file current)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from memext.config import SECTIONS
from memext.fields import plain
from memext.presets import PRESETS
from memext.source import Source


def describe_fields() -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, help) for every field: the source of `--help` and the docs."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            type_str = (
                "|".join(get_args(typ))
                if get_origin(typ) is Literal
                else f"list[{get_args(typ)[0].__name__}]"
                if get_origin(typ) is tuple
                else getattr(typ, "__name__", str(typ))
            )
            rows.append((f"{section}.{f.name}", type_str, plain(f.default), f.metadata["help"]))
    return rows


def fields_markdown() -> str:
    """docs/configuration.md's table, generated from the field docs (a test keeps the file current)."""
    lines = ["| setting | type | default | meaning |", "|---|---|---|---|"]
    for name, typ, default, help_ in describe_fields():
        lines.append(f"| `{name}` | {typ} | `{default!r}` | {help_} |")
    presets = "\n".join(
        f"- `{name}`: "
        + (
            ", ".join(f"`{s}.{k}={v!r}`" for s, vals in p.items() for k, v in vals.items())
            or "the defaults above"
        )
        for name, p in PRESETS.items()
    )
    sources = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Source):
        sources.append(f"| `{f.name}` | `{plain(f.default)!r}` | {f.metadata['help']} |")
    return (
        "\n".join(lines)
        + "\n\n## A source of `data.mixture`\n\n"
        + "\n".join(sources)
        + "\n\n## Presets\n\n"
        + presets
        + "\n"
    )
