"""Beam search for an encoder-decoder (``memext.infer.seq2seq.beam_decode``) and `memext generate`
on a seq2seq run.

Beam search against its references: one beam is greedy decoding token for token; the cached
path equals recomputation (``cache=None``); each cache policy's in-place reordering equals
re-reading the reordered prefixes; with as many beams as there are targets it is the exhaustive
search over a tiny vocabulary. Scores are compared within 1e-4 (fp32 sums of a few log-probs,
the cached and recomputed logits differ by ~1e-6).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import memext.infer.seq2seq as s2s
from memext import checkpoint as ckpt
from memext.checkpoint import load, load_config, run_tokenizer
from memext.cli import app
from memext.config import Config, ModelConfig
from memext.curriculum import trained_length
from memext.infer.cache import CACHES
from memext.infer.seq2seq import Hypothesis, beam_decode, greedy_decode
from memext.model import build_model
from memext.nn.seq2seq import EncoderDecoder
from tiny_runs import save_tiny_corpus, save_tiny_run

BASE = ModelConfig(
    arch="seq2seq",
    vocab_size=264,
    d_model=32,
    n_layers=2,
    encoder_layers=1,
    n_heads=2,
    max_seq_len=64,
    max_target_len=16,
    init_std=0.2,  # larger than training's, so that the search has real choices to make
)
BOS, EOS = 256, 257
TOL = 1e-4
runner = CliRunner()


def _model(seed: int = 0, **changes) -> EncoderDecoder:
    return build_model(dataclasses.replace(BASE, **changes), seed=seed).eval()


def _src(s: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (1, s), generator=torch.Generator().manual_seed(seed))


def _logprob(
    model: EncoderDecoder, src: torch.Tensor, bos: int, eos: int, h: Hypothesis, **retrieval
) -> float:
    """Teacher-forced: the sum of the log-probabilities of ``h``'s tokens (and of its end)."""
    written = [*h.tokens, eos] if h.ended else h.tokens
    tgt = torch.tensor([[bos, *written[:-1]]])
    logits, _ = model(src, tgt, **retrieval)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return float(logp[torch.arange(len(written)), torch.tensor(written)].sum())


def _same(a: list[Hypothesis], b: list[Hypothesis]) -> None:
    assert [(h.tokens, h.ended) for h in a] == [(h.tokens, h.ended) for h in b]
    for x, y in zip(a, b, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=TOL)
        assert x.score == pytest.approx(y.score, abs=TOL)


# --- the search ----------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    s=st.integers(1, 40),
    new=st.integers(1, 15),
    tiny=st.booleans(),
    length_penalty=st.sampled_from([0.0, 0.6, 1.0, 2.0]),
    cache=st.sampled_from(["full", "window"]),
    seed=st.integers(0, 2**16),
)
def test_one_beam_is_greedy_decoding(s, new, tiny, length_penalty, cache, seed) -> None:
    # A 4-token vocabulary ends targets early and often, so the end rule is exercised too.
    model = _model(seed, vocab_size=4) if tiny else _model(seed)
    bos, eos = (0, 1) if tiny else (BOS, EOS)
    src = _src(s, seed, 4 if tiny else 256)
    options = {"window": 3} if cache == "window" else {}
    greedy = greedy_decode(model, src, bos, eos, new, cache, cache_options=options)[0]
    (best,) = beam_decode(
        model, src, bos, eos, new, 1, cache, length_penalty, cache_options=options
    )
    assert best.tokens == greedy
    if cache == "full":  # the references below read the whole target, as the full cache does
        ended = len(greedy) < new or _ends_at_the_limit(model, src, bos, eos, greedy)
        assert best.ended == ended
        assert best.logprob == pytest.approx(_logprob(model, src, bos, eos, best), abs=TOL)


def _ends_at_the_limit(model, src, bos, eos, tokens) -> bool:
    logits, _ = model(src, torch.tensor([[bos, *tokens]]))
    return int(logits[0, -1].argmax()) == eos


