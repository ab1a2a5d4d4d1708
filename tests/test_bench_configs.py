"""The benchmark configs and suites load, and the variants `benchmarks/seeds.py` trains are valid
configs: a figure on the results page must not depend on a file that no longer reads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from memext.cli.common import build_config
from memext.config import Config
from memext.evals.suite import SuiteSpec, get_suite

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "configs"


def _seeds_module():
    spec = importlib.util.spec_from_file_location("bench_seeds", ROOT / "benchmarks" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_memory_knn_config_is_the_main_job():
    # The results page reports memory-knn's longctx grades as the main job's report card.
    assert Config.load(CONFIGS / "memory-knn.yaml") == Config.preset("tiny")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_file_reads(path):
    if "tasks:" in path.read_text():
        SuiteSpec.from_yaml(path)
    else:
        Config.load(path)


@pytest.mark.parametrize("name", sorted(_seeds_module().BENCHES))
def test_every_bench_is_a_valid_config_and_suite(name):
    bench = _seeds_module().BENCHES[name]
    cfg = build_config("tiny", CONFIGS / bench.config, [*bench.sets, "train.seed=3"])
    assert cfg.train.seed == 3
    for suite in bench.suites:
        path = CONFIGS / suite
        spec = SuiteSpec.from_yaml(path) if path.exists() else get_suite(suite)
        if bench.target and bench.target[0] == spec.name:
            assert bench.target[1] in spec.tasks
            assert bench.target[2] in spec.resolve_lengths(cfg.train.seq_len)


def test_extend_yarn_switches_the_rotary_at_its_fine_tune():
    from memext.curriculum import stages

    first, fine_tune = stages(Config.load(CONFIGS / "extend-yarn.yaml"))
    assert (first.seq_len, first.model.rope_factor) == (128, 1.0)
    assert (fine_tune.seq_len, fine_tune.model.rope_factor) == (512, 4.0)
