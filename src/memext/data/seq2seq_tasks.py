"""Sequence-to-sequence tasks on real text (issue 19, tasks 1 and 3): ``outline`` lists the
top-level definitions of a standard-library module's source, ``cipher`` translates one tagged
sentence hidden in a long document under a fixed word cipher.

Built like ``memext.data.tasks`` (token space, exact lengths, seeded, ``TooShort`` when a length
cannot hold the pieces) and registered in its ``TASKS``. Both end in a question whose length is
``meta["question_tokens"]``, so ``memext.evals.seq2seq.prefix_source`` cuts them like ``digest``,
and both name their answer's items (``meta["items"]``, joined by ``meta["joiner"]``) and where
each one's evidence ends in the prompt (``meta["item_ends"]``: the item and the token after it,
which shows where it ends), so ``memext.evals.seq2seq.oracle_answer`` writes what a perfect
reader of a prefix would.

ROUGE (rouge-score) lowercases and splits on anything not a letter or digit: a cipher word is one
ROUGE token, a name such as ``_get_default`` is two (``get``, ``default``).
"""

from __future__ import annotations

import ast
import bisect
import functools
import itertools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memext.data.corpus import file_bucket, stdlib_files
from memext.data.filler import Filler, _ByFingerprint
from memext.data.tasks import (
    Sample,
    Seed,
    TooShort,
    _check,
    _haystack,
    _ids,
    _needed,
    _rng,
    _sample,
    _start,
    register_task,
)
from memext.tokenizer import ByteTokenizer, Tokenizer

# --- outline ------------------------------------------------------------------------------------

# A Python comment, so the prompt stays Python; one name per line, as an outline reads.
OUTLINE_QUESTION = "\n# Top-level definitions, in order:\n"
OUTLINE_JOINER = "\n"
SPLITS = ("train", "validation", "test")
# Validation: the files the corpus holds out at its default 5% (the same hash buckets), so a
# held-out outline is never a module the stdlib corpus trains on; test: the next 10% of buckets.
OUTLINE_VAL_PERCENT = 5.0
OUTLINE_TEST_PERCENT = 10.0
_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_HEADER = re.compile(rb"(?:async\s+def|def|class)\s+")
_SEMICOLON = re.compile(rb"(?:[ \t]*;[ \t]*)?")


def module_split(name: str) -> str:
    """The split of a stdlib file by its POSIX path relative to the stdlib root: the corpus's
    hash bucket (``memext.data.corpus.file_bucket``) below 500 is validation, below 1500 test."""
    bucket = file_bucket(name)
    if bucket < OUTLINE_VAL_PERCENT * 100:
        return "validation"
    if bucket < (OUTLINE_VAL_PERCENT + OUTLINE_TEST_PERCENT) * 100:
        return "test"
    return "train"


@functools.lru_cache(maxsize=1)
def _stdlib_modules() -> tuple[tuple[str, Path, int], ...]:
    # Listing the stdlib walks every installed package too (seconds): once per process.
    root, files = stdlib_files()
    return tuple((p.relative_to(root).as_posix(), p, p.stat().st_size) for p in files)