@settings(max_examples=10, deadline=None)
@given(
    s=st.integers(1, 40),
    new=st.integers(1, 12),
    beams=st.integers(2, 5),
    length_penalty=st.sampled_from([0.0, 1.0, 1.5]),
    retrieval=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cached_beams_equal_recomputation(s, new, beams, length_penalty, retrieval, seed) -> None:
    model = _model(seed)
    src = _src(s + (100 if retrieval else 0), seed)  # past max_seq_len=64 when chunked
    options = {"encode_chunk": 16, "cross_topk": 8} if retrieval else {}
    run = dict(length_penalty=length_penalty, **options)
    cached = beam_decode(model, src, BOS, EOS, new, beams, **run)
    recomputed = beam_decode(model, src, BOS, EOS, new, beams, cache=None, **run)
    _same(cached, recomputed)
    assert len(cached) == beams
    assert [h.score for h in cached] == sorted((h.score for h in cached), reverse=True)
    for h in cached:
        assert h.logprob == pytest.approx(_logprob(model, src, BOS, EOS, h, **options), abs=TOL)
        length = len(h.tokens) + h.ended
        assert h.score == pytest.approx(h.logprob / length**length_penalty, abs=TOL)


REORDERED = {
    "full": {},
    "window": {"window": 4},
    "sinks": {"sinks": 1, "window": 3},
    "quantized": {"policy": "sinks", "sinks": 1, "window": 5, "axis": "channel", "group": 2},
    "kivi": {"group": 2, "residual": 2, "sinks": 1},
}


@pytest.mark.parametrize("cache", sorted(REORDERED))
def test_reordering_in_place_equals_reading_the_prefixes_again(
    cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bounded caches keep a different past per beam: a row left unreordered reads another's.
    model, src = _model(3), _src(20, 3)
    options = REORDERED[cache]
    in_place = beam_decode(model, src, BOS, -1, 15, 4, cache, cache_options=options)
    monkeypatch.setattr(s2s, "reorder_cache", lambda cache, index: False)
    reread = beam_decode(model, src, BOS, -1, 15, 4, cache, cache_options=options)
    _same(in_place, reread)


# Every policy but those that approximate (int8 storage: quantized), which claim no covering.
EXACT = [name for name in CACHES.names() if CACHES.lookup(name).covering(1) is not None]


@pytest.mark.parametrize("cache", EXACT)
def test_every_policy_covering_the_target_is_the_full_cache(cache: str) -> None:
    # snapkv and retrieval cannot reorder: their caches are read again, which this covers.
    covering = CACHES.lookup(cache).covering(BASE.max_target_len)
    model, src = _model(4), _src(12, 4)
    full = beam_decode(model, src, BOS, -1, 15, 3)
    _same(beam_decode(model, src, BOS, -1, 15, 3, cache, cache_options=covering), full)


def _every_target(vocab: int, eos: int, new: int) -> list[tuple[list[int], bool]]:
    words = [t for t in range(vocab) if t != eos]
    ended = [(list(p), True) for n in range(new) for p in itertools.product(words, repeat=n)]
    return ended + [(list(p), False) for p in itertools.product(words, repeat=new)]


@settings(max_examples=15, deadline=None)
@given(
    vocab=st.integers(2, 4),
    new=st.integers(1, 3),
    length_penalty=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_enough_beams_find_the_exhaustive_best(vocab, new, length_penalty, seed) -> None:
    model, src = _model(seed, vocab_size=vocab), _src(5, seed, vocab)
    bos, eos = 0, vocab - 1
    targets = _every_target(vocab, eos, new)
    scored = []
    for tokens, ended in targets:
        h = Hypothesis(tokens, ended, 0.0, 0.0)
        logprob = _logprob(model, src, bos, eos, h)
        scored.append((logprob / (len(tokens) + ended) ** length_penalty, tokens, ended))
    scored.sort(key=lambda x: -x[0])
    found = beam_decode(model, src, bos, eos, new, vocab**new, length_penalty=length_penalty)
    assert len(found) == len(targets)  # every target, since no search can stop early here
    assert (found[0].tokens, found[0].ended) == (scored[0][1], scored[0][2])
    assert [h.score for h in found] == pytest.approx([x[0] for x in scored], abs=TOL)
    greedy = greedy_decode(model, src, bos, eos, new)[0]
    greedy_ended = len(greedy) < new or _ends_at_the_limit(model, src, bos, eos, greedy)
    (greedy_score,) = [x[0] for x in scored if (x[1], x[2]) == (greedy, greedy_ended)]
    assert found[0].score >= greedy_score - TOL


def test_bad_searches_are_refused() -> None:
    model, src = _model(), _src(8, 0)
    with pytest.raises(ValueError, match="beams=0 must be a positive int"):
        beam_decode(model, src, BOS, EOS, 4, 0)
    with pytest.raises(ValueError, match="one source row"):
        beam_decode(model, src.expand(2, -1), BOS, EOS, 4, 2)
    with pytest.raises(ValueError, match="max_target_len=16 holds the start token and 15 more"):
        beam_decode(model, src, BOS, EOS, 16, 2)
    with pytest.raises(ValueError, match="exceeds the model's limit max_seq_len=64"):
        beam_decode(model, _src(65, 0), BOS, EOS, 4, 2)
    assert beam_decode(model, src[0], BOS, EOS, 4, 2) == beam_decode(model, src, BOS, EOS, 4, 2)


# --- memext generate -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random seq2seq run (sources up to 384 tokens, targets up to 15) and a decoder-only one."""
    root = tmp_path_factory.mktemp("runs")
    cfg = Config.preset("seq2seq-tiny")
    model = dataclasses.replace(
        cfg.model, d_model=32, n_heads=2, encoder_layers=1, max_target_len=16, window=8
    )
    model = dataclasses.replace(model, max_seq_len=384, global_tokens=2, init_std=0.2)
    cfg = dataclasses.replace(cfg, model=model)
    seq2seq = root / "seq2seq"
    seq2seq.mkdir()
    cfg.save(seq2seq / ckpt.CONFIG)
    ckpt.save_weights(build_model(model, seed=0), seq2seq / ckpt.WEIGHTS, {"step": "0"})
    corpus = save_tiny_corpus(root / "corpus", docs=1, lines=2)
    return {"seq2seq": seq2seq, "decoder": save_tiny_run(root / "decoder", corpus)}


def _generate(run: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["generate", str(run), *args, "--device", "cpu"])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, " ".join(result.output.split())


def _library(run: Path, text: str, beams: int = 1, **options) -> str:
    model, _ = load(run)
    tok = run_tokenizer(run)
    src = torch.tensor([tok.encode(text)])
    if beams == 1:
        (out,) = greedy_decode(model, src, BOS, EOS, 15, **options)
    else:
        out = beam_decode(model, src, BOS, EOS, 15, beams, **options)[0].tokens
    return tok.decode(out)


SOURCE = "Fact 1: the key is blue. Fact 2: the door is red. Which colours?"


def test_generate_greedy_and_beams_print_the_library_target(runs: dict[str, Path]) -> None:
    run = runs["seq2seq"]
    code, stdout, _ = _generate(run, "--prompt", SOURCE)
    assert code == 0 and stdout == _library(run, SOURCE) + "\n"
    code, stdout, _ = _generate(run, "--prompt", SOURCE, "--temperature", "0")  # greedy, named
    assert code == 0 and stdout == _library(run, SOURCE) + "\n"
    code, stdout, output = _generate(
        run, "--prompt", SOURCE, "--beams", "3", "--length-penalty", "0"
    )
    assert code == 0 and stdout == _library(run, SOURCE, 3, length_penalty=0.0) + "\n"
    assert "beam search, 3 beams: log-probability" in output
    window = ("--cache", "window", "--cache-opt", "window=4")
    code, stdout, _ = _generate(run, "--prompt", SOURCE, "--beams", "2", *window)
    expected = _library(run, SOURCE, 2, cache="window", cache_options={"window": 4})
    assert code == 0 and stdout == expected + "\n"
    text = _library(run, SOURCE)
    stop = text[len(text) // 2]
    code, stdout, _ = _generate(run, "--prompt", SOURCE, "--stop", stop)
    assert code == 0 and stdout == text.split(stop, 1)[0] + "\n"


def test_generate_reads_a_long_source_in_chunks(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["seq2seq"]
    long = tmp_path / "long.txt"
    long.write_text(SOURCE * 8)  # 512 bytes, past max_seq_len=384
    retrieval = ("--encode-chunk", "128", "--cross-topk", "16")
    code, stdout, _ = _generate(run, "--prompt-file", str(long), "--beams", "2", *retrieval)
    # --encode-chunk scales the cross-attention logits from the run's trained length by default
    trained = trained_length(load_config(run))
    expected = _library(run, SOURCE * 8, 2, encode_chunk=128, cross_topk=16, trained_len=trained)
    assert code == 0 and stdout == expected + "\n"
    code, stdout, _ = _generate(
        run, "--prompt-file", str(long), "--encode-chunk", "128", "--trained-len", "0"
    )
    assert code == 0 and stdout == _library(run, SOURCE * 8, encode_chunk=128) + "\n"
    code, stdout, _ = _generate(
        run, "--prompt-file", str(long), "--encode-chunk", "128", "--trained-len", "64"
    )
    assert (
        code == 0 and stdout == _library(run, SOURCE * 8, encode_chunk=128, trained_len=64) + "\n"
    )


@pytest.mark.parametrize(
    ("run", "args", "message"),
    [
        ("seq2seq", ["--prompt", ""], "the source is empty"),
        (
            "seq2seq",
            ["--prompt", SOURCE * 8],
            "the source is 512 tokens, more than the model's max_seq_len=384: give --encode-chunk",
        ),
        ("seq2seq", ["--prompt", "x", "--encode-chunk", "400"], "--encode-chunk 400 exceeds"),
        (
            "seq2seq",
            ["--prompt", "x", "--max-new-tokens", "16"],
            "--max-new-tokens 16 exceeds the decoder's limit: max_target_len=16",
        ),
        ("seq2seq", ["--prompt", "x", "--temperature", "0.7"], "without sampling options: --temp"),
        ("seq2seq", ["--prompt", "x", "--chunk", "4", "--chat"], "options: --chat, --chunk"),
        ("seq2seq", ["--prompt", "x", "--cache", "nope"], "unknown cache 'nope'"),
        ("decoder", ["--prompt", "x", "--beams", "2"], "decoder-only model, given an encoder"),
        ("decoder", ["--prompt", "x", "--encode-chunk", "8"], "seq2seq) option: --encode-chunk"),
        ("seq2seq", ["--prompt", "x", "--trained-len", "8"], "give --encode-chunk too"),
    ],
)
def test_generate_refusals_exit_2_with_one_line(
    runs: dict[str, Path], run: str, args: list[str], message: str
) -> None:
    code, stdout, output = _generate(runs[run], *args)
    assert code == 2 and message in output, output
    assert stdout.strip() == ""
