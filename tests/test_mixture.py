"""The batch mixture (memext.data.mixture): deterministic, placed as configured, weighted right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memext.config import Config
from memext.data.mixture import BatchSource, answer_weights
from memext.data.sampling import sample_batch
from memext.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
TEXT = np.frombuffer(("def f(x):\n    return x + 1\n" * 4000).encode(), dtype=np.uint8).astype(
    np.int64
)
MIX = "[{task: lm, batch_size: 2}, {task: passkey, batch_size: 6, lengths: [256, 384], near: 0.5}]"


def _source(mixture: str = MIX, **extra: str) -> BatchSource:
    cfg = Config.preset("tiny").override({"data.mixture": mixture, **extra})
    return BatchSource(cfg, TOK, TEXT)


def test_text_source_listed_first_draws_the_mixture_free_batches() -> None:
    src = _source()
    b = src.batch(0, step=7, micro=0, seq_len=256, batch_size=16)
    x, y = sample_batch(TEXT, 2, 256, 0, 7)
    assert torch.equal(b.x, x) and torch.equal(b.y, y)
    assert b.resets and b.weights is None


def test_batches_are_a_pure_function_of_step_and_source() -> None:
    a, b = _source(), _source()
    one, two = a.batch(1, 3, 0, 256, 16), b.batch(1, 3, 0, 256, 16)
    assert torch.equal(one.x, two.x) and torch.equal(one.weights, two.weights)
    assert not torch.equal(one.x, a.batch(1, 4, 0, 256, 16).x)


def test_task_samples_fit_their_length_and_place_keys_near_or_far() -> None:
    src = _source("[{task: passkey, batch_size: 64, lengths: [384], near: 0.5}]")
    rng = np.random.default_rng(0)
    near = far = 0
    for _ in range(64):
        s = src._sample(src.sources[0], 384, rng)
        assert s.tokens.size == 385
        distance = s.answer_start - s.key_positions[0]
        if distance <= 128:
            near += 1
        else:
            far += 1
            assert distance >= 128 + 5  # the key's digits end >= one segment before the question
    assert 16 < near < 48 and far == 64 - near


def test_answer_weights_give_the_answer_its_share_of_each_row() -> None:
    answer = torch.zeros(3, 10, dtype=torch.bool)
    answer[:, -4:] = True
    w = answer_weights(answer, 0.25)
    assert torch.allclose(w.sum(dim=1), torch.ones(3))
    assert torch.allclose(w[answer].view(3, 4).sum(dim=1), torch.full((3,), 0.25))


def test_stages_select_sources() -> None:
    src = _source(
        "[{task: lm}, {task: passkey, lengths: [128], stages: [0]}, "
        "{task: passkey, lengths: [256], stages: [1]}]",
        **{"train.curriculum": "256", "train.curriculum_steps": "5"},
    )
    assert src.active(0) == [0, 1] and src.active(1) == [0, 2]
    assert src.names == ["lm", "passkey1", "passkey2"]


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        ("[{task: passkey, lengths: [200]}]", "multiples of train.segment_len"),
        ("[{task: passkey, stages: [2]}]", "stage indices"),
        ("[{task: lm, stages: [0, 1]}]", None),
        ("[{task: pasky}]", "one of lm, "),
        ("[{task: passkey, share: 0}]", "> 0"),
    ],
)
def test_bad_mixtures_are_refused(mixture: str, message: str | None) -> None:
    if message is None:
        _source(mixture)
        return
    with pytest.raises(ValueError, match=message):
        _source(mixture)


def test_every_stage_needs_a_source() -> None:
    with pytest.raises(ValueError, match="active in stage 1"):
        _source(
            "[{task: lm, stages: [0]}]",
            **{"train.curriculum": "256", "train.curriculum_steps": "5"},
        )
