"""Long-range tasks: token-exact, deterministic generators and the segment-by-segment evaluator."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import memext.data.filler as filler_mod
from memext.config import ModelConfig
from memext.data.corpus import Corpus, Document
from memext.data.filler import Filler
from memext.data.sampling import segments, task_batch
from memext.data.tasks import (
    COPY_QUESTION,
    PASSKEY_QUESTION,
    PASSKEY_SENTENCE,
    TASKS,
    Sample,
    assoc_recall,
    copy_task,
    make_samples,
    needle,
    passkey,
    score_answer,
)
from memext.evals.tasks import evaluate_samples
from memext.model import build_model
from memext.nn.transformer import State
from memext.tokenizer import ByteTokenizer, Tokenizer, train_bpe

TOK = ByteTokenizer()
TEXT = (
    "Memory lets a model read far past its attention window. The grass is green and the sky "
    "is blue; numbers like 1234 and 98765 appear in ordinary prose too. "
)
FILLER = Filler.from_text(TOK, TEXT)
HEAD, MID, TAIL = (len(TOK.encode(s)) for s in PASSKEY_SENTENCE)
SENTENCE = HEAD + MID + TAIL + 10  # two copies of the 5 digits
QUESTION = len(TOK.encode(PASSKEY_QUESTION))


def _question_len(tok: Tokenizer, sample: Sample) -> int:
    """Tokens between the haystack and the answer, rebuilt from the sample's own meta."""
    if sample.task == "passkey":
        return len(tok.encode(PASSKEY_QUESTION))
    if sample.task == "needle":
        name = sample.meta["names"][0]
        return len(tok.encode(f"\nWhat is the pass key of {name}? The pass key of {name} is "))
    if sample.task == "copy":
        return len(tok.encode(COPY_QUESTION))
    return len(tok.encode("\n" + "".join(f"{k}?" for k in sample.meta["queries"])))


def _value_lens(tok: Tokenizer, sample: Sample) -> list[int]:
    """Token length of each asked key's digits/value, in key_positions order."""
    if sample.task == "assoc_recall":
        return [len(tok.encode(v)) for v in sample.meta["values"]]
    return [sample.answer.size]


# --- generators ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample_different_seed_different(task: str) -> None:
    a, b, c = (
        TASKS[task](tok=TOK, filler=FILLER, length=300, depth=0.4, seed=s, gap=20)
        for s in (7, 7, 8)
    )
    assert a == b
    assert np.array_equal(a.tokens, b.tokens) and a.key_positions == b.key_positions
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.task == task and a.answer_start == 300 and a.meta["length"] == 300


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("gap", [0, 37])
def test_passkey_is_placed_at_depth_token_exactly(depth: float, gap: int) -> None:
    length = 400
    s = passkey(TOK, FILLER, length, depth, seed=3, gap=gap)
    free = length - QUESTION - gap - SENTENCE
    start = round(depth * free)
    (key_pos,) = s.key_positions
    assert key_pos == start + HEAD
    assert s.answer_start == length and s.prompt.size == length  # the prompt is exactly `length`
    assert s.answer.size == 5 and TOK.decode(s.answer) == str(s.meta["key"])
    assert np.array_equal(s.tokens[key_pos : key_pos + 5], s.answer)
    second = key_pos + 5 + MID
    assert np.array_equal(s.tokens[second : second + 5], s.answer)  # "... 12345 is the pass key"
    sentence_end = start + SENTENCE
    question_start = length - QUESTION
    assert TOK.decode(s.tokens[question_start:length]) == PASSKEY_QUESTION
    if depth == 1.0:
        assert question_start - sentence_end == gap  # as late as the gap allows
    if depth == 0.0:
        assert start == 0
    assert s.meta["distance"] == length - key_pos


@settings(max_examples=40, deadline=None)
@given(
    # The RULER-style tasks (tests/test_ruler_tasks.py) hold the same guarantee, tested there.
    task=st.sampled_from(["assoc_recall", "copy", "needle", "passkey"]),
    depth=st.floats(0.0, 1.0),
    gap=st.integers(0, 120),
    extra=st.integers(0, 150),
    seed=st.integers(0, 2**32),
    prose=st.booleans(),
)
def test_gap_guarantee_holds_at_any_depth(
    task: str, depth: float, gap: int, extra: int, seed: int, prose: bool
) -> None:
    length = 300 + gap + extra  # room for needle's four sentences at any depth
    # assoc_recall and copy also run without filler (assoc_recall then fills with pairs).
    filler = FILLER if prose or task in ("passkey", "needle") else None
    s = TASKS[task](tok=TOK, filler=filler, length=length, depth=depth, seed=seed, gap=gap)
    question_start = s.answer_start - _question_len(TOK, s)
    assert s.prompt.size == length
    for pos, size in zip(s.key_positions, _value_lens(TOK, s), strict=True):
        assert question_start - (pos + size) >= gap
    if task == "passkey":  # the whole key sentence, not only its digits, clears the gap
        assert question_start - (s.key_positions[0] - HEAD + SENTENCE) >= gap


