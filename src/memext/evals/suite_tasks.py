"""The tasks a suite grades a model on, registered by name in ``SUITE_TASKS`` behind one contract:
a task lays out its cells (one length, and one depth where the task has depths) and runs one cell
on a ``ModelAdapter``, returning its score. A task's options (a suite file's ``tasks:`` mapping)
are its ``__init__`` keywords with their defaults; the registry refuses any other. The synthetic
prompts come from the generators of ``memext.data.tasks.TASKS``."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import numpy as np
import torch

from memext.adapters import ModelAdapter, Whole
from memext.data.filler import Filler
from memext.data.tasks import TASKS, Sample, TooShort, make_samples
from memext.errors import MemextError
from memext.registry import Registry

# --- tasks --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    length: int
    depth: float | None

    def key(self) -> str:
        return f"{self.task}@{self.length}@{self.depth}"


@dataclasses.dataclass
class Context:
    """What every task may use: the model, the haystack, the suite's settings."""

    adapter: ModelAdapter
    filler: Filler
    samples: int  # per cell, unless a task's options say otherwise
    seed: int
    longest: int  # the suite's longest length: bits-per-byte scores the same positions at all
    _validation: tuple[np.ndarray, str, str] | None = None
    _byte_lengths: np.ndarray | None = None

    def validation(self) -> tuple[np.ndarray, str, str]:
        """The validation tokens, corpus name and hash; read once per suite."""
        if self._validation is None:
            self._validation = self.adapter.validation()
        return self._validation

    def byte_lengths(self) -> np.ndarray:
        # Once per suite: an HF tokenizer decodes its whole vocabulary to build it.
        if self._byte_lengths is None:
            self._byte_lengths = self.adapter.tokenizer.byte_lengths()
        return self._byte_lengths


