"""The real-text seq2seq tasks: ``outline`` (a stdlib module's top-level definitions) and
``cipher`` (a tagged sentence under a fixed word cipher), their split by source file, and the
prefix oracle that bounds a prefix baseline."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memext.config import Config
from memext.data.corpus import _is_validation
from memext.data.digest import digest
from memext.data.filler import Filler
from memext.data.mixture import BatchSource, fitted_sample
from memext.data.seq2seq_tasks import (
    CIPHER_CLOSE,
    CIPHER_OPEN,
    CIPHER_QUESTION,
    CIPHER_WORDS,
    OUTLINE_QUESTION,
    cipher,
    cipher_table,
    module_split,
    outline,
    split_modules,
    strip_docstrings,
)
from memext.data.tasks import TASKS, TooShort, make_samples, passkey
from memext.evals.probes import HeldOutTask
from memext.evals.seq2seq import held_out_samples, oracle_answer, oracle_scores, prefix_source
from memext.tokenizer import ByteTokenizer, Tokenizer, train_bpe

TOK = ByteTokenizer()
FILLER_TEXT = "Memory lets a model read far past its window. "
FILLER = Filler.from_text(TOK, FILLER_TEXT)
EVERY = {n: p for split in ("train", "validation", "test") for n, p, _ in split_modules(split)}
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _top_level(name: str) -> list[str]:
    """The module's top-level def/class names in order, read from the file as shipped."""
    tree = ast.parse(EVERY[name].read_bytes())
    return [n.name for n in tree.body if isinstance(n, DEFS)]


def _text(tok: Tokenizer, ids: np.ndarray) -> str:
    return tok.decode(ids.tolist())


def test_both_tasks_are_registered_and_built_by_make_samples() -> None:
    assert {"outline", "cipher", "digest"} <= set(TASKS)
    (o,) = make_samples("outline", TOK, FILLER, 700, 0.5, 1, 3)
    (c,) = make_samples("cipher", TOK, FILLER, 300, 0.5, 1, 3)
    assert (o.task, c.task) == ("outline", "cipher")
    assert o.prompt.size == 700 and c.prompt.size == 300


# --- outline ------------------------------------------------------------------------------------


def _check_outline(tok: Tokenizer, s, length: int) -> None:
    """Exact length, the question last, and the names: the module's own top-level definitions,
    consecutive and in order, each where the sample says, with none of its neighbours whole in
    the window."""
    names, q, gap = s.meta["names"], s.meta["question_tokens"], s.meta["gap"]
    assert s.prompt.size == length and s.task == "outline"
    assert _text(tok, s.prompt[-q:]) == OUTLINE_QUESTION
    assert _text(tok, s.prompt[length - q - gap : length - q]) == "\n" * gap
    assert _text(tok, s.answer) == "\n".join(names) == oracle_answer(s)
    assert module_split(s.meta["file"]) == s.meta["split"]
    every = _top_level(s.meta["file"])
    i = next(i for i in range(len(every)) if every[i : i + len(names)] == names)
    window = _text(tok, s.prompt[: length - q - gap])
    for pos, name, end in zip(s.key_positions, names, s.meta["item_ends"], strict=True):
        before = _text(tok, s.prompt[:pos])
        line = before[before.rfind("\n") + 1 :]  # the header, from column 0 up to the name
        assert re.fullmatch(r"(async\s+def|def|class)\s+", line), (name, line)
        assert _text(tok, s.prompt[pos : end - 1]) == name and end <= length - q - gap
    for gone in every[i - 1 : i] + every[i + len(names) : i + len(names) + 1]:
        header = rf"(?m)^(?:async\s+def|def|class)\s+{re.escape(gone)}(?=\W)"
        assert re.search(header, window) is None, gone


