"""The compressive memory (Rae et al. 2019): bookkeeping, the attention read, the compressor's
training signal and its isolation from the language-modelling loss."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from memext.config import ModelConfig
from memext.model import build_model
from memext.nn.memory.compressive import CompressiveMemory  # registers "compressive"
from memext.nn.reference import attention, causal_mask
from memext.nn.transformer import LongLM, State

CFG = ModelConfig(
    d_model=32,
    n_layers=2,
    n_heads=2,
    max_seq_len=256,
    memory="compressive",
    mem_len=8,
    cmem_len=4,
    cmem_rate=2,
)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=gen)


def record(model: LongLM, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every ``attend`` call's inputs, the state it read and its output, in call order."""
    calls: list[dict[str, Any]] = []
    inner = model.memory.attend

    def attend(layer, q, k, v, kernel, step, q_raw, k_raw):
        y = inner(layer, q, k, v, kernel, step, q_raw, k_raw)
        calls.append({"layer": layer, "q": q, "k": k, "v": v, "old": step.old, "y": y})
        return y

    monkeypatch.setattr(model.memory, "attend", attend)
    return calls


def is_compressor(name: str) -> bool:
    return name.startswith(("memory.compress_k.", "memory.compress_v."))


@torch.no_grad()
def test_first_call_equals_the_plain_model() -> None:
    model = build_model(CFG, seed=0)
    plain = build_model(dataclasses.replace(CFG, memory="none"), seed=0)
    shared = dict(plain.named_parameters())
    names = {n for n, _ in model.named_parameters()}
    assert {n for n in names if not is_compressor(n)} == set(shared)
    assert any(is_compressor(n) for n in names)
    for name, p in model.named_parameters():
        if not is_compressor(name):
            assert torch.equal(p, shared[name]), name
    # 12 > mem_len: the first call already evicts and compresses, which changes only the state.
    for length in (5, 12):
        x = tokens(2, length)
        logits, state = model(x)
        assert torch.equal(logits, plain(x)[0])
        assert (state.aux_loss is not None) == (length > CFG.mem_len)


@torch.no_grad()
@pytest.mark.parametrize("compress", ["conv", "mean"])
def test_without_compressed_memory_it_is_xl(compress: str) -> None:
    cfg = dataclasses.replace(CFG, cmem_len=0, compress=compress)
    model = build_model(cfg, seed=0)
    xl = build_model(dataclasses.replace(cfg, memory="xl"), seed=0)
    assert model.num_params() == xl.num_params()
    state, xl_state = None, None
    for i in range(4):
        x = tokens(2, 5, seed=i)
        logits, state = model(x, state)
        xl_logits, xl_state = xl(x, xl_state)
        assert torch.equal(logits, xl_logits)
        assert state.aux_loss is None
        assert state.memory.keys() == xl_state.memory.keys()
        for name, t in state.memory.items():
            assert torch.equal(t, xl_state.memory[name]), name


