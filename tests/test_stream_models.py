"""Streaming perplexity on models of every kind (``memext.evals.streaming``, ``memext stream``).

On a tiny random Hugging Face Llama (``tiny_hf``): every policy that claims exactness
(``CachePolicy.covering``) streams what one full-attention forward scores, token for token, in
chunks of any size; on one layer a ``window`` stream equals the sliding-window recomputation,
which itself equals its definition (one forward per token) from any first position; the cache's
bytes are the formula's and stay flat. The text: several texts share the tokens equally, in
order; bad input is one line and exit 2. On the real SmolLM2 (fetched once into the user's
cache, as ``test_smollm2.py``): a covering stream equals the full forward, and a bounded one
holds the formula's bytes at every checkpoint.

Tolerance: per-token nats of two exact routes within 2e-5 (fp32 sums in different orders).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from memext.adapters import fetch, open_model
from memext.cli import app
from memext.cli.generate import stream_defaults
from memext.config import ModelConfig
from memext.evals.stream_readers import stream_policy, tokens_seen
from memext.evals.stream_text import share, stream_text
from memext.evals.streaming import (
    against_recompute,
    sliding_recompute_perplexity,
    streaming_perplexity,
)
from memext.hf.model import HFCausalLM
from memext.infer.cache import CACHES
from memext.model import build_model
from tiny_hf import save_tiny_llama

TOL = 2e-5
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def adapter(tiny: Path):
    return open_model(tiny)


def _one_layer_llama() -> HFCausalLM:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(1)
    lm = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the random init's near-uniform one
        lm.model.layers[0].self_attn.q_proj.weight.mul_(20)
    return HFCausalLM(lm, max_seq_len=2**62, use_cache=False)


def _ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def _full_nats(lm, ids: np.ndarray) -> np.ndarray:
    """Every target's loss from one forward over the whole stream, no cache."""
    with torch.no_grad():
        logits = lm(input_ids=torch.as_tensor(ids[None, :-1])).logits[0]
    return F.cross_entropy(logits.float(), torch.as_tensor(ids[1:]), reduction="none").numpy()


def _naive_recompute(forward, ids: np.ndarray, window: int, first: int) -> np.ndarray:
    """The definition: target p + 1 from one forward over the window tokens ending at p."""
    out = []
    with torch.no_grad():
        for p in range(first, len(ids) - 1):
            seg = torch.as_tensor(ids[max(0, p + 1 - window) : p + 1])[None]
            logp = forward(seg)[0, -1].float().log_softmax(-1)
            out.append(-float(logp[int(ids[p + 1])]))
    return np.array(out)


