"""Training with context parallelism (``train.context_parallel``) against one process.

``memext train --nproc 2 --set train.context_parallel=2`` (torchrun, gloo, 2 ranks x 1 thread):
one data-parallel replica of two context ranks, which read the same 4 rows and keep half of each
32-token sequence each (zig-zag), attention spanning them through the ring or Ulysses. One
process training the same config is the reference: losses and parameters within 1e-5 after a few
steps, the validation probe (rank 0 alone, on whole sequences) within 1e-5 too, and the run's
checkpoint read by one process. The model has no dropout, so no random draw differs.

The config errors (a length that does not cut into 2N chunks, a memory, a kernel the ring does not
run, a world the groups do not divide) are checked in this process, before anything is written.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memext
from memext import Config, load
from memext.checkpoint import WEIGHTS, read_metrics
from memext.data.mixture import Batch
from memext.dist.context import ContextParallel
from memext.dist.strategy import check_context_world
from memext.errors import MemextError
from memext.evals.probes import training_probes
from memext.train import train
from tiny_runs import tiny_train_settings

SRC = Path(memext.__file__).resolve().parents[1]
STEPS = 6
LIMIT = 240  # seconds one torchrun job may take before the test fails (not hangs)
TOL = 1e-5

SETTINGS = tiny_train_settings(STEPS, save_every=3, **{"eval.reach": ""})

# (train.cp_method, extra settings): the ring's two kernels and Ulysses; the sliding case also
# reads a weighted task (passkey: the answer's share of the loss) beside the text.
CASES = {
    "ring-full": ("ring", {}),
    "ulysses-full": ("ulysses", {}),
    "ring-sliding-passkey": (
        "ring",
        {
            "model.attention": "sliding",
            "model.window": "8",
            "data.mixture": "[{task: lm}, {task: passkey, lengths: [128]}]",
        },
    ),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 80)
    return root


def _settings(corpus: Path, extra: dict[str, str]) -> dict[str, str]:
    return {**SETTINGS, "data.corpus": str(corpus), **extra}


def _config(settings: dict[str, str]) -> Config:
    return Config.preset("tiny").override(settings)


def _train_here(settings: dict[str, str], out: Path) -> None:
    """Train in this process on one thread, as each rank does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _config(settings)
        train(cfg, out, progress=False, log=lambda m: None, probes=training_probes(cfg))
    finally:
        torch.set_num_threads(threads)


