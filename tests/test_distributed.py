"""Training on several processes (torchrun, gloo, 2 ranks x 1 thread) against one process.

The reference is one process training a batch of 4 rows; two ranks each read 2 of those rows
(``memext.data.sampling.rows``), so their averaged gradients are the reference's up to the order of
float additions. The model has no dropout (``model.dropout`` is 0 here, its default), so no
random draw differs between ranks and the reference either. Losses are compared to 1e-6
relative (DDP) and 1e-5 (FSDP), parameters to 1e-6 and 1e-5 absolute.

The ranks are started by torchrun: through ``memext train --nproc``, ``torchrun -m memext
train``, or ``tests/dist_worker.py`` (the library under torchrun, for what the command line
cannot do: stop at a step, kill a rank, measure each rank's bytes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import memext
from memext import Config, dcp, load
from memext.checkpoint import SHARDED, WEIGHTS, read_metrics
from memext.dist.strategy import held_bytes
from memext.errors import MemextError
from memext.train import train
from tiny_runs import tiny_train_settings

SRC = Path(memext.__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS = 20
LIMIT = 240  # seconds one torchrun job may take before the test fails (not hangs)

SETTINGS = tiny_train_settings(STEPS, save_every=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps. " * 80)
    return root


def _settings(corpus: Path, **extra: str) -> dict[str, str]:
    return {**SETTINGS, "data.corpus": str(corpus), **extra}


def _train_here(settings: dict[str, str], out: Path, **kwargs) -> memext.train.TrainResult:
    """Train in this process on one thread, as each rank does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = Config.preset("tiny").override(settings)
        return train(cfg, out, progress=False, log=lambda m: None, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process, the whole batch: its losses, weights and held bytes after step 1."""
    out = tmp_path_factory.mktemp("reference") / "run"
    held: dict[str, int] = {}

    def measure(loop) -> None:
        if loop.step == 1:
            held.update(held_bytes(loop.model, loop.opt))

    _train_here(_settings(corpus), out, callback=measure)
    model, _ = load(out)
    return {"losses": _losses(out), "weights": model.state_dict(), "bytes": held}


def _losses(run: Path) -> list[float]:
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(command: list[str], timeout: float = LIMIT) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _torchrun(*args: str, nproc: int = 2, restarts: int = 0) -> subprocess.CompletedProcess:
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--max-restarts={restarts}",
            *args,
        ]
    )


def _worker(out: Path, settings: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    path = out.parent / f"{out.name}.settings.json"
    path.write_text(json.dumps(settings))
    return _torchrun(str(WORKER), str(out), str(path), *args, **kw)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert math.isclose(x, y, rel_tol=rel, abs_tol=rel), f"step {step}: {x} vs {y}"


def _same_weights(run: Path, reference: dict, tol: float) -> None:
    model, _ = load(run)  # a sharded run too: read into this one process
    for name, p in model.state_dict().items():
        diff = (p - reference["weights"][name]).abs().max().item()
        assert diff <= tol, f"{name} differs by {diff}"


def test_ddp_two_ranks_match_one_process(tmp_path, corpus, reference):
    """`memext train --nproc 2` (torchrun, DDP): each rank reads half the batch."""
    out = tmp_path / "ddp"
    sets = [a for k, v in _settings(corpus).items() for a in ("--set", f"{k}={v}")]
    proc = _run(
        [
            sys.executable,
            "-m",
            "memext",
            "train",
            "--nproc",
            "2",
            "--out",
            str(out),
            "--no-eval",
            *sets,
        ]
    )
    _ok(proc)
    printed = " ".join(proc.stderr.split())  # the console wraps long lines
    assert "global batch: 2 sequences per rank x 2 ranks x 1 accumulation = 4" in printed
    assert proc.stdout.count("completed at step 20") == 1  # rank 0 alone reports
    assert (out / WEIGHTS).is_file() and not (out / SHARDED).exists()
    _close(_losses(out), reference["losses"], 1e-6)
    _same_weights(out, reference, 1e-6)


def test_fsdp_two_ranks_match_one_process_holding_half(tmp_path, corpus, reference):
    """FSDP2 on 2 ranks: the same run, and each rank holds about half the bytes."""
    out = tmp_path / "fsdp"
    proc = _worker(out, _settings(corpus, **{"train.strategy": "fsdp"}), "--bytes", str(out))
    _ok(proc)
    assert (out / SHARDED / ".metadata").is_file() and not (out / WEIGHTS).exists()
    _close(_losses(out), reference["losses"], 1e-5)
    _same_weights(out, reference, 1e-5)
    whole = reference["bytes"]["params"] + reference["bytes"]["optimizer"]
    for rank in (0, 1):
        held = json.loads(out.with_name(f"{out.name}.{rank}").read_text())
        assert held["optimizer"] == 2 * held["params"] > 0  # AdamW: two moments per parameter
        assert held["params"] + held["optimizer"] <= 0.6 * whole, (rank, held, whole)


def test_sharded_checkpoint_round_trips(tmp_path, tiny_model_cfg):
    """Weights and optimizer state written by DCP read back exactly; damage is one clear error."""
    from memext.model import build_model

    model = build_model(tiny_model_cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 264, (2, 16)))[0].float().mean().backward()
    opt.step()
    path = tmp_path / SHARDED
    dcp.save(model, opt, path, 7, sharded=False)

    again = build_model(tiny_model_cfg, seed=1)
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    assert dcp.load(again, opt2, path, sharded=False) == 7
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    weights_only = build_model(tiny_model_cfg, seed=2)
    assert dcp.load_weights(weights_only, path) == 7 == dcp.saved_step(path)
    assert torch.equal(weights_only.embed.weight, model.embed.weight)

    wider = build_model(dataclasses.replace(tiny_model_cfg, d_model=64))
    with pytest.raises(MemextError, match=r"another architecture.*Size mismatch"):
        dcp.load_weights(wider, path)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(MemextError, match="corrupt"):
        dcp.load_weights(build_model(tiny_model_cfg), path)


def test_fsdp_resumes_from_two_ranks_on_one(tmp_path, corpus, reference):
    out = tmp_path / "run"
    settings = _settings(corpus, **{"train.strategy": "fsdp"})
    _ok(_worker(out, settings, "--stop-at", "10"))
    assert [r["step"] for r in read_metrics(out)][-1] == 10
    result = _train_here(settings, out, resume=True)
    assert result.status == "completed" and result.step == STEPS
    _close(_losses(out), reference["losses"], 1e-5)
    _same_weights(out, reference, 1e-5)


def test_fsdp_resumes_from_one_rank_on_two(tmp_path, corpus, reference):
    out = tmp_path / "run"
    settings = _settings(corpus, **{"train.strategy": "fsdp"})

    def stop(loop) -> None:
        loop.stop_requested = loop.step == 10

    assert _train_here(settings, out, callback=stop).status == "interrupted"
    assert (out / SHARDED).is_dir()  # one process writes the sharded format too
    _ok(_worker(out, settings, "--resume"))
    _close(_losses(out), reference["losses"], 1e-5)
    _same_weights(out, reference, 1e-5)


def test_a_killed_rank_stops_the_job_naming_it(tmp_path, corpus):
    """Rank 1 is killed after step 12: torchrun ends the job (no hang) and names rank 1, and
    rank 0 leaves the run at its step-10 checkpoint, readable and resumable."""
    out = tmp_path / "run"
    start = time.monotonic()
    proc = _worker(out, _settings(corpus), "--kill-rank", "1", "--kill-at", "12")
    took = time.monotonic() - start
    assert proc.returncode != 0 and took < LIMIT
    report = proc.stderr
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", report), report
    assert "Root Cause" in report
    assert max(r["step"] for r in read_metrics(out)) == 10
    assert not (out / ".checkpoint-pending" / "COMMITTED").exists()
    model, _ = load(out)  # the last checkpoint is whole
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 10
    del model


def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path, corpus, reference):
    """--max-restarts 1: rank 1 dies after step 12 of the first try; the restart resumes from
    step 10 and the run ends as an uninterrupted one."""
    out = tmp_path / "run"
    proc = _worker(out, _settings(corpus), "--kill-rank", "1", "--kill-at", "12", restarts=1)
    _ok(proc)
    _close(_losses(out), reference["losses"], 1e-6)
    _same_weights(out, reference, 1e-6)


def test_two_nodes_one_rendezvous(tmp_path, corpus, reference):
    """Two torchrun launches (one "node" each) meet at one c10d rendezvous, as on two machines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    sets = [a for k, v in _settings(corpus).items() for a in ("--set", f"{k}={v}")]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={rank}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=memext-test",
                "-m",
                "memext",
                "train",
                "--out",
                str(out),
                "--no-eval",
                *sets,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        results = [node.communicate(timeout=LIMIT) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (stdout, stderr) in zip(nodes, results, strict=True):
        assert node.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "2 ranks, train.strategy=ddp" in " ".join("".join(e for _, e in results).split())
    _close(_losses(out), reference["losses"], 1e-6)
    _same_weights(out, reference, 1e-6)


def test_a_sharded_run_is_read_by_one_process(tmp_path, corpus):
    """A run with sharded checkpoints (train.strategy=fsdp; written here by one process) is read
    by every single-process reader: the model adapter (eval, generate), info, and extend, whose
    copy holds the weights as one model.safetensors."""
    from memext.adapters import open_model
    from memext.adapters.memext_run import MemextAdapter
    from memext.extend import extend_model

    run = tmp_path / "run"
    _train_here(_settings(corpus, **{"train.strategy": "fsdp", "train.steps": "4"}), run)
    assert (run / SHARDED).is_dir() and not (run / WEIGHTS).exists()
    model, _ = load(run)
    adapter = open_model(run)
    tokens = torch.randint(0, 200, (1, 16))
    assert torch.equal(adapter.logits(tokens), model(tokens)[0])
    assert adapter.fingerprint()  # over the shard files
    assert any("checkpoint present" in line for line in MemextAdapter.summary(run))

    copy = tmp_path / "extended"
    extend_model(run, copy, "linear", 2.0)
    assert (copy / WEIGHTS).is_file() and not (copy / SHARDED).exists()
    extended, _ = load(copy)
    weights = extended.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(p, weights[name]), name


def test_a_run_changes_strategy_on_resume(tmp_path, corpus, reference):
    """Sharded (fsdp) to one file (ddp): the resumed run continues the same curve, and its
    checkpoint is then one model.safetensors (the shards are removed once it is committed)."""
    out = tmp_path / "run"

    def stop(loop) -> None:
        loop.stop_requested = loop.step == 10

    _train_here(_settings(corpus, **{"train.strategy": "fsdp"}), out, callback=stop)
    assert (out / SHARDED).is_dir()
    _train_here(_settings(corpus), out, resume=True)
    assert (out / WEIGHTS).is_file() and not (out / SHARDED).exists()
    _close(_losses(out), reference["losses"], 1e-6)
    _same_weights(out, reference, 1e-6)


def test_a_batch_that_does_not_split_is_refused():
    from memext.train.parallel import check_split

    cfg = Config.preset("tiny").override({**SETTINGS, "train.batch_size": "5"})
    check_split(cfg, 1)
    with pytest.raises(MemextError, match="5 rows does not split evenly over 2"):
        check_split(cfg, 2)


# Each grandchild (forked from one warm child) trains a 4-step sharded run (one process writes
# the sharded format too) and SIGKILLs itself at POINT of its second save (step 2).
KILL_AT = """
import json, os, signal, sys
import memext.checkpoint as ckpt
from memext import Config
from memext.train import train

root, cfg_file, points = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = Config.load(cfg_file)


def grandchild(point):
    saves = []

    def hook(at):
        if at == "start":
            saves.append(at)
        if len(saves) == 2 and at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.save_hook = hook
    train(cfg, os.path.join(root, point), progress=False, log=lambda m: None)


train(cfg, os.path.join(root, "warm-up"), progress=False, log=lambda m: None)
signals = {}
for point in points:
    pid = os.fork()
    if pid == 0:
        try:
            grandchild(point)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    signals[point] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
print(json.dumps(signals))
"""

# The step each kill leaves: before the commit marker the last complete checkpoint (step 1),
# from it on the new one (step 2), whose move the next start finishes. "shards-aside": the old
# shards renamed aside, the new ones not yet in place.
SHARDED_KILL_POINTS = {
    "start": 1,
    "weights-written": 1,
    "state-written": 1,
    "committed": 2,
    "renamed-1": 2,
    "shards-aside": 2,
    "renamed-shards": 2,
}


def test_a_kill_at_any_point_of_a_sharded_save_leaves_a_resumable_run(corpus, tmp_path):
    settings = _settings(
        corpus, **{"train.strategy": "fsdp", "train.steps": "4", "train.save_every": "1"}
    )
    cfg = Config.preset("tiny").override(settings)
    straight = tmp_path / "straight"
    _train_here(settings, straight)
    cfg_file = tmp_path / "cfg.json"
    cfg.save(cfg_file)
    done = _run([sys.executable, "-c", KILL_AT, str(tmp_path), str(cfg_file), *SHARDED_KILL_POINTS])
    assert done.returncode == 0, done.stderr
    killed = json.loads(done.stdout.splitlines()[-1])
    assert set(killed.values()) == {9}, (killed, done.stderr[-3000:])
    for point, step in SHARDED_KILL_POINTS.items():
        out = tmp_path / point
        logs: list[str] = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            resumed = train(cfg, out, resume=True, progress=False, log=logs.append)
        finally:
            torch.set_num_threads(threads)
        assert f"resuming {out} from step {step}" in logs, (point, logs)
        assert resumed.step == 4
        assert [r["loss"] for r in read_metrics(out) if "loss" in r] == [
            r["loss"] for r in read_metrics(straight) if "loss" in r
        ], point
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
        assert leftovers == [] and not (out / WEIGHTS).exists(), (point, leftovers)


def test_a_full_disk_during_a_sharded_save_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from memext.errors import StorageError

    settings = _settings(corpus, **{"train.strategy": "fsdp", "train.steps": "2"})
    out = tmp_path / "run"
    _train_here(settings, out)

    def full(*args, **kwargs):  # what DCP raises: each rank's error wrapped, a BaseException
        raise CheckpointException("save", {0: (OSError(errno.ENOSPC, "No space left"), None)})

    monkeypatch.setattr(dcp.dcp, "save", full)
    more = {**settings, "train.steps": "3"}
    with pytest.raises(StorageError, match=r"the disk is full.*last complete checkpoint is kept"):
        _train_here(more, out, resume=True)
    assert not (out / ".checkpoint-pending").exists()
    assert dcp.saved_step(out / SHARDED) == 2
    monkeypatch.undo()
    assert _train_here(more, out, resume=True).step == 3
