"""The training loop: AdamW, warmup + cosine, clipping, accumulation, checkpoints that resume exactly.

Resumption is exact because everything that decides the next step is saved or derived: the
weights and optimizer state are saved; the learning rate is a function of the step; each batch is
a function of (seed, step); the RNG state (used by dropout) is saved.

What is measured during training (validation, held-out tasks) comes in as probes
(``memext.train.probes``): the trainer decides when, the caller what.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memext import checkpoint as ckpt
from memext.config import Config, TrainConfig
from memext.curriculum import Stage, stage_at
from memext.data import prepare_data
from memext.data.mixture import Batch, BatchSource
from memext.errors import MemextError
from memext.io import atomic_write, atomic_write_text
from memext.model import build_model, build_rotary
from memext.runtime import autocast, provenance
from memext.tokenizer import load_tokenizer
from memext.train.probes import Probe, ProbeContext, format_values, run_probes
from memext.train.schedule import lr_at

RUN_INFO = ckpt.RUN_INFO


class TrainingDiverged(MemextError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" or "interrupted"
    step: int
    last_val: dict[str, Any] | None = None  # the last values of the eval probes
    losses: list[float] = field(default_factory=list)


@dataclass
class _Loop:
    """Mutable training state handed to callbacks (tests use it to interrupt or corrupt a run)."""

    step: int
    model: torch.nn.Module
    stop_requested: bool = False


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory this start may not use; writes nothing.

    A fresh start needs a new or empty folder, or one without memext's file names in it;
    ``overwrite`` also accepts a memext run (its config says so) and replaces only the files
    memext wrote there. A folder holding someone else's ``config.json`` (a Hugging Face model,
    a project) is never replaced.
    """
    if resume and overwrite:
        raise MemextError("--resume and --overwrite contradict each other; choose one")
    if resume:
        if not (out / ckpt.CONFIG).is_file():
            raise MemextError(f"cannot resume: {str(out)!r} is not a memext run (no {ckpt.CONFIG})")
        if not ckpt.is_memext_run(out):
            raise MemextError(f"cannot resume: {str(out / ckpt.CONFIG)!r} is not a memext config")
        return
    if out.exists() and not out.is_dir():
        raise MemextError(f"output path {str(out)!r} exists and is not a directory")
    if not out.is_dir():
        return
    if ckpt.is_memext_run(out):
        if not overwrite:
            raise MemextError(
                f"{str(out)!r} already holds a run; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        return
    foreign = ckpt.foreign_files(out)
    if foreign:
        raise MemextError(
            f"{str(out)!r} is not a memext run but holds {', '.join(foreign)}, which memext did "
            "not write: memext replaces only its own runs (--overwrite included); choose "
            "another --out"
        )


def make_run_dir(out: Path, overwrite: bool) -> None:
    """Create the run directory checked by ``check_run_dir``; with ``overwrite``, first remove
    the files an earlier memext run wrote there (and nothing else)."""
    if overwrite and ckpt.is_memext_run(out):
        ckpt.clear_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _storage_error(e, out) from None


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """``check_run_dir`` then, unless resuming, ``make_run_dir``."""
    check_run_dir(out, resume, overwrite)
    if not resume:
        make_run_dir(out, overwrite)


def _storage_error(e: OSError, path: Path) -> OSError:
    from memext.errors import is_environmental, storage_error

    return storage_error(e, path, "create") if is_environmental(e) else e


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, not the embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    t = cfg.train
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def sequence_backward(
    fwd: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    t: TrainConfig,
    device: torch.device,
    *,
    scale: float = 1.0,
    weights: torch.Tensor | None = None,
    reset_id: int | None = None,
) -> float:
    """Forward and backward one batch of sequences; returns its mean loss (before ``scale``).

    With ``t.segment_len`` the sequences are read in segments carrying the model's state, and
    the gradient flows through that state for ``t.bptt`` segments before it is cut (truncated
    backprop through time; 0 = never cut). ``weights`` (B, T) weighs each target (a task's answer
    more than its filler); ``reset_id`` is the document-boundary token: a row whose segment held
    one starts the next segment with empty memory. A memory's auxiliary loss (compressive
    memory's reconstruction) is added to the loss it belongs to but not to the returned mean.
    """
    x, y = x.to(device), y.to(device)
    seg = t.segment_len or x.shape[1]
    n = x.shape[1] // seg
    w = None if weights is None else weights.to(device).float()
    denom = float(w.sum()) if w is not None else float(y.numel())
    memory = ckpt.unwrap(fwd).memory  # the variant's rules for cutting and forgetting state
    state, pending, total = None, None, 0.0
    for i in range(n):
        xs, ys = x[:, i * seg : (i + 1) * seg], y[:, i * seg : (i + 1) * seg]
        with autocast(device, t.precision):
            logits, state = fwd(xs, state)
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), ys.reshape(-1), reduction="none"
        )
        if w is not None:
            nll = nll * w[:, i * seg : (i + 1) * seg].reshape(-1)
        loss = nll.sum() / denom
        total += float(loss.detach())
        if state.aux_loss is not None:
            loss = loss + state.aux_loss / n
        pending = loss if pending is None else pending + loss
        if i == n - 1 or (t.bptt and (i + 1) % t.bptt == 0):
            (pending * scale).backward()
            pending = None
            if i < n - 1 and state.memory:
                state.memory = memory.detach(state.memory)
        if reset_id is not None and i < n - 1 and state.memory:
            rows = (xs == reset_id).any(dim=1)
            if bool(rows.any()):
                state.memory = memory.reset(state.memory, rows)
    return total


