"""Structured head pruning (``memext compress prune``) and the model kind ``pruned``.

``prune`` scores every attention head on text (``memext.nn.prune.head_importance``), removes
the least important ``fraction`` of them as whole KV groups (``choose_groups``) and writes the
smaller model. Where the per-layer head counts live depends on the base, one place each:

- **A memext run** becomes a memext run: its config's ``model.heads`` holds each layer's head
  count, its weights the smaller projections, so every command opens it as kind ``memext`` and
  ``memext train`` can fine-tune it. ``recover_steps`` does that at once (``memext.train``).
- **A Hugging Face model** (a directory, a GGUF file, a known name) becomes a directory of kind
  ``pruned``: ``pruned.json`` holds the base model, the KV groups each layer keeps and a checksum
  of the base's attention weights. Opening it opens the base and cuts its projections to the
  kept groups (``memext.hf.prune``); the weights kept are the base's own, so nothing else is
  stored. Everything else is the base adapter's, as for ``quantized`` (both are derived
  directories, ``adapters/derived.py``).

Refused before anything is written: a fraction outside (0, 1), one that would leave a layer no
head, an ``out`` that exists, a model already pruned or quantized (prune its base), and
``recover_steps`` on a model memext does not train.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memext.adapters import derived
from memext.adapters.base import register_model_kind
from memext.errors import MemextError
from memext.nn import prune as heads_prune

META = "pruned.json"
FORMAT = "memext-pruned"
VERSION = 1
#: The record a pruned memext run carries beside its config (not read back: model.heads is).
RECORD = "prune.json"


def prune(
    source: str | Path,
    out: str | Path,
    heads: float = 0.25,
    *,
    batches: int = 8,
    seq_len: int = 256,
    text: str | Path | None = None,
    recover_steps: int = 0,
    recover_lr: float | None = None,
    recover_data: str = "mixture",
    recover_kd: float = 0.0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Remove ``heads`` (a fraction in (0, 1)) of the attention heads of the model at ``source``
    into the new directory ``out``, scored on ``batches`` sequences of ``seq_len`` tokens of
    ``text`` (a file; default: the model's validation text); returns the record of what was
    kept. ``recover_steps`` (memext runs): fine-tune the pruned run that many steps on its own
    training data (``recover_data``: ``mixture``, the run's ``data.mixture``; ``corpus``, its
    corpus text alone) at ``recover_lr`` (default: the run's final rate, lr * min_lr_ratio);
    ``recover_kd`` > 0 mixes in the unpruned model's soft targets with that weight (alpha of
    ``memext.train.distill``, T = 1): the recovery learns to predict what the model did before
    it was cut, not only the text."""
    from memext.adapters.open import detect_kind, open_model

    _check_fraction(heads)
    for name, value, least in (("batches", batches, 1), ("seq_len", seq_len, 2)):
        if not isinstance(value, int) or value < least:
            raise MemextError(
                f"--{name.replace('_', '-')} {value!r}: expected an integer >= {least}"
            )
    if not isinstance(recover_steps, int) or recover_steps < 0:
        raise MemextError(f"--recover-steps {recover_steps!r}: expected an integer >= 0")
    if not 0.0 <= recover_kd <= 1.0:
        raise MemextError(f"--recover-kd {recover_kd!r}: expected a weight in [0, 1]")
    if recover_kd and not recover_steps:
        raise MemextError("--recover-kd weighs the recovery's soft targets: give --recover-steps")
    if recover_data not in RECOVER_DATA:
        raise MemextError(
            f"--recover-data {recover_data!r}: expected one of {', '.join(RECOVER_DATA)}"
        )
    if recover_lr is not None and not (math.isfinite(recover_lr) and recover_lr > 0):
        raise MemextError(f"--recover-lr {recover_lr}: expected a number > 0")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise MemextError(f"{str(out)!r} already exists: give a new --out (nothing was written)")
    kind = detect_kind(source)
    _refuse_compressed(source, kind)
    if kind == "memext":
        _check_run(source)
    elif recover_steps:
        raise MemextError(
            f"{str(source)!r} is a {kind} model: --recover-steps fine-tunes memext runs only "
            "(memext does not train Hugging Face models); prune without it"
        )
    adapter = open_model(source, device)
    if kind == "memext":
        model = adapter.model
        slots = heads_prune.self_attention_slots(model)
    else:
        from memext.hf.prune import llama_slots

        model = adapter.model.model
        try:
            slots = llama_slots(model)
        except ValueError as e:
            raise MemextError(f"{str(source)!r}: {e}") from None
    try:
        n = heads_prune.groups_to_remove(heads, slots)
    except ValueError as e:
        raise MemextError(str(e)) from None
    ids = _scoring_ids(adapter, text, batches * seq_len + 1)
    length = min(seq_len, len(ids) - 1)
    log(f"scoring {sum(s.n_heads for s in slots)} heads on {batches} x {length} tokens")
    scores = heads_prune.head_importance(
        slots, _loss(model, kind), _batches(ids, batches, length, adapter.device)
    )
    keep = heads_prune.choose_groups(slots, scores, n)
    record = {
        "heads": heads,
        "unit": "head" if all(s.group == 1 for s in slots) else "kv_group",
        "heads_before": [s.n_heads for s in slots],
        "heads_after": [len(g) * s.group for s, g in zip(slots, keep, strict=True)],
        "keep": keep,
        "scores": [[round(float(v), 8) for v in s] for s in scores],
        "scored_on": {
            "text": str(text) if text else "validation",
            "batches": batches,
            "seq_len": length,
        },
    }
    if kind == "memext":
        recover = {
            "steps": recover_steps,
            "lr": recover_lr,
            "data": recover_data,
            **({"kd": recover_kd} if recover_kd else {}),
        }
        _write_run(source, out, model, adapter.cfg, keep, record, recover, device, progress, log)
    else:
        _write_pruned(source, kind, out, model, record)
    return record