@pytest.mark.parametrize(
    ("length", "depth", "gap"), [(300, 0.0, 0), (900, 0.5, 37), (1600, 1.0, 0)]
)
def test_outline_lists_the_modules_top_level_definitions_in_order(length, depth, gap) -> None:
    for seed in range(4):
        _check_outline(TOK, outline(TOK, length, seed, depth=depth, gap=gap), length)


def test_outline_is_deterministic_and_its_depth_moves_the_window() -> None:
    a, b = outline(TOK, 1200, 7, depth=0.4), outline(TOK, 1200, 7, depth=0.4)
    assert a == b
    assert len({outline(TOK, 1200, s).meta["file"] for s in range(6)}) > 1
    # The same seed draws the same modules in the same order, and the window moves with depth
    # through the first whose window holds a definition.
    moved = 0
    for seed in range(4):
        by_depth = [outline(TOK, 1200, seed, depth=d) for d in (0.0, 0.4, 1.0)]
        if len({s.meta["file"] for s in by_depth}) == 1:
            starts = [s.meta["start"] for s in by_depth]
            assert starts[0] == 0 and starts == sorted(starts)
            moved += starts[0] < starts[-1]
        for s in by_depth:  # the window is the docstring-free source itself, from a line start
            body, start = 1200 - s.meta["question_tokens"], s.meta["start"]
            source = strip_docstrings(EVERY[s.meta["file"]].read_bytes())
            assert source is not None and len(source) == s.meta["module_tokens"]
            assert bytes(s.prompt[:body].tolist()) == source[start : start + body]
            assert start <= round(s.meta["depth"] * (len(source) - body))
            assert start == 0 or source[start - 1 : start] in (b"\n", b"\r")
    assert moved


def test_outline_splits_modules_by_the_corpus_hash_and_never_crosses_them() -> None:
    parts = {
        split: {n for n, _, _ in split_modules(split)} for split in ("train", "validation", "test")
    }
    every = set(EVERY)
    assert set.union(*parts.values()) == every and sum(map(len, parts.values())) == len(every)
    assert len(every) > 100 and all(n.endswith(".py") for n in every)
    # Validation is exactly what the corpus holds out at its default 5%; test is 10% more.
    assert parts["validation"] == {n for n in every if _is_validation(n, 5.0)}
    assert parts["test"] == {n for n in every if _is_validation(n, 15.0)} - parts["validation"]
    assert parts["test"] and parts["validation"]
    train = [outline(TOK, 400, s, depth=s / 20) for s in range(20)]
    assert {s.meta["file"] for s in train} <= parts["train"]
    test = [outline(TOK, 400, s, split="test") for s in range(6)]
    assert {s.meta["file"] for s in test} <= parts["test"]
    held = held_out_samples("outline", TOK, FILLER, 400, 4)  # the probe's split: validation
    assert {s.meta["file"] for s in held} <= parts["validation"]
    assert {s.meta["file"] for s in held_out_samples("outline", TOK, FILLER, 400, 4, "test")} <= (
        parts["test"]
    )


def test_outline_refuses_what_it_cannot_make() -> None:
    with pytest.raises(TooShort, match="question"):
        outline(TOK, len(OUTLINE_QUESTION), 0)
    with pytest.raises(TooShort, match="no test module"):
        outline(TOK, 10**8, 0, split="test")
    with pytest.raises(ValueError, match="split='dev'"):
        outline(TOK, 500, 0, split="dev")
    with pytest.raises(TooShort, match="gap=500"):
        outline(TOK, 520, 0, gap=500)
    with pytest.raises(ValueError, match="depth"):
        outline(TOK, 500, 0, depth=1.5)


