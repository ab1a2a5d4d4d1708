"""Every registered attention variant, inside a model: causal, and it learns.

The per-kernel equality with the naive references lives in test_attention_<variant>.py; here the
variants are exercised the way a user meets them, through ``ModelConfig.attention``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from memext.config import Config
from memext.model import build_model
from memext.nn.attention import ATTENTION, build_attention
from memext.train.trainer import build_optimizer, train_step

# Small enough for a 2-core CI machine; the windows are smaller than the sequence so that every
# variant's sparse path (not a dense fallback) is what learns.
SETTINGS = {"window": 32, "lsh_chunk": 16, "block_size": 16, "random_blocks": 1}
SEQ, BATCH = 128, 4
CPU = torch.device("cpu")


def _text_tokens(n: int) -> torch.Tensor:
    """Real text: bytes of the running Python's standard library (the built-in corpus)."""
    root = Path(os.__file__).parent
    data = b"".join(p.read_bytes() for p in sorted(root.glob("[a-c]*.py")))
    return torch.tensor(list(data[:n]), dtype=torch.long)


@pytest.mark.parametrize("name", [n for n in sorted(ATTENTION) if ATTENTION[n].prefix_exact])
def test_variant_is_causal(name: str, tiny_model_cfg) -> None:
    cfg = dataclasses.replace(tiny_model_cfg, attention=name, **SETTINGS)
    model = build_model(cfg, seed=0).eval()
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 60:] = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert (a[:, :60] - b[:, :60]).abs().max().item() <= 1e-5  # the past ignores the future
    assert (a[:, 60:] - b[:, 60:]).abs().max().item() > 1e-3  # and the check can fail


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_future_values_never_reach_the_past(name: str) -> None:
    """Holds for every variant, LSH included: no query ever attends to a later key."""
    kernel = build_attention(name, SETTINGS).eval()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 16, generator=gen) for _ in range(3))
    if kernel.shared_qk:
        k = q
    v2 = v.clone()
    v2[:, :, 60:] += 1.0
    a, b = kernel(q, k, v, causal=True), kernel(q, k, v2, causal=True)
    assert (a[:, :, :60] - b[:, :, :60]).abs().max().item() <= 1e-6
    assert (a[:, :, 60:] - b[:, :, 60:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_variant_trains_tiny_preset(name: str) -> None:
    """The tiny preset's architecture, 50 steps on real text: loss at least 20% below its start."""
    cfg = Config.preset("tiny")
    cfg = cfg.replace(
        model=dataclasses.replace(cfg.model, attention=name, memory="none", **SETTINGS),
        train=dataclasses.replace(
            cfg.train, seq_len=SEQ, segment_len=0, batch_size=BATCH, warmup_steps=5
        ),
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, seed=0).train()
    opt = build_optimizer(model, cfg)
    tokens = _text_tokens(200_000)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        starts = torch.randint(0, len(tokens) - SEQ - 1, (BATCH,), generator=gen)
        rows = torch.stack([tokens[s : s + SEQ + 1] for s in starts.tolist()])
        loss, _ = train_step(
            model, model, opt, [(rows[:, :-1], rows[:, 1:])], cfg.train.lr, cfg.train, CPU
        )
        losses.append(loss)
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end <= 0.8 * start, f"{name}: loss {start:.3f} -> {end:.3f}"
