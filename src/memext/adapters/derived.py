"""The derived model directory, shared by the kinds ``quantized`` and ``pruned``: a directory a
``memext compress`` command writes, holding a JSON record (its ``format``, ``version`` and
``base``: the model it was made from) and no copy of the base's weights. Opening it opens the
base through its own kind and changes that model; every attribute of the adapter contract the
derived kind does not set is the base adapter's.

What lives here is what the two kinds did alike: how the record names its base, reading and
checking the record's common fields, writing it, opening the base, and handing the rest to it.
Each kind keeps its own record file name, format, checks and on-disk layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memext.adapters.base import files_fingerprint
from memext.errors import MemextError


def base_source(path: str | Path, kind: str) -> str:
    """How a record names its base: a known model by name (it is fetched where it lives), any
    other by absolute path (the derived directory may be read from elsewhere)."""
    return str(path) if kind == "known" else str(Path(path).resolve())


def base_exists(source: str) -> bool:
    from memext.adapters.known import KNOWN_MODELS

    return source in KNOWN_MODELS or Path(source).exists()


def header_problem(meta: Any, fmt: str, version: int) -> str | None:
    """What is wrong with a record's ``format`` and ``version``, or None."""
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        return f"its format is not {fmt!r}"
    if meta.get("version") != version:
        return f"version {meta.get('version')!r}, this memext reads version {version}"
    return None


def base_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a record's ``base``, or None."""
    base = meta.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("source"), str):
        return "no base model (base.source)"
    return None


def read_record(
    path: str | Path, name: str, kind: str, problem: Callable[[Any], str | None]
) -> dict[str, Any]:
    """The JSON record ``name`` of the directory ``path``, checked by ``problem`` (the kind's
    whole check, ``header_problem`` and ``base_problem`` among it); a MemextError says what is
    wrong."""
    file = Path(path) / name
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MemextError(f"{str(file)!r} is unreadable or not JSON ({e})") from None
    bad = problem(meta)
    if bad:
        raise MemextError(f"{str(file)!r} is not a memext {kind} model: {bad}")
    return meta


def write_record(directory: Path, name: str, meta: dict[str, Any]) -> None:
    (directory / name).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


class DerivedAdapter:
    """The part of a derived kind's adapter that is the base's. A subclass sets ``kind``,
    ``META`` (its record's file name), ``FINGERPRINT`` (a prefix that tells kinds apart),
    ``HOLDS`` (what its directory keeps, for the error when the base is gone), and in its
    constructor ``meta``, ``_base`` (from ``open_base``) and ``_files`` (what it reads itself)."""

    kind: str
    META: str
    FINGERPRINT: str
    HOLDS: str
    meta: dict[str, Any]
    _files: list[Path]

    def open_base(
        self, path: str | Path, verb: str, device: torch.device | str, **options: Any
    ) -> Any:
        """The adapter of the base ``self.meta`` names (``open_model(..., **options)``);
        ``verb`` says what this directory does to it ("quantizes")."""
        from memext.adapters.open import open_model

        source = self.meta["base"]["source"]
        if not base_exists(source):
            raise MemextError(
                f"{str(path)!r} {verb} {source!r}, which is not there any more: a {self.kind} "
                f"directory holds {self.HOLDS}"
            )
        try:
            return open_model(source, device, **options)
        except MemextError as e:
            raise MemextError(f"{str(path)!r}: its base model: {e}") from None

    def __getattr__(self, name: str) -> Any:
        if name == "_base":  # not built yet: no recursion
            raise AttributeError(name)
        return getattr(self._base, name)

    @classmethod
    def claims(cls, path: str | Path) -> bool:
        return (Path(path) / cls.META).is_file()

    def fingerprint(self) -> str:
        # The directory's own files and the base's identity (its weights and reading rule).
        return f"{self.FINGERPRINT}{files_fingerprint(self._files)}-{self._base.fingerprint()}"
