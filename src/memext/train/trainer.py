"""The training loop: AdamW, warmup + cosine, clipping, accumulation, checkpoints that resume exactly.

Resumption is exact because everything that decides the next step is saved or derived: the
weights and optimizer state are saved; the learning rate is a function of the step; each batch is
a function of (seed, step); the RNG state (used by dropout) is saved.

What is measured during training (validation, held-out tasks) comes in as probes
(``memext.train.probes``): the trainer decides when, the caller what.

The loop is here; what one step does (``build_optimizer``, ``sequence_backward``,
``train_step``) is in ``step.py``, and the run directory (checks before writing, checkpoint
commit and restore, the metrics log) in ``run_dir.py``.

Under torchrun the same loop runs on every rank (``parallel.py``, ``memext.dist``): each rank
reads its rows of every global batch (with ``train.context_parallel``, its shard of each
sequence: ``memext.dist.context``), the strategy (``train.strategy``: DDP or FSDP2) averages
the gradients, and rank 0 alone logs, shows progress, reports the probes and writes the run
(a sharded checkpoint is written by every rank and committed by rank 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memext import checkpoint as ckpt
from memext.config import Config
from memext.curriculum import Stage, stage_at, trained_length
from memext.data import prepare_data
from memext.data.mixture import BatchSource
from memext.dist.context import ContextParallel
from memext.dist.launch import World, job_id, join
from memext.dist.strategy import make_strategy
from memext.errors import MemextError
from memext.io import atomic_write, atomic_write_text
from memext.model import build_model, build_rotary
from memext.runtime import provenance
from memext.tokenizer import load_tokenizer
from memext.train.distill import (
    Distillation,
    Teacher,
    check_teacher,
    identity,
    init_from_teacher,
)
from memext.train.parallel import (
    agree,
    check_split,
    describe_batch,
    elastic_start,
    seed_rank,
    stop_cleanly,
)
from memext.train.probes import Probe, ProbeContext, format_values, run_probes
from memext.train.run_dir import (
    RUN_INFO,
    TrainingDiverged,
    append_metrics,
    check_run_dir,
    commit_checkpoint,
    make_run_dir,
    on_main_thread,
    prepare_run_dir,
    read_run_info,
    restore_checkpoint,
    run_tokenizer,
    truncate_metrics,
)
from memext.train.schedule import lr_at
from memext.train.step import build_optimizer, sequence_backward, train_step

__all__ = [
    "RUN_INFO",
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "check_run_dir",
    "make_run_dir",
    "prepare_run_dir",
    "sequence_backward",
    "train",
    "train_step",
]


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" or "interrupted"
    step: int
    last_val: dict[str, Any] | None = None  # the last values of the eval probes
    losses: list[float] = field(default_factory=list)
    main: bool = True  # rank 0 (or the only process): the one that evaluates and reports


@dataclass
class _Loop:
    """Mutable training state handed to callbacks (tests use it to interrupt or corrupt a run)."""

    step: int
    model: torch.nn.Module
    stop_requested: bool = False
    opt: torch.optim.Optimizer | None = None


def train(
    cfg: Config,
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback: Callable[[_Loop], None] | None = None,
    log: Callable[[str], None] = print,
    init_from: str | Path | None = None,
    probes: Sequence[Probe] = (),
    teacher: Teacher | None = None,
) -> TrainResult:
    """Train ``cfg`` into the run directory ``out`` (or continue it with ``resume=True``).

    Ctrl-C finishes the current step, saves a checkpoint and returns with status "interrupted".
    A NaN/inf loss raises ``TrainingDiverged`` and leaves the last good checkpoint in place.
    ``init_from``: a run's weights (``model.safetensors`` or a sharded ``model.dcp``) to start
    from instead of a random initialisation (fine-tuning, as ``memext extend --steps`` does);
    ignored when resuming.
    ``probes``: measurements taken every ``train.eval_every`` steps, at the end and after each
    curriculum stage, logged to ``metrics.jsonl`` (``memext.train.probes``); none by default:
    ``memext train`` passes ``memext.evals.probes.training_probes(cfg)``.
    ``teacher``: the model ``cfg.train.distill_teacher`` names, opened by the caller
    (``memext.adapters.open_model``; ``memext train`` and ``memext distill`` do): its soft
    targets join the loss (``memext.train.distill``). Its identity is recorded in ``run.json``,
    and a resumed run refuses another teacher.

    Started by torchrun, every rank calls this with the same arguments (docs/distributed.md);
    the process group is made here, unless the caller made one, and destroyed on return.
    """
    world = join(torch.device(device), cfg.train.dist_timeout)
    try:
        return _train(
            cfg,
            Path(out),
            world,
            resume,
            overwrite,
            progress,
            callback,
            log,
            init_from,
            probes,
            teacher,
        )
    finally:
        world.leave()


def _train(
    cfg: Config,
    run_dir: Path,
    world: World,
    resume: bool,
    overwrite: bool,
    progress: bool,
    callback: Callable[[_Loop], None] | None,
    log: Callable[[str], None],
    init_from: str | Path | None,
    probes: Sequence[Probe],
    teacher: Teacher | None,
) -> TrainResult:
    device, main = world.device, world.main
    if not main:  # rank 0 alone logs and shows progress
        log, progress = _silent, False
    resume, overwrite = elastic_start(run_dir, resume, overwrite, log)
    # Everything is checked before anything is written: a refused start or resume leaves the
    # folder as it was (no half-made run, no rewritten config).
    check_run_dir(run_dir, resume, overwrite)
    t = cfg.train
    strategy = make_strategy(
        t.strategy, world, bf16(device, t.precision), context_parallel=t.context_parallel
    )
    check_split(cfg, strategy.dp_size)
    if resume:
        if main:
            ckpt.recover(run_dir)  # finish or drop a checkpoint a kill interrupted
        world.barrier()
        old = read_run_info(run_dir)
    tok = run_tokenizer(cfg, run_dir, log) if resume else load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise MemextError(
            f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size={tok.vocab_size}"
        )
    distill = _distillation(cfg, teacher, tok, device)
    if world.local_rank != 0:  # one rank per node builds the token store; the others read it
        world.barrier()
    store, skipped = prepare_data(cfg.data, tok, log)
    if world.local_rank == 0 and world.size > 1:
        world.barrier()
    byte_lengths = tok.byte_lengths()
    reset_id = tok.special_id("<eod>") if t.segment_len else None

    info = {
        "corpus_hash": store.corpus_hash,
        "token_store": store.key,
        "train_tokens": int(store.train.size),
        "validation_tokens": int(store.validation.size),
        "skipped_files": list(skipped),
        "tokenizer": tok.fingerprint(),
        **({"init_from": str(init_from)} if init_from is not None else {}),
        **({"teacher": identity(distill.teacher)} if distill is not None else {}),
        **provenance(device),
        **({"world_size": world.size} if world.size > 1 else {}),
        # An elastic restart takes over only a run its own job wrote (parallel.elastic_start).
        **({"job": job_id()} if world.size > 1 and job_id() else {}),
    }
    if resume:
        if old.get("corpus_hash") not in (None, store.corpus_hash):
            raise MemextError(
                "cannot resume: the corpus changed since the run started "
                f"(hash {old['corpus_hash'][:12]} -> {store.corpus_hash[:12]})"
            )
        if old.get("tokenizer") not in (None, info["tokenizer"]):
            raise MemextError(
                "cannot resume: the tokenizer changed since the run started (fingerprint "
                f"{old['tokenizer']} -> {info['tokenizer']}); the run's ids would change meaning"
            )
        if old.get("teacher") != info.get("teacher"):
            raise MemextError(_teacher_changed(old.get("teacher"), info.get("teacher")))
        if old.get("threads") not in (None, info["threads"]):
            log(
                f"note: this run used {old['threads']} threads and now uses {info['threads']}: "
                "losses may differ in the last bits"
            )

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, seed=t.seed).to(device)
    model.activation_checkpointing = t.activation_checkpointing
    n_params = model.num_params()  # before sharding: the whole model's
    if init_from is not None and not resume:
        ckpt.load_weights(model, Path(init_from))
    if distill is not None and t.distill_init and not resume:
        if init_from is not None:
            raise MemextError("give init_from or train.distill_init, not both")
        picks = init_from_teacher(model, distill.teacher)
        log(f"starting from the teacher's weights (its blocks {picks})")
    seed_rank(t.seed, world)
    strategy.shard(model)  # FSDP: in place, before the optimizer takes the parameters
    context = None
    if strategy.cp_group is not None:  # each rank reads its shard of every sequence
        context = ContextParallel(
            strategy.cp_group, strategy.cp_rank, strategy.cp_size, t.cp_method
        )
        context.install(model)
    opt = build_optimizer(model, cfg)
    step = 0
    if resume:
        step = restore_checkpoint(run_dir, model, opt, strategy, log)
    source = BatchSource(cfg, tok, store.train, shard=(strategy.dp_rank, strategy.dp_size))

    if main:
        if not resume:
            make_run_dir(run_dir, overwrite)
        cfg.save(run_dir / ckpt.CONFIG)
        if tok.name == "bpe" and not resume:  # a resumed run keeps (and reads) its own copy
            atomic_write(run_dir / ckpt.TOKENIZER, lambda tmp: shutil.copyfile(tok.path, tmp))
        atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")
        if resume:
            truncate_metrics(run_dir, step)
    world.barrier()  # the run directory exists before any rank writes a shard into it
    if resume:
        log(f"resuming {run_dir} from step {step}")
    elif init_from is not None:
        log(f"starting from the weights in {init_from}")
    fwd = strategy.wrap(model)
    fwd = torch.compile(fwd) if t.compile else fwd
    log(
        f"model: {n_params / 1e6:.2f}M parameters (without embeddings), device {device}; "
        f"data: {store.train.size:,} train / {store.validation.size:,} validation tokens"
    )
    if world.size > 1:
        ranks = describe_batch(cfg, strategy.dp_size, strategy.cp_size)
        log(f"{world.size} ranks, train.strategy={t.strategy}; {ranks}")

    loop = _Loop(step=step, model=model, opt=opt)
    saved = step  # the step of the checkpoint on disk, named if the job stops

    def on_sigint(signum: int, frame: Any) -> None:
        if loop.stop_requested:
            raise KeyboardInterrupt
        loop.stop_requested = True
        log("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint) if on_main_thread() else None
    result = TrainResult(run_dir, "completed", step, main=main)
    tokens_done = 0
    stage = _enter_stage(model, cfg, step, None, log)
    bar = tqdm(
        total=t.total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    pending: list[dict] = []
    last_val = None
    shown: dict[str, str] = {}  # the last eval probes' numbers, on the progress bar

    def measure(moment: str) -> dict[str, Any]:
        """Rank 0's probe values. Sharded weights are gathered inside each forward, so then
        every rank takes part in the probes' forward passes (and rank 0 alone reports)."""
        if not (main or strategy.sharded):
            return {}
        ctx = ProbeContext(
            model, loop.step, stage, cfg, tok, store.validation, byte_lengths, device
        )
        # Rank 0 alone reads whole sequences: the probes run without context parallelism.
        with context.paused(model) if context is not None else contextlib.nullcontext():
            values = run_probes(probes, moment, ctx)
        return values if main else {}

    def where() -> str:
        return (
            f"at step {loop.step + 1}; the checkpoint of step {saved} in {run_dir} is kept "
            f"(continue with: memext train --resume {run_dir} --nproc {world.size})"
        )

    tic = time.perf_counter()
    model.train()
    try:
        with stop_cleanly(world, where):
            while loop.step < t.total_steps and not loop.stop_requested:
                stage = _enter_stage(model, cfg, loop.step, stage, log)
                lr = lr_at(loop.step, t)
                batches = [
                    source.batch(i, loop.step, m, stage.seq_len, stage.batch_size)
                    for m in range(t.grad_accum)
                    for i in source.active(stage.index)
                ]
                if context is not None:
                    batches = [context.shard_batch(b) for b in batches]
                by_source: dict[str, float] = {}
                terms: dict[str, float] = {}
                total, gnorm = train_step(
                    fwd,
                    model,
                    opt,
                    batches,
                    lr,
                    t,
                    device,
                    reset_id,
                    losses=by_source,
                    strategy=strategy if world.size > 1 else None,
                    distill=distill,
                    terms=terms,
                )
                if not (math.isfinite(total) and math.isfinite(gnorm)):
                    what = "loss" if not math.isfinite(total) else "gradient norm"
                    raise TrainingDiverged(
                        f"the {what} became {total if what == 'loss' else gnorm} at step "
                        f"{loop.step + 1}; the step was not taken and training stopped. The last "
                        f"good checkpoint in {run_dir} is kept: lower train.lr or raise "
                        "train.warmup_steps"
                    )
                loop.step += 1
                tokens_done += world.size * sum(  # every rank reads as many as this one
                    b.x.numel() + (0 if b.src is None else b.src.numel()) for b in batches
                )
                result.losses.append(total)
                bar.update(1)
                if loop.step % t.log_every == 0 or loop.step == t.total_steps:
                    tps = tokens_done / (time.perf_counter() - tic)
                    row = {"step": loop.step, "loss": total, "lr": lr, "grad_norm": gnorm}
                    if len(by_source) > 1:
                        row |= {f"loss/{name}": v for name, v in by_source.items()}
                    row |= {f"loss_{name}": v for name, v in terms.items()}  # ce and kd
                    pending.append(row | {"tokens_per_s": round(tps, 1)})
                    bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tps:,.0f}", **shown)
                if callback is not None:
                    callback(loop)
                # A stop (Ctrl-C, a callback) reaches the ranks at different moments: they
                # agree on it, so that all of them save the same step and stop together.
                loop.stop_requested = agree(strategy, loop.stop_requested)
                at_end = loop.step == t.total_steps
                if (t.eval_every and loop.step % t.eval_every == 0) or at_end:
                    values = measure("eval")
                    if values:
                        last_val = values
                        pending.append({"step": loop.step, **values})
                        shown = {k: f"{v:.3f}" for k, v in values.items() if isinstance(v, float)}
                        bar.set_postfix(loss=f"{total:.3f}", **shown)
                        bar.write(f"step {loop.step}: {format_values(values)}")
                if t.curriculum and loop.step == stage.end_step:
                    values = measure("stage")
                    if values:
                        pending.append(_stage_row(stage) | values)
                        bar.write(
                            f"after stage {stage.index} (seq_len {stage.seq_len}): "
                            + format_values(values)
                        )
                if loop.step % t.save_every == 0 or at_end or loop.stop_requested:
                    if main:
                        append_metrics(run_dir, pending)
                    pending.clear()
                    commit_checkpoint(run_dir, model, opt, loop.step, strategy)
                    saved = loop.step
    finally:
        bar.close()
        if context is not None:
            context.remove(model)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if loop.stop_requested:
        result.status = "interrupted"
        log(
            f"saved a checkpoint at step {loop.step}; continue with: memext train --resume {run_dir}"
        )
    result.step = loop.step
    result.last_val = last_val
    return result


