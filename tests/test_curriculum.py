"""The progressive context-length curriculum and `memext extend` on memext runs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from memext import Config, load
from memext.checkpoint import read_metrics
from memext.curriculum import stage_at, stages
from memext.errors import MemextError
from memext.evals.probes import training_probes
from memext.extend import extend_run, extended_config
from memext.train import train
from memext.train.schedule import lr_at

SMALL = {
    "model.d_model": "32",
    "model.n_layers": "2",
    "model.n_heads": "2",
    "model.max_seq_len": "256",
    "model.memory": "none",
    "data.mixture": "[]",  # corpus text only (the tiny preset also trains on passkeys)
    "train.curriculum": "",
    "train.curriculum_steps": "",
    "train.segment_len": "0",
    "train.seq_len": "32",
    "train.batch_size": "4",
    "train.log_every": "1",
    "train.eval_tokens": "256",
    "train.warmup_steps": "2",
    "eval.lengths": "32,64,128",
    "eval.max_tokens": "256",
}
CURRICULUM = {
    "model.rope_scaling": "linear",
    "model.rope_original_len": "32",
    "train.steps": "4",
    "train.curriculum": "64,128",
    "train.curriculum_steps": "2,2",
    "train.save_every": "100",
    "train.eval_every": "0",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 90)
    return root


def _cfg(corpus: Path, **extra: str) -> Config:
    return Config.preset("tiny").override({**SMALL, "data.corpus": str(corpus), **extra})


def quiet(_msg: str) -> None:
    pass


def test_stages_keep_tokens_per_step_and_scale_rotary(corpus):
    cfg = _cfg(corpus, **CURRICULUM)
    got = [
        (s.seq_len, s.batch_size, s.first_step, s.steps, s.model.rope_factor) for s in stages(cfg)
    ]
    assert got == [(32, 4, 0, 4, 1.0), (64, 2, 4, 2, 2.0), (128, 1, 6, 2, 4.0)]
    assert all(s.model.rope_original_len == 32 for s in stages(cfg)[1:])
    assert [stage_at(cfg, step).index for step in range(9)] == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert cfg.train.total_steps == 8


def test_without_rope_scaling_the_curriculum_only_lengthens(corpus):
    cfg = _cfg(corpus, **{**CURRICULUM, "model.rope_scaling": "none"})
    assert {s.model for s in stages(cfg)} == {cfg.model}


def test_schedule_spans_the_whole_curriculum(corpus):
    t = _cfg(corpus, **CURRICULUM).train
    lrs = [lr_at(s, t) for s in range(t.total_steps)]
    assert lrs[-1] > t.lr * t.min_lr_ratio  # still decaying at the last step, not flat since 4
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"train.curriculum": "64", "train.curriculum_steps": "1,2"}, "one step count per"),
        ({"train.curriculum": "64,48", "train.curriculum_steps": "1,1"}, "not decreasing"),
        ({"train.curriculum": "16", "train.curriculum_steps": "1"}, "not decreasing"),
        ({"train.curriculum": "512", "train.curriculum_steps": "1"}, "max_seq_len"),
        ({"train.curriculum": "64", "train.curriculum_steps": "0"}, ">= 1"),
    ],
)
def test_bad_curricula_are_refused(corpus, extra, message):
    with pytest.raises(ValueError, match=message):
        _cfg(corpus, **extra)


def test_curriculum_run_reports_every_stage_and_resumes_exactly(tmp_path, corpus):
    cfg = _cfg(corpus, **CURRICULUM)
    full = train(cfg, tmp_path / "full", progress=False, log=quiet, probes=training_probes(cfg))
    assert full.status == "completed" and full.step == 8
    reports = [r for r in read_metrics(tmp_path / "full") if "stage" in r]
    assert [(r["stage"], r["stage_seq_len"], r["step"]) for r in reports] == [
        (0, 32, 4),
        (1, 64, 6),
        (2, 128, 8),
    ]
    for r in reports:
        assert set(r["bits_per_byte_by_length"]) == {"32", "64", "128"}
        assert all(0 < v < 9 for v in r["bits_per_byte_by_length"].values())
    model, _ = load(tmp_path / "full")
    assert model.rotary.factor == 4.0  # the last stage's scaling comes back with the weights

    def stop_in_stage_1(loop):
        if loop.step == 5:
            loop.stop_requested = True

    part = train(cfg, tmp_path / "part", progress=False, callback=stop_in_stage_1, log=quiet)
    assert part.status == "interrupted" and part.step == 5
    assert load(tmp_path / "part")[0].rotary.factor == 2.0
    train(cfg, tmp_path / "part", resume=True, progress=False, log=quiet)
    losses = [
        [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r] for d in ("full", "part")
    ]
    assert losses[0] == losses[1]
    a, b = load(tmp_path / "full")[0], load(tmp_path / "part")[0]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_extend_writes_a_scaled_copy_and_fine_tunes(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "3", "train.save_every": "100", "train.eval_every": "0"})
    train(cfg, tmp_path / "src", progress=False, log=quiet)
    extend_run(tmp_path / "src", tmp_path / "x4", "yarn", 4.0, progress=False, log=quiet)
    model, new = load(tmp_path / "x4")
    src_model, _ = load(tmp_path / "src")
    assert (new.model.rope_scaling, new.model.rope_factor, new.model.rope_original_len) == (
        "yarn",
        4.0,
        32,
    )
    for (name, p), q in zip(
        model.state_dict().items(), src_model.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name  # same weights, only the rotary changed
    x = torch.randint(0, 256, (1, 100))
    assert not torch.allclose(model(x)[0], src_model(x[:, :100])[0])

    tuned = extend_run(
        tmp_path / "src",
        tmp_path / "ft",
        "linear",
        2.0,
        steps=2,
        progress=False,
        log=quiet,
        probes=training_probes(cfg),
    )
    ft_model, ft_cfg = load(tuned)
    assert ft_cfg.train.seq_len == 64 and ft_cfg.train.batch_size == 2
    assert ft_model.rotary.factor == 2.0
    assert [r["step"] for r in read_metrics(tuned) if "loss" in r] == [1, 2]
    assert [r["step"] for r in read_metrics(tuned) if "val_bits_per_byte" in r] == [2]
    assert not torch.equal(ft_model.embed.weight, src_model.embed.weight)


def test_extend_refuses_bad_input(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "1", "train.eval_every": "0"})
    with pytest.raises(MemextError, match="factor"):
        extended_config(cfg, "linear", 0.0)
    with pytest.raises(MemextError, match="rope_scaling"):
        extended_config(cfg, "nope", 2.0)
    with pytest.raises(MemextError, match="rope scaling 'ntk' takes no setting yarn_beta"):
        extended_config(cfg, "ntk", 2.0, beta=16.0)
    with pytest.raises(MemextError, match=r"not a memext run|does not exist"):
        extend_run(tmp_path / "missing", tmp_path / "out", "linear", 2.0, log=quiet)
    train(cfg, tmp_path / "src", progress=False, log=quiet)
    with pytest.raises(MemextError, match="its own directory"):
        extend_run(tmp_path / "src", tmp_path / "src", "linear", 2.0, log=quiet)
