"""The trainer: exact resumption, Ctrl-C, divergence, and never overwriting a run by accident."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memext import Config, load
from memext.checkpoint import read_metrics
from memext.errors import MemextError
from memext.evals.probes import training_probes
from memext.train import TrainingDiverged, train

# A small architecture keeps these tests fast; the presets themselves are exercised elsewhere.
SMALL = {
    "model.d_model": "32",
    "model.n_layers": "2",
    "model.n_heads": "2",
    "model.max_seq_len": "256",
    "train.seq_len": "32",
    "train.segment_len": "0",  # resumption of the plain model (segments: test_train_segments)
    "model.memory": "none",
    "data.mixture": "[]",  # corpus text only (the tiny preset also trains on passkeys)
    "train.curriculum": "",
    "train.curriculum_steps": "",
    "train.batch_size": "4",
    "train.log_every": "1",
    "train.eval_tokens": "256",
    "train.warmup_steps": "2",
    "eval.lengths": "32,64",
    "eval.max_tokens": "256",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 80)
    return root


def _cfg(corpus: Path, **extra: str) -> Config:
    return Config.preset("tiny").override({**SMALL, "data.corpus": str(corpus), **extra})


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "8", "train.save_every": "100", "train.eval_every": "4"})
    full = train(cfg, tmp_path / "full", progress=False, log=lambda m: None)
    assert full.status == "completed" and full.step == 8

    def stop_at_3(loop):
        if loop.step == 3:
            loop.stop_requested = True

    part = train(cfg, tmp_path / "part", progress=False, callback=stop_at_3, log=lambda m: None)
    assert part.status == "interrupted" and part.step == 3
    assert [s for s, _ in _losses(tmp_path / "part")] == [1, 2, 3]
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False, log=lambda m: None)
    assert resumed.status == "completed" and resumed.step == 8
    # Bit-identical on CPU with the same thread count: compare the floats exactly.
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a, _ = load(tmp_path / "full")
    b, _ = load(tmp_path / "part")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# The CLI in a child process, with a training callback that parks the run at step STOP_AT (its
# SIGINT handler installed, steps done) and says so in a file, until the signal has arrived. The
# test then sends a real SIGINT from outside, so the interrupt lands at a known step however fast
# or slow the machine is: nothing can finish first, and nothing is skipped.
PARK_AT_STEP = """
import functools, os, sys, time
import memext.train

STOP_AT, MARK = int(sys.argv[1]), sys.argv[2]
plain = memext.train.train

@functools.wraps(plain)  # the CLI reads the library's defaults from this signature
def train(*args, **kwargs):
    theirs = kwargs.get("callback")

    def park(loop):
        if theirs is not None:
            theirs(loop)
        if loop.step == STOP_AT:
            open(MARK, "w").close()
            deadline = time.time() + 120
            while not loop.stop_requested and time.time() < deadline:
                time.sleep(0.01)

    kwargs["callback"] = park
    return plain(*args, **kwargs)

memext.train.train = train  # before the CLI imports it
from memext.cli import main