def _distillation(
    cfg: Config, teacher: Teacher | None, tok: Any, device: torch.device
) -> Distillation | None:
    """The teacher's part of the loss, checked against the student before anything is
    written; None without ``train.distill_teacher``."""
    t = cfg.train
    if not t.distill_teacher:
        if teacher is not None:
            raise MemextError("a teacher was given but train.distill_teacher is not set")
        return None
    if teacher is None:
        raise MemextError(
            f"train.distill_teacher={t.distill_teacher!r} needs its model: pass "
            "teacher=memext.adapters.open_model(cfg.train.distill_teacher) to train()"
        )
    lengths = [n for src in cfg.data.mixture for n in src.lengths]
    check_teacher(teacher, tok, cfg.model.vocab_size, max([trained_length(cfg), *lengths]), device)
    return Distillation(teacher, t.distill_alpha, t.distill_temperature)


def _teacher_changed(old: dict | None, new: dict | None) -> str:
    """Why a resume with another teacher (or with one where there was none) is refused."""
    if old is None:
        return "cannot resume: the run was started without a teacher; drop train.distill_teacher"
    if new is None:
        return (
            f"cannot resume: the run distils from {old['name']!r}; give that teacher again "
            "(train.distill_teacher)"
        )
    return (
        f"cannot resume: the run distils from {old['name']!r} (fingerprint "
        f"{old['fingerprint']}) but the teacher now is {new['name']!r} (fingerprint "
        f"{new['fingerprint']}): another teacher would change the targets of the steps to come"
    )


