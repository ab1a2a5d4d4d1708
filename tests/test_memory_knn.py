"""kNN memory (Memorizing Transformer): exact retrieval against a brute-force twin, the store's
contents, the gate's two limits, resets, gradients, and empty memory == xl == the plain model."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memext.nn.memory.knn  # registers "knn" (until memext.nn.memory imports it)
from memext.config import ModelConfig
from memext.model import build_model
from memext.nn.attention import build_attention
from memext.nn.memory import MemoryStep, build_memory
from memext.nn.memory.knn import KNNMemory, knn_attention, topk_indices
from memext.nn.reference import attention
from memext.nn.transformer import State

T = 8  # tokens per segment


def _cfg(**changes) -> ModelConfig:
    base = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=256, memory="knn", knn_topk=4)
    return dataclasses.replace(base, **changes)


def _twin(model, **changes):
    """A model with ``model``'s weights but another memory (``changes`` to its config)."""
    other = build_model(_cfg(**changes))
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("memory.")}
    other.load_state_dict(weights, strict=False)
    return other.eval()


def _tokens(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 264, (b, n), generator=torch.Generator().manual_seed(seed))


def _segments(model, tokens: torch.Tensor, state: State | None = None):
    outs = []
    for s in range(0, tokens.shape[1], T):
        logits, state = model(tokens[:, s : s + T], state)
        outs.append(logits)
    return outs, state


def naive_knn(q, keys, values, valid, k: int) -> torch.Tensor:
    """Brute force: dense scores, sort, keep each query's best min(k, valid) keys, plain softmax."""
    out = torch.zeros_like(q)
    for row in range(q.shape[0]):
        n_valid = int(valid[row].sum())
        if n_valid == 0:
            continue  # nothing to retrieve: zeros, like knn_attention
        scores = (q[row] @ keys[row].transpose(-2, -1)).masked_fill(~valid[row], float("-inf"))
        best = scores.argsort(dim=-1, descending=True)[..., : min(k, n_valid)]
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
        out[row] = attention(q[row], keys[row], values[row], mask)
    return out


def _random_store(b, h, tq, n, d, seed, p_valid=0.6):
    gen = torch.Generator().manual_seed(seed)
    q, keys, values = (torch.randn(b, h, m, d, generator=gen) for m in (tq, n, n))
    valid = torch.rand(b, n, generator=gen) < p_valid
    return q, keys, values, valid


# --- retrieval ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    tq=st.integers(1, 6),
    n=st.integers(1, 20),
    d=st.integers(1, 8),
    k=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_knn_attention_equals_brute_force(b, h, tq, n, d, k, seed):
    q, keys, values, valid = _random_store(b, h, tq, n, d, seed)
    got = knn_attention(q, keys, values, valid, k)
    torch.testing.assert_close(got, naive_knn(q, keys, values, valid, k), atol=1e-5, rtol=0)


def test_topk_in_chunks_equals_one_chunk(monkeypatch):
    q, keys, _, valid = _random_store(2, 2, 9, 30, 4, seed=1)
    whole = topk_indices(q, keys, valid, 5)
    monkeypatch.setattr(memext.nn.memory.knn, "CHUNK_ELEMENTS", 2 * 2 * 30 * 2)  # 2 queries
    assert torch.equal(topk_indices(q, keys, valid, 5), whole)


def test_k_at_least_n_is_full_attention_over_the_valid_store():
    q, keys, values, valid = _random_store(3, 2, 5, 11, 8, seed=2)
    valid[0] = True
    valid[1, :3] = False  # partly valid; row 2 as drawn
    got = knn_attention(q, keys, values, valid, k=11)
    want = attention(q, keys, values, valid[:, None, None, :])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_faiss_backend_equals_torch():
    import faiss  # noqa: F401  (the dev extra brings it: a missing one is an install error)

    q, keys, values, valid = _random_store(3, 2, 7, 50, 8, seed=3)
    valid[1] = False
    valid[1, [4, 9]] = True  # fewer valid keys than k: padded with -1
    valid[2] = False  # none at all
    idx_torch = topk_indices(q, keys, valid, 6, "torch")
    idx_faiss = topk_indices(q, keys, valid, 6, "faiss")
    assert torch.equal(idx_faiss, idx_torch)
    assert (idx_torch[1, ..., 2:] == -1).all() and (idx_torch[2] == -1).all()
    torch.testing.assert_close(
        knn_attention(q, keys, values, valid, 6, "faiss"),
        knn_attention(q, keys, values, valid, 6, "torch"),
        atol=1e-6,
        rtol=0,
    )