def split_modules(split: str) -> tuple[tuple[str, Path, int], ...]:
    """(name, path, size in bytes) of the stdlib files of ``split``, in the corpus's order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    return tuple(m for m in _stdlib_modules() if module_split(m[0]) == split)


def _line_starts(src: bytes) -> list[int]:
    starts = [0]
    for line in src.splitlines(keepends=True):  # bytes split on \n, \r\n, \r only, as ast does
        starts.append(starts[-1] + len(line))
    return starts


def _is_string(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _docstring_cuts(
    src: bytes, tree: ast.Module, starts: list[int]
) -> list[tuple[int, int, bytes]]:
    """(start, end, replacement) byte spans of every docstring in ``src``, sorted. A string
    statement right after a docstring goes too, since it would be the docstring once the one
    before it is gone; a body of nothing else becomes ``...`` (still valid Python)."""
    cuts = []
    for node in ast.walk(tree):
        if not isinstance(node, _DOC_OWNERS):
            continue
        run = list(itertools.takewhile(_is_string, node.body))
        for i, doc in enumerate(run):
            # ast's columns are UTF-8 byte offsets within their line.
            a = starts[doc.lineno - 1] + doc.col_offset
            b = starts[doc.end_lineno - 1] + doc.end_col_offset  # type: ignore[operator]
            line_a, line_b = starts[doc.lineno - 1], starts[doc.end_lineno]  # type: ignore[index]
            if i == 0 and len(run) == len(node.body) and not isinstance(node, ast.Module):
                cuts.append((a, b, b"..."))
            elif not src[line_a:a].strip() and not src[b:line_b].strip():
                cuts.append((line_a, line_b, b""))  # the docstring's own lines go whole
            else:  # on a line with code: the string goes, and a ";" after it
                cuts.append((a, _SEMICOLON.match(src, b).end(), b""))  # type: ignore[union-attr]
    return sorted(cuts)


def _parse(src: bytes) -> ast.Module | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes in old stdlib code warn
        try:
            return ast.parse(src)
        except (SyntaxError, ValueError):
            return None


def _strip(src: bytes) -> tuple[bytes, list[tuple[str, int, int]]] | None:
    """``src`` without its docstrings, every other byte as written, and the byte span of each
    top-level definition's name in it; None when ``src`` is not Python this can place."""
    tree = _parse(src)
    if tree is None:
        return None
    starts = _line_starts(src)
    names = []
    for node in tree.body:
        if isinstance(node, _DEFS):
            header = _HEADER.match(src, starts[node.lineno - 1] + node.col_offset)
            name = node.name.encode()
            if header is None or src[header.end() : header.end() + len(name)] != name:
                return None  # a header split over lines: too odd to place exactly
            names.append((node.name, header.end(), header.end() + len(name)))
    out, pos, ends, removed = [], 0, [], [0]
    for a, b, rep in _docstring_cuts(src, tree, starts):
        if a < pos:
            return None  # two docstrings on one line: too odd to cut
        out += [src[pos:a], rep]
        pos = b
        ends.append(b)
        removed.append(removed[-1] + b - a - len(rep))

    def moved(x: int) -> int:  # where byte x of src lands (x is outside every cut)
        return x - removed[bisect.bisect_right(ends, x)]

    return b"".join([*out, src[pos:]]), [(s, moved(a), moved(b)) for s, a, b in names]


def strip_docstrings(src: bytes) -> bytes | None:
    """``src`` (Python source) without its docstrings, every other byte as written; None when
    it does not parse."""
    stripped = _strip(src)
    return None if stripped is None else stripped[0]


@dataclass(frozen=True)
class _Module:
    """A module's docstring-free source in tokens: where each line starts and each top-level
    definition's name lies (token offsets)."""

    ids: np.ndarray
    lines: tuple[int, ...]
    names: tuple[tuple[str, int, int], ...]  # (name, start, end)