def test_docstrings_go_and_everything_else_stays_as_written() -> None:
    src = (
        b'"""Module doc."""\n'
        b"# a comment\n"
        b"import os\r\n"
        b"class A:\n"
        b'    """Class doc\n    over lines."""\n'
        b"    x = 1  # kept\n"
        b"    def f(self):\n"
        b"        '''only a docstring'''\n"
        b'def g(): "one line"; return 2\n'
        b"async def h():\n"
        b'    "doc"\n'
        b'    "a string that would become the docstring"\n'
        b"    return 'not a docstring'\n"
        b'X = """data, not a docstring"""\n'
    )
    assert strip_docstrings(src) == (
        b"# a comment\n"
        b"import os\r\n"
        b"class A:\n"
        b"    x = 1  # kept\n"
        b"    def f(self):\n"
        b"        ...\n"
        b"def g(): return 2\n"
        b"async def h():\n"
        b"    return 'not a docstring'\n"
        b'X = """data, not a docstring"""\n'
    )
    assert strip_docstrings(b"def f(x):\n") is None  # not Python


def test_stripped_stdlib_modules_parse_without_docstrings_and_keep_their_comments() -> None:
    for name in ("argparse.py", "json/decoder.py", "asyncio/locks.py", "string.py"):
        raw = EVERY[name].read_bytes()
        out = strip_docstrings(raw)
        assert out is not None and len(out) < len(raw)
        tree = ast.parse(out)
        owners = (ast.Module, *DEFS)
        assert all(ast.get_docstring(n) is None for n in ast.walk(tree) if isinstance(n, owners))
        assert [n.name for n in tree.body if isinstance(n, DEFS)] == _top_level(name)

        def comments(code: bytes) -> list[str]:
            toks = tokenize.tokenize(io.BytesIO(code).readline)
            return [t.string for t in toks if t.type == tokenize.COMMENT]

        assert comments(out) == comments(raw)


# --- cipher -------------------------------------------------------------------------------------


def test_the_cipher_is_one_fixed_bijection_with_no_word_left_alone() -> None:
    table = cipher_table()
    assert sorted(table) == sorted(table.values()) == sorted(CIPHER_WORDS)
    assert all(k != v for k, v in table.items())
    assert len(set(CIPHER_WORDS)) == len(CIPHER_WORDS) == 64
    assert all(re.fullmatch(r"[a-z]+", w) for w in CIPHER_WORDS)


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(40, 600),
    depth=st.floats(0.0, 1.0),
    gap=st.integers(0, 40),
    seed=st.integers(0, 2**31),
)
def test_cipher_translates_the_tagged_sentence(length, depth, gap, seed) -> None:
    try:
        s = cipher(TOK, FILLER, length, depth, seed, gap=gap)
    except TooShort:
        # The longest block (6 words of up to 7 letters) and the question need ~90 tokens.
        assert length < 100 + gap
        return
    words, q = s.meta["words"], s.meta["question_tokens"]
    assert s.prompt.size == length and 3 <= len(words) <= 6
    assert _text(TOK, s.answer) == " ".join(cipher_table()[w] for w in words) == oracle_answer(s)
    assert _text(TOK, s.prompt[-q:]) == CIPHER_QUESTION
    first = s.key_positions[0] - len(CIPHER_OPEN)
    block = f"{CIPHER_OPEN}{' '.join(words)}{CIPHER_CLOSE}"
    assert _text(TOK, s.prompt[first : first + len(block)]) == block
    assert first == round(depth * (length - q - gap - len(block)))
    for pos, word in zip(s.key_positions, words, strict=True):
        assert _text(TOK, s.prompt[pos : pos + len(word)]) == word


def test_cipher_is_deterministic_and_refuses_bad_settings() -> None:
    a, b = cipher(TOK, FILLER, 400, 0.3, 5), cipher(TOK, FILLER, 400, 0.3, 5)
    assert a == b and any(a != cipher(TOK, FILLER, 400, 0.3, s) for s in range(6, 9))
    with pytest.raises(TooShort, match="too short"):
        cipher(TOK, FILLER, 40, 0.5, 1)
    with pytest.raises(ValueError, match="min_words=4, max_words=2"):
        cipher(TOK, FILLER, 400, 0.5, 1, min_words=4, max_words=2)
    with pytest.raises(ValueError, match="Filler"):
        cipher(TOK, None, 400, 0.5, 1)


