"""How far does each memory reach? Passkey retrieval beyond the attention window.

Every variant is the same tiny Transformer (or an LSTM of the same width and depth), trained
identically (same steps, batches, schedule) on passkey samples, the loss being language modelling
over the whole sample with the answer weighted to half of it. The filler is the classic passkey
filler (Mohtashami & Jaggi 2023: "The grass is green. The sky is blue..."), so that a CPU budget
of minutes goes to learning retrieval rather than Python; `--filler stdlib` uses the built-in
corpus instead. Long input is read in segments of W tokens with the state carried.
Then each model reads passkey prompts of L + W tokens (L = W, 4W, 16W, 64W) with the key at
depth 0 .. 1 of the first L tokens and at least W tokens before the question, so a model that
sees only the last W tokens cannot answer: its accuracy is chance (1e-5 for 5 random digits).

    python benchmarks/memory_tasks.py                 # all variants, 1500 + 1500 steps each
    python benchmarks/memory_tasks.py --only knn --steps 100 --lengths 1,4

Writes benchmarks/results/memory_tasks.json and memory_tasks.png (a heatmap per variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from memext import build_model
from memext.config import Config, EvalConfig, ModelConfig, TrainConfig
from memext.data.sampling import task_batch
from memext.data.tasks import PASSKEY_QUESTION, PASSKEY_SENTENCE, Filler, make_samples
from memext.evals.tasks import evaluate_samples
from memext.runtime import command_line, provenance
from memext.tokenizer import ByteTokenizer
from memext.train import build_optimizer
from memext.train.schedule import lr_at
from memext.train.trainer import sequence_backward

W = 128
BASE = ModelConfig(d_model=64, n_layers=2, n_heads=2, max_seq_len=4 * W)

# The budgets of the issue: xl mem_len <= 4W; compressive mem_len <= 2W plus <= 2W compressed
# slots; tokens m <= 16; knn stores every key of one layer and retrieves top-32 per query.
VARIANTS: dict[str, dict] = {
    "window": {"attention": "sliding", "window": W, "memory": "xl", "mem_len": W},
    "lstm": {"arch": "lstm"},
    "xl": {"memory": "xl", "mem_len": 4 * W},
    "compressive": {"memory": "compressive", "mem_len": 2 * W, "cmem_len": 2 * W, "cmem_rate": 4},
    "tokens": {"memory": "tokens", "mem_tokens": 16},
    "knn": {"memory": "knn", "mem_len": W, "knn_topk": 32, "knn_layer": 1},
}
# Segments per truncated-backprop window: RMT and the LSTM learn to write memory only through
# backprop across segments; the attention memories are read-only at training time (stop-grad).
BPTT = {"tokens": 0, "lstm": 0}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER = 5  # digits
CLASSIC = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def model_config(name: str) -> ModelConfig:
    return dataclasses.replace(BASE, **VARIANTS[name])


def near_depth(tok, length: int) -> float:
    """The smallest depth that puts the whole key sentence inside the question's window."""
    sizes = [len(tok.encode(t)) for t in (*PASSKEY_SENTENCE, PASSKEY_QUESTION)]
    free = length - sum(sizes) - 2 * ANSWER
    return min(1.0, max(0.0, (length - W) / free))


def train_batch(
    tok,
    filler,
    rng: np.random.Generator,
    batch: int,
    step: int,
    seed: int,
    near: float,
    warm: bool = False,
):
    """Passkey samples of 2..4 segments (a random count per step); weights put half the loss on
    the answer. A fraction ``near`` of them has the key inside the question's window, the rest
    has it >= W before the question. Near samples are the curriculum: they teach the attention
    memories' read path (stored keys are stop-gradient, so far samples alone give their key
    projections no signal to shape). ``warm``: one segment, key anywhere in it (the first stage
    of the curriculum, where retrieval is learned at all)."""
    n_seg = 1 if warm else int(rng.integers(2, 5))
    length = n_seg * W - (ANSWER - 1)
    low = near_depth(tok, length)
    samples = []
    for b in range(batch):
        is_near = warm or rng.uniform() < near
        depth = float(rng.uniform(low, 1.0) if is_near else rng.uniform())
        s = make_samples(
            "passkey",
            tok,
            filler,
            length,
            depth,
            1,
            seed * 1_000_003 + step * 64 + b,
            gap=0 if is_near else W,
        )[0]
        samples.append(s)
    x, y, mask = task_batch(samples)
    weights = torch.ones(x.shape, dtype=torch.float32)
    weights[mask] = (~mask).sum(dim=1, keepdim=True).expand_as(mask)[mask] / ANSWER
    return x, y, weights


def train_variant(
    name: str, steps: int, warm: int, seed: int, tok, filler, batch: int, near: float
) -> dict:
    """``warm`` one-segment steps, then ``steps`` steps of 2..4 segments; throughput is timed
    over the latter (the segment-wise reading the variants differ in)."""
    cfg = model_config(name)
    t = TrainConfig(
        seq_len=4 * W,
        segment_len=W,
        bptt=BPTT.get(name, 1),
        lr=3e-3,
        warmup_steps=50,
        steps=warm + steps,
        grad_clip=1.0,
    )
    torch.manual_seed(seed)
    model = build_model(cfg, seed=seed)
    opt = build_optimizer(model, Config(model=cfg, train=t, eval=EvalConfig(lengths=(W,))))
    rng = np.random.default_rng(seed)
    tokens, losses, t0 = 0, [], time.perf_counter()
    for step in range(warm + steps):
        if step == warm:
            tokens, t0 = 0, time.perf_counter()
        x, y, w = train_batch(tok, filler, rng, batch, step, seed, near, warm=step < warm)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        loss = sequence_backward(model, x, y, t, torch.device("cpu"), weights=w)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        tokens += x.numel()
        if (step + 1) % 50 == 0:
            print(f"  {name} step {step + 1} loss {np.mean(losses[-50:]):.3f}", flush=True)
    seconds = time.perf_counter() - t0
    return {
        "model": model.eval(),
        "steps": steps,
        "warm_steps": warm,
        "train_seconds": round(seconds, 1),
        "train_tokens_per_s": round(tokens / seconds, 1),
        "loss_first_50": float(np.mean(losses[:50])),
        "loss_last_50": float(np.mean(losses[-50:])),
        "params": sum(p.numel() for p in model.parameters()),
    }


