"""The digest task, an encoder-decoder's batches and scoring, and `memext train` on a seq2seq
config end to end: a few steps, a checkpoint that loads back, a resume equal to one run."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from memext.checkpoint import load, read_metrics
from memext.cli import app
from memext.config import Config
from memext.data.digest import DIGEST_QUESTION, DIGEST_WORDS, digest
from memext.data.filler import Filler
from memext.data.sampling import pair_batch
from memext.data.tasks import TooShort
from memext.evals.seq2seq import evaluate_pairs, held_out_samples, prefix_source
from memext.model import build_model
from memext.nn.seq2seq import EncoderDecoder
from memext.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
FILLER = Filler.from_text(TOK, "Memory lets a model read far past its window. ")
runner = CliRunner()


# --- the task ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(150, 900),
    depth=st.floats(0.0, 1.0),
    gap=st.integers(0, 40),
    seed=st.integers(0, 2**31),
)
def test_digest_spreads_its_facts_and_answers_them_in_order(length, depth, gap, seed) -> None:
    try:
        s = digest(TOK, FILLER, length, depth, seed, gap=gap)
    except TooShort:
        assert length < 150 + gap  # 6 facts of ~22 tokens and the question fill ~150
        return
    words, k = s.meta["words"], s.meta["n_facts"]
    assert s.prompt.size == length and 2 <= k <= 6 and len(set(words)) == k
    assert TOK.decode(s.answer) == " ".join(words)
    assert TOK.decode(s.prompt[-s.meta["question_tokens"] :]) == DIGEST_QUESTION
    for n, (pos, word) in enumerate(zip(s.key_positions, words, strict=True), start=1):
        head = f"\nFact {n}: "
        assert TOK.decode(s.prompt[pos - len(head) : pos + len(word) + 2]) == f"{head}{word}.\n"
    assert list(s.key_positions) == sorted(s.key_positions)
    # Uniform depths: fact i lies in the i-th k-th of the body before the gap and the question.
    body = length - s.meta["question_tokens"] - gap
    for i, pos in enumerate(s.key_positions):
        assert i * body / k - 25 <= pos <= (i + 1) * body / k + 25
    end = s.key_positions[-1] + len(words[-1]) + 2
    assert length - s.meta["question_tokens"] - end >= gap


def test_digest_is_deterministic_and_refuses_bad_settings() -> None:
    a, b = digest(TOK, FILLER, 400, 0.3, 5), digest(TOK, FILLER, 400, 0.3, 5)
    assert a == b and a != digest(TOK, FILLER, 400, 0.3, 6)
    with pytest.raises(TooShort, match="too short"):
        digest(TOK, FILLER, 60, 0.5, 1, min_facts=6)
    with pytest.raises(ValueError, match="min_facts=3, max_facts=2"):
        digest(TOK, FILLER, 400, 0.5, 1, min_facts=3, max_facts=2)
    assert len(set(DIGEST_WORDS)) == len(DIGEST_WORDS) == 64


def test_prefix_source_keeps_the_start_and_the_question() -> None:
    s = digest(TOK, FILLER, 600, 0.5, 2)
    q = s.meta["question_tokens"]
    cut = prefix_source(s, 150)
    assert cut.size == 150
    assert np.array_equal(cut[: 150 - q], s.prompt[: 150 - q])
    assert np.array_equal(cut[150 - q :], s.prompt[-q:])
    assert np.array_equal(prefix_source(s, 10_000), s.prompt)
    with pytest.raises(ValueError, match="no document"):
        prefix_source(s, q)


# --- batches and scoring -------------------------------------------------------------------------


def test_pair_batch_pads_targets_and_marks_them() -> None:
    samples = [digest(TOK, FILLER, 300, d, i) for i, d in enumerate((0.1, 0.9))]
    src, x, y, real = pair_batch(samples, bos=256, eos=257, pad=259)
    assert src.shape == (2, 300) and x.shape == y.shape == real.shape
    for row, s in enumerate(samples):
        n = s.answer.size
        assert x[row, 0] == 256 and x[row, 1 : n + 1].tolist() == s.answer.tolist()
        assert y[row, :n].tolist() == s.answer.tolist() and y[row, n] == 257
        assert real[row].sum() == n + 1 and not real[row, n + 1 :].any()
    with pytest.raises(ValueError, match="share a length"):
        pair_batch([samples[0], digest(TOK, FILLER, 301, 0.5, 3)], 256, 257, 259)


def test_target_padding_never_changes_a_real_position() -> None:
    """Sources in a batch share a length (nothing on the encoder side is padded); a short
    answer padded to a longer one's length gives the logits it gives alone, at every real
    position, and the loss ignores the padding."""
    model = build_model(Config.preset("seq2seq-tiny").model, seed=0).eval()
    short = next(s for i in range(50) if (s := digest(TOK, FILLER, 300, 0.5, i)).answer.size < 20)
    long = next(s for i in range(50) if (s := digest(TOK, FILLER, 300, 0.3, i)).answer.size > 30)
    src, x, _, real = pair_batch([short, long], bos=256, eos=257, pad=259)
    alone_src, alone_x, _, _ = pair_batch([short], bos=256, eos=257, pad=259)
    assert x.shape[1] > alone_x.shape[1]  # the short row is padded in the pair
    with torch.no_grad():
        pair, _ = model(src, x)
        alone, _ = model(alone_src, alone_x)
    n = int(real[0].sum())
    assert (pair[0, :n] - alone[0, :n]).abs().max().item() <= 1e-5


def test_evaluate_pairs_scores_the_greedy_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """With greedy decoding replaced by the references, every score is 100; the prefix
    baseline hands the decoder ``keep``-token sources; the teacher-forced loss is finite."""
    import memext.evals.seq2seq as s2s

    samples = held_out_samples("digest", TOK, FILLER, 300, 4)
    model = build_model(Config.preset("seq2seq-tiny").model).eval()
    seen = []

    def oracle(model, src, bos, eos, limit, **retrieval):
        seen.append(src.shape)
        by_source = {tuple(s.prompt.tolist()): s.answer.tolist() for s in samples}
        return [
            by_source.get(tuple(row), s.answer.tolist())
            for row, s in zip(src.tolist(), samples, strict=False)
        ]

    monkeypatch.setattr(s2s, "greedy_decode", oracle)
    r = evaluate_pairs(model, TOK, samples)
    assert r["n"] == 4 and r["source_tokens"] == 300 and np.isfinite(r["loss"])
    for name in ("rouge1", "rouge2", "rougeL", "bleu", "chrf"):
        assert r[name] == pytest.approx(100.0), name
    base = evaluate_pairs(model, TOK, samples, keep=100, batch_size=3)
    assert base["source_tokens"] == 100 and seen[-2:] == [(3, 100), (1, 100)]
    assert base["loss"] != r["loss"]  # the model read other sources


# --- training through the command line -----------------------------------------------------------

SMALL = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.window=16",
    "model.max_target_len=64",
    "data.mixture=[{task: digest, batch_size: 4, lengths: [160]}]",
    "train.seq_len=160",
    "train.curriculum=[]",
    "train.curriculum_steps=[]",
    "train.warmup_steps=2",
    "train.save_every=2",
    "train.log_every=1",
    "eval.probes=digest@160",
    "eval.probe_samples=2",
]


def _train(out: Path, corpus: Path, steps: int, *extra: str) -> None:
    sets = [*SMALL, f"data.corpus={corpus}", f"train.steps={steps}", "train.eval_every=0"]
    args = ["train", "--preset", "seq2seq-tiny", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, [*args, *extra, *(f"--set={s}" for s in sets)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 80)
    return root


def test_memext_train_seq2seq_end_to_end_and_checkpoint_round_trip(
    tmp_path: Path, corpus: Path
) -> None:
    output = _train(tmp_path / "a", corpus, 4)
    assert "probe/digest@160" in output and "seq2seq results:" in output
    assert (tmp_path / "a" / "eval" / "seq2seq.json").is_file()
    assert (tmp_path / "a" / "report" / "report.html").is_file()
    rows = read_metrics(tmp_path / "a")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert "probe/digest@160" in rows[-1] and "probe/digest@160/loss" in rows[-1]

    model, cfg = load(tmp_path / "a")
    assert isinstance(model, EncoderDecoder) and cfg.model.arch == "seq2seq"
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name != "head.weight":  # tied: stored once, as the embedding
            assert torch.equal(saved[name], tensor), name

    # Resumed from step 2 to 4: the same weights as the uninterrupted run.
    _train(tmp_path / "b", corpus, 2)
    _train(tmp_path / "b", corpus, 4, "--resume", str(tmp_path / "b"))
    resumed, _ = load(tmp_path / "b")
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("data.mixture=[{task: lm}]", "synthetic tasks only for model.arch='seq2seq'"),
        ("data.mixture=[]", "synthetic tasks only for model.arch='seq2seq'"),
        ("model.max_target_len=8", "model.max_target_len=8: raise it"),
    ],
)
def test_bad_seq2seq_configs_exit_2_with_one_line(
    tmp_path: Path, corpus: Path, setting: str, message: str
) -> None:
    sets = [*SMALL, f"data.corpus={corpus}", "train.steps=1", "eval.probes=", setting]
    args = ["train", "--preset", "seq2seq-tiny", "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, *(f"--set={s}" for s in sets)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_seq2seq_tiny_preset_reads_facts_spread_through_its_length() -> None:
    cfg = Config.preset("seq2seq-tiny")
    assert cfg.model.arch == "seq2seq" and cfg.model.attention == "sliding"
    assert cfg.model.global_tokens > 0  # the model's own global slots
    # The 384-token digests (the last stage) come first: the benchmark scores the first source.
    source = cfg.data.mixture[0]
    assert source.task == "digest" and source.lengths == (384,) and source.stages == (1,)
    assert all(s.stages == (0,) and max(s.lengths) < 384 for s in cfg.data.mixture[1:])
    sample = digest(TOK, FILLER, source.lengths[0], 0.5, 0)
    spread = [p / sample.prompt.size for p in sample.key_positions]
    assert all(b - a > 0.1 for a, b in itertools.pairwise(spread))