def _check_fraction(heads: Any) -> None:
    try:
        heads_prune.check_fraction(heads)
    except ValueError as e:
        raise MemextError(str(e)) from None


def _refuse_compressed(source: str | Path, kind: str) -> None:
    if kind == "quantized":
        raise MemextError(
            f"{str(source)!r} is quantized: prune its base model, then quantize the pruned one"
        )
    if kind == "pruned":
        base = read_meta(source)["base"]["source"]
        raise MemextError(
            f"{str(source)!r} is already pruned (of {base}): prune its base model instead"
        )


def _check_run(source: str | Path) -> None:
    from memext.checkpoint import load_config
    from memext.nn.memory import MEMORY

    m = load_config(source).model
    if m.heads:
        raise MemextError(
            f"{str(source)!r} is already pruned (model.heads = {list(m.heads)}): prune the run "
            "it was made from instead"
        )
    if m.arch != "transformer":
        raise MemextError(f"{str(source)!r} is a {m.arch} run: head pruning reads Transformers")
    if not MEMORY[m.memory].prunable:
        raise MemextError(
            f"{str(source)!r} has memory {m.memory!r}, whose state is shaped by all n_heads "
            "heads: head pruning takes memory none, xl or tokens"
        )


def _scoring_ids(adapter: Any, text: str | Path | None, need: int) -> np.ndarray:
    if text is None:
        ids = np.asarray(adapter.validation()[0])
    else:
        try:
            raw = Path(text).read_bytes()
        except OSError as e:
            raise MemextError(f"--text {str(text)!r} cannot be read ({e.strerror})") from None
        ids = np.asarray(adapter.tokenizer.encode(raw))
    if len(ids) < 3:
        raise MemextError("the scoring text is too short: give --text with more text")
    return ids[:need]


def _batches(ids: np.ndarray, batches: int, length: int, device: Any) -> Iterator[torch.Tensor]:
    """Up to ``batches`` rows of ``length + 1`` consecutive ids (the last one only a target),
    one row per batch: Michel et al.'s importance is |∂L/∂ξ| per example, summed."""
    for i in range(batches):
        row = ids[i * length : i * length + length + 1]
        if len(row) < 2:
            return
        yield torch.as_tensor(row.astype(np.int64), device=device)[None]


