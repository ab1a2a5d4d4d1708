"""Training throughput of memext's presets against a plain PyTorch causal LM of identical shape.

The memext side times memext's own training step: the model from ``build_model``, the optimizer
from ``memext.train.step.build_optimizer``, the lr from ``memext.train.schedule.lr_at`` and the
step itself from ``memext.train.step.train_step`` (what ``train()`` calls every step: forward
under memext's autocast, ``F.cross_entropy`` on ``logits.float()``, backward, ``clip_grad_norm_``,
``opt.step()``, ``opt.zero_grad(set_to_none=True)``, and host reads of the loss and grad norm).

The reference is a minimal nanoGPT-style model written below: token embedding, pre-norm RMSNorm
blocks with rotary (rotate-half layout) attention through ``F.scaled_dot_product_attention``
(``is_causal=True``), a SwiGLU feed-forward of the same hidden width, a final norm and a tied
output head; trained with the same AdamW settings (betas, weight-decay groups, clipping).

Both run in one process, on the same thread count and the same random batches, warm-up excluded,
in interleaved repeats so that drift on a shared machine hits both: within each repeat the two
sides alternate step by step (A B, B A, A B, ...; ``--interleave run`` alternates whole runs
instead). The figure of merit is the per-repeat ratio memext / reference (median, min, max).
Because load from other processes only ever adds time, in bursts, three burst-robust views are
reported too: the ratio of the sides' median step times, of their fastest steps, and the median
of the per-step-pair ratios (adjacent steps see nearly the same machine).

    python benchmarks/train_throughput.py --presets tiny,small --repeats 5 --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memext
from memext.config import Config, ModelConfig
from memext.model import build_model
from memext.train.schedule import lr_at
from memext.train.step import build_optimizer, train_step

# Batch sizes used on CPU when --batch-size does not say otherwise: `small` trains on
# seq_len 1024 x batch 16, far too slow for a 2-core benchmark, so its batch is shrunk (never the
# architecture). On CUDA every preset keeps its own batch size.
CPU_BATCH = {"small": 2, "base": 1}


# --------------------------------------------------------------------------------------------
# The reference: a plain causal LM, one file, simple modules.
# --------------------------------------------------------------------------------------------


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RefAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=False)  # [q | k | v]
        self.c_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q = q.view(b, t, self.n_heads, -1).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, self.n_heads, -1).transpose(1, 2)
        v = v.view(b, t, self.n_heads, -1).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class RefMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, hidden: int, eps: float):
        super().__init__()
        self.ln_1 = nn.RMSNorm(d_model, eps=eps)
        self.attn = RefAttention(d_model, n_heads)
        self.ln_2 = nn.RMSNorm(d_model, eps=eps)
        self.mlp = RefMLP(d_model, hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(
        self,
        vocab: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        hidden: int,
        max_len: int,
        eps: float = 1e-5,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.h = nn.ModuleList(RefBlock(d_model, n_heads, hidden, eps) for _ in range(n_layers))
        self.ln_f = nn.RMSNorm(d_model, eps=eps)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        head_dim = d_model // n_heads
        inv_freq = 1.0 / rope_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(max_len).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("c_proj.weight", "w2.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers) if residual else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        x = self.wte(idx)
        for block in self.h:
            x = block(x, cos, sin)
        return self.lm_head(self.ln_f(x))


def ref_from_config(m: ModelConfig, max_len: int) -> RefGPT:
    return RefGPT(
        m.vocab_size,
        m.d_model,
        m.n_layers,
        m.n_heads,
        m.ffn_hidden,
        max_len,
        m.norm_eps,
        m.rope_base,
    )


def ref_optimizer(model: RefGPT, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Same grouping as memext: matrices decay, norms and the (tied) embedding do not.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("wte.")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("wte.")]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))  # torch's default implementation


@torch.no_grad()
def copy_memext_weights(ref: RefGPT, mx: nn.Module) -> None:
    """Load a memext LongLM's weights into the reference (to check both compute one function)."""
    ref.wte.weight.copy_(mx.embed.weight)
    ref.ln_f.weight.copy_(mx.norm.weight)
    for rb, mb in zip(ref.h, mx.blocks, strict=True):
        rb.ln_1.weight.copy_(mb.attn_norm.weight)
        rb.ln_2.weight.copy_(mb.ffn_norm.weight)
        rb.attn.c_attn.weight.copy_(mb.attn.qkv.weight)
        rb.attn.c_proj.weight.copy_(mb.attn.out.weight)
        gate, up = mb.ffn.gate_up.weight.chunk(2, dim=0)
        rb.mlp.w1.weight.copy_(gate)
        rb.mlp.w3.weight.copy_(up)
        rb.mlp.w2.weight.copy_(mb.ffn.down.weight)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