def train_step(
    fwd: torch.nn.Module,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Sequence[Batch | tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    t: TrainConfig,
    device: torch.device,
    reset_id: int | None = None,
    losses: dict[str, float] | None = None,
) -> tuple[float, float]:
    """One optimizer step over ``batches``; returns (loss, grad norm).

    ``batches`` are the step's micro-batches: the mixture's ``Batch``es (each source's loss
    weighted by its share, shares normalised within the step) or plain (inputs, targets) pairs
    of text, accumulated with equal weights. ``losses``, when given, receives each source's mean
    loss. ``fwd`` is the module to call (``model`` itself, or its torch.compile wrapper).

    The step is skipped, leaving the weights those of the last good step, when the loss or the
    gradient norm is not finite.
    """
    parts = [b if isinstance(b, Batch) else Batch("lm", 1.0, *b, resets=True) for b in batches]
    for group in opt.param_groups:
        group["lr"] = lr
    shares = sum(b.share for b in parts)
    total, by_name, counts = 0.0, {}, {}
    for b in parts:
        weight = b.share / shares
        loss = sequence_backward(
            fwd,
            b.x,
            b.y,
            t,
            device,
            scale=weight,
            weights=b.weights,
            reset_id=reset_id if b.resets else None,
        )
        total += weight * loss
        by_name[b.name] = by_name.get(b.name, 0.0) + loss
        counts[b.name] = counts.get(b.name, 0) + 1
    if losses is not None:
        losses.update({k: v / counts[k] for k, v in by_name.items()})
    if not math.isfinite(total):
        opt.zero_grad(set_to_none=True)
        return total, math.nan
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf))
    if not math.isfinite(gnorm):
        opt.zero_grad(set_to_none=True)
        return total, gnorm
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, gnorm


