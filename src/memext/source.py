"""A source of the training batch mixture (``data.mixture``): its fields and their checks.

``memext.data.mixture.BatchSource`` draws the batches; this record only says what to draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memext.fields import check_choice, check_positive, doc, fail


@dataclass(frozen=True)
class Source:
    """One part of the training batch mixture: language-model text, or a synthetic task.

    Every optimizer step draws one batch from each source active in the step's curriculum
    stage; the step's loss is the sources' losses weighted by their shares. A task source's
    batch is a pure function of (train.seed, step, source), like the text's, so resuming stays
    exact.
    """

    task: str = doc("lm", "'lm' (the corpus) or a synthetic task by registered name (passkey...).")
    share: float = doc(1.0, "Weight of this source's loss in the step (shares are normalised).")
    batch_size: int = doc(0, "Sequences per batch; 0 = the stage's train.batch_size.")
    lengths: tuple[int, ...] = doc(
        (), "Sequence lengths, one drawn per step; () = the stage's seq_len."
    )
    stages: tuple[int, ...] = doc((), "Curriculum stages it is active in; () = all of them.")
    near: float = doc(
        0.0,
        "Tasks: fraction of samples whose key lies in the last segment (the attention window); "
        "the others keep it >= train.segment_len tokens before the question, so only memory "
        "reaches it.",
    )
    filler: Literal["corpus", "classic"] = doc(
        "corpus",
        "Tasks: the haystack: the training corpus's text, or the classic passkey filler "
        "('The grass is green. ...').",
    )
    answer_weight: float = doc(
        0.5, "Tasks: share of a sample's loss on its answer tokens (the rest on the prompt)."
    )

    def __post_init__(self) -> None:
        from memext.data.tasks import TASKS  # local: data imports the config

        if self.task != "lm" and self.task not in TASKS:
            names = ", ".join(["lm", *sorted(TASKS)])
            fail("data.mixture", "task", self.task, f"one of {names}")
        check_positive("data.mixture", self, "share")
        if self.batch_size < 0:
            fail("data.mixture", "batch_size", self.batch_size, "0 (the stage's) or > 0")
        for name in ("lengths", "stages"):
            if any(
                not isinstance(n, int) or n < (2 if name == "lengths" else 0)
                for n in getattr(self, name)
            ):
                fail(
                    "data.mixture",
                    name,
                    getattr(self, name),
                    "non-negative integers (lengths >= 2)",
                )
        if not 0.0 <= self.near <= 1.0:
            fail("data.mixture", "near", self.near, "a fraction in [0, 1]")
        if not 0.0 < self.answer_weight <= 1.0:
            fail("data.mixture", "answer_weight", self.answer_weight, "a fraction in (0, 1]")
        check_choice("data.mixture", self, "filler")


def check_mixture(
    mixture: tuple[Source, ...], *, segment_len: int, n_stages: int, max_seq_len: int
) -> None:
    """The checks a mixture needs from the rest of the config: every length fits the model (a
    multiple of ``train.segment_len`` when it reads in segments), every stage named exists, and
    every one of the curriculum's ``n_stages`` stages has a source."""
    seg = segment_len
    for i, src in enumerate(mixture):
        where = f"data.mixture[{i}]"
        for n in src.lengths:
            if seg and n % seg:
                fail(where, "lengths", src.lengths, f"multiples of train.segment_len={seg}")
            if not seg and n > max_seq_len:
                fail(where, "lengths", src.lengths, f"<= model.max_seq_len={max_seq_len}")
        if any(k >= n_stages for k in src.stages):
            fail(where, "stages", src.stages, f"stage indices < {n_stages} (the curriculum's)")
    for k in range(n_stages if mixture else 0):
        if not any(not s.stages or k in s.stages for s in mixture):
            raise ValueError(
                f"data.mixture is invalid: no source is active in stage {k}; give one "
                f"with no stages, or with stage {k} among its stages"
            )