@torch.no_grad()
def test_eviction_moves_whole_groups_into_the_compressed_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build_model(dataclasses.replace(CFG, compress="mean"), seed=0)
    calls = record(model, monkeypatch)
    # Segments of 5 with mem_len=8, rate 2: a group waits in the XL memory (9 slots) until whole.
    expected = [(5, 0), (8, 1), (9, 3), (8, 4), (9, 4), (8, 4)]  # (XL slots, compressed slots)
    stream = tokens(2, 5 * len(expected))
    state = None
    for i, (m, c) in enumerate(expected):
        _, state = model(stream[:, 5 * i : 5 * (i + 1)], state)
        assert state.aux_loss is None  # mean-pooling has nothing to learn
        for layer in range(CFG.n_layers):
            assert state.memory[f"k.{layer}"].shape == (2, 2, m, 16)
            if c:
                assert state.memory[f"ck.{layer}"].shape == (2, 2, c, 16)
        assert state.memory["valid"].shape == (2, m) and bool(state.memory["valid"].all())
        if c:
            assert state.memory["cvalid"].shape == (2, c) and bool(state.memory["cvalid"].all())
        else:
            assert "cvalid" not in state.memory

    # 30 tokens: the last 8 are in the XL memory, the 22 before were evicted in groups of 2, and
    # the compressed memory keeps the last 4 groups: positions 14..21.
    for layer in range(CFG.n_layers):
        keys = torch.cat([c["k"] for c in calls if c["layer"] == layer], dim=-2)
        values = torch.cat([c["v"] for c in calls if c["layer"] == layer], dim=-2)
        assert torch.equal(state.memory[f"k.{layer}"], keys[..., 22:, :])
        assert torch.equal(state.memory[f"v.{layer}"], values[..., 22:, :])
        want_k = keys[..., 14:22, :].reshape(2, 2, 4, 2, 16).mean(dim=3)
        want_v = values[..., 14:22, :].reshape(2, 2, 4, 2, 16).mean(dim=3)
        torch.testing.assert_close(state.memory[f"ck.{layer}"], want_k, rtol=0, atol=1e-7)
        torch.testing.assert_close(state.memory[f"cv.{layer}"], want_v, rtol=0, atol=1e-7)

    # A call that completes no group carries the compressed memory over unchanged.
    _, after = model(tokens(2, 1, seed=5), state)
    assert after.memory["k.0"].shape[-2] == 9
    for name in ("ck.0", "cv.1", "cvalid"):
        assert torch.equal(after.memory[name], state.memory[name])

    # The keys are rotated at their absolute positions: layer 0's equal the unsegmented model's.
    plain = build_model(dataclasses.replace(CFG, memory="none"), seed=0)
    plain_calls = record(plain, monkeypatch)
    plain(stream)
    keys0 = torch.cat([c["k"] for c in calls if c["layer"] == 0], dim=-2)[..., :30, :]
    torch.testing.assert_close(keys0, plain_calls[0]["k"], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_without_xl_memory_only_the_remainder_waits() -> None:
    cfg = dataclasses.replace(CFG, mem_len=0, cmem_rate=4, compress="mean")
    model = build_model(cfg, seed=0)
    state = None
    # Segments of 6 at rate 4: 6 -> 1 group + 2 waiting; 2 + 6 -> 2 groups; 6 -> 1 group + 2.
    for i, (remainder, slots) in enumerate([(2, 1), (0, 3), (2, 4)]):
        _, state = model(tokens(1, 6, seed=i), state)
        assert state.memory["ck.0"].shape[-2] == slots
        if remainder:
            assert state.memory["k.1"].shape[-2] == remainder
        else:
            assert "k.1" not in state.memory and "valid" not in state.memory


@torch.no_grad()
def test_attention_reads_compressed_memory_then_memory_then_segment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build_model(CFG, seed=0)  # conv compression
    state = None
    for i in range(4):
        _, state = model(tokens(2, 5, seed=i), state)
    # Row 1 starts a new document: it must see only its own segment, causally.
    state = dataclasses.replace(
        state, memory=model.memory.reset(state.memory, torch.tensor([False, True]))
    )
    calls = record(model, monkeypatch)
    model(tokens(2, 5, seed=9), state)
    assert len(calls) == CFG.n_layers
    for call in calls:
        layer, old = call["layer"], call["old"]
        keys = torch.cat((old[f"ck.{layer}"], old[f"k.{layer}"], call["k"]), dim=-2)
        values = torch.cat((old[f"cv.{layer}"], old[f"v.{layer}"], call["v"]), dim=-2)
        assert keys.shape[-2] == 4 + 8 + 5
        mask = causal_mask(5, keys.shape[-2]).repeat(2, 1, 1, 1)
        mask[1, ..., :-5] = False
        want = attention(call["q"], keys, values, mask)
        torch.testing.assert_close(call["y"], want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_conv_compression_and_its_loss_match_a_direct_computation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build_model(CFG, seed=0)
    calls = record(model, monkeypatch)
    _, state = model(tokens(2, 8, seed=0))  # fills the XL memory
    _, state = model(tokens(2, 8, seed=1), state)  # evicts those 8: 4 groups of 2
    first, second = calls[: CFG.n_layers], calls[CFG.n_layers :]
    want_loss = torch.zeros(())
    for layer in range(CFG.n_layers):
        compressed = []
        for old, conv in (
            (first[layer]["k"], model.memory.compress_k[layer]),
            (first[layer]["v"], model.memory.compress_v[layer]),
        ):
            # Each slot is a linear map of its group of 2 memories in the (T, H*D) layout.
            groups = old.permute(0, 2, 1, 3).reshape(2, 4, 2, 32)  # (B, slot, c, H*D)
            slots = torch.einsum("bsci,oic->bso", groups, conv.weight)
            compressed.append(slots.view(2, 4, 2, 16).transpose(1, 2))
        ck, cv = compressed
        torch.testing.assert_close(state.memory[f"ck.{layer}"], ck, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state.memory[f"cv.{layer}"], cv, rtol=1e-5, atol=1e-6)
        q = second[layer]["q"]  # every evicted memory precedes every query: no mask
        target = attention(q, first[layer]["k"], first[layer]["v"])
        want_loss += (attention(q, ck, cv) - target).pow(2).mean()
    torch.testing.assert_close(state.aux_loss, want_loss, rtol=1e-4, atol=1e-9)


def test_reconstruction_loss_trains_the_compressor() -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, d_model=32, cmem_rate=4), seed=0)
    with torch.no_grad():
        _, state = model(tokens(2, 8, seed=1))  # the XL memory is full; the next call evicts
    x = tokens(2, 8, seed=2)
    params = [p for n, p in model.named_parameters() if is_compressor(n)]
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(20):
        _, out = model(x, state)
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
        losses.append(out.aux_loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"reconstruction loss: first-5 mean {first:.3g}, last-5 mean {last:.3g}")
    assert last <= 0.5 * first, (first, last)


