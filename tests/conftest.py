"""Shared fixtures: an isolated token-store cache, the user's cache for real models, and a tiny,
fast model config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from memext.config import ModelConfig

#: The memext cache as the session found it (``$MEMEXT_CACHE``, else ``~/.cache/memext``),
#: before ``_isolated_cache`` points the tests elsewhere: real models, fetched once per machine.
USER_CACHE = Path(os.environ.get("MEMEXT_CACHE") or Path.home() / ".cache" / "memext").expanduser()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point MEMEXT_CACHE at a temporary folder so no test writes to ~/.cache/memext."""
    old = os.environ.get("MEMEXT_CACHE")
    os.environ["MEMEXT_CACHE"] = str(tmp_path_factory.mktemp("memext-cache"))
    yield
    if old is None:
        os.environ.pop("MEMEXT_CACHE", None)
    else:
        os.environ["MEMEXT_CACHE"] = old


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """A model small enough that a forward pass takes milliseconds on one CPU core."""
    return ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, max_seq_len=512)


@pytest.fixture(scope="session")
def user_cache() -> Path:
    """Where tests that need a real model find it (fetched there once, kept between runs)."""
    return USER_CACHE
