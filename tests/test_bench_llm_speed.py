"""benchmarks/llm_speed.py on a tiny random HF Llama: well-formed rows, greedy agreement, the
memory decomposition. No timing is asserted (speed is measured by the benchmark, not here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from memext.adapters import open_model
from tiny_hf import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--prompt-tokens=48",
    "--new-tokens=5",
    "--chunk=16",
    "--threads=1",
    "--repeats=2",
    "--warmup-prompt-tokens=20",
    "--sinks=2",
    "--window=16",
    "--block=8",
    "--topk=2",
    "--reps=2",
]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_llm_speed", ROOT / "benchmarks" / "llm_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, Any]:
    path = save_tiny_llama(tmp_path_factory.mktemp("llm_speed") / "llama")
    return _bench(), path, open_model(path)


def test_decode_rows_are_well_formed_and_full_agrees_with_transformers(tiny: tuple) -> None:
    bench, path, adapter = tiny
    args = bench.parse_args([f"--model={path}", *SMALL])
    ids = bench.prompt_ids(adapter, args.prompt_tokens, args.seed)
    warmup = bench.prompt_ids(adapter, args.warmup_prompt_tokens, args.seed + 1)
    configs = list(bench.DECODE_CONFIGS)
    rows, table = bench.decode_benchmark(adapter, ids, warmup, configs, args, log=lambda m: None)

    assert len(ids) == 48 and len(rows) == args.repeats * len(configs)
    for row in rows:
        assert len(row["tokens"]) == args.new_tokens and row["decode_steps"] == args.new_tokens - 1
        assert row["tokens_per_s"] > 0 and row["first_token_s"] > 0
    by = {entry["config"]: entry for entry in table}
    assert list(by) == configs
    assert by["transformers"]["vs_transformers"] == pytest.approx(1.0)
    # Greedy through every token: memext's loop over DynamicCache and over its own full cache
    # (chunked prefill) make transformers' tokens.
    for config in ("transformers", "full", "full-chunked"):
        assert by[config]["tokens_equal_transformers"], config
        assert by[config]["tokens_agreeing_with_transformers"] == args.new_tokens
    for entry in table:
        assert entry["same_tokens_every_run"] and entry["cache_bytes"] > 0
    # The bounded policies hold less than the whole prompt.
    assert by["sinks"]["cache_bytes"] < by["full"]["cache_bytes"]
    assert by["quantized"]["cache_bytes"] < by["sinks"]["cache_bytes"]


def test_generation_with_retrieval_leaves_no_query_hook_behind(tiny: tuple) -> None:
    # The benchmark interleaves policies on one model: a hook left on q_proj by one run would
    # tax every later forward (and they piled up, one per generation).
    _, _, adapter = tiny
    q_proj = adapter.model.model.model.layers[0].self_attn.q_proj
    opts = {"sinks": 2, "window": 8, "block": 4, "topk": 2}
    for _ in range(2):
        ids = adapter._generate_ids(
            list(range(3, 40)), 3, temperature=0, cache="retrieval", cache_options=opts, chunk=8
        )
        assert len(list(ids)) == 3
        assert not q_proj._forward_hooks


@pytest.mark.parametrize("method", ["profiler", "rss"])
def test_prefill_memory_rows_split_peak_into_cache_and_activation(tiny: tuple, method: str) -> None:
    bench, _, adapter = tiny
    if method == "rss" and not Path("/proc/self/status").exists():
        pytest.fail("RSS is read from /proc (Linux; the CI machine has it)")
    lm = bench.causal_lm(adapter)
    ids = torch.tensor([bench.prompt_ids(adapter, 48, 0)])
    rows = [bench.measure_prefill(lm, ids, c, 16, method) for c in bench.MEMORY_CONFIGS]
    layers, heads, dim, element = bench.kv_shape(lm)
    for row in rows:
        # Every configuration keeps the whole prompt: the same cache, exactly.
        assert row["cache_bytes"] == 2 * layers * heads * 48 * dim * element
        assert row["activation_bytes"] == row["peak_bytes"] - row["cache_bytes"]
    if method == "profiler":  # tensor bytes: the cache is live at the end, so within the peak
        assert all(row["peak_bytes"] >= row["cache_bytes"] for row in rows)
    table = bench.memory_table(rows)
    assert [r["config"] for r in table] == list(bench.MEMORY_CONFIGS)
    assert table[0]["activation_vs_one_shot"] == pytest.approx(1.0)
    assert set(bench.targets([], table)) == {
        f"prefill_activation_{c}_{method}" for c in bench.MEMORY_CONFIGS[1:]
    }


def test_memory_child_prints_one_result_line(
    tiny: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    bench, path, _ = tiny
    bench.main([f"--model={path}", *SMALL, "--memory-child=chunked-memext:profiler"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT ")]
    row = json.loads(lines[-1][len("RESULT ") :])
    assert row["config"] == "chunked-memext" and row["tokens"] == 48


def test_main_writes_the_command_provenance_and_tables(tiny: tuple, tmp_path: Path) -> None:
    bench, path, _ = tiny
    out = tmp_path / "speed.json"
    bench.main(
        [
            f"--model={path}",
            *SMALL,
            "--repeats=1",
            "--configs=transformers,full,sinks",
            "--memory-configs=",
            f"--out={out}",
        ]
    )
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/llm_speed.py --model=")
    assert "memory-child" not in result["command"]
    assert result["provenance"]["threads"] == 1
    assert [r["config"] for r in result["decode"]] == ["transformers", "full", "sinks"]
    assert result["decode"][1]["tokens_equal_transformers"] is True
    assert set(result["targets"]) == {"decode_full_vs_transformers"}
    assert result["memory"] == []
