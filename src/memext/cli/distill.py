"""`memext distill`: train a student config against a teacher's soft targets.

A thin command over `memext train`: it sets ``train.distill_teacher``, ``train.distill_alpha``
and ``train.distill_temperature`` on the student's config and trains it with the same trainer,
batch mixture, checkpoints and evaluation (docs/compression.md, "Distillation").
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memext.cli import run
from memext.cli.common import MODEL_HELP, DeviceOpt, SetOpt, default, user_errors
from memext.errors import MemextError
from memext.presets import PRESETS
from memext.train import trainer


@user_errors
def distill(
    teacher: Annotated[
        str | None,
        typer.Option(help=f"The teacher. {MODEL_HELP} Sets train.distill_teacher."),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help=f"The student: a config file (YAML or JSON) or a preset ({', '.join(PRESETS)})."
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(help="Weight of the teacher's soft targets, in [0, 1] (train.distill_alpha)."),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="Temperature of the soft targets, > 0 (train.distill_temperature)."),
    ] = None,
    init: Annotated[
        bool | None,
        typer.Option(
            "--init-from-teacher/--random-init",
            help="Start from the teacher's weights, DistilBERT's way (train.distill_init).",
        ),
    ] = None,
    set_: SetOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory (default: runs/STUDENT-TIMESTAMP)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the distillation run in this directory (same teacher)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = default(
        trainer.train, "overwrite"
    ),
    device: DeviceOpt = "auto",
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate at the end, as `memext train`.")
    ] = True,
    suite: Annotated[str, typer.Option(help="The suite to evaluate with, as `memext train`.")] = (
        "longctx"
    ),
) -> None:
    """Distil a teacher into a student: loss = alpha * T^2 * KL(teacher_T ‖ student_T) +
    (1 - alpha) * CE, on the student's own batch mixture (e.g. a full-attention teacher into a
    windowed student with memory)."""
    sets = list(set_ or [])
    for key, value in (
        ("distill_teacher", teacher),
        ("distill_alpha", alpha),
        ("distill_temperature", temperature),
        ("distill_init", None if init is None else str(init).lower()),
    ):
        if value is not None:
            sets.append(f"train.{key}={value}")
    preset, config = "tiny", None
    if resume is None:
        if teacher is None or student is None:
            raise MemextError("give --teacher MODEL and --student CONFIG (or --resume RUN)")
        if Path(student).is_file():
            config = Path(student)
        elif student in PRESETS:
            preset = student
        else:
            raise MemextError(
                f"the student {student!r} is neither a config file nor a preset "
                f"({', '.join(PRESETS)})"
            )
    elif student is not None:
        raise MemextError("--resume continues the run's own student config; leave out --student")
    run.train(
        preset=preset,
        config=config,
        set_=sets,
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        device=device,
        evaluate=evaluate,
        suite=suite,
        nproc=None,
        max_restarts=0,
    )
