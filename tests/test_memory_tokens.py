"""The ``tokens`` memory (Recurrent Memory Transformer): the plain model at m = 0, the layout
against a naive reference, information and gradients carried across segments, reset, and a tiny
task that only memory can solve."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import memext.nn.memory.tokens  # noqa: F401  (registers "tokens" until memory/__init__ imports it)
from memext import build_model
from memext.config import ModelConfig
from memext.nn.memory import MEMORY, build_memory
from memext.nn.memory.tokens import TokenMemory
from memext.nn.transformer import LongLM, State

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=256, memory="tokens", mem_tokens=4)


def segments(n: int, batch: int = 2, length: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 256, (n, batch, length), generator=gen))


def run(model: LongLM, segs: list[torch.Tensor], state: State | None = None) -> list[torch.Tensor]:
    """Logits of each segment, read one after the other with the memory carried."""
    out = []
    for seg in segs:
        logits, state = model(seg, state)
        out.append(logits)
    return out


def test_registered_and_built_from_the_model_config() -> None:
    assert MEMORY["tokens"] is TokenMemory
    memory = build_memory("tokens", dataclasses.asdict(CFG))
    assert isinstance(memory, TokenMemory) and memory.name == "tokens"
    assert (memory.d_model, memory.mem_tokens) == (32, 4)
    assert TokenMemory.unbounded and memory.position_offset(123) == 0


def test_no_memory_tokens_is_exactly_the_plain_model() -> None:
    plain = build_model(dataclasses.replace(CFG, memory="none"), seed=0).eval()
    tokens = build_model(dataclasses.replace(CFG, mem_tokens=0), seed=0).eval()
    assert plain.state_dict().keys() == tokens.state_dict().keys()  # no empty parameter either
    (seg,) = segments(1)
    with torch.no_grad():
        a, _ = plain(seg)
        b, state = tokens(seg)
    assert torch.equal(a, b)
    assert state.memory == {}


def test_shapes_and_state() -> None:
    model = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        logits, state = model(torch.zeros(3, 10, dtype=torch.long))
    assert logits.shape == (3, 10, CFG.vocab_size)
    assert set(state.memory) == {"mem"}
    assert state.memory["mem"].shape == (3, CFG.mem_tokens, CFG.d_model)
    assert state.memory["mem"].is_contiguous()  # what safetensors saves


def test_matches_a_naive_reference_over_two_segments() -> None:
    # The reference builds [mem, x, mem] by hand and runs the bare blocks (no memory hooks) at
    # positions 0..T+2m-1, then reads the written memory back from the last m slots.
    model = build_model(CFG, seed=0).eval()
    m = CFG.mem_tokens
    segs = segments(2, length=12)
    with torch.no_grad():
        got = run(model, segs)
        mem = model.memory.initial.expand(2, -1, -1)
        for seg, logits in zip(segs, got, strict=True):
            x = torch.cat((mem, model.embed(seg), mem), dim=1)
            cos, sin = model.rotary(torch.arange(x.shape[1]))
            for block in model.blocks:
                x = block(x, cos, sin)
            torch.testing.assert_close(logits, model.head(model.norm(x[:, m:-m])), rtol=0, atol=0)
            mem = x[:, -m:]


def test_memory_carries_information_to_the_next_segment() -> None:
    model = build_model(CFG, seed=0).eval()
    first, second = segments(2)
    changed = first.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 256
    with torch.no_grad():
        _, state_a = model(first)
        _, state_b = model(changed)
        a, _ = model(second, state_a)
        b, _ = model(second, state_b)
        assert (a - b).abs().amax(dim=-1).min().item() > 1e-4  # every position sees the change
        # Reset memory forgets segment 1 entirely.
        every = torch.ones(2, dtype=torch.bool)
        ra, _ = model(second, State(memory=model.memory.reset(state_a.memory, every)))
        rb, _ = model(second, State(memory=model.memory.reset(state_b.memory, every)))
        assert torch.equal(ra, rb)
        # ... and without memory tokens nothing crosses the boundary.
        plain = build_model(dataclasses.replace(CFG, mem_tokens=0), seed=0).eval()
        _, sa = plain(first)
        _, sb = plain(changed)
        assert torch.equal(plain(second, sa)[0], plain(second, sb)[0])


def _embedding_grads(model: LongLM, k: int, detach: bool) -> tuple[torch.Tensor | None, ...]:
    """Backprop the last of k segments' loss; the grad at each segment's input embeddings."""
    embedded: list[torch.Tensor] = []

    def keep(module, inputs, output):
        output.retain_grad()
        embedded.append(output)

    handle = model.embed.register_forward_hook(keep)
    segs = segments(k + 1, length=8)
    state = None
    try:
        for seg in segs[:k]:
            logits, state = model(seg, state)
            if detach:
                state = dataclasses.replace(state, memory=model.memory.detach(state.memory))
    finally:
        handle.remove()
    loss = F.cross_entropy(logits.flatten(0, 1), segs[k].flatten())
    loss.backward()
    return tuple(e.grad for e in embedded)


def test_gradients_reach_k_segments_back_unless_detached() -> None:
    model = build_model(CFG, seed=0)
    grads = _embedding_grads(model, k=4, detach=False)
    for g in grads:
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    initial = model.memory.initial.grad  # the learned initial memory is trained too
    assert initial is not None and initial.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    grads = _embedding_grads(model, k=4, detach=True)
    assert all(g is None for g in grads[:-1])
    assert grads[-1] is not None and grads[-1].abs().sum() > 0
    assert model.memory.initial.grad is None


def test_reset_row_reads_like_a_fresh_row() -> None:
    model = build_model(CFG, seed=0).eval()
    first, second = segments(2)
    with torch.no_grad():
        _, state = model(first)
        rows = torch.tensor([True, False])
        reset = dataclasses.replace(state, memory=model.memory.reset(state.memory, rows))
        got, _ = model(second, reset)
        fresh, _ = model(second)
        carried, _ = model(second, state)
    torch.testing.assert_close(got[0], fresh[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], carried[1], rtol=0, atol=1e-6)
    assert not torch.allclose(got[0], carried[0])


def test_positions_restart_so_the_stream_may_exceed_max_seq_len() -> None:
    # One call holds T + 2m = 16 positions; five segments read 40 tokens past a limit of 16.
    model = build_model(dataclasses.replace(CFG, max_seq_len=16), seed=0).eval()
    with torch.no_grad():
        logits = run(model, segments(5, length=8))
    assert all(torch.isfinite(x).all() for x in logits)


def test_invalid_settings_raise() -> None:
    with pytest.raises(ValueError, match="mem_tokens=-1 is invalid"):
        TokenMemory(d_model=32, mem_tokens=-1)
    with pytest.raises(ValueError, match="d_model=0 is invalid"):
        TokenMemory(d_model=0, mem_tokens=2)
    with pytest.raises(ValueError, match="mem_tokens"):
        dataclasses.replace(CFG, mem_tokens=-1)
    with pytest.raises(ValueError, match="reversible"):
        dataclasses.replace(CFG, reversible=True)
    model = build_model(CFG, seed=0)
    wrong = State(memory={"mem": torch.zeros(2, 3, CFG.d_model)})
    with pytest.raises(ValueError, match=r"'mem' has shape \(2, 3, 32\): expected \(2, 4, 32\)"):
        model(torch.zeros(2, 5, dtype=torch.long), wrong)


# --- a fact carried across a segment boundary ---------------------------------------------------
FILLER, SYMBOLS, LENGTH = 0, 4, 6


def recall_batch(
    batch: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segment 1 opens with a random symbol, all else filler; segment 2 is filler only and must
    name the symbol at its last position."""
    symbol = torch.randint(1, SYMBOLS + 1, (batch,), generator=gen)
    first = torch.full((batch, LENGTH), FILLER)
    first[:, 0] = symbol
    return first, torch.full((batch, LENGTH), FILLER), symbol