def _save(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    # A non-finite step is never taken, so this holds; checked so a checkpoint never holds one.
    bad = [n for n, p in ckpt.unwrap(model).named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"the weights hold NaN or inf at step {step} ({bad[0]}): not saved; the last good "
            f"checkpoint in {run_dir} is kept: lower train.lr or raise train.warmup_steps"
        )
    state = {"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    # Ignore Ctrl-C while the checkpoint is written (a kill is handled by ckpt.recover).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        ckpt.save_checkpoint(run_dir, model, state, step)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _restore(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load the run's checkpoint into ``model`` and ``opt`` and set the RNG; returns its step.
    Reads only: a refusal leaves the run as it was."""
    weights = run_dir / ckpt.WEIGHTS
    if not weights.is_file():
        raise MemextError(
            f"cannot resume: {str(weights)!r} is missing, so {str(run_dir)!r} has no checkpoint "
            "to continue from (a run stopped before its first save?); start it again with "
            "--overwrite"
        )
    ckpt.load_weights(model, weights)
    state = ckpt.load_train_state(run_dir)
    path = run_dir / ckpt.TRAIN_STATE
    try:
        opt.load_state_dict(state["optimizer"])
    except Exception as e:
        raise MemextError(f"cannot resume: {str(path)!r} is corrupt or foreign ({e})") from None
    step = state["step"]
    saved = ckpt.weights_metadata(weights).get("step")
    if saved != str(step):
        raise MemextError(
            f"cannot resume: weights (step {saved}) and training state (step {step}) disagree"
        )
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _append_metrics(run_dir: Path, rows: list[dict]) -> None:
    path = run_dir / ckpt.METRICS
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
    except OSError as e:
        from memext.errors import is_environmental, storage_error

        if is_environmental(e):
            raise storage_error(e, path, "write", "the last complete checkpoint is kept") from None
        raise


def _run_info(run_dir: Path) -> dict:
    path = run_dir / RUN_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MemextError(f"cannot resume: {str(path)!r} is unreadable ({e})") from None
    if not isinstance(info, dict):
        raise MemextError(f"cannot resume: {str(path)!r} does not hold a JSON object")
    return info


def _run_tokenizer(cfg: Config, run_dir: Path, log: Callable[[str], None]):
    """The tokenizer a resumed run continues with: its own copy of a BPE file, never the file
    the config names (which may have changed since)."""
    if cfg.data.tokenizer == "byte":
        return load_tokenizer("byte")
    local = run_dir / ckpt.TOKENIZER
    if not local.is_file():
        raise MemextError(
            f"cannot resume: the run's copy of its tokenizer, {str(local)!r}, is missing"
        )
    source = Path(cfg.data.tokenizer)
    moved = source.resolve() != local.resolve() and source.is_file()
    if moved and source.read_bytes() != local.read_bytes():
        log(f"note: {source} changed since the run started; resuming with the run's own copy")
    return load_tokenizer(str(local))


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed, so the log reads as one run."""
    rows = [r for r in ckpt.read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(run_dir / ckpt.METRICS, "".join(json.dumps(r) + "\n" for r in rows))


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
) -> TrainResult:
    """Train ``cfg`` into the run directory ``out`` (or continue it with ``resume=True``).

    Ctrl-C finishes the current step, saves a checkpoint and returns with status "interrupted".
    A NaN/inf loss raises ``TrainingDiverged`` and leaves the last good checkpoint in place.
    ``init_from``: a weights file (``model.safetensors``) to start from instead of a random
    initialisation (fine-tuning, as ``memext extend --steps`` does); ignored when resuming.
    ``probes``: measurements taken every ``train.eval_every`` steps, at the end and after each
    curriculum stage, logged to ``metrics.jsonl`` (``memext.train.probes``); none by default:
    ``memext train`` passes ``memext.evals.probes.training_probes(cfg)``.
    """
    run_dir = Path(out)
    device = torch.device(device)
    # Everything is checked before anything is written: a refused start or resume leaves the
    # folder as it was (no half-made run, no rewritten config).
    check_run_dir(run_dir, resume, overwrite)
    t = cfg.train
    if resume:
        ckpt.recover(run_dir)  # finish or drop a checkpoint a kill interrupted
        old = _run_info(run_dir)
    tok = _run_tokenizer(cfg, run_dir, log) if resume else load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise MemextError(
            f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size={tok.vocab_size}"
        )
    store, skipped = prepare_data(cfg.data, tok, log)
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
        **provenance(device),
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
        if old.get("threads") not in (None, info["threads"]):
            log(
                f"note: this run used {old['threads']} threads and now uses {info['threads']}: "
                "losses may differ in the last bits"
            )

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, seed=t.seed).to(device)
    model.activation_checkpointing = t.activation_checkpointing
    opt = build_optimizer(model, cfg)
    step = 0
    if resume:
        step = _restore(run_dir, model, opt)
    elif init_from is not None:
        ckpt.load_weights(model, Path(init_from))
    source = BatchSource(cfg, tok, store.train)

    if not resume:
        make_run_dir(run_dir, overwrite)
    cfg.save(run_dir / ckpt.CONFIG)
    if tok.name == "bpe" and not resume:  # a resumed run keeps (and reads) its own copy
        atomic_write(run_dir / ckpt.TOKENIZER, lambda tmp: shutil.copyfile(tok.path, tmp))
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")
    if resume:
        _truncate_metrics(run_dir, step)
        log(f"resuming {run_dir} from step {step}")
    elif init_from is not None:
        log(f"starting from the weights in {init_from}")
    fwd = torch.compile(model) if t.compile else model
    n_params = model.num_params()
    log(
        f"model: {n_params / 1e6:.2f}M parameters (without embeddings), device {device}; "
        f"data: {store.train.size:,} train / {store.validation.size:,} validation tokens"
    )

    loop = _Loop(step=step, model=model)

    def on_sigint(signum: int, frame: Any) -> None:
        if loop.stop_requested:
            raise KeyboardInterrupt
        loop.stop_requested = True
        log("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    result = TrainResult(run_dir, "completed", step)
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

    def context() -> ProbeContext:
        return ProbeContext(
            model, loop.step, stage, cfg, tok, store.validation, byte_lengths, device
        )

    tic = time.perf_counter()
    model.train()
    try:
        while loop.step < t.total_steps and not loop.stop_requested:
            stage = _enter_stage(model, cfg, loop.step, stage, log)
            lr = lr_at(loop.step, t)
            batches = [
                source.batch(i, loop.step, m, stage.seq_len, stage.batch_size)
                for m in range(t.grad_accum)
                for i in source.active(stage.index)
            ]
            by_source: dict[str, float] = {}
            total, gnorm = train_step(
                fwd, model, opt, batches, lr, t, device, reset_id, losses=by_source
            )
            if not (math.isfinite(total) and math.isfinite(gnorm)):
                what = "loss" if not math.isfinite(total) else "gradient norm"
                raise TrainingDiverged(
                    f"the {what} became {total if what == 'loss' else gnorm} at step "
                    f"{loop.step + 1}; the step was not taken and training stopped. The last good "
                    f"checkpoint in {run_dir} is kept: lower train.lr or raise train.warmup_steps"
                )
            loop.step += 1
            tokens_done += sum(b.x.numel() for b in batches)
            result.losses.append(total)
            bar.update(1)
            if loop.step % t.log_every == 0 or loop.step == t.total_steps:
                tps = tokens_done / (time.perf_counter() - tic)
                row = {"step": loop.step, "loss": total, "lr": lr, "grad_norm": gnorm}
                if len(by_source) > 1:
                    row |= {f"loss/{name}": v for name, v in by_source.items()}
                pending.append(row | {"tokens_per_s": round(tps, 1)})
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tps:,.0f}", **shown)
            if callback is not None:
                callback(loop)
            at_end = loop.step == t.total_steps
            if (t.eval_every and loop.step % t.eval_every == 0) or at_end:
                values = run_probes(probes, "eval", context())
                if values:
                    last_val = values
                    pending.append({"step": loop.step, **values})
                    shown = {k: f"{v:.3f}" for k, v in values.items() if isinstance(v, float)}
                    bar.set_postfix(loss=f"{total:.3f}", **shown)
                    bar.write(f"step {loop.step}: {format_values(values)}")
            if t.curriculum and loop.step == stage.end_step:
                values = run_probes(probes, "stage", context())
                if values:
                    pending.append(_stage_row(stage) | values)
                    bar.write(
                        f"after stage {stage.index} (seq_len {stage.seq_len}): "
                        + format_values(values)
                    )
            if loop.step % t.save_every == 0 or at_end or loop.stop_requested:
                _append_metrics(run_dir, pending)
                pending.clear()
                _save(run_dir, model, opt, loop.step)
    finally:
        bar.close()
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