# --------------------------------------------------------------------------------------------
# The two training steps.
# --------------------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    model: nn.Module
    run: Callable[[int], None]  # run(n): n optimizer steps
    tokens_per_s: list[float] = field(default_factory=list)  # one figure per repeat
    step_times: list[list[float]] = field(default_factory=list)  # seconds, per repeat, per step


def memext_side(cfg: Config, device: torch.device, batches: list[tuple[Tensor, Tensor]]) -> Side:
    """memext's trainer step: the model, optimizer and step function ``train()`` itself uses."""
    t = cfg.train
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, seed=t.seed).to(device)
    opt = build_optimizer(model, cfg)
    model.train()
    step = 0

    def run(n: int) -> None:
        nonlocal step
        for _ in range(n):
            micro = [batches[step % len(batches)]]  # grad_accum == 1: one micro-batch
            loss, _ = train_step(model, model, opt, micro, lr_at(step, t), t, device)
            if not math.isfinite(loss):
                raise RuntimeError(f"memext loss became {loss}")
            step += 1

    return Side("memext", model, run)


def reference_side(cfg: Config, device: torch.device, batches: list[tuple[Tensor, Tensor]]) -> Side:
    t = cfg.train
    torch.manual_seed(t.seed)
    model = ref_from_config(cfg.model, t.seq_len).to(device)
    opt = ref_optimizer(model, t.lr, t.weight_decay)
    ctx = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        if device.type == "cuda"  # as memext's precision "auto" does on a GPU
        else contextlib.nullcontext
    )
    model.train()
    step = 0

    def get_lr(it: int) -> float:  # warmup + cosine, as nanoGPT does
        if it < t.warmup_steps:
            return t.lr * (it + 1) / t.warmup_steps
        ratio = min(1.0, (it - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        floor = t.lr * t.min_lr_ratio
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - floor)

    def run(n: int) -> None:
        nonlocal step
        for _ in range(n):
            for group in opt.param_groups:
                group["lr"] = get_lr(step)
            x, y = batches[step % len(batches)]
            with ctx():
                logits = model(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1

    return Side("reference", model, run)


def timed_step(side: Side, device: torch.device) -> float:
    """Seconds for one optimizer step of ``side`` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    side.run(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def run_repeat(
    sides: list[Side], steps: int, r: int, interleave: str, device: torch.device
) -> None:
    """One repeat: ``steps`` timed steps per side, interleaved by step or by run.

    The side that goes first alternates (A B, B A, ...) so neither always runs right after the
    other has filled the caches; ``interleave="step"`` alternates every step, so a burst of load
    from another process hits both sides almost equally even within one repeat.
    """
    for side in sides:
        side.step_times.append([])
    if interleave == "step":
        for i in range(steps):
            for side in sides if (r * steps + i) % 2 == 0 else sides[::-1]:
                side.step_times[-1].append(timed_step(side, device))
    else:
        for side in sides if r % 2 == 0 else sides[::-1]:
            for _ in range(steps):
                side.step_times[-1].append(timed_step(side, device))


# --------------------------------------------------------------------------------------------
# FLOPs (PaLM appendix B): 6 N + 12 L H Q T per token, N without the embedding.
# --------------------------------------------------------------------------------------------


def flops_per_token(m: ModelConfig, non_embedding_params: int, seq_len: int) -> int:
    return 6 * non_embedding_params + 12 * m.n_layers * m.n_heads * m.head_dim * seq_len


def check_same_function(cfg: Config, device: torch.device) -> float:
    """Both models, given memext's weights, give the same logits (fp32, short input)."""
    mx = build_model(cfg.model, seed=cfg.train.seed).to(device).eval()
    ref = ref_from_config(cfg.model, cfg.train.seq_len).to(device).eval()
    copy_memext_weights(ref, mx)
    x = torch.randint(0, cfg.model.vocab_size, (2, min(64, cfg.train.seq_len)), device=device)
    with torch.no_grad():
        diff = (mx(x)[0].float() - ref(x).float()).abs().max().item()
    if diff > 1e-3:
        raise AssertionError(f"reference and memext disagree on the logits (max |diff| {diff})")
    return diff


def bench_preset(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = Config.preset(name)
    batch_preset = cfg.train.batch_size
    if name in args.batch_size:
        batch = args.batch_size[name]
    elif device.type == "cpu":
        batch = CPU_BATCH.get(name, batch_preset)
    else:
        batch = batch_preset
    # Attention alone (no memory, one pass): the reference model has the same shape and math.
    cfg = cfg.replace(**{"train.batch_size": batch, "model.memory": "none", "train.segment_len": 0})
    m, t = cfg.model, cfg.train
    # The step below is the presets' step: one micro-batch, eager, no checkpointing.
    if t.grad_accum != 1 or t.compile or t.activation_checkpointing:
        raise SystemExit(f"{name}: grad_accum/compile/activation_checkpointing are not benchmarked")
    seq = t.seq_len

    diff = check_same_function(cfg, device)
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(args.distinct_batches):
        tok = torch.randint(0, m.vocab_size, (batch, seq + 1), generator=gen)
        batches.append((tok[:, :-1].contiguous().to(device), tok[:, 1:].contiguous().to(device)))

    sides = [memext_side(cfg, device, batches), reference_side(cfg, device, batches)]
    n_mx, n_ref = n_params(sides[0].model), n_params(sides[1].model)
    assert n_mx == n_ref, f"parameter counts differ: memext {n_mx:,} vs reference {n_ref:,}"
    non_embed = sides[0].model.num_params()
    fpt = flops_per_token(m, non_embed, seq)
    tokens_per_step = batch * seq

    for side in sides:
        side.run(args.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    for r in range(args.repeats):
        run_repeat(sides, args.steps, r, args.interleave, device)
        for side in sides:
            side.tokens_per_s.append(tokens_per_step * args.steps / sum(side.step_times[-1]))
        if not args.quiet:
            print(
                f"  {name} repeat {r + 1}/{args.repeats}: memext "
                f"{sides[0].tokens_per_s[-1]:,.0f} tok/s, reference "
                f"{sides[1].tokens_per_s[-1]:,.0f} tok/s",
                flush=True,
            )

    mx_tps, ref_tps = sides[0].tokens_per_s, sides[1].tokens_per_s
    ratios = [a / b for a, b in zip(mx_tps, ref_tps, strict=True)]
    # Burst-robust views (load from other processes only ever adds time): the median and the
    # fastest single step of each side, and the median of the ratios of adjacent step pairs.
    mx_steps = [s for rep in sides[0].step_times for s in rep]
    ref_steps = [s for rep in sides[1].step_times for s in rep]
    mx_step, ref_step = statistics.median(mx_steps), statistics.median(ref_steps)
    pair_ratios = [b / a for a, b in zip(mx_steps, ref_steps, strict=True)]
    result: dict[str, Any] = {
        "preset": name,
        "shape": {
            "vocab_size": m.vocab_size,
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "head_dim": m.head_dim,
            "ffn_hidden": m.ffn_hidden,
            "tie_embeddings": m.tie_embeddings,
            "params": n_mx,
            "non_embedding_params": non_embed,
        },
        "batch": batch,
        "preset_batch": batch_preset,
        "batch_shrunk": batch != batch_preset,
        "seq_len": seq,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": args.warmup,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "logits_max_abs_diff": diff,
        "memext_tokens_per_s": [round(v, 1) for v in mx_tps],
        "reference_tokens_per_s": [round(v, 1) for v in ref_tps],
        "ratio_per_repeat": [round(v, 4) for v in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "interleave": args.interleave,
        "memext_step_seconds": [[round(s, 5) for s in rep] for rep in sides[0].step_times],
        "reference_step_seconds": [[round(s, 5) for s in rep] for rep in sides[1].step_times],
        "memext_median_step_s": round(mx_step, 5),
        "reference_median_step_s": round(ref_step, 5),
        "median_step_ratio": round(ref_step / mx_step, 4),
        "memext_fastest_step_s": round(min(mx_steps), 5),
        "reference_fastest_step_s": round(min(ref_steps), 5),
        "fastest_step_ratio": round(min(ref_steps) / min(mx_steps), 4),
        "step_pair_ratios": [round(v, 4) for v in pair_ratios],
        "step_pair_ratio_median": round(statistics.median(pair_ratios), 4),
        "memext_tokens_per_s_median": round(statistics.median(mx_tps), 1),
        "reference_tokens_per_s_median": round(statistics.median(ref_tps), 1),
        "flops_per_token": fpt,
        "memext_flops_per_s_median": fpt * statistics.median(mx_tps),
        "reference_flops_per_s_median": fpt * statistics.median(ref_tps),
    }
    if device.type == "cuda":
        peak = args.peak_tflops * 1e12
        result["peak_tflops"] = args.peak_tflops
        result["memext_mfu_median"] = result["memext_flops_per_s_median"] / peak
        result["reference_mfu_median"] = result["reference_flops_per_s_median"] / peak
    return result


def print_table(results: list[dict[str, Any]], device: torch.device, threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    cuda = device.type == "cuda"
    table = Table(
        title=f"training throughput, {device.type}, {threads} threads, torch {torch.__version__}"
    )
    for col in ("preset", "batch x seq", "repeat", "memext tok/s", "reference tok/s", "ratio"):
        table.add_column(col, justify="right" if col != "preset" else "left")
    for res in results:
        batch = f"{res['batch']}x{res['seq_len']}"
        if res["batch_shrunk"]:
            batch += f" (preset batch {res['preset_batch']})"
        rows = zip(
            res["memext_tokens_per_s"],
            res["reference_tokens_per_s"],
            res["ratio_per_repeat"],
            strict=True,
        )
        for i, (a, b, r) in enumerate(rows):
            first = i == 0
            table.add_row(
                res["preset"] if first else "",
                batch if first else "",
                str(i + 1),
                f"{a:,.0f}",
                f"{b:,.0f}",
                f"{r:.3f}",
            )
        mx, ref = res["memext_tokens_per_s_median"], res["reference_tokens_per_s_median"]
        table.add_row(
            "",
            "",
            "median of repeats",
            f"{mx:,.0f}",
            f"{ref:,.0f}",
            f"[bold]{res['ratio_median']:.3f}",
        )
        table.add_row("", "", "min of repeats", "", "", f"{res['ratio_min']:.3f}")
        table.add_row("", "", "max of repeats", "", "", f"{res['ratio_max']:.3f}")
        tps = res["tokens_per_step"]
        table.add_row(
            "",
            "",
            "median step",
            f"{tps / res['memext_median_step_s']:,.0f}",
            f"{tps / res['reference_median_step_s']:,.0f}",
            f"{res['median_step_ratio']:.3f}",
        )
        table.add_row(
            "",
            "",
            "fastest step",
            f"{tps / res['memext_fastest_step_s']:,.0f}",
            f"{tps / res['reference_fastest_step_s']:,.0f}",
            f"{res['fastest_step_ratio']:.3f}",
        )
        table.add_row(
            "",
            "",
            "step pairs, median",
            "",
            "",
            f"{res['step_pair_ratio_median']:.3f}",
            end_section=True,
        )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    flops = Table(title="model FLOPs (PaLM: 6N + 12·L·H·Q·T per token, N without embeddings)")
    cols = ["preset", "params (non-emb)", "FLOPs/token", "memext FLOP/s", "reference FLOP/s"]
    if cuda:
        cols += ["memext MFU", "reference MFU"]
    for col in cols:
        flops.add_column(col, justify="right" if col != "preset" else "left")
    for res in results:
        row = [
            res["preset"],
            f"{res['shape']['params']:,} ({res['shape']['non_embedding_params']:,})",
            f"{res['flops_per_token'] / 1e6:.2f} M",
            f"{res['memext_flops_per_s_median'] / 1e9:.1f} G",
            f"{res['reference_flops_per_s_median'] / 1e9:.1f} G",
        ]
        if cuda:
            row += [f"{res['memext_mfu_median']:.1%}", f"{res['reference_mfu_median']:.1%}"]
        flops.add_row(*row)
    console.print(flops)


def parse_batch_sizes(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if not value:
            raise argparse.ArgumentTypeError(
                f"--batch-size wants PRESET=N[,PRESET=N], got {item!r}"
            )
        out[name.strip()] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny,small", help="comma-separated preset names")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per side")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before timing")
    p.add_argument(
        "--batch-size",
        type=parse_batch_sizes,
        default={},
        help="override batch sizes, e.g. 'small=4' (CPU default: small=2; preset's otherwise)",
    )
    p.add_argument(
        "--interleave",
        choices=("step", "run"),
        default="step",
        help="alternate the sides every step (default) or every run of --steps steps",
    )
    p.add_argument("--distinct-batches", type=int, default=4, help="random batches cycled through")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak for MFU (cuda only)")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    p.add_argument("--quiet", action="store_true", help="no per-repeat progress lines")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    print(f"torch {torch.__version__}, device {device}, torch.get_num_threads() = {threads}")

    results = []
    for name in presets:
        res = bench_preset(name, args, device)
        results.append(res)
        note = (
            f" (batch shrunk from the preset's {res['preset_batch']} for {device.type})"
            if res["batch_shrunk"]
            else ""
        )
        print(f"{name}: batch {res['batch']} x seq {res['seq_len']}{note}; {res['shape']}")
    print_table(results, device, threads)

    payload = {
        "benchmark": "train_throughput",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "memext": memext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "threads": threads,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