def _loss(model: torch.nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(tokens: torch.Tensor) -> torch.Tensor:
        x, y = tokens[:, :-1], tokens[:, 1:]
        logits = model(x)[0] if kind == "memext" else model(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    return loss


def _write_run(source, out, model, cfg, keep, record, recover, device, progress, log) -> None:
    """The pruned run: its config with ``model.heads``, the cut weights, the tokenizer (and
    ``steps`` of recovery training through ``memext.train`` when asked)."""
    import shutil

    from memext import checkpoint as ckpt
    from memext.io import atomic_dir

    for block, groups in zip(model.blocks, keep, strict=True):
        heads_prune.prune_self_attention(block.attn, groups)
    new = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, heads=tuple(len(g) for g in keep))
    )
    record = {**record, "base": {"source": str(Path(source).resolve()), "kind": "memext"}}
    if recover["steps"]:
        from memext.adapters.open import open_model
        from memext.train import train

        teacher = str(Path(source).resolve())
        kd = recover.get("kd", 0.0)
        new = recovery_config(
            new, recover["steps"], recover["lr"], recover["data"], kd=kd, teacher=teacher
        )
        record["recover"] = {**recover, "lr": new.train.lr}
        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / ckpt.WEIGHTS
            ckpt.save_weights(model, weights, {"step": "0"})
            train(
                new,
                out,
                device=device,
                progress=progress,
                log=log,
                init_from=weights,
                teacher=open_model(teacher, device) if kd else None,
            )
        (out / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return
    with atomic_dir(out) as tmp:
        new.save(tmp / ckpt.CONFIG)
        ckpt.save_weights(model, tmp / ckpt.WEIGHTS, {"step": "0"})
        if (Path(source) / ckpt.TOKENIZER).is_file():
            shutil.copyfile(Path(source) / ckpt.TOKENIZER, tmp / ckpt.TOKENIZER)
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


#: What a recovery fine-tune reads: the run's whole ``data.mixture``, or its corpus alone.
RECOVER_DATA = ("mixture", "corpus")


def recovery_config(
    cfg: Any,
    steps: int,
    lr: float | None = None,
    data: str = "mixture",
    kd: float = 0.0,
    teacher: str = "",
) -> Any:
    """``cfg`` set to fine-tune ``steps`` steps at its final length and tokens per step, at
    ``lr`` (default: the run's final rate, lr * min_lr_ratio), no curriculum or evaluation, on
    ``data`` (``RECOVER_DATA``); with ``kd`` > 0, distilled from ``teacher`` at that alpha,
    T = 1."""
    from memext.curriculum import trained_length

    t = cfg.train
    length = trained_length(cfg)
    seg = t.segment_len
    train = dataclasses.replace(
        t,
        seq_len=length if not seg else -(-length // seg) * seg,
        batch_size=max(1, t.batch_size * t.seq_len // length),
        steps=steps,
        curriculum=(),
        curriculum_steps=(),
        lr=lr if lr is not None else t.lr * t.min_lr_ratio,
        warmup_steps=min(t.warmup_steps, steps // 10),
        eval_every=0,
        save_every=steps,
        context_parallel=1,
        distill_teacher=teacher if kd else "",
        distill_alpha=kd if kd else t.distill_alpha,
        distill_temperature=1.0 if kd else t.distill_temperature,
        distill_init=False,
    )
    # A fresh optimizer's first steps on synthetic tasks can cost text quality that a short
    # recovery does not win back (docs/compression.md): "corpus" reads the text alone.
    mixture = cfg.data.mixture if data == "mixture" else ()
    return dataclasses.replace(
        cfg, train=train, data=dataclasses.replace(cfg.data, mixture=mixture)
    )


def _base_checksums(lm: torch.nn.Module) -> list[dict[str, float]]:
    from memext.hf.prune import attention_layers
    from memext.nn.quant import weight_checksum

    sums = []
    for attn in attention_layers(lm):
        parts = [
            weight_checksum(getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        sums.append({k: sum(p[k] for p in parts) for k in ("sum", "abs_sum")})
    return sums


def _write_pruned(
    source: str | Path, kind: str, out: Path, lm: torch.nn.Module, record: dict
) -> None:
    from memext.hf.prune import prune_llama
    from memext.io import atomic_dir

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base": {"source": derived.base_source(source, kind), "kind": kind},
        **record,
        "checksums": _base_checksums(lm),
    }
    prune_llama(lm, record["keep"])  # the adapter in hand is now the pruned model
    with atomic_dir(out) as tmp:
        derived.write_record(tmp, META, meta)


def read_meta(path: str | Path) -> dict[str, Any]:
    """``pruned.json`` of the directory ``path``, checked; a MemextError says what is wrong."""
    return derived.read_record(path, META, "pruned", _meta_problem)


def _meta_problem(meta: Any) -> str | None:
    bad = derived.header_problem(meta, FORMAT, VERSION) or derived.base_problem(meta)
    if bad:
        return bad
    keep, sums = meta.get("keep"), meta.get("checksums")
    if not isinstance(keep, list) or not keep:
        return "no kept groups (keep)"
    for i, groups in enumerate(keep):
        if (
            not isinstance(groups, list)
            or not groups
            or not all(isinstance(g, int) and g >= 0 for g in groups)
        ):
            return f"layer {i} keeps no group (keep[{i}] = {groups!r})"
    if not isinstance(sums, list) or len(sums) != len(keep):
        return "no checksum per layer (checksums)"
    return None


@register_model_kind("pruned")
class PrunedAdapter(derived.DerivedAdapter):
    """A pruned directory: the base model's adapter with the heads ``pruned.json`` drops cut
    out of its attention. Every attribute the contract names that is not set here is the base
    adapter's."""

    kind = "pruned"
    META = META
    FINGERPRINT = "p"
    HOLDS = "which heads to keep, and reads the weights from its base"

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", reading: Any = None):
        from memext.hf.prune import llama_slots, prune_llama

        self.meta = meta = read_meta(path)
        source = meta["base"]["source"]
        self._base = self.open_base(path, "prunes", device, reading=reading)
        lm = self._base.model.model
        try:
            slots = llama_slots(lm)
            problem = _fit_problem(slots, meta, _base_checksums(lm))
        except ValueError as e:
            problem = str(e)
        if problem:
            raise MemextError(f"{str(path)!r} does not fit its base {source!r}: {problem}")
        prune_llama(lm, meta["keep"])
        self.path = str(path)
        kept, total = sum(meta["heads_after"]), sum(meta["heads_before"])
        self.name = f"{Path(path).resolve().name} ({self._base.name}, {kept}/{total} heads)"
        self.params = sum(p.numel() for p in self._base.model.parameters())
        self._files = [Path(path) / META]

    @staticmethod
    def summary(path: str | Path) -> list[str]:
        meta = read_meta(path)
        kept, total = sum(meta.get("heads_after", [])), sum(meta.get("heads_before", []))
        return [
            f"model: {meta['base']['source']} ({meta['base'].get('kind')}) pruned: {kept} of "
            f"{total} attention heads kept (whole KV groups removed)",
            f"heads per layer: {', '.join(map(str, meta.get('heads_after', [])))}",
        ]

    def describe(self) -> dict[str, Any]:
        kept = {k: self.meta.get(k) for k in ("heads", "base", "heads_after", "keep")}
        return {**self._base.describe(), "pruned": kept}


def _fit_problem(slots: list, meta: dict[str, Any], sums: list[dict[str, float]]) -> str | None:
    keep = meta["keep"]
    if len(keep) != len(slots):
        return f"{len(keep)} layers in {META}, {len(slots)} in the model"
    for i, (s, groups, want, got) in enumerate(
        zip(slots, keep, meta["checksums"], sums, strict=True)
    ):
        if max(groups) >= s.n_groups or len(set(groups)) != len(groups):
            return f"layer {i} keeps groups {groups}, it has {s.n_groups}"
        # Summed in float64: another device's order changes it by ~1e-16 of the magnitude.
        tol = 1e-9 * max(float(want.get("abs_sum", 0.0)), 1e-30)
        if any(abs(got[k] - float(want.get(k, math.nan))) > tol for k in ("sum", "abs_sum")) or any(
            math.isnan(float(want.get(k, math.nan))) for k in ("sum", "abs_sum")
        ):
            return f"layer {i}'s attention weights are not those that were pruned"
    return None