def test_faiss_model_equals_torch_model():
    import faiss  # noqa: F401  (the dev extra brings it: a missing one is an install error)

    model = build_model(_cfg(knn_topk=3)).eval()
    other = _twin(model, knn_topk=3, knn_backend="faiss")
    tokens = _tokens(2, 3 * T)
    with torch.no_grad():
        for a, b in zip(_segments(model, tokens)[0], _segments(other, tokens)[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --- the model -----------------------------------------------------------------------------------


@torch.no_grad()
def test_empty_store_is_the_plain_model_and_xl():
    tokens = _tokens(2, T)
    model = build_model(_cfg()).eval()
    plain = _twin(model, memory="none")
    logits, state = model(tokens)
    assert torch.equal(logits, plain(tokens)[0])
    assert set(state.memory) == {"knn.k", "knn.v", "knn.valid"}  # mem_len=0: no xl keys

    model = build_model(_cfg(mem_len=5)).eval()
    xl = _twin(model, memory="xl", mem_len=5)
    logits, state = model(tokens)
    logits_xl, state_xl = xl(tokens)
    assert torch.equal(logits, logits_xl)
    for name, t in state_xl.memory.items():
        assert torch.equal(state.memory[name], t)


@pytest.mark.parametrize("knn_layer", [0, -1])
def test_store_holds_every_past_raw_key_in_order_detached(knn_layer):
    cfg = _cfg(knn_layer=knn_layer)
    model = build_model(cfg).train()  # grad enabled: the store must still be detached
    seen = []
    qkv = model.blocks[knn_layer].attn.qkv
    handle = qkv.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    _, state = _segments(model, _tokens(2, 3 * T))
    handle.remove()
    h, d = cfg.n_heads, cfg.head_dim
    k_raw, v = (
        torch.cat([out.view(2, T, 3, h, d)[:, :, j].transpose(1, 2) for out in seen], dim=2)
        for j in (1, 2)
    )
    mem = state.memory
    assert mem["knn.k"].shape == (2, h, 3 * T, d)
    assert torch.equal(mem["knn.k"], k_raw) and torch.equal(mem["knn.v"], v)
    assert mem["knn.valid"].all() and mem["knn.valid"].shape == (2, 3 * T)
    assert not mem["knn.k"].requires_grad and not mem["knn.v"].requires_grad

    capped = _twin(model, knn_layer=knn_layer, knn_max=12)
    with torch.no_grad():
        mem = _segments(capped, _tokens(2, 3 * T))[1].memory
    assert torch.equal(mem["knn.k"], k_raw[..., -12:, :])
    assert torch.equal(mem["knn.v"], v[..., -12:, :])


@torch.no_grad()
@pytest.mark.parametrize("mem_len", [0, 4])
def test_closed_gate_is_xl(mem_len):
    model = build_model(_cfg(mem_len=mem_len)).eval()
    model.memory.gate.fill_(-40.0)
    xl = _twin(model, memory="xl", mem_len=mem_len)
    tokens = _tokens(2, 3 * T)
    ours, theirs = _segments(model, tokens)[0], _segments(xl, tokens)[0]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    model.memory.gate.zero_()
    assert not torch.allclose(_segments(model, tokens)[0][-1], theirs[-1], atol=1e-3)


@torch.no_grad()
def test_gate_limits_in_attend():
    """Open gate: the layer's output is retrieval alone; closed: the local attention alone."""
    mem = KNNMemory(n_layers=2, n_heads=2, knn_topk=3)
    kernel = build_attention("full")
    q, keys, values, valid = _random_store(2, 2, T, 20, 4, seed=4)
    k, v = torch.randn(2, 2, T, 4), torch.randn(2, 2, T, 4)
    old = {"knn.k": keys, "knn.v": values, "knn.valid": valid}
    for gate, want in (
        (40.0, knn_attention(q, keys, values, valid, 3)),
        (-40.0, kernel(q, k, v, causal=True)),
    ):
        mem.gate.fill_(gate)
        y = mem.attend(1, q, k, v, kernel, MemoryStep(mem, old), q, k)
        torch.testing.assert_close(y, want, atol=1e-6, rtol=0)
    y = mem.attend(0, q, k, v, kernel, MemoryStep(mem, old), q, k)  # not the kNN layer
    assert torch.equal(y, kernel(q, k, v, causal=True))


@torch.no_grad()
@pytest.mark.parametrize("mem_len", [0, 4])
def test_reset_row_equals_fresh_row(mem_len):
    model = build_model(_cfg(mem_len=mem_len)).eval()
    tokens = _tokens(2, 2 * T)
    _, state = model(tokens[:, :T])
    state.memory = model.memory.reset(state.memory, torch.tensor([True, False]))
    assert state.memory["knn.valid"].tolist() == [[False] * T, [True] * T]
    after_reset, _ = model(tokens[:, T:], state)
    fresh, _ = model(tokens[:, T:], State(pos=T))  # same positions, no memory at all
    torch.testing.assert_close(after_reset[0], fresh[0], atol=1e-5, rtol=0)
    assert not torch.allclose(after_reset[1], fresh[1], atol=1e-3)


@torch.no_grad()
def test_columns_no_row_holds_are_dropped():
    model = build_model(_cfg()).eval()
    tokens = _tokens(2, 2 * T)
    _, state = model(tokens[:, :T])
    state.memory = model.memory.reset(state.memory, torch.tensor([True, True]))
    _, state = model(tokens[:, T:], state)
    assert state.memory["knn.k"].shape[2] == T and state.memory["knn.valid"].all()


def test_gradients_reach_gate_and_queries():
    model = build_model(_cfg(mem_len=4)).train()
    tokens = _tokens(2, 3 * T + 1)
    state = None
    for s in range(0, 3 * T, T):
        logits, state = model(tokens[:, s : s + T], state)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 2 * T + 1 :].flatten())
    loss.backward()
    gate, qkv = model.memory.gate.grad, model.blocks[-1].attn.qkv.weight.grad
    assert gate is not None and torch.isfinite(gate).all() and gate.abs().sum() > 0
    assert torch.isfinite(qkv).all() and qkv.abs().sum() > 0
    assert not any(state.memory[n].requires_grad for n in ("knn.k", "knn.v"))

    # Through retrieval alone: the scores of the picked keys depend on the queries.
    q, keys, values, valid = _random_store(2, 2, 5, 12, 4, seed=5)
    valid[1] = False  # a row with nothing: zero output, zero (not NaN) gradient
    q.requires_grad_()
    knn_attention(q, keys, values, valid, 3).pow(2).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[0].abs().sum() > 0
    assert (q.grad[1] == 0).all()