def test_both_tasks_place_their_pieces_exactly_with_a_bpe(tmp_path: Path) -> None:
    text = EVERY["argparse.py"].read_text() + " ".join(CIPHER_WORDS) * 3
    bpe = train_bpe([text, FILLER_TEXT * 20], 400, tmp_path / "bpe.json")
    filler = Filler.from_text(bpe, FILLER_TEXT)
    for seed in range(3):
        _check_outline(bpe, outline(bpe, 600, seed, depth=0.5), 600)
        s = cipher(bpe, filler, 200, 0.7, seed)
        assert s.prompt.size == 200
        assert _text(bpe, s.answer) == " ".join(s.meta["target"]) == oracle_answer(s)
        for pos, word in zip(s.key_positions, s.meta["words"], strict=True):
            assert _text(bpe, s.prompt[pos:]).startswith(word)


# --- through the mixture, and the prefix oracle -------------------------------------------------


def test_the_mixture_draws_both_tasks_for_either_architecture() -> None:
    # A decoder-only model reads prompt + answer of an exact total, though an outline's answer
    # changes with the window's length (some of these widen their gap to fit).
    for seed in range(24):
        s = fitted_sample("outline", TOK, FILLER, 500, seed / 60, seed, 0)
        assert s.tokens.size == 500
        _check_outline(TOK, s, s.prompt.size)
        assert fitted_sample("cipher", TOK, FILLER, 500, seed / 24, seed, 0).tokens.size == 500
    probe = HeldOutTask("outline", 400, 3).samples(TOK, FILLER)  # a decoder-only probe
    assert all(module_split(s.meta["file"]) == "validation" for s in probe)
    assert [s.tokens.size for s in probe] == [401] * 3
    mixture = [{"task": "outline", "batch_size": 2, "lengths": [256]}]
    cfg = Config.preset("seq2seq-tiny").override({"data.mixture": mixture})
    batch = BatchSource(cfg, TOK, np.frombuffer(b"x = 1\n" * 2000, np.uint8).astype(np.int64))
    b = batch.batch(0, 0, 0, 256, 2)
    assert b.src is not None and b.src.shape == (2, 256)


def test_the_prefix_oracle_keeps_what_the_prefix_shows() -> None:
    samples = [
        digest(TOK, FILLER, 600, 0.5, 2),
        outline(TOK, 1500, 4, depth=0.5),
        cipher(TOK, FILLER, 600, 0.5, 4),
    ]
    for s in samples:
        q, ends = s.meta["question_tokens"], s.meta["item_ends"]
        assert oracle_answer(s) == oracle_answer(s, 10**6) == _text(TOK, s.answer)
        for keep in (q + 1, (q + s.prompt.size) // 2, s.prompt.size - 1):
            shown = [it for it, e in zip(s.meta["items"], ends, strict=True) if e <= keep - q]
            assert oracle_answer(s, keep) == s.meta["joiner"].join(shown)
            assert prefix_source(s, keep).size == keep
        # An item shows once its last token and the one after it are kept.
        shown_as = s.meta["words"] if s.task == "cipher" else s.meta["items"]  # source words
        for pos, word, end in zip(s.key_positions, shown_as, ends, strict=True):
            assert end == pos + len(word) + 1
        assert oracle_answer(s, q + ends[0] - 1) == ""
        assert oracle_answer(s, q + ends[0]).split(s.meta["joiner"])[0] == s.meta["items"][0]
    whole = oracle_scores(TOK, samples)
    assert all(v == pytest.approx(100.0) for v in whole.values())
    half = oracle_scores(TOK, samples, 300)
    assert 0.0 <= half["rougeL"] < 100.0
    with pytest.raises(ValueError, match="no oracle"):
        oracle_answer(passkey(TOK, FILLER, 200, 0.5, 1))
