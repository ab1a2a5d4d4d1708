"""The evaluations ``memext train`` takes while it trains, as probes for the trainer
(``memext.train.probes``, which says when each runs and where its values go).

- ``Validation``: bits-per-byte of the validation text at the stage's length, every
  ``train.eval_every`` steps (``val_bits_per_byte``, ``val_loss``).
- ``StageReport``: bits-per-byte at every ``eval.lengths`` when a curriculum stage ends
  (``bits_per_byte_by_length``).
- ``HeldOutTask``: exact match of a synthetic task (``eval.probes``: TASK@LENGTH), logged as
  ``probe/TASK@LENGTH``. Its samples are held out from training twice over: the haystack is cut
  from the validation text, and their seeds lie above ``TRAIN_SEEDS``, the range training
  samples draw theirs from. They are the same samples at every step and for every training seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from memext.config import Config
from memext.data.filler import CLASSIC_FILLER, Filler
from memext.data.mixture import TRAIN_SEEDS, fitted_sample
from memext.data.tasks import TASKS, Sample, TooShort
from memext.errors import MemextError
from memext.evals.perplexity import evaluate_lengths
from memext.evals.seq2seq import HeldOutPairs, held_out_samples
from memext.evals.tasks import evaluate_samples
from memext.tokenizer import Tokenizer, load_tokenizer
from memext.train.probes import Moment, Probe, ProbeContext


@dataclass(frozen=True)
class Validation:
    """Validation bits-per-byte at the current stage's length, on ``train.eval_tokens`` tokens."""

    at: ClassVar[Moment] = "eval"

    def __call__(self, ctx: ProbeContext) -> dict[str, float]:
        (r,) = evaluate_lengths(
            ctx.model,
            ctx.validation,
            (ctx.stage.seq_len,),
            ctx.cfg.train.eval_tokens,
            ctx.byte_lengths,
            ctx.stage.batch_size,
            ctx.device,
        )
        return {
            "val_bits_per_byte": r["bits_per_byte"],
            "val_loss": r["nats"] / r["scored_tokens"],
        }


@dataclass(frozen=True)
class StageReport:
    """Validation bits-per-byte at every ``eval.lengths`` after a curriculum stage."""

    at: ClassVar[Moment] = "stage"

    def __call__(self, ctx: ProbeContext) -> dict[str, dict[str, float]]:
        e = ctx.cfg.eval
        rows = evaluate_lengths(
            ctx.model,
            ctx.validation,
            e.lengths,
            e.max_tokens,
            ctx.byte_lengths,
            e.batch_size,
            ctx.device,
        )
        return {"bits_per_byte_by_length": {str(r["length"]): r["bits_per_byte"] for r in rows}}


@dataclass
class HeldOutTask:
    """Exact match on ``n`` samples of ``task``, each ``length`` input tokens, read the way the
    model trains (``train.segment_len`` at a time, memory carried) and scored teacher-forced
    (``evaluate_samples``). Sample ``i`` has its key at depth (i + 1/2) / n and seed
    ``TRAIN_SEEDS + i``; the samples are built on the first call and kept."""

    task: str
    length: int
    n: int
    at: ClassVar[Moment] = "eval"
    _samples: list[Sample] | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"probe/{self.task}@{self.length}"

    def samples(self, tok: Tokenizer, filler: Filler) -> list[Sample]:
        """The probe's samples with haystacks cut from ``filler``."""
        # A task that picks its own source files (outline) reads the validation ones.
        extra = {"split": "validation"} if "split" in TASKS.takes(self.task) else {}
        try:
            return [
                fitted_sample(
                    self.task,
                    tok,
                    filler,
                    self.length + 1,
                    (i + 0.5) / self.n,
                    TRAIN_SEEDS + i,
                    0,
                    **extra,
                )
                for i in range(self.n)
            ]
        except TooShort as e:
            raise MemextError(f"eval.probes {self.task}@{self.length}: {e}") from None

    def __call__(self, ctx: ProbeContext) -> dict[str, float]:
        if self._samples is None:
            self._samples = self.samples(ctx.tokenizer, Filler(ctx.validation))
        r = evaluate_samples(
            ctx.model,
            self._samples,
            ctx.cfg.train.segment_len or self.length,
            ctx.device,
            batch_size=ctx.cfg.eval.batch_size,
        )
        return {self.name: r["exact_match"]}


def training_probes(cfg: Config) -> list[Probe]:
    """What ``memext train`` measures during a run of ``cfg``: validation, the stage reports and
    the held-out tasks of ``eval.probes``. A task probe that cannot be built (an unknown task, a
    length too short for its question) is refused now, not after ``train.eval_every`` steps."""
    if cfg.model.arch == "seq2seq":
        return _seq2seq_probes(cfg)
    tasks = [HeldOutTask(task, n, cfg.eval.probe_samples) for task, n in cfg.eval.probe_cells]
    if tasks:
        tok = load_tokenizer(cfg.data.tokenizer)
        for probe in tasks:
            if probe.task not in TASKS:
                raise MemextError(
                    f"eval.probes: {probe.task!r} in {probe.task}@{probe.length} is not a task; "
                    f"expected {TASKS.accepted(probe.task)}"
                )
            # The same sizes as the real haystack's: the task's pieces and question decide them.
            probe.samples(tok, Filler.from_text(tok, CLASSIC_FILLER))
    return [Validation(), StageReport(), *tasks]


def _seq2seq_probes(cfg: Config) -> list[Probe]:
    """An encoder-decoder reads no running text, so it has no bits-per-byte: its probes are the
    held-out pairs of ``eval.probes`` (ROUGE-L and loss), checked now as ``training_probes``
    checks its task probes."""
    probes = [HeldOutPairs(task, n, cfg.eval.probe_samples) for task, n in cfg.eval.probe_cells]
    tok = load_tokenizer(cfg.data.tokenizer) if probes else None
    for probe in probes:
        if probe.task not in TASKS:
            raise MemextError(
                f"eval.probes: {probe.task!r} in {probe.task}@{probe.length} is not a task; "
                f"expected {TASKS.accepted(probe.task)}"
            )
        held_out_samples(probe.task, tok, Filler.from_text(tok, CLASSIC_FILLER), probe.length, 1)
    return probes