def _silent(message: str) -> None:
    """The log of every rank but rank 0."""


def bf16(device: torch.device, precision: str) -> bool:
    """Whether FSDP keeps bf16 parameters for compute: on CUDA, where ``train.precision`` asks
    for bf16 (``auto`` does there, as ``memext.runtime.autocast`` reads it)."""
    return device.type == "cuda" and precision in ("bf16", "auto")


def _enter_stage(
    model: torch.nn.Module, cfg: Config, step: int, current: Stage | None, log: Callable
) -> Stage:
    """The stage of ``step``; on entering a new one, the model's rotary takes its scaling."""
    stage = stage_at(cfg, step)
    if current is None or stage.index != current.index:
        ckpt.unwrap(model).rotary = build_rotary(stage.model).to(_device_of(model))
        if current is not None:
            m = stage.model
            log(
                f"stage {stage.index}: seq_len {stage.seq_len}, batch {stage.batch_size}, rotary "
                f"{m.rope_scaling} x{m.rope_factor:g}, {stage.steps} steps"
            )
    return stage


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _stage_row(stage: Stage) -> dict[str, Any]:
    """The fields naming a curriculum stage in its ``metrics.jsonl`` row."""
    return {
        "step": stage.end_step,
        "stage": stage.index,
        "stage_seq_len": stage.seq_len,
        "rope_scaling": stage.model.rope_scaling,
        "rope_factor": stage.model.rope_factor,
    }