def test_needle_names_keys_and_depth() -> None:
    length, depth, gap = 600, 0.5, 40
    s = needle(TOK, FILLER, length, depth, seed=11, n_keys=5, gap=gap)
    names, keys, starts = s.meta["names"], s.meta["keys"], s.meta["sentence_starts"]
    assert len(set(names)) == 5 and len(set(keys)) == 5 and len(set(starts)) == 5
    sentences = [f"\nThe pass key of {n} is {k}.\n" for n, k in zip(names, keys, strict=True)]
    for start, text in zip(starts, sentences, strict=True):
        assert TOK.decode(s.tokens[start : start + len(text)]) == text
    spans = sorted((a, a + len(t)) for a, t in zip(starts, sentences, strict=True))
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    asked = sentences[0]
    head = len(f"\nThe pass key of {names[0]} is ")
    question = _question_len(TOK, s)
    assert starts[0] == round(depth * (length - question - gap - len(asked)))
    assert s.key_positions == (starts[0] + head,)
    assert TOK.decode(s.answer) == str(keys[0])
    assert f"of {names[0]}?" in TOK.decode(s.tokens[length - question : length])


def test_assoc_recall_answers_the_asked_values() -> None:
    s = assoc_recall(TOK, 300, seed=5, n_queries=3, gap=50)  # pairs fill the whole prompt
    text = TOK.decode(s.prompt)
    assert text.endswith("\n" + "".join(f"{k}?" for k in s.meta["queries"]))
    assert TOK.decode(s.answer) == ";".join(s.meta["values"])
    for key, value, pos in zip(s.meta["queries"], s.meta["values"], s.key_positions, strict=True):
        assert TOK.decode(s.tokens[pos - 4 : pos + 3]) == f"{key}={value}"
        assert text.count(f"{key}=") == 1  # keys are distinct
    assert s.meta["n_pairs"] >= (300 - 13) // 8  # as many pairs as fit
    one = assoc_recall(TOK, 300, seed=5, n_pairs=6, filler=FILLER, depth=1.0, gap=30)
    (pos,) = one.key_positions
    assert np.array_equal(one.tokens[pos : pos + 3], one.answer) and one.meta["n_pairs"] == 6


def test_copy_task_answer_is_the_span() -> None:
    s = copy_task(TOK, 200, seed=2, span=12, gap=10)
    (pos,) = s.key_positions
    assert TOK.decode(s.answer) == s.meta["span"] and len(s.meta["span"]) == 12
    assert np.array_equal(s.tokens[pos : pos + 12], s.answer)
    assert TOK.decode(s.prompt).endswith(COPY_QUESTION)


@pytest.mark.parametrize("task", TASKS)
def test_score_answer_is_exact_match(task: str) -> None:
    s = TASKS[task](tok=TOK, filler=FILLER, length=300, depth=0.3, seed=1)
    right = s.answer.tolist()
    wrong = [*right]
    wrong[-1] = ord("x") if wrong[-1] != ord("x") else ord("y")
    assert score_answer(s, right) and score_answer(s, np.array(right))
    assert not score_answer(s, wrong)
    assert not score_answer(s, right[:-1])
    assert not score_answer(s, [*right, right[-1]])
    assert not score_answer(s, [])


def test_make_samples_seeds_each_sample_by_seed_and_index() -> None:
    samples = make_samples("passkey", TOK, FILLER, 200, 0.5, 4, seed=9, gap=8)
    assert len(samples) == 4
    assert samples[2] == passkey(TOK, FILLER, 200, 0.5, seed=(9, 2), gap=8)
    assert len({s.meta["key"] for s in samples}) == 4
    assert make_samples("passkey", TOK, FILLER, 200, 0.5, 2, seed=9, gap=8) == samples[:2]


def test_bpe_samples_reuse_the_key_ids(tmp_path: Path) -> None:
    bpe = train_bpe([TEXT * 20, "12345 67890 the pass key is " * 50], 300, tmp_path / "t.json")
    filler = Filler.from_text(bpe, TEXT * 4)
    for task in ("passkey", "needle", "assoc_recall", "copy"):  # one value each
        s = TASKS[task](tok=bpe, filler=filler, length=250, depth=0.6, seed=4, gap=15)
        assert s.prompt.size == 250
        pos = s.key_positions[0]
        value = s.answer if task != "assoc_recall" else np.asarray(bpe.encode(s.meta["values"][0]))
        assert np.array_equal(s.tokens[pos : pos + value.size], value)