def _rows(run: Path) -> tuple[list[dict], dict]:
    """The run's training rows (step by step) and its last validation row."""
    rows = read_metrics(run)
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, STEPS + 1))
    return losses, [r for r in rows if "val_loss" in r][-1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _close(a: float, b: float, what: str) -> None:
    assert math.isclose(a, b, rel_tol=TOL, abs_tol=TOL), f"{what}: {a} vs {b}"


@pytest.mark.parametrize("case", list(CASES))
def test_two_context_ranks_train_as_one_process(tmp_path, corpus, case):
    method, extra = CASES[case]
    settings = _settings(corpus, extra)
    reference = tmp_path / "one"
    _train_here(settings, reference)

    out = tmp_path / "cp"
    sets = {**settings, "train.context_parallel": "2", "train.cp_method": method}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "memext", "train", "--nproc", "2", "--out", str(out)]
    proc = subprocess.run(
        [*command, "--no-eval", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    printed = " ".join(proc.stderr.split())  # the console wraps long lines
    assert (
        "global batch: 4 sequences per replica x 1 replica x 1 accumulation = 4 sequences of 32 "
        f"tokens per step; each sequence split over 2 context-parallel ranks (16 tokens each, "
        f"train.cp_method={method})"
    ) in printed
    assert proc.stdout.count(f"completed at step {STEPS}") == 1  # rank 0 alone reports

    mine, mine_val = _rows(out)
    theirs, their_val = _rows(reference)
    for a, b in zip(mine, theirs, strict=True):
        for key in ("loss", "grad_norm", *(k for k in b if k.startswith("loss/"))):
            _close(a[key], b[key], f"step {a['step']} {key}")
    _close(mine_val["val_loss"], their_val["val_loss"], "validation (rank 0, whole sequences)")

    assert (out / WEIGHTS).is_file()  # one weights file, read by one process
    model, cfg = load(out)
    assert cfg.train.context_parallel == 2
    assert type(model.blocks[0].attn.kernel).__name__ != "ContextKernel"
    expected, _ = load(reference)
    for name, p in model.state_dict().items():
        diff = (p - expected.state_dict()[name]).abs().max().item()
        assert diff <= TOL, f"{name} differs by {diff}"


# --- config errors, checked before anything is written --------------------------------------


def _error(corpus: Path, **extra: str) -> str:
    with pytest.raises(ValueError) as e:
        _config(_settings(corpus, {"train.context_parallel": "2", **extra}))
    return str(e.value)


def test_a_length_that_does_not_cut_into_2n_chunks_is_refused_naming_the_lengths_that_do(
    corpus,
):
    assert _error(corpus, **{"train.seq_len": "30"}) == (
        "train.seq_len=30 is invalid: expected a multiple of 4 with train.context_parallel=2 "
        "(each sequence is cut into 2 x 2 equal chunks, zig-zag), e.g. 28 or 32"
    )
    assert "train.curriculum=(64, 66) is invalid: expected a multiple of 4" in _error(
        corpus, **{"train.curriculum": "64,66", "train.curriculum_steps": "1,1"}
    )
    mixture = "[{task: lm}, {task: passkey, lengths: [128, 130]}]"
    assert "data.mixture[1].lengths=[128, 130] is invalid: expected a multiple of 4" in _error(
        corpus, **{"data.mixture": mixture}
    )


def test_what_context_parallelism_cannot_split_is_refused_in_one_line(corpus):
    memory = _error(corpus, **{"model.memory": "xl"})
    assert memory.startswith("model.memory='xl' is invalid: expected 'none' with ")
    ring = _error(corpus, **{"model.attention": "chunked"})
    assert ring.startswith(
        "model.attention='chunked' is invalid: expected 'full', or 'sliding' without dilation or "
        "global tokens, for train.cp_method='ring'"
    )
    dilated = {"model.attention": "sliding", "model.dilation": "2"}
    assert _error(corpus, **dilated).startswith("model.dilation=2 is invalid: expected 1")
    ulysses = {"train.cp_method": "ulysses"}
    assert "n_heads/N" in _error(corpus, **ulysses, **{"model.n_heads": "1"})
    assert "lsh" in _error(corpus, **ulysses, **{"model.attention": "lsh"})
    assert "'ddp'" in _error(corpus, **{"train.strategy": "fsdp"})
    _config(
        _settings(corpus, {"train.context_parallel": "2", **ulysses, "model.attention": "chunked"})
    )
    for error in (memory, ring):
        assert "\n" not in error


def test_a_world_the_groups_do_not_divide_is_refused_before_writing(tmp_path, corpus):
    out = tmp_path / "run"
    cfg = _config(_settings(corpus, {"train.context_parallel": "2"}))
    with pytest.raises(MemextError, match=r"this job has 1 rank, not a multiple of 2: start it "):
        train(cfg, out, progress=False, log=lambda m: None)
    assert not out.exists()
    with pytest.raises(MemextError, match=r"set train\.context_parallel to a divisor of 6"):
        check_context_world(4, 6)
    check_context_world(2, 6)


def test_a_shard_batch_loss_is_its_share_of_the_whole_mean():
    """Each rank's loss is its shard's sum over the whole rows' denominator / N: the ranks'
    losses then average to the mean over every token (or target weight) of the rows."""
    torch.manual_seed(0)
    x, y = torch.randint(0, 9, (2, 16)), torch.randint(0, 9, (2, 16))
    w = torch.rand(2, 16)
    nll = torch.rand(2, 16)  # a stand-in for the per-token loss, sharded like the targets
    for weights, denom in ((None, None), (w, None), (w, 3.5)):
        whole = Batch("t", 1.0, x, y, weights=weights, denom=denom)
        total = weights.sum() if weights is not None else y.numel()
        expected = (nll * (1 if weights is None else weights)).sum() / (denom or total)
        got = 0.0
        for rank in range(4):
            cp = ContextParallel(None, rank, 4)  # type: ignore[arg-type]
            part = cp.shard_batch(whole)
            assert part.x.shape == part.y.shape == (2, 4)
            lost = cp.shard_batch(Batch("t", 1.0, nll, y, weights=weights)).x
            got += float((lost * (1 if part.weights is None else part.weights)).sum()) / part.denom
        assert math.isclose(got / 4, float(expected), rel_tol=1e-6)