def recall_accuracy(mem_tokens: int, steps: int = 120) -> float:
    """Train on the recall task from a fixed seed; accuracy at segment 2's last position."""
    torch.manual_seed(0)
    # init_std=0.1: at the default 0.02 the symbol reaches the answer only through the product of
    # two tiny attention paths (write in segment 1, read in segment 2) and Adam sits at the
    # chance plateau for hundreds of steps; at 0.1 every seed tried solves it in < 80 steps.
    cfg = ModelConfig(
        vocab_size=8, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, init_std=0.1,
        memory="tokens", mem_tokens=mem_tokens,
    )  # fmt: skip
    model = build_model(cfg, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        first, second, symbol = recall_batch(32, gen)
        _, state = model(first)
        logits, _ = model(second, state)
        loss = F.cross_entropy(logits[:, -1], symbol)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    first, second, symbol = recall_batch(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = model(first)
        logits, _ = model(second, state)
    return (logits[:, -1].argmax(-1) == symbol).float().mean().item()


def test_memory_tokens_carry_a_fact_across_segments() -> None:
    chance = 1 / SYMBOLS
    assert recall_accuracy(mem_tokens=2) > 0.9
    # Without memory the second segment is the same for every symbol: one guess, chance level.
    assert recall_accuracy(mem_tokens=0) <= chance + 0.06
