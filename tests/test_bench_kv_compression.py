"""benchmarks/kv_compression.py on a tiny random HF Llama: the JSON's parts are well-formed, the
cache bytes it reports are the documented formulas (``memext.infer.kivi``'s and the others'),
and the settings that compress nothing (kivi with a residual holding every token, snapkv with a
budget of the whole prompt) generate what ``full`` generates."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tiny_hf import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# Prompts of 96 tokens read 32 per forward, 4 tokens generated (the tiny model holds 128
# positions); kivi quantizes groups of 8 tokens behind a residual of 8, after 2 sinks.
PROMPT, NEW, SINKS, GROUP = 96, 4, 2, 8
SMALL = [
    "--ppl-tokens=64",
    "--ppl-chunk=16",
    f"--group={GROUP}",
    f"--kivi-sinks={SINKS}",
    f"--kivi-length={PROMPT}",
    f"--snap-length={PROMPT}",
    "--samples=3",
    "--chunk=32",
    f"--new-tokens={NEW}",
    "--snap-window=8",
    "--kernel=3",
]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_kv_compression", ROOT / "benchmarks" / "kv_compression.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kivi_bytes(shape: dict[str, int], m: int, s: int, r: int, g: int, b: int = 2) -> int:
    """``memext.infer.kivi``'s documented ``nbytes()`` at batch 1, values in one group per
    token (``value_group`` all of head_dim), written out from the module doc."""
    d, e = shape["head_dim"], shape["element_bytes"]
    c = math.ceil(d * b / 8)
    n = math.ceil(max(m - s - r, 0) / g)
    per_head = (
        2 * s * d * e
        + n * g * c
        + n * 2 * 4 * d
        + n * g * c
        + n * g * 2 * 4 * 1
        + 2 * min(r, m - s) * d * e
    )
    return shape["layers"] * shape["kv_heads"] * per_head


def _outputs(part: dict[str, Any], policy: str) -> list[str]:
    return [row["output"] for row in part["rows"] if row["policy"] == policy]


@pytest.fixture(scope="module")
def compressing(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, Path, dict]:
    """All three parts with settings that compress: kivi quantizes, snapkv and sinks keep a
    quarter of the prompt. Weights larger than the default initialisation make the random
    model's greedy tokens depend on what it attends to (with 0.02 every policy said the same)."""
    tmp = tmp_path_factory.mktemp("kv_compression")
    path = save_tiny_llama(tmp / "llama", initializer_range=0.2)
    bench, out = _bench(), tmp / "kv.json"
    bench.main(
        [f"--model={path}", *SMALL, "--residual=8", "--budget=0.25", "--pool=max", f"--out={out}"]
    )
    return bench, path, out, json.loads(out.read_text())


def test_the_json_holds_every_part_and_the_command(compressing: tuple) -> None:
    _, path, _, result = compressing
    assert result["shape"] == {"layers": 2, "kv_heads": 2, "head_dim": 8, "element_bytes": 4}
    assert result["model"] == str(path)
    assert result["command"].startswith("python benchmarks/kv_compression.py --model=")
    flags = {arg.split("=")[0] for arg in result["command"].split()}
    assert "--out" not in flags and "--parts" not in flags
    for part, policies in (
        ("kivi_passkey", ["full", "kivi"]),
        ("snapkv_passkey", ["full", "snapkv", "sinks"]),
    ):
        got = result[part]
        assert got["length"] == PROMPT and got["samples"] == 3
        assert [t["policy"] for t in got["table"]] == policies
        assert len(got["rows"]) == 3 * len(policies)
        for entry in got["table"]:
            cell = [r for r in got["rows"] if r["policy"] == entry["policy"]]
            assert entry["n"] == 3 and entry["right"] == sum(r["right"] for r in cell)
            assert entry["score"] == entry["right"] / 3
        for row in got["rows"]:
            assert row["prompt_tokens"] == PROMPT and 0 < row["depth"] < 1
            assert 10000 <= row["key"] <= 99999  # a 5-digit key
            # Right means the first number generated is the key.
            assert row["right"] == (_bench().first_number(row["output"]) == row["key"])
    assert result["snapkv_passkey"]["budget_fraction"] == 0.25


