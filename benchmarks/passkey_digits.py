"""Where a passkey answer goes wrong: teacher-forced accuracy of each answer digit, for a run of
``benchmarks/context_extension.py`` (docs/results.md#context).

The first digit needs the key found; each later one needs the right neighbour copied, which a
match on the previous digit alone gets wrong where a digit repeats in the key.

    python benchmarks/passkey_digits.py runs/extension-passkey runs/extension-passkey2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from context_extension import ANSWER, CLASSIC, DEPTHS
from memext import build_model
from memext import checkpoint as ckpt
from memext.config import Config
from memext.data.sampling import task_batch
from memext.data.tasks import Filler, make_samples
from memext.tokenizer import ByteTokenizer


@torch.no_grad()
def digit_accuracy(model, tok, filler, length: int, n: int, seed: int) -> tuple[list[float], float]:
    """Per-position accuracy of the answer digits and exact match, ``n`` samples per depth."""
    samples = [
        s
        for d in DEPTHS
        for s in make_samples("passkey", tok, filler, length - ANSWER + 1, d, n, seed)
    ]
    x, y, mask = task_batch(samples)
    right = (model(x)[0].argmax(-1) == y)[mask].reshape(len(samples), ANSWER).float()
    return right.mean(0).tolist(), right.all(1).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--samples", type=int, default=8, help="per depth")
    p.add_argument("--seed", type=int, default=4242, help="not the sweep's seeds")
    args = p.parse_args()
    tok = ByteTokenizer()
    filler = Filler.from_text(tok, CLASSIC)
    for run in args.runs:
        model = build_model(Config.load(run / ckpt.CONFIG).model, seed=0).eval()
        ckpt.load_weights(model, run / ckpt.WEIGHTS)
        digits, exact = digit_accuracy(model, tok, filler, args.length, args.samples, args.seed)
        print(
            f"{run}: digits {' '.join(f'{a:.2f}' for a in digits)}  exact {exact:.2f} "
            f"({len(DEPTHS) * args.samples} samples at {args.length})"
        )


if __name__ == "__main__":
    main()
