"""The package metadata names only what exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package_data() -> dict[str, list[str]]:
    # pyproject's [tool.setuptools.package-data] table, read without a TOML parser (tomllib is
    # Python 3.11+): one `package = [globs]` line per package.
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = re.search(r"^\[tool\.setuptools\.package-data\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert table, "pyproject.toml has no [tool.setuptools.package-data] table"
    data = {}
    for line in table.group(1).splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            data[name.strip()] = ast.literal_eval(value.strip())
    return data


def test_every_package_data_glob_matches_a_file() -> None:
    data = _package_data()
    assert data
    for package, globs in data.items():
        folder = ROOT / "src" / package.replace(".", "/")
        empty = [g for g in globs if not any(folder.glob(g))]
        assert not empty, f"{package}: package-data {empty} matches no file in {folder}"
