"""Progressive context-length curriculum: the run as a list of stages, each a pure function of
the config, so any step knows its stage (resuming needs no extra state).

Stage 0 trains at ``train.seq_len`` for ``train.steps``; stage i >= 1 at ``train.curriculum[i-1]``
for ``train.curriculum_steps[i-1]``. Tokens per step stay those of stage 0 (the batch shrinks as
the length grows). With ``model.rope_scaling`` set, stage i's rotary factor is its length divided
by ``model.rope_original_len`` (stage 0 keeps the model's own factor, usually 1).

The stages live beside the config, below ``checkpoint`` and ``train``: loading a run rebuilds the
rotary of the stage its last saved step belonged to, and the trainer switches stages by them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memext.config import Config, ModelConfig


@dataclass(frozen=True)
class Stage:
    index: int
    seq_len: int
    batch_size: int
    first_step: int
    steps: int
    model: ModelConfig

    @property
    def end_step(self) -> int:
        return self.first_step + self.steps


def stages(cfg: Config) -> list[Stage]:
    t, m = cfg.train, cfg.model
    out, first = [], 0
    lengths = (t.seq_len, *t.curriculum)
    for i, (n, steps) in enumerate(zip(lengths, (t.steps, *t.curriculum_steps), strict=True)):
        model = m
        if i and m.rope_scaling != "none":
            model = dataclasses.replace(m, rope_factor=n / m.rope_original_len)
        batch = max(1, t.batch_size * t.seq_len // n)
        out.append(Stage(i, n, batch, first, steps, model))
        first += steps
    return out


def trained_length(cfg: Config) -> int:
    """The longest sequence a run trains on: its last stage's length (stage lengths never
    decrease, the config checks), or ``seq_len`` without a curriculum."""
    return max((cfg.train.seq_len, *cfg.train.curriculum))


def stage_at(cfg: Config, step: int) -> Stage:
    """The stage that optimizer step ``step`` (0-based) belongs to; the run's end belongs to the
    last stage."""
    all_stages = stages(cfg)
    return next((s for s in all_stages if step < s.end_step), all_stages[-1])