# Every module of a split stays cached (int32: ~35 MB for the whole stdlib in bytes), so a
# training run parses and encodes each module once.
@functools.lru_cache(maxsize=1024)
def _module(key: _ByFingerprint, path: Path) -> _Module | None:
    """``path``'s source encoded piece by piece, cut at every line start and around every
    top-level name, so each offset is exact; None when it is not UTF-8 Python."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    stripped = _strip(raw)
    if stripped is None:
        return None
    src, names = stripped
    lines = _line_starts(src)
    if isinstance(key.tok, ByteTokenizer):  # a token per byte: the pieces would be the bytes
        ids = key.tok.encode_array(src).astype(np.int32)
        token_at = {b: b for b in {*lines, *(x for _, a, b in names for x in (a, b))}}
    else:
        bounds = sorted({*lines, *(x for _, a, b in names for x in (a, b))})
        token_at, parts, n = {}, [], 0
        for a, b in itertools.pairwise(bounds):
            token_at[a] = n
            parts.append(_ids(key.tok, src[a:b]))
            n += parts[-1].size
        token_at[len(src)] = n
        ids = (np.concatenate(parts) if parts else np.zeros(0)).astype(np.int32)
    ids.setflags(write=False)  # cached and shared by every sample
    placed = tuple((s, token_at[a], token_at[b]) for s, a, b in names)
    return _Module(ids, tuple(token_at[x] for x in lines[:-1]) or (0,), placed)


@register_task("outline")
def outline(
    tok: Tokenizer,
    length: int,
    seed: Seed,
    depth: float = 0.0,
    split: str = "train",
    filler: Filler | None = None,
    gap: int = 0,
) -> Sample:
    """A window of a stdlib module's docstring-free source, then the question; the answer is
    the names of the top-level ``def``/``class`` statements in the window, in order, one a line.

    The module: ``split``'s files (``module_split``) in an order drawn from the seed alone (a
    slightly longer sample of a seed reads the same module), the first at least as long as the
    window (``length`` less the question and the gap) in bytes and in tokens whose window holds
    a name; a file of another split is never read. The window: exactly that many tokens of the
    source, from the last line that begins at or before ``depth`` of the way through the
    source's slack (depth 0: the module's head), cut wherever it ends, so a module gives many
    samples. Starting at a line rather than at a statement spreads the names through the
    window: one that started at a definition would hand a prefix baseline its first name every
    time. A name counts when the window holds it and the token after it (which shows where it
    ends); the top level is column 0, so definitions nested under a top-level ``if`` or ``try``
    do not count.

    ``filler`` is not read (the module is the document). ``gap``: that many tokens of blank
    lines between the window and the question, so no name lies in the last ``gap`` tokens
    before it, as with ``passkey``. ``meta``: ``names``, ``file`` (relative to the stdlib root),
    ``split``, ``start`` and ``module_tokens`` (the window's place in the module), ``items``,
    ``item_ends``, ``joiner``, ``question_tokens``.
    """
    _check(length, depth, gap, filler)
    modules = split_modules(split)  # checks the split
    rng = _rng(seed, "outline")
    question = _ids(tok, OUTLINE_QUESTION)
    body_len = length - question.size - gap
    if body_len < 1:
        raise TooShort(
            f"length={length} is too short for the {question.size}-token question and gap={gap}"
        )
    key = _ByFingerprint(tok)
    # One order per seed, whatever the length: a decoder-only batch sizes each prompt for its
    # answer (mixture.fitted_sample), which must not move it to another module.
    for i in rng.permutation(len(modules)):
        name, path, size = modules[int(i)]
        if size < body_len:
            continue  # a token holds a byte at least: too short, without reading it
        module = _module(key, path)
        if module is None or module.ids.size < body_len:
            continue
        target = round(depth * (module.ids.size - body_len))
        start = max(s for s in module.lines if s <= target)
        end = start + body_len
        picked = [(s, a, b) for s, a, b in module.names if a >= start and b < end]
        if picked:
            break
    else:
        raise TooShort(
            f"no {split} module of this Python's stdlib fills {body_len} tokens with a "
            f"top-level definition in them (length={length}): use a shorter length"
        )
    joiner = _ids(tok, OUTLINE_JOINER)
    answer: list[np.ndarray] = []
    for _, a, b in picked:
        answer += [joiner, module.ids[a:b]] if answer else [module.ids[a:b]]
    meta = {
        "depth": depth,
        "gap": gap,
        "names": [s for s, _, _ in picked],
        "file": name,
        "split": split,
        "start": start,
        "module_tokens": int(module.ids.size),
        "items": [s for s, _, _ in picked],
        "item_ends": [b + 1 - start for _, _, b in picked],
        "joiner": OUTLINE_JOINER,
        "question_tokens": int(question.size),
        "chance": 0.0,
    }
    blank = np.resize(_ids(tok, "\n"), gap)  # a newline is one token in bytes and byte BPEs
    prompt = np.concatenate([module.ids[start:end], blank, question])
    positions = tuple(a - start for _, a, _ in picked)
    return _sample("outline", prompt, np.concatenate(answer), positions, meta)


# --- cipher -------------------------------------------------------------------------------------

CIPHER_OPEN, CIPHER_CLOSE = "\nTranslate << ", " >>\n"
CIPHER_QUESTION = "\nThe translation: "
# Short distinct lowercase words (none of digest's): each is one ROUGE token.
CIPHER_WORDS = (
    "acorn", "bell", "brook", "cabin", "cliff", "cloud", "copper", "dune",
    "ember", "feather", "field", "flint", "forest", "frost", "garden", "gravel",
    "grove", "hill", "honey", "island", "ivory", "lake", "leaf", "lily",
    "marsh", "meteor", "mist", "moon", "moss", "night", "ocean", "onyx",
    "pearl", "pine", "plum", "pond", "rain", "reed", "river", "robin",
    "rose", "ruby", "sage", "sand", "shell", "shore", "silk", "snow",
    "spring", "star", "stone", "storm", "stream", "summer", "sun", "thorn",
    "thunder", "tide", "valley", "wave", "wind", "winter", "wolf", "wren",
)  # fmt: skip
CIPHER_SEED = 19  # the number: the one cipher every sample and run shares


@functools.lru_cache(maxsize=1)
def cipher_table() -> dict[str, str]:
    """The fixed cipher: one seeded cycle through ``CIPHER_WORDS``, each word to the next, so it
    is a bijection with no word mapped to itself (copying the sentence scores nothing)."""
    order = np.random.default_rng(CIPHER_SEED).permutation(len(CIPHER_WORDS))
    cycle = [CIPHER_WORDS[i] for i in order]
    return dict(zip(cycle, cycle[1:] + cycle[:1], strict=True))


@register_task("cipher")
def cipher(
    tok: Tokenizer,
    filler: Filler,
    length: int,
    depth: float,
    seed: Seed,
    gap: int = 0,
    min_words: int = 3,
    max_words: int = 6,
) -> Sample:
    """A tagged sentence "Translate << w1 ... wk >>" (k drawn in [min_words, max_words], words
    drawn from ``CIPHER_WORDS`` with replacement) in filler, then the question; the answer is
    the sentence's image under ``cipher_table()``, word by word, joined by spaces.

    The tagged block sits at ``depth`` as ``passkey``'s sentence does (``gap`` tokens at least
    before the question). ``key_positions``: each source word's start. ``meta``: ``words``,
    ``target``, ``items`` (= target), ``item_ends``, ``joiner``, ``question_tokens``.
    """
    _check(length, depth, gap, _needed(filler, "cipher"))
    if not 1 <= min_words <= max_words:
        raise ValueError(
            f"min_words={min_words}, max_words={max_words}: need 1 <= min_words <= max_words"
        )
    rng = _rng(seed, "cipher")
    k = int(rng.integers(min_words, max_words + 1))
    words = [CIPHER_WORDS[i] for i in rng.integers(0, len(CIPHER_WORDS), k)]
    table = cipher_table()
    target = [table[w] for w in words]
    sep = _ids(tok, " ")
    head, tail = _ids(tok, CIPHER_OPEN), _ids(tok, CIPHER_CLOSE)
    source_ids = [_ids(tok, w) for w in words]
    parts, offsets, pos = [head], [], head.size
    for i, ids in enumerate(source_ids):
        if i:
            parts.append(sep)
            pos += sep.size
        offsets.append(pos)
        parts.append(ids)
        pos += ids.size
    block = np.concatenate([*parts, tail])
    question = _ids(tok, CIPHER_QUESTION)
    start = _start(length, depth, gap, block.size, question.size, "the tagged sentence")
    body = _haystack(filler, rng, length - question.size, [(start, block)])
    answer: list[np.ndarray] = []
    for w in target:
        answer += [sep, _ids(tok, w)] if answer else [_ids(tok, w)]
    ends = [start + o + ids.size + 1 for o, ids in zip(offsets, source_ids, strict=True)]
    meta = {
        "depth": depth,
        "gap": gap,
        "words": words,
        "target": target,
        "items": target,
        "item_ends": ends,
        "joiner": " ",
        "question_tokens": int(question.size),
        "chance": float(len(CIPHER_WORDS)) ** -k,
    }
    prompt = np.concatenate([body, question])
    positions = tuple(start + o for o in offsets)
    return _sample("cipher", prompt, np.concatenate(answer), positions, meta)