# --- exactness --------------------------------------------------------------------------------
EXACT = [name for name in CACHES.names() if CACHES.lookup(name).covering(1) is not None]


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("cache", EXACT)
def test_an_exact_policy_streams_an_hf_model_as_full_attention(adapter, cache, chunk) -> None:
    ids = _ids(150, adapter.tokenizer.vocab_size)
    want = _full_nats(adapter.model.model, ids)
    got = streaming_perplexity(
        adapter.model,
        ids,
        cache,
        chunk,
        cache_options=CACHES.lookup(cache).covering(len(ids)),
        every=50,
        progress=False,
        token_nats=True,
    )
    assert got["tokens"] == 149 and len(got["token_nats"]) == 149
    assert np.abs(got["token_nats"] - want).max() <= TOL
    assert math.isclose(got["nats_per_token"], float(want.mean()), rel_tol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_one_layer_hf_window_stream_equals_recompute(chunk: int) -> None:
    # One layer: what a query sees through a window cache is exactly its last w tokens, and the
    # chunks reach past the window, so the band mask is what makes them equal.
    lm, w = _one_layer_llama(), 16
    ids = _ids(200, 300, seed=1)
    got = streaming_perplexity(
        lm, ids, "window", chunk, cache_options={"window": w}, progress=False, token_nats=True
    )
    ref = sliding_recompute_perplexity(lm, ids, w, progress=False, token_nats=True)
    assert np.abs(got["token_nats"] - ref["token_nats"]).max() <= TOL
    # ... and not a comparison that cannot fail: the full-attention losses differ.
    assert np.abs(got["token_nats"] - _full_nats(lm.model, ids)).max() > 1e-3


@pytest.mark.parametrize("first", [0, 5, 16, 120])
def test_recompute_from_any_position_is_its_definition(first: int) -> None:
    lm, w = _one_layer_llama(), 16
    ids = _ids(140, 300, seed=2)
    want = _naive_recompute(lambda t: lm.model(input_ids=t).logits, ids, w, first)
    lengths = np.arange(300) % 3
    for stride, batch in ((1, 16), (1, 5), (4, 3)):
        got = sliding_recompute_perplexity(
            lm,
            ids,
            w,
            stride,
            first=first,
            byte_lengths=lengths,
            batch_size=batch,
            progress=False,
            token_nats=True,
        )
        assert got["tokens"] == len(want) == 139 - first and got["first"] == first
        assert got["bytes"] == int(lengths[ids[first + 1 :]].sum())
        if stride == 1:
            assert np.abs(got["token_nats"] - want).max() <= TOL
    with pytest.raises(ValueError, match="is not an input position"):
        sliding_recompute_perplexity(lm, ids, w, first=139)


def test_recompute_on_a_memext_model_from_a_position() -> None:
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    model = build_model(cfg, seed=0).eval()
    ids = _ids(90, 256, seed=3)
    want = _naive_recompute(lambda t: model(t)[0], ids, 12, 30)
    got = sliding_recompute_perplexity(model, ids, 12, first=30, progress=False, token_nats=True)
    assert np.abs(got["token_nats"] - want).max() <= TOL


def test_against_recompute_compares_the_same_positions() -> None:
    lm, w = _one_layer_llama(), 16
    ids = _ids(200, 300, seed=4)
    stream = streaming_perplexity(
        lm, ids, "window", 32, cache_options={"window": w}, progress=False, token_nats=True
    )
    lengths = np.ones(300, dtype=np.int64)
    cmp = against_recompute(
        lm, ids, stream["token_nats"], 150, w, byte_lengths=lengths, progress=False
    )
    assert cmp["tokens"] == cmp["stream"]["tokens"] == cmp["recompute"]["tokens"] == 49
    assert cmp["stream"]["bytes"] == cmp["recompute"]["bytes"] == 49
    assert cmp["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    mine = float(stream["token_nats"][150:].mean())
    assert cmp["stream"]["nats_per_token"] == pytest.approx(mine, rel=1e-12)
    with pytest.raises(ValueError, match="stream losses"):
        against_recompute(lm, ids[:-1], stream["token_nats"], 150, w, progress=False)


# --- memory -----------------------------------------------------------------------------------
def test_an_hf_stream_holds_the_formulas_bytes_flat(adapter) -> None:
    ids = _ids(900, adapter.tokenizer.vocab_size, seed=5)
    s, w = 4, 32
    out = streaming_perplexity(
        adapter.model,
        ids,
        "sinks",
        16,
        cache_options={"sinks": s, "window": w},
        every=100,
        progress=False,
    )
    config = adapter.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # 2 (keys, values) · layers · KV heads · (s + w - 1) tokens · head_dim · 4 bytes (fp32)
    want = 2 * config.num_hidden_layers * config.num_key_value_heads * (s + w - 1) * head_dim * 4
    marks = out["checkpoints"]
    assert [m["start"] // 100 for m in marks] == list(range(9))
    assert {m["cache_nbytes"] for m in marks} == {want}
    peaks = [m["chunk_peak_bytes"] for m in marks[1:]]  # the first chunk runs on an empty cache
    assert max(peaks) <= min(peaks) * 1.05 + 1024, peaks
    assert all(isinstance(m["rss_bytes"], int) and m["rss_bytes"] > 0 for m in marks)
    # Linux counts resident pages in per-thread batches: the high-water mark is not exact.
    assert all(m["max_rss_bytes"] >= m["rss_bytes"] * 0.99 for m in marks)
    # Buckets tile the stream, and their losses add up to the whole.
    buckets = out["by_position"]
    assert [b["start"] for b in buckets] == list(range(0, 899, 100))
    assert sum(b["tokens"] for b in buckets) == out["tokens"] == 899
    total = sum(b["nats_per_token"] * b["tokens"] for b in buckets)
    assert total / 899 == pytest.approx(out["nats_per_token"], rel=1e-9)


def test_without_the_profiler_a_bounded_stream_keeps_its_resident_set(adapter) -> None:
    ids = _ids(8001, adapter.tokenizer.vocab_size, seed=7)
    out = streaming_perplexity(
        adapter.model,
        ids,
        "sinks",
        16,
        cache_options={"sinks": 4, "window": 32},
        every=1000,
        progress=False,
        chunk_peak=False,
    )
    rss = [m["rss_bytes"] for m in out["checkpoints"]]
    assert all(m["chunk_peak_bytes"] is None for m in out["checkpoints"])
    # 500 chunks: a leak of 16 kB per chunk would show.
    assert max(rss[1:]) - min(rss[1:]) < 8 * 2**20, rss


def test_the_quantized_cache_streams_close_to_its_fp32_policy(adapter) -> None:
    ids = _ids(300, adapter.tokenizer.vocab_size, seed=6)
    sizes = {"sinks": 4, "window": 32}
    fp32 = streaming_perplexity(
        adapter.model, ids, "sinks", 32, cache_options=sizes, progress=False
    )
    for axis in ("token", "channel"):
        q = streaming_perplexity(
            adapter.model,
            ids,
            "quantized",
            32,
            cache_options={"policy": "sinks", "axis": axis, **sizes},
            progress=False,
        )
        assert q["checkpoints"][0]["cache_nbytes"] < fp32["checkpoints"][0]["cache_nbytes"]
        assert q["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-3)


def test_tokens_seen_is_what_a_query_sees() -> None:
    assert tokens_seen(stream_policy("sinks", {"sinks": 4, "window": 60}, 100)) == 64
    assert tokens_seen(stream_policy("window", {"window": 60}, 100)) == 60
    sinks = {"policy": "sinks", "sinks": 4, "window": 60}
    assert tokens_seen(stream_policy("quantized", sinks, 100)) == 64
    assert tokens_seen(stream_policy("full", {}, 100)) is None
    assert tokens_seen(stream_policy("retrieval", {"sinks": 4, "window": 60}, 100)) is None
    with pytest.raises(ValueError, match="window"):
        stream_policy("sinks", {"sinks": 4}, 100)


def test_stream_defaults_are_the_context_up_to_a_cap() -> None:
    assert stream_defaults(128, "sinks") == {"sinks": 4, "window": 124}
    assert stream_defaults(8192, "sinks") == {"sinks": 4, "window": 2044}
    assert stream_defaults(8192, "window") == {"window": 2048}
    assert stream_defaults(8192, "full") == {}


def test_a_model_that_is_neither_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="memext LongLM or a Hugging Face causal LM"):
        streaming_perplexity(torch.nn.Linear(2, 2), [1, 2, 3], "window", 2)


# --- the text ---------------------------------------------------------------------------------
def test_texts_share_the_tokens_equally() -> None:
    assert share(10, [100, 100]) == [5, 5]
    assert share(11, [100, 100]) == [5, 6]
    assert share(100, [10, 1000, 1000]) == [10, 45, 45]  # the short one leaves its rest
    assert share(5000, [10, 20]) == [10, 20]
    assert sum(share(7, [3, 3, 3])) == 7


def test_stream_text_reads_texts_in_order_and_marks_the_cut(adapter, tmp_path: Path) -> None:
    tok = adapter.tokenizer
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The pass key is 12345. " * 40)
    b.write_text("Remember it. " * 40)
    whole_a, whole_b = np.asarray(tok.encode(a.read_text())), np.asarray(tok.encode(b.read_text()))
    ids, parts = stream_text([str(a), str(b)], tok, 60, log=lambda m: None)
    eod = tok.special_id("<eod>")
    assert len(ids) == 60 and [p["start"] for p in parts] == [0, 30]
    assert [p["tokens"] for p in parts] == [30, 30]
    assert parts[0]["available"] == len(whole_a) + 1  # the document's end token
    assert list(ids[:29]) == list(whole_a[:29]) and ids[29] == eod  # cut, another follows
    assert list(ids[30:]) == list(whole_b[:30])
    # One text is read whole, as one document (not the corpus split's two).
    ids, _ = stream_text([str(a)], tok, 10**6, log=lambda m: None)
    assert list(ids) == [*whole_a, eod]


def test_stdlib_is_its_validation_split(adapter, monkeypatch) -> None:
    # Tokenizing the whole standard library takes minutes: the store is stood in for.
    import memext.data.prepare
    from memext.data.store import TokenStore

    split = TokenStore(np.arange(1000), np.arange(500, 800), "hash", "key")
    asked = []

    def prepare(cfg, tok, log):
        asked.append(cfg.corpus)
        return split, ()

    monkeypatch.setattr(memext.data.prepare, "prepare_data", prepare)
    ids, parts = stream_text(["stdlib"], adapter.tokenizer, 200, log=lambda m: None)
    assert asked == ["stdlib"] and list(ids) == list(range(500, 700))
    assert parts == [{"text": "stdlib", "start": 0, "tokens": 200, "available": 300}]


# --- the command ------------------------------------------------------------------------------
def _fails(args: list[str], *messages: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for message in messages:
        assert message in result.output, result.output
    return result.output


@pytest.fixture
def text(tmp_path: Path) -> Path:
    f = tmp_path / "text.txt"
    f.write_text("The pass key is 12345. Remember it. " * 30)
    return f


def test_stream_reads_an_hf_model(tiny: Path, text: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["stream", str(tiny), "--text", str(text), "--text", str(text), "--tokens", "300"]
    opts = ["--chunk", "16", "--every", "100", "--cache-opt", "window=32", "--recompute", "50"]
    result = runner.invoke(app, [*args, *opts, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["kind"] == "hf" and r["cache"] == "sinks"
    assert r["cache_options"] == {"sinks": 4, "window": 32}
    assert [p["tokens"] for p in r["texts"]] == [150, 150] and r["tokens"] == 299
    assert r["recompute"]["window"] == 36 and r["recompute"]["tokens"] == 50
    assert len(r["by_position"]) == 3 and "token_nats" not in r
    assert "recomputed over 36" in result.output


def test_stream_refuses_bad_input_in_one_line(tiny: Path, text: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    _fails(["stream", str(tiny), "--text", str(empty)], "has no text", "empty")
    _fails(["stream", str(tiny), "--text", str(latin)], "not valid UTF-8")
    _fails(["stream", str(tiny), "--text", str(tmp_path / "nope")], "does not exist")
    _fails(["stream", str(tiny), "--text", str(text), "--cache", "sink"], "unknown cache 'sink'")
    _fails(["stream", str(tiny), "--text", str(text), "--cache-opt", "windw=8"], "windw")
    _fails(
        ["stream", str(tiny), "--text", str(text), "--cache", "full", "--recompute", "10"],
        "--recompute-window",
    )
    _fails(
        [
            "stream",
            str(tiny),
            "--text",
            str(text),
            "--recompute",
            "10",
            "--recompute-stride",
            "999",
        ],
        "exceeds the window",
    )


# --- the real SmolLM2 -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(user_cache: Path) -> Iterator[Path]:
    """The converted directory in the user's cache, fetched on the first run on a machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMEXT_CACHE", str(user_cache))
        yield fetch("smollm2", log=lambda m: print(m, flush=True))


def test_smollm2_streams_exactly_and_in_flat_bytes(smollm2: Path) -> None:
    model = open_model(smollm2)
    text = "In the beginning God created the heaven and the earth. " * 12
    ids = np.asarray(model.tokenizer.encode(text))[:97]
    want = _full_nats(model.model.model, ids)
    got = streaming_perplexity(
        model.model,
        ids,
        "sinks",
        32,
        cache_options={"sinks": 4, "window": 96},
        progress=False,
        token_nats=True,
    )
    assert np.abs(got["token_nats"] - want).max() <= 1e-4
    bounded = streaming_perplexity(
        model.model,
        ids,
        "sinks",
        16,
        cache_options={"sinks": 4, "window": 16},
        every=32,
        progress=False,
    )
    # 2 · 30 layers · 3 KV heads · (4 + 16 - 1) tokens · 64 · 4 bytes
    assert {m["cache_nbytes"] for m in bounded["checkpoints"]} == {2 * 30 * 3 * 19 * 64 * 4}
    assert len(bounded["checkpoints"]) == 3
    # A bounded cache reads less than the whole text: not the full-attention losses.
    assert abs(bounded["nats_per_token"] - got["nats_per_token"]) > 1e-4