def test_filler_take_is_contiguous_and_tiles() -> None:
    rng = np.random.default_rng(0)
    ids = FILLER.ids
    span = FILLER.take(50, rng)
    starts = [i for i in range(ids.size - 49) if np.array_equal(ids[i : i + 50], span)]
    assert starts
    long = FILLER.take(3 * ids.size + 7, rng)
    assert long.size == 3 * ids.size + 7
    assert np.array_equal(long[ids.size :], long[: -ids.size])  # periodic: the array repeats
    assert FILLER.take(0, rng).size == 0


def test_stdlib_filler_joins_train_documents_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_read_corpus(source: str) -> Corpus:
        calls.append(source)
        docs = tuple(Document(f"m{i}.py", f"doc{i}".encode() * 3) for i in range(5))
        return Corpus(docs, (), ())

    monkeypatch.setattr(filler_mod, "read_corpus", fake_read_corpus)
    filler_mod._stdlib_text.cache_clear()
    filler_mod._stdlib_filler.cache_clear()
    try:
        a = Filler.stdlib(TOK, max_bytes=20)
        b = Filler.stdlib(ByteTokenizer(), max_bytes=20)  # another instance, same fingerprint
        assert a is b and calls == ["stdlib"]
        assert TOK.decode(a.ids) == "doc0doc0doc0\ndoc1doc"  # whole docs, then cut
    finally:
        filler_mod._stdlib_text.cache_clear()
        filler_mod._stdlib_filler.cache_clear()


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="too short"):
        passkey(TOK, FILLER, 60, 0.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        passkey(TOK, FILLER, QUESTION + SENTENCE + 9, 0.5, seed=0, gap=10)
    passkey(TOK, FILLER, QUESTION + SENTENCE + 10, 0.5, seed=0, gap=10)  # just fits
    with pytest.raises(ValueError, match=r"depth=1\.5 must lie in \[0, 1\]"):
        passkey(TOK, FILLER, 300, 1.5, seed=0)
    with pytest.raises(ValueError, match="gap=-1"):
        copy_task(TOK, 300, seed=0, gap=-1)
    with pytest.raises(ValueError, match="filler text is empty"):
        Filler.from_text(TOK, "")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        Filler(np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="too short for 8 key sentences"):
        needle(TOK, FILLER, 200, 0.5, seed=0, n_keys=8)
    with pytest.raises(ValueError, match="n_keys=99"):
        needle(TOK, FILLER, 2000, 0.5, seed=0, n_keys=99)
    with pytest.raises(ValueError, match="too short"):
        assoc_recall(TOK, 100, seed=0, n_pairs=16, filler=FILLER)
    with pytest.raises(ValueError, match="n_queries=5"):
        assoc_recall(TOK, 300, seed=0, n_pairs=4, n_queries=5)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_samples("nope", TOK, FILLER, 300, 0.5, 1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        passkey(TOK, FILLER, 300, 0.5, seed=-1)


# --- evaluator ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), seg=st.integers(1, 120))
def test_segments_cover_from_the_end(n: int, seg: int) -> None:
    cuts = segments(n, seg)
    assert [a for a, _ in cuts[1:]] == [b for _, b in cuts[:-1]]  # contiguous
    if n == 0:
        assert cuts == []
        return
    assert cuts[0][0] == 0 and cuts[-1][1] == n
    assert all(b - a == seg for a, b in cuts[1:])
    assert 1 <= cuts[0][1] - cuts[0][0] <= seg
    assert len(cuts) == -(-n // seg)


def test_segments_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="segment_len=0"):
        segments(10, 0)


def test_task_batch_masks_exactly_the_answer_predicting_positions() -> None:
    samples = [  # one total length: 120-token prompts, 5-token answers
        needle(TOK, FILLER, 120, 0.7, seed=1, n_keys=1),
        passkey(TOK, FILLER, 120, 0.2, seed=2),
        copy_task(TOK, 120, seed=3, span=5),
    ]
    inputs, targets, mask = task_batch(samples)
    assert inputs.shape == targets.shape == mask.shape
    assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
    for b, s in enumerate(samples):
        assert mask[b].nonzero().flatten().tolist() == list(
            range(s.answer_start - 1, 120 + s.answer.size - 1)
        )
        assert targets[b, mask[b]].tolist() == s.answer.tolist()
        assert np.array_equal(inputs[b].numpy(), s.tokens[:-1])
        assert np.array_equal(targets[b].numpy(), s.tokens[1:])
    with pytest.raises(ValueError, match="share a length"):
        task_batch([samples[0], passkey(TOK, FILLER, 130, 0.2, seed=2)])


class Oracle(nn.Module):
    """Puts all mass on the true next token, found from the samples it was given.

    It reads the position from ``State.pos`` and keeps, per row, the samples whose tokens match
    everything seen so far in ``State.memory``: so it is only right if the evaluator carries the
    state across segments. ``miss_last``: deliberately wrong on every sample's last token.
    """

    def __init__(self, samples: Sequence[Sample], vocab: int, miss_last: bool = False):
        super().__init__()
        self.rows = [torch.from_numpy(s.tokens.copy()) for s in samples]
        self.vocab, self.miss_last = vocab, miss_last

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = state or State()
        (b, t), pos = tokens.shape, state.pos
        seen = state.memory or [list(range(len(self.rows)))] * b
        logits = torch.zeros(b, t, self.vocab)
        kept = []
        for i in range(b):
            keep = [
                k
                for k in seen[i]
                if self.rows[k].numel() > pos + t
                and torch.equal(self.rows[k][pos : pos + t], tokens[i])
            ]
            nxt = self.rows[keep[0]][pos + 1 : pos + t + 1].clone()
            if self.miss_last and pos + t + 1 == self.rows[keep[0]].numel():
                nxt[-1] = (nxt[-1] + 1) % self.vocab
            logits[i, torch.arange(t), nxt] = 1.0
            kept.append(keep)
        return logits, State(pos=pos + t, memory=kept)


def _mixed_samples() -> list[Sample]:
    return [
        *make_samples("passkey", TOK, FILLER, 150, 0.5, 3, seed=0, gap=20),
        *make_samples("copy", TOK, FILLER, 120, 0.0, 2, seed=0, span=10),
        *make_samples("passkey", TOK, FILLER, 150, 0.9, 2, seed=1, gap=20),
    ]


@pytest.mark.parametrize("segment_len", [16, 40, 1000])
def test_an_oracle_scores_perfectly_across_segments(segment_len: int) -> None:
    samples = _mixed_samples()
    out = evaluate_samples(Oracle(samples, TOK.vocab_size), samples, segment_len, batch_size=2)
    assert out["exact_match"] == 1.0 and out["token_accuracy"] == 1.0
    assert out["correct"] == [True] * len(samples) and out["n"] == len(samples)
    assert out["task"] == "copy+passkey" and out["segment_len"] == segment_len
    assert 0 < out["chance"] < 1e-4 and out["seconds"] >= 0


def test_one_wrong_token_fails_the_sample_but_not_the_others() -> None:
    samples = _mixed_samples()
    model = Oracle(samples, TOK.vocab_size, miss_last=True)
    out = evaluate_samples(model, samples, 32, batch_size=4)
    assert out["exact_match"] == 0.0 and out["correct"] == [False] * len(samples)
    n_answer = sum(s.answer.size for s in samples)
    assert out["token_accuracy"] == pytest.approx((n_answer - len(samples)) / n_answer)


def test_the_answer_must_fit_in_the_last_segment() -> None:
    samples = make_samples("copy", TOK, FILLER, 120, 0.0, 2, seed=0, span=10)
    model = Oracle(samples, TOK.vocab_size)
    assert evaluate_samples(model, samples, 10)["exact_match"] == 1.0  # exactly fits
    with pytest.raises(ValueError, match="need segment_len >= 10"):
        evaluate_samples(model, samples, 9)


def test_a_random_model_fails_passkey(tiny_model_cfg: ModelConfig) -> None:
    model = build_model(tiny_model_cfg, seed=0)
    samples = make_samples("passkey", TOK, FILLER, 200, 0.5, 4, seed=0, gap=40)
    out = evaluate_samples(model, samples, 64, batch_size=4)
    assert out["exact_match"] == 0.0 and out["token_accuracy"] < 0.5
    assert model.training  # the evaluator restores the mode it found


def test_one_segment_equals_one_forward_pass(tiny_model_cfg: ModelConfig) -> None:
    model = build_model(tiny_model_cfg, seed=1).eval()
    samples = make_samples("copy", TOK, FILLER, 160, 0.5, 4, seed=3, span=3)
    inputs, targets, mask = task_batch(samples)
    with torch.no_grad():
        pred = model(inputs)[0].argmax(-1)
    hit = (pred == targets) & mask
    direct_correct = (hit | ~mask).all(1).tolist()
    direct_acc = int(hit.sum()) / int(mask.sum())
    for segment_len in (160, 512):
        out = evaluate_samples(model, samples, segment_len, batch_size=3)
        assert out["correct"] == direct_correct
        assert out["token_accuracy"] == pytest.approx(direct_acc)
        assert out["exact_match"] == sum(direct_correct) / len(samples)