@torch.no_grad()
def memory_bytes(model, length: int) -> int:
    """Bytes of carried state after reading ``length`` tokens of one sequence."""
    state = None
    x = torch.randint(0, 256, (1, length))
    for s in range(0, length, W):
        _, state = model(x[:, s : s + W], state)
    return sum(t.numel() * t.element_size() for t in (state.memory or {}).values())


def evaluate_variant(model, tok, filler, lengths, n: int, seed: int) -> list[dict]:
    rows = []
    for mult in lengths:
        length = mult * W
        for depth in DEPTHS:
            samples = make_samples(
                "passkey", tok, filler, length + W, depth, n, seed + 7919 * mult, gap=W
            )
            t0 = time.perf_counter()
            r = evaluate_samples(model, samples, W, batch_size=8)
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "context": length,
                    "context_in_W": mult,
                    "depth": depth,
                    "exact_match": r["exact_match"],
                    "token_accuracy": r["token_accuracy"],
                    "chance": r["chance"],
                    "n": r["n"],
                    "min_distance": min(s.meta["distance"] for s in samples),
                    "read_tokens_per_s": round(n * (length + W) / seconds, 1),
                }
            )
            print(
                f"  L={mult}W depth={depth:.2f}: exact {r['exact_match']:.2f} "
                f"tokens {r['token_accuracy']:.2f}",
                flush=True,
            )
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    fig, axes = plt.subplots(
        1, len(names), figsize=(2.4 * len(names), 3.2), squeeze=False, sharey=True
    )
    for ax, name in zip(axes[0], names, strict=True):
        rows = results["variants"][name]["passkey"]
        mults = sorted({r["context_in_W"] for r in rows})
        grid = np.array(
            [
                [
                    next(
                        r["exact_match"] for r in rows if r["context_in_W"] == m and r["depth"] == d
                    )
                    for m in mults
                ]
                for d in DEPTHS
            ]
        )
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(mults)), [f"{m}W" for m in mults])
        ax.set_yticks(range(len(DEPTHS)), [f"{d:.2f}" for d in DEPTHS])
        ax.tick_params(axis="y", labelleft=ax is axes[0][0])
        ax.set_title(name)
        ax.set_xlabel("context")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if grid[i, j] < 0.5 else "black",
                )
    axes[0][0].set_ylabel("key depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="passkey exact match")
    fig.suptitle(f"Passkey retrieval beyond a window of W={W} tokens", fontsize=10)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--only", default="knn,window,xl,compressive,tokens,lstm", help="comma-separated variants"
    )
    p.add_argument("--steps", type=int, default=1500, help="multi-segment steps per variant")
    p.add_argument(
        "--warm", type=int, default=1500, help="first-stage steps on one-segment samples"
    )
    p.add_argument("--lengths", default="1,4,16,64", help="contexts, in multiples of W")
    p.add_argument("--samples", type=int, default=8, help="samples per (length, depth) cell")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--near", type=float, default=0.5, help="fraction of training keys inside the window"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--filler", choices=("classic", "stdlib"), default="classic")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_tasks.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = ByteTokenizer()
    filler = Filler.stdlib(tok) if args.filler == "stdlib" else Filler.from_text(tok, CLASSIC)
    lengths = [int(v) for v in args.lengths.split(",")]
    results = {
        "window_W": W,
        "base_model": dataclasses.asdict(BASE),
        "steps_per_variant": args.steps,
        "depths": DEPTHS,
        "samples_per_cell": args.samples,
        "provenance": provenance(torch.device("cpu")),
        "command": command_line("benchmarks/memory_tasks.py", args, ("out",)),
        "variants": {},
    }
    if args.out.is_file():  # keep variants measured by an earlier call with --only
        results["variants"] = json.loads(args.out.read_text()).get("variants", {})
    for name in args.only.split(","):
        print(f"== {name}: {VARIANTS[name]}", flush=True)
        trained = train_variant(
            name, args.steps, args.warm, args.seed, tok, filler, args.batch, args.near
        )
        model = trained.pop("model")
        rows = evaluate_variant(model, tok, filler, lengths, args.samples, args.seed + 1)
        ctx = 16 * W
        kept = memory_bytes(model, ctx)
        results["variants"][name] = {
            "config": VARIANTS[name],
            "bptt": BPTT.get(name, 1),
            **trained,
            "memory_bytes_at_16W": kept,
            "memory_bytes_per_context_token_at_16W": round(kept / ctx, 1),
            "passkey": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print("\nexact match by context (mean over depths):")
    for name, v in results["variants"].items():
        by = {}
        for r in v["passkey"]:
            by.setdefault(r["context_in_W"], []).append(r["exact_match"])
        cells = "  ".join(f"{m}W {np.mean(a):.2f}" for m, a in sorted(by.items()))
        print(f"  {name:12s} {cells}   ({v['steps']} steps, {v['train_tokens_per_s']:.0f} tok/s)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
