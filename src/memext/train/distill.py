"""Knowledge distillation: a teacher's predictions as soft targets beside the corpus's tokens.

With ``train.distill_teacher`` set, each target position's loss is

    (1 - alpha) * CE(student, token) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with alpha = ``train.distill_alpha`` and T = ``train.distill_temperature`` (Hinton et al.'s
scaling: T^2 keeps the soft term's gradient the size of the hard term's as T grows). It is
weighed and averaged exactly as the cross-entropy alone would be (a task's answer weights, the
batch's denominator), so alpha = 0 is plain training, bit for bit.

The teacher's logits are computed on the fly, once per micro-batch, on the tokens the student
reads: the teacher reads each sequence its own way (a full-attention teacher in one pass), and
``sequence_backward`` cuts them at the student's segment boundaries, so position i of the
student's segment k is compared with position k * segment_len + i of the teacher's. The
teacher is in eval mode and runs without gradients; at most one micro-batch's teacher logits,
B x T x vocab floats, are alive at a time.

The teacher is any model memext opens (``memext.adapters.open_model``: a memext run, a Hugging
Face directory, a known name); the trainer needs only the ``Teacher`` part of that contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memext.errors import MemextError
from memext.tokenizer import Tokenizer


class Teacher(Protocol):
    """What distillation reads from a teacher: a subset of ``memext.adapters.ModelAdapter``."""

    name: str
    tokenizer: Tokenizer
    max_context: int | None

    def logits(self, tokens: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, vocab) logits, the whole input read the model's way."""
        ...

    def fingerprint(self) -> str: ...


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per position.

    Args:
        student: (..., vocab) logits, with gradient.
        teacher: (..., vocab) logits of the same positions.
        temperature: T > 0.

    Returns:
        (...) float32: the divergence of each position, summed over the vocabulary.
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1) * temperature**2


@dataclass
class Distillation:
    """A teacher and the mixing of its soft targets with the tokens (``train.distill_*``)."""

    teacher: Teacher
    alpha: float
    temperature: float

    @torch.no_grad()
    def targets(self, x: Tensor) -> Tensor:
        """The teacher's (B, T, vocab) float32 logits on the student's inputs ``x`` (B, T)."""
        return self.teacher.logits(x).float()

    def mix(self, logits: Tensor, nll: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Per-target losses of one segment: ``(1 - alpha) * nll + alpha * kd`` and the kd term.

        Args:
            logits: (B, S, vocab) the student's.
            nll: (B * S,) its cross-entropy on the tokens.
            teacher: (B, S, vocab) the teacher's logits at the same positions.
        """
        kd = kd_loss(logits, teacher, self.temperature).reshape(-1)
        return (1.0 - self.alpha) * nll + self.alpha * kd, kd


def teacher_blocks(n_teacher: int, n_student: int) -> list[int]:
    """The teacher block each student block starts from: evenly spaced, the first and the last
    kept (4 -> 2: [0, 3]; 6 -> 3: [0, 2, 5]; equal depths: each its own)."""
    if not 0 < n_student <= n_teacher:
        raise MemextError(
            f"the student has {n_student} blocks and the teacher {n_teacher}: initialising from "
            "the teacher needs a student no deeper than it"
        )
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def init_from_teacher(student: nn.Module, teacher: Teacher) -> list[int]:
    """Copy a memext teacher's weights into ``student`` (``train.distill_init``): the embedding,
    the final norm, the head, and block i from teacher block ``teacher_blocks(...)[i]``.
    Parameters only the student has (a memory's gate) keep their initialisation: whatever
    attention kernel or memory the student reads with, its projections have the teacher's
    shapes. Returns the teacher blocks used. Refuses another width or a teacher that is not a
    memext model, before anything is copied."""
    source = getattr(teacher, "model", None)
    blocks = getattr(source, "blocks", None)
    if not isinstance(source, nn.Module) or blocks is None or not hasattr(source, "embed"):
        raise MemextError(
            f"train.distill_init needs a memext run as the teacher; {teacher.name!r} is not one "
            "(its weights cannot be mapped onto a memext student)"
        )
    picks = teacher_blocks(len(blocks), len(student.blocks))
    theirs, copies = source.state_dict(), []
    for name, param in student.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "blocks":
            index, _, rest = rest.partition(".")
            name_there = f"blocks.{picks[int(index)]}.{rest}"
        else:
            name_there = name
        if name_there not in theirs:
            continue
        if theirs[name_there].shape != param.shape:
            raise MemextError(
                f"train.distill_init: the student's {name} is {tuple(param.shape)} but the "
                f"teacher's {name_there} is {tuple(theirs[name_there].shape)}: initialising "
                "from the teacher needs the same d_model, heads and feed-forward width"
            )
        copies.append((param, theirs[name_there]))
    with torch.no_grad():
        for param, value in copies:
            param.copy_(value.to(param.device, param.dtype))
    return picks


def identity(teacher: Teacher) -> dict[str, str]:
    """What ``run.json`` records of the teacher, and a resumed run must find again."""
    return {"name": teacher.name, "fingerprint": teacher.fingerprint()}


def check_teacher(
    teacher: Teacher, tokenizer: Tokenizer, vocab_size: int, longest: int, device: torch.device
) -> None:
    """Refuse a teacher whose predictions cannot be compared with the student's position by
    position: another tokenizer, another vocabulary width, or too short a context for the
    longest sequence the student trains on. Runs the teacher once, on one token."""
    mine, theirs = tokenizer.fingerprint(), teacher.tokenizer.fingerprint()
    if mine != theirs:
        raise MemextError(
            f"the teacher {teacher.name!r} uses another tokenizer ({theirs}) than the student "
            f"({mine}): distillation compares their predictions token by token, so both must "
            "use the same tokenizer (data.tokenizer)"
        )
    width = int(teacher.logits(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1])
    if width != vocab_size:
        raise MemextError(
            f"the teacher {teacher.name!r} predicts {width} token ids but the student "
            f"model.vocab_size={vocab_size}: set model.vocab_size={width}"
        )
    if teacher.max_context is not None and teacher.max_context < longest:
        raise MemextError(
            f"the teacher {teacher.name!r} reads at most {teacher.max_context} tokens but the "
            f"student trains on sequences of {longest}: the teacher must read each of them whole"
        )