class Task:
    """One measurement on a grid of cells. ``run`` returns the cell's fields beyond its
    coordinates: at least ``score``, ``n`` and ``chance`` (None when it has no meaning)."""

    name: str = ""
    #: One line saying what is measured, printed under the score table where two tasks share a
    #: metric (bpb and reach are both bits-per-byte, of different text and context).
    measures: str = ""
    metric: str = "exact_match"
    higher_is_better: bool = True
    uses_depth: bool = True

    def cells(self, lengths: list[int], depths: list[float]) -> list[Cell]:
        return [
            Cell(self.name, n, d) for n in lengths for d in (depths if self.uses_depth else [None])
        ]

    def run(self, cell: Cell, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError

    def tokens(self, cell: Cell, samples: int) -> int:
        """About how many tokens running ``cell`` reads (the suite's time estimate)."""
        raise NotImplementedError


SUITE_TASKS: Registry[type[Task]] = Registry("suite task", noun="option")
register_suite_task = SUITE_TASKS.register


@register_suite_task("bpb")
class BitsPerByte(Task):
    """Bits-per-byte of the validation text at each length (memext's definition: windows of L,
    the second half scored; the same positions at every length of the suite): at most
    ``max_tokens`` scored tokens, ``batch_size`` windows per forward."""

    measures = (
        "validation text in windows of L, the second half scored (context L/2..L), "
        "the same positions at every L"
    )
    metric = "bits_per_byte"
    higher_is_better = False
    uses_depth = False

    def __init__(self, max_tokens: int = 4096, batch_size: int = 4) -> None:
        self.max_tokens, self.batch_size = int(max_tokens), int(batch_size)

    def tokens(self, cell: Cell, samples: int) -> int:
        # Windows of L whose second halves tile the scored tokens, each with its unscored first
        # half ahead: a 32k window scoring 4,096 tokens reads 20k, not 8k.
        lead = cell.length - cell.length // 2
        windows = -(-self.max_tokens // max(cell.length // 2, 1))
        return windows * lead + self.max_tokens

    def run(self, cell: Cell, ctx: Context) -> dict[str, Any]:
        from memext.evals.perplexity import score_length

        tokens = ctx.validation()[0]
        check_length(ctx.adapter, cell.length)
        first = ctx.longest // 2
        n_scored = min(self.max_tokens, tokens.size - 1 - first)
        if n_scored <= 0:
            raise MemextError(
                f"the validation text has {tokens.size} tokens: too few for length {ctx.longest}"
            )
        r = score_length(
            Whole(ctx.adapter),
            tokens,
            cell.length,
            first,
            n_scored,
            ctx.byte_lengths(),
            self.batch_size,
            ctx.adapter.device,
        )
        return {
            "score": r["bits_per_byte"],
            "n": r["scored_tokens"],
            "bytes": r["scored_bytes"],
            "first": first,
            "chance": None,
        }


@register_suite_task("reach")
class Reach(Task):
    """Memory reach (``memext.evals.reach``'s definition, read through the adapter): at length R
    (a multiple of the model's segment W), bits-per-byte of the last W tokens of R tokens of
    validation text, read the adapter's way (segments with the memory carried; with
    ``--no-memory`` each segment alone). The same segments are scored at every R of the suite:
    at most ``max_tokens`` of them, the first after room for the longest R. Models that read in
    one pass have no segments: their cells are skipped."""

    measures = "the last segment W of L tokens read in segments (memory reach), the same segments"
    metric = "bits_per_byte"
    higher_is_better = False
    uses_depth = False

    def __init__(self, max_tokens: int = 4096, batch_size: int = 4) -> None:
        self.max_tokens, self.batch_size = int(max_tokens), int(batch_size)

    def tokens(self, cell: Cell, samples: int) -> int:
        return self.max_tokens * max(1, cell.length // 128)

    def run(self, cell: Cell, ctx: Context) -> dict[str, Any]:
        from memext.evals.reach import score_reach

        w = getattr(ctx.adapter, "segment_len", None)
        if not w:
            raise TooShort(f"{ctx.adapter.name} reads in one pass: reach applies to segments")
        if cell.length < w or cell.length % w:
            raise TooShort(f"reach {cell.length} is not a multiple of the {w}-token segment")
        tokens = ctx.validation()[0]
        r = score_reach(
            Whole(ctx.adapter),
            tokens,
            w,
            cell.length // w,
            ctx.longest // w,
            self.max_tokens,
            ctx.byte_lengths(),
            self.batch_size,
            ctx.adapter.device,
        )
        return {"score": r["bits_per_byte"], "n": r["scored_tokens"], "chance": None}


class AnswerTask(Task):
    """A generated prompt whose answer is scored exactly (scikit-learn's accuracy over samples).

    Scoring is teacher-forced, as in ``memext.evals.tasks.evaluate_samples``: a sample is right
    iff the argmax at every answer position is the answer's token, which equals greedy decoding's
    exact match."""

    generator = ""
    in_haystack = True  # False: the task fills its prompt itself (padding with spaces)

    def __init__(self, samples: int | None = None, **settings: Any) -> None:
        """``samples`` per cell (None: the suite's); ``settings`` go to the generator, which
        must take them (``gap``, ``needle``...)."""
        TASKS.check_names(self.generator, settings)
        self.n_samples, self.settings = samples, settings

    def tokens(self, cell: Cell, samples: int) -> int:
        return cell.length * int(self.n_samples or samples)

    def samples(self, cell: Cell, ctx: Context) -> list[Sample]:
        opts = self.settings
        n = int(self.n_samples or ctx.samples)
        seed = ctx.seed * 1_000_003 + cell.length
        filler = ctx.filler if self.in_haystack else None
        return make_samples(
            self.generator,
            ctx.adapter.tokenizer,
            filler,
            cell.length,
            cell.depth or 0.0,
            n,
            seed,
            **opts,
        )

    def run(self, cell: Cell, ctx: Context) -> dict[str, Any]:
        from sklearn.metrics import accuracy_score

        from memext.evals.tasks import evaluate_samples

        samples = self.samples(cell, ctx)
        check_length(ctx.adapter, max(s.tokens.size - 1 for s in samples))
        r = evaluate_samples(
            Whole(ctx.adapter), samples, 2**62, ctx.adapter.device, batch_size=4, keep=True
        )
        exact = float(accuracy_score([True] * len(samples), r["correct"]))
        out = {"score": exact, "n": r["n"], "chance": r["chance"]}
        out["token_accuracy"] = r["token_accuracy"]
        return out | self.extra(samples, r, ctx)

    def extra(self, samples: list[Sample], r: dict[str, Any], ctx: Context) -> dict[str, Any]:
        """Fields that replace or add to the exact-match ones."""
        return {}


def check_length(adapter: ModelAdapter, n_inputs: int) -> None:
    """Refuse an input longer than a model without memory reads, before it is run."""
    if adapter.max_context is not None and n_inputs > adapter.max_context:
        raise MemextError(
            f"a {n_inputs}-token input exceeds {adapter.name}'s limit of {adapter.max_context} "
            "tokens (a model without memory reads at most max_seq_len): evaluate shorter "
            "lengths (--lengths) or use a model that reads in segments"
        )


def _answer_task(name: str, in_haystack: bool = True) -> type[AnswerTask]:
    attrs = {"generator": name, "uses_depth": in_haystack, "in_haystack": in_haystack}
    return register_suite_task(name)(type(name, (AnswerTask,), attrs))


for _name in ("passkey", "niah", "needle", "multi_value", "variable_tracking"):
    _answer_task(_name)
_answer_task("assoc_recall", in_haystack=False)  # pairs fill the prompt: recall, not search


@register_suite_task("common_words")
class CommonWords(AnswerTask):
    """The most common words of a list: exact match, and the words' F1 (scikit-learn, per
    sample, over the words read from the teacher-forced argmax at the answer's positions)."""

    generator = "common_words"
    uses_depth = False
    in_haystack = False
    metric = "f1"

    def extra(self, samples: list[Sample], r: dict[str, Any], ctx: Context) -> dict[str, Any]:
        from sklearn.metrics import f1_score
        from sklearn.preprocessing import MultiLabelBinarizer

        truth = [set(s.meta["words"]) for s in samples]
        guess = [set(ctx.adapter.tokenizer.decode(p).split()) for p in r["predicted"]]
        binarizer = MultiLabelBinarizer().fit(truth + guess)
        f1 = f1_score(
            binarizer.transform(truth),
            binarizer.transform(guess),
            average="samples",
            zero_division=0.0,
        )
        exact = sum(r["correct"]) / len(samples)
        return {"exact_match": exact, "score": float(f1), "chance": None}


@register_suite_task("speed")
class Speed(Task):
    """Tokens/s reading one L-token sequence the adapter's way, as a prompt is read (the
    vocabulary projection of its last position only; median of ``repeats`` after a warm-up) and
    the allocator's peak bytes for it, measured in a separate call (the profiler slows CPU
    calls)."""

    metric = "tokens_per_s"
    uses_depth = False

    def __init__(self, repeats: int = 3) -> None:
        self.repeats = int(repeats)

    def tokens(self, cell: Cell, samples: int) -> int:
        return cell.length * (self.repeats + 2)  # the repeats, the warm-up, the memory probe

    def run(self, cell: Cell, ctx: Context) -> dict[str, Any]:
        from memext.profiling import peak_memory

        adapter = ctx.adapter
        check_length(adapter, cell.length)
        x = torch.randint(0, min(256, adapter.tokenizer.vocab_size), (1, cell.length))
        last = [cell.length - 1]
        adapter.logits(x, last)
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            adapter.logits(x, last)
            times.append(time.perf_counter() - t0)
        rate = cell.length / statistics.median(times)
        peak = peak_memory(lambda: adapter.logits(x, last), adapter.device)
        return {
            "score": rate,
            "n": len(times),
            "chance": None,
            "tokens_per_s": rate,
            "peak_bytes": int(peak),
        }
