"""Segment-wise training: state carried across segments, truncated backprop, document resets,
and the LSTM baseline on the same trainer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from memext import Config, build_model
from memext.config import ModelConfig, TrainConfig
from memext.train import train
from memext.train.trainer import sequence_backward

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, memory="xl", mem_len=16)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _xy(t: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 256, (2, t + 1), generator=torch.Generator().manual_seed(seed))
    return seq[:, :-1], seq[:, 1:]


def test_one_segment_equals_the_plain_loss() -> None:
    model = build_model(TINY, seed=0)
    x, y = _xy()
    loss = sequence_backward(model, x, y, TrainConfig(seq_len=48), torch.device("cpu"))
    logits, _ = model(x)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    assert loss == pytest.approx(float(ref.detach()), rel=1e-6)


def test_bptt_decides_whether_gradients_cross_segments() -> None:
    """bptt=0 (whole sequence) equals one backward through every segment; bptt=1 cuts it."""
    x, y = _xy()
    grads = {}
    for bptt in (0, 1, 3):
        model = build_model(TINY, seed=0)
        t = TrainConfig(seq_len=48, segment_len=16, bptt=bptt)
        sequence_backward(model, x, y, t, torch.device("cpu"))
        grads[bptt] = _grads(model)
    # 3 segments: bptt=3 is one window, the same as bptt=0.
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[3][name], atol=1e-6, rtol=1e-5)
    assert any((g - grads[1][n]).abs().max() > 1e-6 for n, g in grads[0].items())


def test_segment_losses_are_the_same_whatever_the_bptt() -> None:
    x, y = _xy()
    losses = {
        bptt: sequence_backward(
            build_model(TINY, seed=0),
            x,
            y,
            TrainConfig(seq_len=48, segment_len=16, bptt=bptt),
            torch.device("cpu"),
        )
        for bptt in (0, 1)
    }
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_document_boundary_resets_that_row_only() -> None:
    """With the boundary token in row 0's first segment, row 0's second segment sees no memory."""
    eod = 257
    x, y = _xy(32, seed=1)
    x[0, 5] = eod
    model = build_model(TINY, seed=0).eval()
    t = TrainConfig(seq_len=32, segment_len=16)
    seen = []
    original = model.forward

    def spy(tokens, state=None):
        if state is not None:
            seen.append(state.memory["valid"].clone())
        return original(tokens, state)

    model.forward = spy
    sequence_backward(model, x, y, t, torch.device("cpu"), reset_id=eod)
    (valid,) = seen
    assert not valid[0].any() and valid[1].all()


@pytest.mark.parametrize(
    "model_changes",
    [
        {"memory": "xl", "mem_len": "32"},
        {"arch": "lstm", "memory": "none"},
    ],
)
def test_the_trainer_runs_segments_and_resumes_exactly(tmp_path: Path, model_changes) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("segment recurrence carries memory across windows. " * 400)
    sets = {
        "data.corpus": str(corpus),
        "model.d_model": "32",
        "model.n_layers": "2",
        "model.n_heads": "2",
        "model.max_seq_len": "64",
        "train.seq_len": "64",
        "train.segment_len": "16",
        "train.bptt": "2",
        "train.batch_size": "2",
        "train.steps": "6",
        "train.save_every": "100",
        "train.eval_every": "0",
        "train.eval_tokens": "128",
        "eval.lengths": "32,64",
        "eval.max_tokens": "128",
        "train.log_every": "1",
        "data.mixture": "[]",
        "train.curriculum": "",
        "train.curriculum_steps": "",
        **{f"model.{k}": v for k, v in model_changes.items()},
    }
    cfg = Config.preset("tiny").override(sets)
    quiet = {"progress": False, "log": lambda m: None}
    full = train(cfg, tmp_path / "full", **quiet)

    def stop_at_2(loop):
        if loop.step == 2:
            loop.stop_requested = True

    train(cfg, tmp_path / "part", callback=stop_at_2, **quiet)
    resumed = train(cfg, tmp_path / "part", resume=True, **quiet)
    assert resumed.step == 6
    assert full.losses[2:] == resumed.losses
    assert full.losses[-1] < full.losses[0]


def test_segment_len_must_divide_seq_len_and_needs_memory() -> None:
    with pytest.raises(ValueError, match=r"train\.segment_len"):
        TrainConfig(seq_len=48, segment_len=20)
    with pytest.raises(ValueError, match=r"model\.memory='none'"):
        Config(train=TrainConfig(seq_len=64, segment_len=16))
    # Only a segment must fit the model: the sequence may be longer than max_seq_len.
    model = dataclasses.replace(TINY, max_seq_len=1024)
    ok = Config(model=model, train=TrainConfig(seq_len=4096, segment_len=1024))
    assert ok.train.segment_len == 1024