def test_kivi_bytes_are_the_documented_formula(compressing: tuple) -> None:
    _, _, _, result = compressing
    shape, ppl = result["shape"], result["kivi_perplexity"]
    fp32 = 2 * shape["layers"] * shape["kv_heads"] * 64 * shape["head_dim"] * 4
    assert ppl["tokens"] == 64 and ppl["fp32_cache_bytes"] == fp32
    # The fp32 model's full cache, allocated for the whole text, is the fp32 baseline itself.
    assert ppl["full"]["cache_bytes"] == fp32
    want = kivi_bytes(shape, 64, SINKS, 8, GROUP)
    assert ppl["kivi"]["cache_bytes"] == want and want < fp32
    assert ppl["bytes_ratio_vs_fp32"] == pytest.approx(want / fp32)
    for policy in ("full", "kivi"):
        assert math.isfinite(ppl[policy]["perplexity"]) and ppl[policy]["perplexity"] > 1
    change = ppl["kivi"]["perplexity"] / ppl["full"]["perplexity"] - 1
    assert ppl["perplexity_change"] == pytest.approx(change)
    for row in result["kivi_passkey"]["rows"]:
        per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 4
        want = {"full": per_token * (PROMPT + NEW)}
        want["kivi"] = kivi_bytes(shape, PROMPT + NEW, SINKS, 8, GROUP)
        assert row["cache_bytes"] == want[row["policy"]]


def test_budget_policies_keep_a_quarter_of_the_prompt(compressing: tuple) -> None:
    _, _, _, result = compressing
    s = result["shape"]
    per_token = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * s["element_bytes"]
    budget = round(0.25 * PROMPT)
    for row in result["snapkv_passkey"]["rows"]:
        if row["policy"] == "snapkv":
            assert row["options"]["budget"] == budget and row["options"]["pool"] == "max"
            assert row["cache_bytes"] == per_token * (budget + NEW)
        if row["policy"] == "sinks":  # 4 sinks and a window: the budget's tokens, no more
            assert row["options"]["sinks"] + row["options"]["window"] - 1 == budget
            assert row["cache_bytes"] == per_token * budget
    # What compresses changes what this model generates: the equalities of the next test can
    # fail.
    part2, part3 = result["kivi_passkey"], result["snapkv_passkey"]
    assert _outputs(part2, "kivi") != _outputs(part2, "full")
    assert _outputs(part3, "snapkv") != _outputs(part3, "full")


def test_settings_that_keep_everything_generate_what_full_does(
    compressing: tuple, tmp_path: Path
) -> None:
    bench, path, first, before = compressing
    out = tmp_path / "kv.json"
    shutil.copyfile(first, out)
    # kivi: a residual holding every token after the sinks quantizes nothing; snapkv: a budget
    # of the whole prompt keeps every token (both documented to compute what full computes).
    argv = [f"--model={path}", *SMALL, "--parts=2,3", "--residual=200", "--budget=1.0"]
    bench.main([*argv, f"--out={out}"])
    result = json.loads(out.read_text())
    # Part 1 was not run: its results are kept from the existing --out.
    assert result["kivi_perplexity"] == before["kivi_perplexity"]
    part2, part3 = result["kivi_passkey"], result["snapkv_passkey"]
    assert _outputs(part2, "kivi") == _outputs(part2, "full")
    assert _outputs(part3, "snapkv") == _outputs(part3, "full")
    assert _outputs(part2, "full") == _outputs(before["kivi_passkey"], "full")
    assert len(set(_outputs(part2, "full"))) > 1  # the depths give different prompts
    for part, policy in ((part2, "kivi"), (part3, "snapkv")):
        bytes_ = {r["policy"]: r["cache_bytes"] for r in part["rows"]}
        assert bytes_[policy] == bytes_["full"]  # nothing quantized, nothing dropped


def test_the_kivi_options_past_kivi_reach_the_policy_and_its_bytes() -> None:
    bench = _bench()
    args = SimpleNamespace(bits=2, group=32, residual=64, kivi_sinks=4, value_group=32,
                           scale_dtype="float16", outliers=0.025, pre_rotary=True)  # fmt: skip
    options = bench.kivi_options(args)
    assert options == {"bits": 2, "group": 32, "residual": 64, "sinks": 4, "value_group": 32,
                       "scale_dtype": "float16", "outliers": 0.025, "pre_rotary": True}  # fmt: skip
    # SmolLM2's shape at 4,096 tokens: the 0.146x fp32 docs/results.md states (bytes do not
    # depend on pre_rotary, which needs the model's rotary to allocate a memext cache)
    fp32 = 2 * 30 * 3 * 4096 * 64 * 4
    assert round(bench.decode_bytes("kivi", options, 4096, 0, (30, 3, 64, 4)) / fp32, 3) == 0.146
    defaults = SimpleNamespace(**{**vars(args), "scale_dtype": "float32", "outliers": 0.0,
                                  "pre_rotary": False, "value_group": 0})  # fmt: skip
    assert bench.kivi_options(defaults) == {"bits": 2, "group": 32, "residual": 64, "sinks": 4}