# --- settings ------------------------------------------------------------------------------------


def test_built_from_the_config():
    mem = build_memory("knn", dataclasses.asdict(_cfg(knn_layer=-2, knn_max=7, mem_len=3)))
    assert isinstance(mem, KNNMemory)
    assert (mem.layer, mem.topk, mem.max, mem.mem_len, mem.backend) == (0, 4, 7, 3, "torch")
    assert mem.gate.shape == (2,) and (mem.gate == 0).all()
    assert torch.equal(build_model(_cfg()).memory.gate, torch.zeros(2))  # init leaves it at 0


@pytest.mark.parametrize(
    "settings_,match",
    [
        ({"knn_layer": 2}, "knn_layer=2"),
        ({"knn_layer": -3}, "knn_layer=-3"),
        ({"knn_topk": 0}, "knn_topk=0"),
        ({"knn_max": -1}, "knn_max=-1"),
        ({"knn_backend": "annoy"}, "knn_backend='annoy'"),
        ({"mem_len": -1}, "mem_len=-1"),
        ({"n_heads": 0}, "n_heads=0"),
    ],
)
def test_invalid_settings_raise(settings_, match):
    with pytest.raises(ValueError, match=match):
        KNNMemory(**{"n_layers": 2, "n_heads": 2, **settings_})


def test_missing_faiss_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        KNNMemory(n_layers=2, n_heads=2, knn_backend="faiss")


def test_scale_is_one_over_sqrt_d():
    """One valid key per row: softmax over one score is 1, so test the scale with two."""
    q = torch.ones(1, 1, 1, 4)
    keys = torch.tensor([[[[1.0, 0, 0, 0], [0, 0, 0, 0]]]])
    values = torch.tensor([[[[1.0], [0.0]]]]).expand(1, 1, 2, 4).contiguous()
    y = knn_attention(q, keys, values, torch.ones(1, 2, dtype=torch.bool), k=2)
    w = 1 / (1 + math.exp(-1 / math.sqrt(4)))
    torch.testing.assert_close(y, torch.full((1, 1, 1, 4), w))


@torch.no_grad()
def test_shared_qk_kernel_stores_its_queries_as_keys():
    """LSH attends with k = q, so the layer's keys, and the store's, are its raw queries."""
    cfg = _cfg(attention="lsh", lsh_chunk=4)
    model = build_model(cfg).eval()
    seen = []
    handle = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out))
    _, state = _segments(model, _tokens(1, 2 * T))
    handle.remove()
    h, d = cfg.n_heads, cfg.head_dim
    q_raw = torch.cat([out.view(1, T, 3, h, d)[:, :, 0].transpose(1, 2) for out in seen], dim=2)
    assert torch.equal(state.memory["knn.k"], q_raw)
