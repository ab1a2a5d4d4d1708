"""Training probes: the trainer measures through what it is given, at its moments, and the
held-out task probe scores samples that training never draws."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from memext import Config
from memext.checkpoint import read_metrics
from memext.data.filler import Filler
from memext.data.mixture import TRAIN_SEEDS
from memext.data.tasks import make_samples
from memext.errors import MemextError
from memext.evals.probes import HeldOutTask, StageReport, Validation, training_probes
from memext.tokenizer import ByteTokenizer
from memext.train import train
from memext.train.probes import ProbeContext, format_values

SMALL = {
    "model.d_model": "32",
    "model.n_layers": "2",
    "model.n_heads": "2",
    "model.max_seq_len": "512",
    "model.memory": "none",
    "data.mixture": "[]",
    "train.curriculum": "",
    "train.curriculum_steps": "",
    "train.segment_len": "0",
    "train.seq_len": "32",
    "train.batch_size": "4",
    "train.log_every": "1",
    "train.eval_tokens": "128",
    "train.warmup_steps": "1",
    "train.save_every": "100",
    "eval.lengths": "32,64",
    "eval.max_tokens": "128",
}
QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 90)
    return root


def _cfg(corpus: Path, **extra: str) -> Config:
    return Config.preset("tiny").override({**SMALL, "data.corpus": str(corpus), **extra})


@dataclass
class Recorder:
    """A probe that notes the steps and stages it was called at."""

    at: str
    calls: list[tuple[int, int]]

    def __call__(self, ctx: ProbeContext) -> dict[str, float]:
        assert ctx.model.training  # the trainer hands over the model as it trains it
        self.calls.append((ctx.step, ctx.stage.index))
        return {f"seen/{self.at}": float(ctx.step)}


def test_probes_run_at_their_moments_and_land_in_metrics(tmp_path, corpus, capsys):
    cfg = _cfg(
        corpus,
        **{"train.steps": "4", "train.curriculum": "64", "train.curriculum_steps": "2"},
        **{"train.eval_every": "3"},
    )
    every, stage = Recorder("eval", []), Recorder("stage", [])
    result = train(cfg, tmp_path / "run", probes=[every, stage], **QUIET)
    assert every.calls == [(3, 0), (6, 1)]  # every 3 steps and at the end
    assert stage.calls == [(4, 0), (6, 1)]  # when each curriculum stage ends
    rows = read_metrics(tmp_path / "run")
    assert [r for r in rows if "seen/eval" in r] == [
        {"step": 3, "seen/eval": 3.0},
        {"step": 6, "seen/eval": 6.0},
    ]
    stage_rows = [r for r in rows if "stage" in r]
    assert [(r["step"], r["stage"], r["stage_seq_len"], r["seen/stage"]) for r in stage_rows] == [
        (4, 0, 32, 4.0),
        (6, 1, 64, 6.0),
    ]
    assert result.last_val == {"seen/eval": 6.0}
    printed = capsys.readouterr().out
    assert "step 3: seen/eval 3.000" in printed
    assert "after stage 1 (seq_len 64): seen/stage 6.000" in printed


def test_without_probes_nothing_is_measured(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "2", "train.eval_every": "1"})
    result = train(cfg, tmp_path / "run", **QUIET)
    assert all(
        set(r) <= {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
        for r in read_metrics(tmp_path / "run")
    )
    assert result.last_val is None


def test_the_held_out_task_probe_on_a_tiny_run(tmp_path, corpus, capsys):
    cfg = _cfg(
        corpus,
        **{
            "model.memory": "xl",
            "model.mem_len": "64",
            "train.segment_len": "128",
            "train.seq_len": "128",
            "train.steps": "4",
            "train.eval_every": "2",
            "eval.probes": "passkey@256,passkey@128",
            "eval.probe_samples": "4",
            "data.mixture": "[{task: lm}, {task: passkey, batch_size: 2, lengths: [256], near: 0.5}]",
        },
    )
    probes = training_probes(cfg)
    assert [type(p) for p in probes] == [Validation, StageReport, HeldOutTask, HeldOutTask]
    train(cfg, tmp_path / "run", probes=probes, **QUIET)
    rows = [r for r in read_metrics(tmp_path / "run") if "val_bits_per_byte" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        for name in ("probe/passkey@256", "probe/passkey@128"):
            assert r[name] in (0.0, 0.25, 0.5, 0.75, 1.0)  # exact match over 4 samples
    assert "probe/passkey@256" in capsys.readouterr().out
    # Its samples: built once, of the probed length, from the validation text.
    task = probes[2]
    assert [s.tokens.size for s in task._samples] == [257] * 4


def test_held_out_samples_are_fixed_spread_and_cut_from_the_given_text():
    tok = ByteTokenizer()
    probe = HeldOutTask("passkey", 300, 6)
    validation = Filler(np.full(1000, ord("v")))
    samples = probe.samples(tok, validation)
    again = HeldOutTask("passkey", 300, 6).samples(tok, validation)
    assert samples == again  # the same samples at every step and for every run
    assert all(s.tokens.size == 301 for s in samples)
    keys = [s.key_positions[0] for s in samples]
    assert keys == sorted(keys) and keys[0] < 60 and keys[-1] > 180  # depths spread (i + 1/2) / n
    for s in samples:  # the haystack is the validation text; the rest is the task's own
        prompt = s.prompt.tolist()
        assert prompt.count(ord("v")) >= 300 - 120
    # Seeds above the training range: the n-th probe sample is what seed TRAIN_SEEDS + n draws.
    # (a 301-token sample: a 296-token prompt and the 5-digit answer)
    (first,) = make_samples("passkey", tok, validation, 296, 0.5 / 6, 1, TRAIN_SEEDS)
    assert first.meta["key"] == samples[0].meta["key"]


def test_task_probes_that_cannot_be_built_fail_before_training(corpus):
    with pytest.raises(MemextError, match=r"'pasky' .* is not a task.*did you mean 'passkey'"):
        training_probes(_cfg(corpus, **{"eval.probes": "pasky@128"}))
    with pytest.raises(MemextError, match=r"eval.probes passkey@40: length=\d+ is too short"):
        training_probes(_cfg(corpus, **{"eval.probes": "passkey@40"}))


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ("passkey", "TASK@LENGTH"),
        ("passkey@", "TASK@LENGTH"),
        ("@128", "TASK@LENGTH"),
        ("passkey@1", "LENGTH >= 2"),
        ("passkey@x", "TASK@LENGTH"),
        ("passkey@1024", "max_seq_len=512"),  # a model without memory reads at most max_seq_len
    ],
)
def test_bad_probe_specs_are_refused(corpus, probes, message):
    with pytest.raises(ValueError, match=f"eval.probes=.*{message}"):
        _cfg(corpus, **{"eval.probes": probes})


def test_a_model_reading_in_segments_may_probe_beyond_max_seq_len(corpus):
    cfg = _cfg(
        corpus,
        **{"model.memory": "xl", "train.segment_len": "32", "eval.probes": "passkey@1024"},
    )
    assert cfg.eval.probe_cells == (("passkey", 1024),)


def test_format_values():
    assert format_values({"a": 1.23456, "b": {"32": 2.0, "64": 1.5}, "n": 3}) == (
        "a 1.235, b  32: 2.000  64: 1.500, n 3"
    )