def test_gradients_stay_on_their_side() -> None:
    model = build_model(CFG, seed=0)
    # Two calls with gradients flowing through the XL memory; the third reads compressed memory.
    _, state = model(tokens(2, 8, seed=0))
    _, state = model(tokens(2, 8, seed=1), state)
    assert state.aux_loss is not None and "ck.0" in state.memory

    # The reconstruction loss reaches the compressor and nothing else.
    state.aux_loss.backward(retain_graph=True)
    for name, p in model.named_parameters():
        if is_compressor(name):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None or not bool(p.grad.any()), name

    # The language-modelling loss never reaches the compressor, even across segments.
    model.zero_grad(set_to_none=True)
    logits, _ = model(tokens(2, 8, seed=2), state)
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if is_compressor(name):
            assert p.grad is None or not bool(p.grad.any()), name
    assert model.embed.weight.grad is not None


@torch.no_grad()
def test_reset_forgets_the_rows() -> None:
    model = build_model(CFG, seed=0)
    state = None
    for i in range(3):
        _, state = model(tokens(2, 5, seed=i), state)
    rows = torch.tensor([True, False])
    memory = model.memory.reset(state.memory, rows)
    assert not bool(memory["valid"][0].any()) and not bool(memory["cvalid"][0].any())
    assert bool(memory["valid"][1].all()) and bool(memory["cvalid"][1].all())
    assert "cvalid" in state.memory and bool(state.memory["cvalid"].all())  # not in place

    x = tokens(2, 5, seed=7)
    logits, _ = model(x, dataclasses.replace(state, memory=memory))
    fresh, _ = model(x[:1], State(pos=state.pos))  # same positions, empty memory
    kept, _ = model(x, state)
    torch.testing.assert_close(logits[:1], fresh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1:], kept[1:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_group_straddling_a_reset_is_dropped() -> None:
    model = build_model(dataclasses.replace(CFG, compress="mean"), seed=0)
    state = None
    for i in range(3):  # segments of 5: the XL memory holds 9 slots, the compressed memory 3
        _, state = model(tokens(2, 5, seed=i), state)
    rows = torch.tensor([True, False])
    state = dataclasses.replace(state, memory=model.memory.reset(state.memory, rows))
    # Each (compressed, XL) validity of row 0 after the next segments: 9 + 5 evicts 6 old slots
    # (3 groups, invalid); 8 + 5 evicts 3 old slots and 1 new one, so the 2nd group mixes the two
    # documents and is dropped; 9 + 5 evicts 6 new slots: 3 valid groups.
    expected = [
        ([False] * 4, [False] * 3 + [True] * 5),
        ([False] * 4, [True] * 9),
        ([False] + [True] * 3, [True] * 8),
    ]
    for i, (cvalid, valid) in enumerate(expected):
        _, state = model(tokens(2, 5, seed=10 + i), state)
        assert state.memory["cvalid"][0].tolist() == cvalid
        assert state.memory["valid"][0].tolist() == valid
        assert bool(state.memory["cvalid"][1].all()) and bool(state.memory["valid"][1].all())


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"cmem_len": -1}, "cmem_len"),
        ({"cmem_rate": 0}, "cmem_rate"),
        ({"compress": "max"}, "compress"),
        ({"mem_len": -1}, "mem_len"),
    ],
)
def test_invalid_settings_are_refused(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(CFG, **settings)
    with pytest.raises(ValueError, match=field):
        CompressiveMemory(d_model=32, n_heads=2, n_layers=2, **settings)
    with pytest.raises(ValueError, match="n_heads"):
        CompressiveMemory(d_model=30, n_heads=4, n_layers=2, cmem_len=4)