sys.argv = ["memext", *sys.argv[3:]]
main()
"""


def test_real_ctrl_c_saves_and_resume_matches(tmp_path, corpus):
    """SIGINT to the CLI mid-run: exit 130 with a checkpoint; resuming reproduces every loss."""
    steps, stop_at = 12, 5
    sets = [f"--set={k}={v}" for k, v in SMALL.items()] + [
        f"--set=data.corpus={corpus}",
        f"--set=train.steps={steps}",
        "--set=train.save_every=100000",
        "--set=train.eval_every=0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["train", "--no-eval", "--device", "cpu", *sets]
    mark = tmp_path / "parked"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PARK_AT_STEP,
            str(stop_at),
            str(mark),
            *args,
            "--out",
            str(tmp_path / "a"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not mark.exists():
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run never reached step {stop_at} (exit {proc.returncode}): {err}")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupt: finishing this step" in err
    assert f"interrupted at step {stop_at}" in out
    assert max(s for s, _ in _losses(tmp_path / "a")) == stop_at
    cmd = [sys.executable, "-m", "memext"]
    done = subprocess.run(
        [*cmd, "train", "--no-eval", "--resume", str(tmp_path / "a")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    straight = subprocess.run(
        [*cmd, *args, "--out", str(tmp_path / "b")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    assert [s for s, _ in _losses(tmp_path / "b")] == list(range(1, steps + 1))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "10", "train.save_every": "2", "train.eval_every": "0"})

    def poison(loop):
        if loop.step == 3:
            with torch.no_grad():
                loop.model.embed.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="loss became nan at step 4"):
        train(cfg, tmp_path / "run", progress=False, callback=poison, log=lambda m: None)
    model, _ = load(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(s for s, _ in _losses(tmp_path / "run")) == 2
    assert all(math.isfinite(v) for _, v in _losses(tmp_path / "run"))


def test_existing_run_is_refused_and_left_untouched(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "2", "train.eval_every": "0"})
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(MemextError, match="already holds a run"):
        train(cfg, run, progress=False, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    with pytest.raises(MemextError, match="contradict"):
        train(cfg, run, resume=True, overwrite=True, progress=False, log=lambda m: None)
    again = train(
        cfg.override({"train.steps": "3"}), run, overwrite=True, progress=False, log=lambda m: None
    )
    assert again.step == 3


def test_resume_refuses_corrupt_training_state(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "2", "train.eval_every": "0"})
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda m: None)
    (run / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MemextError, match="corrupt or foreign"):
        train(
            cfg.override({"train.steps": "4"}), run, resume=True, progress=False, log=lambda m: None
        )


def test_resume_refuses_changed_corpus(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "2", "train.eval_every": "0"})
    train(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    (corpus / "doc0.txt").write_text("changed text " * 200)
    with pytest.raises(MemextError, match="corpus changed"):
        train(
            cfg.override({"train.steps": "4"}),
            tmp_path / "run",
            resume=True,
            progress=False,
            log=lambda m: None,
        )


def test_metrics_and_run_info_record_provenance(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "4", "train.eval_every": "2"})
    train(cfg, tmp_path / "run", progress=False, log=lambda m: None, probes=training_probes(cfg))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(info["corpus_hash"]) == 64 and info["threads"] == torch.get_num_threads()
    vals = [r for r in read_metrics(tmp_path / "run") if "val_bits_per_byte" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(0 < r["val_bits_per_byte"] < 12 for r in vals)


def test_mixture_run_resumes_exactly(tmp_path, corpus):
    cfg = _cfg(
        corpus,
        **{
            "model.memory": "xl",
            "model.mem_len": "32",
            "train.segment_len": "128",
            "train.seq_len": "128",
            "train.steps": "6",
            "train.save_every": "100",
            "train.eval_every": "3",
            "eval.probes": "passkey@256",
            "eval.probe_samples": "4",
            "data.mixture": "[{task: lm, batch_size: 2}, "
            "{task: passkey, batch_size: 2, lengths: [128, 256], near: 0.5, share: 2}]",
        },
    )
    quiet = {"progress": False, "log": lambda m: None}
    train(cfg, tmp_path / "full", probes=training_probes(cfg), **quiet)

    def stop_at_2(loop):
        if loop.step == 2:
            loop.stop_requested = True

    train(cfg, tmp_path / "part", callback=stop_at_2, probes=training_probes(cfg), **quiet)
    train(cfg, tmp_path / "part", resume=True, probes=training_probes(cfg), **quiet)
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")

    def measured(rows):  # everything but the wall-clock speed
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert measured(part) == measured(full)
    assert [r["step"] for r in full if "probe/passkey@256" in r] == [3, 6]
    assert [r.get("loss/passkey") for r in part] == [r.get("loss/passkey") for r in full]
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    assert all("loss/lm" in r for r in full if "loss" in r)


def test_non_finite_gradient_is_not_stepped(tmp_path, corpus):
    cfg = _cfg(corpus, **{"train.steps": "10", "train.save_every": "2", "train.eval_every": "0"})

    def poison(loop):
        if loop.step == 3:  # the loss stays finite; only the gradient blows up
            loop.model.embed.weight.register_hook(lambda g: g * float("inf"))

    with pytest.raises(TrainingDiverged, match=r"gradient norm became .* at step 4"):
        train(cfg, tmp_path / "run", progress=False, callback=poison, log=lambda m: None)
    model, _ = load(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
