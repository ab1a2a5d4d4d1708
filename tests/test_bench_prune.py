"""benchmarks/prune.py on a tiny memext config (d32, 2 layers of 4 heads, 4 training steps): the
rows and JSON are well-formed, the pruned models hold the heads the prune record keeps (fewer
heads and parameters than the base), the deltas are what they say, and a second call reuses the
trained runs. No timing is asserted (the forward's speed-up is the benchmark's to measure)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from memext import Config
from memext import checkpoint as ckpt
from memext.adapters.pruned import RECORD
from tiny_runs import tiny_train_settings

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["base", "continued", "pruned", "recovered"]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_prune", ROOT / "benchmarks" / "prune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, list[str], Path, dict]:
    tmp = tmp_path_factory.mktemp("prune")
    # One file of varied lines: a single-file corpus holds out its last 5% for validation,
    # enough for the scoring (2 x 16 tokens) and the 64 held tokens after them.
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: item {i % 37} is {i * 7 % 101}.\n" for i in range(800)))
    settings = tiny_train_settings(4, 4, **{"model.n_heads": "4", "data.corpus": str(corpus)})
    Config.preset("tiny").override(settings).save(tmp / "tiny.yaml")
    out = tmp / "prune.json"
    argv = [
        f"--config={tmp / 'tiny.yaml'}",
        "--steps=4",
        f"--work={tmp / 'work'}",
        "--heads=0.5",
        "--batches=2",
        "--seq-len=16",
        "--eval-tokens=64",
        "--context=16",
        "--length=64",
        "--repeats=2",
        f"--out={out}",
    ]
    bench = _bench()
    bench.main(argv)
    return bench, argv, tmp, json.loads(out.read_text())


def _rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["model"]: row for row in result["rows"]}


def test_rows_hold_the_pruned_heads_and_their_deltas(ran: tuple) -> None:
    _, _, tmp, result = ran
    rows = _rows(result)
    assert list(rows) == NAMES
    assert rows["base"]["heads"] == rows["continued"]["heads"] == [4, 4]
    record = json.loads((tmp / "work" / "pruned" / RECORD).read_text())
    assert record["heads_before"] == [4, 4]
    for name in ("pruned", "recovered"):
        # The models read back hold the heads the prune kept: half of them, none left empty.
        assert rows[name]["heads"] == record["heads_after"]
        assert sum(rows[name]["heads"]) == 4 and min(rows[name]["heads"]) >= 1
        assert rows[name]["params"] < rows["base"]["params"]
    assert rows["continued"]["params"] == rows["base"]["params"]
    assert rows["recovered"]["params"] == rows["pruned"]["params"]
    for row in rows.values():
        assert math.isfinite(row["bits_per_byte"]) and row["bits_per_byte"] > 0
    base = rows["base"]["bits_per_byte"]
    for name in ("continued", "pruned", "recovered"):
        assert rows[name]["delta_bpb"] == pytest.approx(rows[name]["bits_per_byte"] - base)
    vs = rows["recovered"]["bits_per_byte"] - rows["continued"]["bits_per_byte"]
    assert rows["recovered"]["delta_bpb_vs_continued"] == pytest.approx(vs)
    # Recovery and its control: 5% of 4 steps, at least one.
    assert rows["recovered"]["recover_steps"] == rows["continued"]["steps"] == 1
    assert rows["recovered"]["recover_share"] == 0.25
    assert rows["recovered"]["recover_data"] == "corpus"


def test_the_json_records_the_command_timing_and_targets(ran: tuple) -> None:
    _, _, _, result = ran
    assert result["command"].startswith("python benchmarks/prune.py --config=")
    assert result["base_steps"] == 4 and result["heads_fraction"] == 0.5
    assert result["eval_tokens"] == 64
    forward = result["forward"]
    assert forward["length"] == 64 and forward["repeats"] == 2
    for name in ("base", "pruned"):
        assert len(forward["seconds"][name]) == 2 and all(s > 0 for s in forward["seconds"][name])
    paired = [
        a / b for a, b in zip(forward["seconds"]["base"], forward["seconds"]["pruned"], strict=True)
    ]
    assert forward["speedup_median_paired"] == pytest.approx(sum(paired) / 2)
    targets = result["targets"]
    assert set(targets) == {
        "delta_bpb_after_recovery<=",
        "delta_bpb_after_recovery_vs_continued<=",
        "recover_share<=",
        "speedup>=",
    }
    for target, got, met in targets.values():
        comparison = (got >= target) if target > 1 else (got <= target)
        assert met is comparison
    assert targets["recover_share<="][1:] == [0.25, False]  # 1 of 4 steps is over 5%
    assert "smollm2" not in result


def test_a_second_call_reuses_the_trained_runs(ran: tuple) -> None:
    bench, argv, tmp, result = ran
    work = tmp / "work"
    stamps = {name: (work / name / ckpt.WEIGHTS).stat().st_mtime_ns for name in NAMES}
    again = tmp / "again.json"
    bench.main([*argv, f"--out={again}"])
    assert {n: (work / n / ckpt.WEIGHTS).stat().st_mtime_ns for n in NAMES} == stamps
    # The same models on the same tokens: the same bits-per-byte.
    assert {n: r["bits_per_byte"] for n, r in _rows(json.loads(again.read_text())).items()} == {
        n: r["bits_per_byte"] for n, r in _rows(result).items()
    }
