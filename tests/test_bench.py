"""`memext bench attention`: the harness's arithmetic, and one small end-to-end run with peers."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

from memext.bench.attention import Record, comparisons, slopes
from memext.cli import app
from memext.profiling import peak_memory


def test_slope_of_a_power_law_is_its_exponent() -> None:
    recs = [
        Record("lin", "g", n, forward_s=3e-6 * n, backward_s=1e-9 * n**2)
        for n in (1024, 2048, 4096, 8192)
    ]
    fitted = slopes(recs)["lin"]
    assert fitted["forward"] == pytest.approx(1.0, abs=1e-3)
    assert fitted["backward"] == pytest.approx(2.0, abs=1e-3)


def test_comparisons_are_their_time_over_ours() -> None:
    recs = [
        Record("memext sliding", "g", 4096, 1.0, 2.0, 10, 20),
        Record("memext full", "g", 4096, 8.0, 12.0, 10, 40),
    ]
    (row,) = [r for r in comparisons(recs) if r["theirs"] == "memext full"]
    assert row["forward_speedup"] == 8.0 and row["backward_speedup"] == 6.0
    assert row["backward_memory_ratio"] == 2.0


def test_peak_memory_counts_what_is_held_at_the_worst_moment() -> None:
    def work() -> None:
        a = torch.empty(1_000_000, dtype=torch.uint8)
        b = torch.empty(2_000_000, dtype=torch.uint8)
        del a
        c = torch.empty(500_000, dtype=torch.uint8)
        del b, c

    assert peak_memory(work) == 3_000_000


# The peers of `memext bench attention`, by the module that the `bench` extra installs (and `dev`
# includes it). Each peer whose module imports is checked; under CI (`.ci/run` sets CI) a missing
# one fails the test, since CI installs `.[dev]`. Elsewhere the test checks the peers present and
# that each missing one is reported in its record rather than crashing the run.
PEERS = {
    "transformers": ["HF Longformer", "HF BigBird"],
    "x_transformers": ["x-transformers full"],
    "local_attention": ["local-attention"],
    "reformer_pytorch": ["reformer-pytorch lsh"],
}


def test_bench_attention_end_to_end(tmp_path) -> None:
    out = tmp_path / "bench"
    args = ["bench", "attention", "--lengths", "256,512", "--heads", "2", "--head-dim", "16"]
    args += ["--window", "32", "--block-size", "16", "--lsh-chunk", "16", "--repeats", "1"]
    args += ["--train-length", "256", "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "attention.json").read_text())
    assert payload["format"] == "memext-bench-attention"
    records = {(r["name"], r["length"]): r for r in payload["records"]}
    ours = ["memext full", "memext sliding", "memext lsh", "memext block_sparse"]
    for name in ours:
        for t in (256, 512):
            rec = records[(name, t)]
            assert rec["status"] == "ok", rec
            assert rec["forward_s"] > 0 and rec["backward_s"] > 0
            assert rec["backward_peak_bytes"] > 0
    missing = []
    for module, names in PEERS.items():
        present = importlib.util.find_spec(module) is not None
        if not present:
            missing.append(module)
        for name in names:
            rec = records[(name, 512)]
            if present:
                assert rec["status"] == "ok", rec
                assert rec["forward_s"] > 0 and rec["backward_s"] > 0
            else:
                assert rec["status"].startswith("error: ModuleNotFoundError"), rec
    if os.environ.get("CI"):
        assert not missing, f"peers of the `bench` extra missing under CI: {missing}"
    if "transformers" not in missing:
        assert any(r["theirs"] == "HF Longformer" for r in payload["comparisons"])
    assert (out / "attention.png").stat().st_size > 10_000  # matplotlib is a core dependency
    assert {r["attention"] for r in payload["training"]} >= {"full", "sliding"}
    assert all(math.isfinite(s["forward"]) for s in payload["slopes"].values())
    assert "speed-up" in result.output


def test_bench_attention_rejects_bad_lengths() -> None:
    result = CliRunner().invoke(app, ["bench", "attention", "--lengths", "1k"])
    assert result.exit_code == 2
    assert "--lengths" in result.output
