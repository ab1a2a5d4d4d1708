"""The ``snapkv`` KV-cache policy (``memext.infer.snapkv``): the prompt's last queries vote which
of its keys each KV head keeps; on memext models and in transformers' Llama (``PolicyCache``).

- Selection: the votes and the kept set equal a naive reference (loops over heads, queries and
  keys in float64; pooling by hand), whatever the shapes, pool and GQA grouping; up to ties at
  the cut, where any tied choice is right.
- A cached run equals a one-shot forward whose attention applies the naive selection as a mask
  (prompt rows causal, decoded rows see the kept tokens and the decoded ones), memext; in
  transformers (one KV head) decoding equals a fresh forward over the kept tokens at their true
  positions, and the kept keys are the naive selection from queries rotated by hand.
- A budget covering the input: exactly ``full`` (logits and greedy tokens), memext and HF.
- Bytes: the module doc's formulas, before and after the prompt ends.
- Bad options and misuse: one clear error each; ``--cache snapkv`` on the command line.

Tolerances (fp32): logits <= 2e-5 max abs for memext (cached vs one-shot summation order),
<= 1e-4 through transformers; votes within 1e-4 relative of the float64 reference; a cut whose
two sides' reference votes differ by less than 1e-5 counts as a tie.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from typer.testing import CliRunner

from memext.adapters import open_model
from memext.cli import app
from memext.config import ModelConfig
from memext.hf.cache import PolicyCache, prefill
from memext.infer.cache import CACHES, build_cache
from memext.infer.generate import generate_ids, new_state
from memext.infer.snapkv import SnapKV, keep_index, votes
from memext.model import build_model
from memext.nn.attention import AttentionKernel
from memext.nn.transformer import LongLM
from tiny_hf import save_tiny_llama

TOL, HF_TOL, TIE = 2e-5, 1e-4, 1e-5


def _model(n_layers: int = 2, **changes) -> LongLM:
    cfg = ModelConfig(
        vocab_size=264, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=512, init_std=0.2
    )
    return build_model(dataclasses.replace(cfg, **changes), seed=0).eval()


def _tokens(b: int, t: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


# --- the naive reference ----------------------------------------------------------------------
def _naive_votes(q: Tensor, k: Tensor, kernel: int, pool: str) -> Tensor:
    """(B, H, P - W) votes by loops in float64 (module doc's rule, spelled out)."""
    b_, hq, w, d = q.shape
    h_, p = k.shape[1], k.shape[2]
    g, r = hq // h_, kernel // 2
    out = torch.zeros(b_, h_, p - w, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            for j in range(g):
                summed = [0.0] * (p - w)
                for i in range(w):
                    seen = p - w + i + 1  # the window's i-th query sees keys [0, seen)
                    logits = [float(q[b, h * g + j, i].double() @ k[b, h, t].double())
                              / math.sqrt(d) for t in range(seen)]  # fmt: skip
                    top = max(logits)
                    e = [math.exp(x - top) for x in logits]
                    for t in range(p - w):
                        summed[t] += e[t] / sum(e)
                for t in range(p - w):
                    near = [summed[u] for u in range(t - r, t + r + 1) if 0 <= u < p - w]
                    out[b, h, t] += sum(near) / kernel if pool == "avg" else max(near)
    return out


def _naive_keep(scores: Tensor, p: int, budget: int, window: int, sinks: int) -> list:
    """Per (b, h): the kept positions (sorted), and the gap at the cut (for ties)."""
    kept = []
    for row in scores.reshape(-1, scores.shape[-1]).tolist():
        s = min(sinks, p - window)
        ranked = sorted(range(s, p - window), key=lambda t: -row[t])
        n = budget - window - s
        gap = row[ranked[n - 1]] - row[ranked[n]] if 0 < n < len(ranked) else math.inf
        kept.append((sorted([*range(s), *ranked[:n], *range(p - window, p)]), gap, row))
    return kept


def _check_kept(index: Tensor, naive: list) -> None:
    """``index`` (B, H, budget) is the naive selection, or a tied alternative at the cut."""
    for got, (want, gap, row) in zip(
        index.reshape(-1, index.shape[-1]).tolist(), naive, strict=True
    ):
        if gap > TIE:
            assert got == want
        else:  # any choice among the tied is right: the same size, nothing better left out
            extra = [row[t] for t in set(got) - set(want)]
            missing = [row[t] for t in set(want) - set(got)]
            assert len(got) == len(want) and all(abs(a - m) <= TIE for a in extra for m in missing)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    g=st.integers(1, 3),
    w=st.integers(1, 6),
    extra=st.integers(1, 20),
    kernel=st.sampled_from([1, 3, 5, 7]),
    pool=st.sampled_from(["avg", "max"]),
    sinks=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_votes_and_kept_set_equal_the_naive_reference(
    b, h, g, w, extra, kernel, pool, sinks, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    d, p = 4, sinks + w + extra
    q, k = torch.randn(b, h * g, w, d, generator=gen), torch.randn(b, h, p, d, generator=gen)
    budget = sinks + w + extra // 2
    naive = _naive_votes(q, k, kernel, pool)
    fast = votes(q, k, kernel, pool)
    torch.testing.assert_close(fast.double(), naive, rtol=1e-4, atol=1e-6)
    index = keep_index(fast, p, budget, w, sinks)
    _check_kept(index, _naive_keep(naive, p, budget, w, sinks))


@settings(max_examples=25, deadline=None)
@given(
    chunks=st.lists(st.integers(2, 9), min_size=1, max_size=6),
    g=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_the_layer_keeps_the_naive_selection_whatever_the_chunking(chunks, g, seed) -> None:
    # The window's queries come from the prompt's last forwards, however it was cut (forwards
    # of 2 tokens or more: a single token ends the prompt).
    gen = torch.Generator().manual_seed(seed)
    p, budget, window, sinks = sum(chunks), 8, 3, 1
    # avg: max pooling makes plateaus of tied votes, judged in the votes test above
    policy = SnapKV(budget=budget, window=window, kernel=3, sinks=sinks, pool="avg", max_len=p + 4)
    layer = policy.make_layer(1, 2, 4)
    k, v = torch.randn(1, 2, p + 1, 4, generator=gen), torch.randn(1, 2, p + 1, 4, generator=gen)
    q = torch.randn(1, 2 * g, p + 1, 4, generator=gen)
    a = 0
    for size in chunks:
        layer.step(a, k[..., a : a + size, :], v[..., a : a + size, :], q[..., a : a + size, :])
        a += size
    keys, values = layer.step(p, k[..., p:, :], v[..., p:, :], q[..., p:, :])
    kept = min(budget, p)
    assert keys.shape[-2] == kept + 1 and layer.held == kept + 1
    # Which prompt tokens the returned keys are: each is a row of the prompt's keys.
    index = (keys[..., :kept, None, :] == k[..., None, :p, :]).all(-1).float().argmax(-1)
    if p > budget:
        scores = _naive_votes(q[..., p - window : p, :], k[..., :p, :], 3, "avg")
        _check_kept(index, _naive_keep(scores, p, budget, window, sinks))
    else:
        assert index.tolist() == [[list(range(p))] * 2]
    assert torch.equal(values[..., :kept, :], v.gather(2, index[..., None].expand(-1, -1, -1, 4)))
    assert torch.equal(keys[..., kept:, :], k[..., p:, :])


# --- a cached run equals masked attention under the naive selection ----------------------------
class _SnapKernel(AttentionKernel):
    """The reference: prompt rows (< ``n_prompt``) causal; later rows see, per head, the naive
    selection from the window's queries over the prompt's keys, and the rows from the prompt's
    end up to themselves."""

    def __init__(self, n_prompt: int, **options):
        super().__init__()
        self.n_prompt, self.options = n_prompt, options

    def forward(self, q, k, v, *, causal=True, key_padding=None):
        o, p, t = self.options, self.n_prompt, q.shape[-2]
        w = o["window"]
        scores = _naive_votes(q[..., p - w : p, :], k[..., :p, :], o["kernel"], o["pool"])
        naive = _naive_keep(scores, p, o["budget"], w, o["sinks"])
        mask = torch.ones(t, t, dtype=torch.bool).tril().expand(*q.shape[:2], t, t).clone()
        for n, (kept, _, _) in enumerate(naive):
            b, h = divmod(n, q.shape[1])
            mask[b, h, p:, :p] = False
            mask[b, h, p:, kept] = True
        logits = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
        return logits.softmax(-1) @ v


@pytest.mark.parametrize(
    ("chunk", "options"),
    [
        (None, {"budget": 16, "window": 4, "kernel": 3, "sinks": 2, "pool": "avg"}),
        # (max pooling makes plateaus of tied votes: it is tested above, where ties are judged)
        (7, {"budget": 20, "window": 8, "kernel": 7, "sinks": 4, "pool": "avg"}),
        (11, {"budget": 9, "window": 5, "kernel": 1, "sinks": 0, "pool": "avg"}),
    ],
)
def test_decoding_equals_attention_masked_by_the_naive_selection(chunk, options) -> None:
    model, tokens, p = _model(), _tokens(1, 48, seed=4), 40
    reference = copy.deepcopy(model)
    for block in reference.blocks:
        block.attn.kernel = _SnapKernel(p, **options)
    state = new_state(model, 1, 48, "snapkv", **options)
    with torch.no_grad():
        want, full = reference(tokens)[0], model(tokens)[0]
        got = []
        for a in range(0, p, chunk or p):
            logits, state = model(tokens[:, a : min(a + (chunk or p), p)], state)
            got.append(logits)
        for i in range(p, 48):  # decoding, teacher-forced
            logits, state = model(tokens[:, i : i + 1], state)
            got.append(logits)
    got = torch.cat(got, 1)
    assert (got - want).abs().max().item() <= TOL
    assert (got[:, :p] - full[:, :p]).abs().max().item() <= TOL  # the prompt: full attention
    assert (got[:, p:] - full[:, p:]).abs().max().item() > 100 * TOL  # the cut shows
    assert all(layer.held == options["budget"] + 8 for layer in state.cache.layers)


# --- exactness: a budget covering the input ----------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 6, 40])
def test_a_budget_covering_the_input_equals_full(chunk: int) -> None:
    model, tokens = _model(), _tokens(2, 40)
    with torch.no_grad():
        want = model(tokens)[0]
        state, out = new_state(model, 2, 40, "snapkv", budget=40), []
        for a in range(0, 40, chunk):
            logits, state = model(tokens[:, a : a + chunk], state)
            out.append(logits)
    assert (torch.cat(out, 1) - want).abs().max().item() <= TOL


def test_greedy_with_a_covering_budget_equals_full() -> None:
    model = _model()
    prompt = _tokens(1, 50, seed=5)[0].tolist()
    full = list(generate_ids(model, prompt, 30, temperature=0))
    covering = CACHES["snapkv"].covering(80)
    got = list(generate_ids(model, prompt, 30, temperature=0, cache="snapkv",
                            cache_options=covering, chunk=16))  # fmt: skip
    assert got == full and len(set(full)) > 3


# --- bytes --------------------------------------------------------------------------------------
def test_nbytes_follows_the_formulas_before_and_after_the_prompt() -> None:
    n_layers, b, h, d, m, w, budget = 2, 3, 2, 16, 100, 8, 30
    cache = build_cache("snapkv", n_layers, b, h, d, max_len=m, budget=budget, window=w)
    full = 2 * n_layers * b * h * m * d * 4
    assert cache.nbytes() == full
    gen = torch.Generator().manual_seed(0)

    def read(t: int) -> None:
        for layer in range(n_layers):
            k, v, q = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
            cache.update(layer, k, v, queries=q)
        cache.advance(t)

    read(5)
    assert cache.nbytes() == full + n_layers * b * h * 5 * d * 4  # the queries read so far
    read(55)
    assert cache.nbytes() == full + n_layers * b * h * w * d * 4  # the window's queries
    read(1)  # the prompt (60 tokens) ends: 30 kept, room for the 40 still allowed
    assert cache.nbytes() == 2 * n_layers * b * h * (budget + m - 60) * d * 4
    read(1)
    assert cache.nbytes() == 2 * n_layers * b * h * (budget + m - 60) * d * 4


# --- Hugging Face ------------------------------------------------------------------------------
def _llama(kv_heads: int, n_layers: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=264,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_hf_decoding_equals_a_fresh_forward_over_the_kept_tokens() -> None:
    # One layer, one KV head: every query head reads the same kept set, so a fresh forward over
    # the kept tokens at their true positions sees exactly what the cache keeps.
    lm = _llama(kv_heads=1, n_layers=1)
    tokens, p = _tokens(1, 56, seed=7), 50
    cache = PolicyCache(lm.config, "snapkv", budget=20, window=4, sinks=2, max_len=56)
    prefill(lm, tokens[:, :p], cache, 16)
    full_keys = transformers.DynamicCache(config=lm.config)
    lm(tokens[:, :p], past_key_values=full_keys)
    for i in range(p, 56):
        out = lm(tokens[:, i : i + 1], position_ids=torch.tensor([[i]]), past_key_values=cache)
        if i == p:
            held = cache.layers[0].kv.k[..., :20, :]
            every = full_keys.layers[0].keys
            kept = (held[..., :, None, :] - every[..., None, :, :]).abs().amax(-1).argmin(-1)
            kept = kept[0, 0].tolist()
            assert kept[:2] == [0, 1] and kept[-4:] == list(range(p - 4, p))
        positions = torch.tensor([kept + list(range(p, i + 1))])
        fresh = lm(tokens[:, positions[0]], position_ids=positions).logits[:, -1]
        assert (out.logits[:, -1] - fresh).abs().max().item() <= HF_TOL
    assert cache.get_seq_length() == 56 and cache.layers[0].kv.held == 20 + 6


@torch.no_grad()
def test_hf_keeps_the_naive_selection_from_queries_rotated_by_hand() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = _llama(kv_heads=2, n_layers=2)  # GQA: 2 query heads a KV head
    tokens, p, w = _tokens(1, 45, seed=8), 45, 6
    options = {"budget": 15, "window": w, "sinks": 1, "kernel": 5, "pool": "max"}
    cache = PolicyCache(lm.config, "snapkv", max_len=50, **options)
    prefill(lm, tokens, cache, 20)
    queries: dict[int, Tensor] = {}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(
            lambda mod, inp, out, i=i: queries.__setitem__(i, out)
        )
        for i, layer in enumerate(lm.model.layers)
    ]
    full = transformers.DynamicCache(config=lm.config)
    lm(tokens, past_key_values=full)
    for hook in hooks:
        hook.remove()
    cos, sin = lm.model.rotary_emb(torch.zeros(1), torch.arange(p)[None])
    lm(tokens[:, :1], position_ids=torch.tensor([[p]]), past_key_values=cache)  # ends the prompt
    for i in range(2):
        q = queries[i].view(1, p, 4, 8).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        keys = full.layers[i].keys
        scores = _naive_votes(q[..., p - w :, :], keys, 5, "max")
        naive = _naive_keep(scores, p, 15, w, 1)
        held = cache.layers[i].kv.k[..., :15, :]
        index = (held[..., :, None, :] - keys[..., None, :, :]).abs().amax(-1).argmin(-1)
        _check_kept(index, naive)


def test_hf_covering_budget_generates_what_transformers_generates() -> None:
    lm = _llama(kv_heads=2, n_layers=2)
    prompt = _tokens(1, 30, seed=9)
    with torch.no_grad():
        want = lm.generate(prompt, max_new_tokens=20, do_sample=False)
        cache = PolicyCache(lm.config, "snapkv", budget=50, max_len=50).attach(lm)
        got = lm.generate(prompt, max_new_tokens=20, do_sample=False, past_key_values=cache)
        cache.detach()
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("snapkv") / "llama")


def test_hf_adapter_generates_through_snapkv(llama_dir: Path) -> None:
    adapter = open_model(llama_dir)
    lm = adapter.model.model
    prompt, n = adapter.prompt_ids("Remember the pass key. " * 6), 12
    covering = CACHES["snapkv"].covering(len(prompt) + n)
    got = list(adapter._generate_ids(prompt, n, temperature=0.0, cache="snapkv",
                                     cache_options=covering, chunk=8))  # fmt: skip
    with torch.no_grad():
        ref = lm.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    assert got == ref[0, len(prompt) :].tolist()
    cut = {"budget": 40, "window": 8}
    assert len(prompt) > 40
    assert len(list(adapter._generate_ids(prompt, n, temperature=0.0, cache="snapkv",
                                          cache_options=cut))) == n  # fmt: skip
    assert not lm.model.layers[0].self_attn.q_proj._forward_hooks  # detached after


# --- bad options and misuse ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_len": 64}, r"the cache needs budget=N"),
        ({"budget": 64}, r"the cache needs max_len=N"),
        ({"max_len": 64, "budget": 20}, r"budget=20 must hold .* budget >= sinks \+ window = 36"),
        ({"max_len": 64, "budget": 40, "kernel": 6}, r"snapkv kernel must be odd .* kernel=6"),
        ({"max_len": 64, "budget": 40, "kernel": 0}, r"kernel must be a positive"),
        ({"max_len": 64, "budget": 40, "window": 0}, r"window must be a positive"),
        ({"max_len": 64, "budget": 40, "sinks": -2}, r"snapkv sinks must be a number of tokens"),
        ({"max_len": 64, "budget": 40, "pool": "mean"}, r"pool must be one of avg, max"),
        ({"max_len": 64, "budget": 40, "topk": 3}, r"cache 'snapkv' takes no option topk"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_cache("snapkv", 2, 1, 2, 8, **options)


def test_update_without_queries_and_past_max_len_are_refused() -> None:
    cache = build_cache("snapkv", 1, 1, 2, 8, max_len=10, budget=40)
    with pytest.raises(ValueError, match="votes with the prompt's last queries: pass"):
        cache.update(0, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    x = torch.zeros(1, 2, 11, 8)
    with pytest.raises(ValueError, match="the KV cache holds 10 positions; 11 were asked for"):
        cache.update(0, x, x, queries=x)
    lm = _llama(kv_heads=2, n_layers=1)
    hf = PolicyCache(lm.config, "snapkv", budget=40, max_len=64)
    with pytest.raises(ValueError, match=r"call cache.attach\(model\)"):
        lm(_tokens(1, 5), past_key_values=hf)


def test_the_command_line_takes_snapkv_and_refuses_a_missing_budget(llama_dir: Path) -> None:
    runner = CliRunner()
    args = ["generate", str(llama_dir), "--prompt", "The pass key " * 10, "--max-new-tokens",
            "4", "--temperature", "0", "--device", "cpu", "--no-chat", "--cache", "snapkv"]  # fmt: skip
    done = runner.invoke(app, [*args, "--cache-opt", "budget=40", "--cache-opt", "window=8"])
    assert done.exit_code == 0, done.output
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "the cache needs budget=N" in bad.output, bad.output
