"""Fault injection: kills at every point of a checkpoint save, a full disk, a read-only run,
torn logs, foreign folders and bad flags. Each leaves the run resumable or cleanly refused,
with nothing lost that existed before, and every refusal is one line and exit code 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from typer.testing import CliRunner

import memext.checkpoint as ckpt
from memext import Config
from memext.cli import app
from memext.errors import MemextError
from memext.evals import suite as suite_mod
from memext.train import TrainingDiverged, train

runner = CliRunner()

SMALL = {
    "model.d_model": "32",
    "model.n_layers": "2",
    "model.n_heads": "2",
    "model.max_seq_len": "64",
    "model.memory": "none",
    "train.seq_len": "32",
    "train.segment_len": "0",
    "data.mixture": "[]",
    "train.curriculum": "",
    "train.curriculum_steps": "",
    "train.batch_size": "2",
    "train.log_every": "1",
    "train.eval_every": "0",
    "train.eval_tokens": "64",
    "train.warmup_steps": "1",
    "train.steps": "4",
    "train.save_every": "1",
    "eval.lengths": "32",
    "eval.max_tokens": "64",
}
QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (root / f"doc{i}.txt").write_text(f"document {i}: " + "a lazy dog sleeps. " * 60)
    return root


def _cfg(corpus: Path, **extra: str) -> Config:
    return Config.preset("tiny").override({**SMALL, "data.corpus": str(corpus), **extra})


def _sets(corpus: Path, **extra: str) -> list[str]:
    return [f"--set={k}={v}" for k, v in {**SMALL, "data.corpus": str(corpus), **extra}.items()]


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-step run: what every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_cfg(corpus), out, **QUIET)
    return out


@pytest.fixture
def run(straight: Path, tmp_path: Path) -> Path:
    """A finished run of one's own (a copy of ``straight``)."""
    return Path(shutil.copytree(straight, tmp_path / "run"))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in ckpt.read_metrics(run_dir) if "loss" in r]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _fails(args: list[str], *messages: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for message in messages:
        assert message in result.output, result.output
    return result.output


# --- kills during a checkpoint save ------------------------------------------------------------

# One child process imports torch once, then forks a grandchild per kill point (no OpenMP
# pool exists to break in a fork: OMP_NUM_THREADS=1), and trains once so that each fork starts
# warm. Each grandchild trains a 4-step run and
# SIGKILLs itself at POINT of the second save (step 2); "mid-write" dies inside a write, its
# temporary file half written and not renamed. The child reports each grandchild's signal.
KILL_AT = """
import json, os, signal, sys
import memext.checkpoint as ckpt
from memext import Config
from memext.train import train

root, cfg_file, points = sys.argv[1], sys.argv[2], sys.argv[3:]
cfg = Config.load(cfg_file)
plain = ckpt._torch_save


def grandchild(point):
    saves = []

    def hook(at):
        if at == "start":
            saves.append(at)
        if len(saves) == 2 and at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def torn(obj, path):
        plain(obj, path)
        if len(saves) == 2:
            with open(path, "r+b") as f:
                f.truncate(100)
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.save_hook = hook
    if point == "mid-write":
        ckpt._torch_save = torn
    train(cfg, os.path.join(root, point), progress=False, log=lambda m: None)


train(cfg, os.path.join(root, "warm-up"), progress=False, log=lambda m: None)  # torch's lazy set-up
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

# The step each kill leaves: before the commit marker, the last complete checkpoint (step 1);
# from it on, the new one (step 2), finished by the next start.
KILL_POINTS = {
    "start": 1,
    "mid-write": 1,
    "state-written": 1,
    "weights-written": 1,
    "committed": 2,
    "renamed-1": 2,  # between the two renames
    "renamed-2": 2,
}


def test_a_kill_at_any_point_of_a_save_leaves_a_resumable_run(corpus, straight, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    _cfg(corpus).save(cfg_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILL_AT, str(tmp_path), str(cfg_file), *KILL_POINTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    killed = json.loads(done.stdout.splitlines()[-1])
    assert killed == dict.fromkeys(KILL_POINTS, signal.SIGKILL), done.stderr
    for point, step in KILL_POINTS.items():
        out = tmp_path / point
        assert (out / ckpt.PENDING).exists() == (point != "start"), point
        logs: list[str] = []
        resumed = train(_cfg(corpus), out, resume=True, progress=False, log=logs.append)
        assert f"resuming {out} from step {step}" in logs, (point, logs)
        assert resumed.step == 4
        assert _losses(out) == _losses(straight), point
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
        assert leftovers == [], (point, leftovers)


def test_orphaned_temporary_files_are_cleaned_on_start(run, corpus):
    # What an older memext left after a kill mid-rename: temporary files beside the run's own.
    orphans = [run / ".model.safetensors.abcd1234.tmp", run / ".train_state.pt.0a1b2c3d.tmp"]
    for p in orphans:
        p.write_bytes(b"x" * 1000)
    (run / ".notes.tmp").write_text("the user's")  # not a name memext writes: kept
    train(_cfg(corpus, **{"train.steps": "5"}), run, resume=True, **QUIET)
    assert not any(p.exists() for p in orphans)
    assert (run / ".notes.tmp").read_text() == "the user's"


def test_an_old_run_without_a_pending_folder_resumes(run, corpus):
    # The layout before checkpoints became one unit is the same layout at rest.
    assert not (run / ckpt.PENDING).exists()
    assert train(_cfg(corpus, **{"train.steps": "5"}), run, resume=True, **QUIET).step == 5


# --- a full disk ---------------------------------------------------------------------------------


def _full_disk_weights(*args, **kwargs):
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


def _full_disk_state(obj, path):
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "writer, fail",
    [("save_weights", _full_disk_weights), ("_torch_save", _full_disk_state)],
    ids=["weights", "training-state"],
)
def test_a_full_disk_keeps_the_last_checkpoint(
    writer, fail, corpus, straight, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    plain = getattr(ckpt, writer)
    calls = []

    def third_fails(*args, **kwargs):
        calls.append(1)
        return (fail if len(calls) == 3 else plain)(*args, **kwargs)

    monkeypatch.setattr(ckpt, writer, third_fails)
    with pytest.raises(MemextError, match=r"disk is full.*last complete checkpoint is kept"):
        train(_cfg(corpus), out, **QUIET)
    monkeypatch.setattr(ckpt, writer, plain)
    assert not (out / ckpt.PENDING).exists()
    assert ckpt.weights_metadata(out / ckpt.WEIGHTS)["step"] == "2"
    train(_cfg(corpus), out, resume=True, **QUIET)
    assert _losses(out) == _losses(straight)


def test_a_full_disk_through_the_cli_is_one_line(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_weights", _full_disk_weights)
    out = tmp_path / "run"
    _fails(
        ["train", "--no-eval", "--device", "cpu", "--out", str(out), *_sets(corpus)], "disk is full"
    )
    # The first save failed: there is no checkpoint, and resume says so instead of starting over.
    before = _snapshot(out)
    _fails(
        ["train", "--resume", str(out), "--no-eval"],
        "model.safetensors",
        "is missing",
        "--overwrite",
    )
    assert _snapshot(out) == before


def test_a_torch_save_on_a_full_disk_names_the_cause(tmp_path):
    # torch.save given a path says only "unexpected pos"; through a file object it is ENOSPC.
    if not Path("/dev/full").exists():
        pytest.fail("/dev/full is missing")  # Linux (and the CI machine) has it
    with pytest.raises(OSError) as caught:
        ckpt._torch_save({"x": torch.zeros(10_000)}, "/dev/full")
    assert caught.value.errno == errno.ENOSPC


# --- a read-only run directory --------------------------------------------------------------


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only: its mode, and (root ignores modes) memext's writer refusing it."""
    import memext.io

    folders: list[Path] = []
    plain = memext.io._new_temp

    def refuse(path: Path) -> str:
        if any(Path(path).is_relative_to(f) for f in folders):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return plain(path)

    monkeypatch.setattr(memext.io, "_new_temp", refuse)

    def make(folder: Path) -> None:
        folders.append(folder)
        folder.chmod(0o555)

    yield make
    for f in folders:
        f.chmod(0o755)


def test_a_read_only_run_is_refused_and_left_as_it_was(run, read_only):
    before = _snapshot(run)
    read_only(run)
    _fails(["train", "--resume", str(run), "--set", "train.steps=6", "--no-eval"], "read-only")
    assert _snapshot(run) == before
    assert runner.invoke(app, ["info", str(run)]).exit_code == 0


# --- torn logs ---------------------------------------------------------------------------------


def test_a_torn_metrics_line_blocks_neither_resume_nor_info(run, corpus, straight):
    with open(run / ckpt.METRICS, "a") as f:
        f.write('{"step": 5, "lo')  # a kill during the append
    result = runner.invoke(app, ["info", str(run)])
    assert result.exit_code == 0 and "step 4 of 4" in result.output, result.output
    train(_cfg(corpus, **{"train.steps": "5"}), run, resume=True, **QUIET)
    assert [s for s, _ in _losses(run)] == [1, 2, 3, 4, 5]
    assert _losses(run)[:4] == _losses(straight)


def test_a_damaged_metrics_line_is_named(run):
    lines = (run / ckpt.METRICS).read_text().splitlines()
    lines[1] = "[1, 2]"
    (run / ckpt.METRICS).write_text("\n".join(lines) + "\n")
    _fails(["info", str(run)], "metrics.jsonl", "line 2")


def test_the_cell_log_survives_a_torn_line_and_foreign_lines(tmp_path):
    log = tmp_path / "quick.cells.jsonl"
    good = {"suite_key": "k", "cell": "a", "row": {"score": 1}}
    log.write_text(json.dumps(good) + "\n" + "[1, 2]\n" + '"text"\n' + '{"suite_key": "k", "ce')
    suite_mod._append(log, {"suite_key": "k", "cell": "b", "row": {"score": 2}})
    assert suite_mod._finished(log, "k") == {"a": {"score": 1}, "b": {"score": 2}}


def test_a_corrupt_suite_results_file_is_reported_as_corrupt(run):
    (run / "eval").mkdir()
    (run / "eval" / "quick.json").write_text('{"format": "memext-suite-results", "cel')
    _fails(["report", str(run)], "quick.json is corrupt", "--suite quick")


# --- what --overwrite may replace ------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_memext_run(corpus, tmp_path):
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "model.safetensors").write_bytes(b"weights someone else made")
    before = _snapshot(hf)
    _fails(
        ["train", "--no-eval", "--overwrite", "--out", str(hf), *_sets(corpus)],
        "not a memext run",
        "config.json",
    )
    project = tmp_path / "project"
    project.mkdir()
    (project / "metrics.jsonl").write_text("the user's own log\n")
    _fails(["train", "--no-eval", "--out", str(project), *_sets(corpus)], "metrics.jsonl")
    assert _snapshot(hf) == before
    assert (project / "metrics.jsonl").read_text() == "the user's own log\n"


def test_extend_overwrite_refuses_a_folder_that_is_not_a_memext_run(run, tmp_path):
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    _fails(
        ["extend", str(run), "--out", str(hf), "--factor", "2", "--overwrite", "--no-eval"],
        "not a memext run",
    )
    assert (hf / "config.json").read_text() == '{"model_type": "llama"}'


def test_overwrite_replaces_only_what_memext_wrote(run, corpus):
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "keep.bin").write_bytes(b"mine too")
    (run / "eval").mkdir()
    (run / "eval" / "quick.cells.jsonl").write_text("{}\n")
    (run / "eval" / "mine.json").write_text('{"not": "memext"}')
    train(_cfg(corpus, **{"train.steps": "2"}), run, overwrite=True, **QUIET)
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "data" / "keep.bin").read_bytes() == b"mine too"
    assert (run / "eval" / "mine.json").is_file()
    assert not (run / "eval" / "quick.cells.jsonl").exists()
    assert [s for s, _ in _losses(run)] == [1, 2]


def test_a_refused_overwrite_start_keeps_the_old_run(run, corpus):
    before = _snapshot(run)
    with pytest.raises(MemextError, match="does not exist"):
        train(
            _cfg(corpus, **{"data.corpus": str(corpus / "missing")}), run, overwrite=True, **QUIET
        )
    assert _snapshot(run) == before


# --- resume checks everything, then writes ---------------------------------------------------


def test_a_refused_resume_does_not_rewrite_the_run(run):
    before = _snapshot(run)
    _fails(
        ["train", "--resume", str(run), "--set", "model.d_model=64", "--no-eval"],
        "another architecture",
    )
    assert _snapshot(run) == before
    result = runner.invoke(app, ["generate", str(run), "--prompt", "a", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


def test_resume_without_weights_refuses_instead_of_starting_over(run):
    (run / ckpt.WEIGHTS).unlink()
    before = _snapshot(run)
    _fails(["train", "--resume", str(run), "--no-eval"], "is missing", "--overwrite")
    assert _snapshot(run) == before


def test_a_training_state_without_its_step_is_refused(run):
    state = torch.load(run / ckpt.TRAIN_STATE, weights_only=True)
    del state["step"]
    torch.save(state, run / ckpt.TRAIN_STATE)
    _fails(["train", "--resume", str(run), "--no-eval"], "train_state.pt", "corrupt or foreign")
    torch.save([1, 2], run / ckpt.TRAIN_STATE)
    _fails(["train", "--resume", str(run), "--no-eval"], "train_state.pt", "corrupt or foreign")


def test_a_failed_start_leaves_no_run_directory(corpus, tmp_path):
    out = tmp_path / "run"
    _fails(["train", "--no-eval", "--out", str(out), *_sets(corpus / "missing")], "does not exist")
    bad_mixture = "[{task: nosuchtask}]"
    runner.invoke(
        app,
        ["train", "--no-eval", "--out", str(out), *_sets(corpus, **{"data.mixture": bad_mixture})],
    )
    assert not out.exists()


def test_resume_uses_the_runs_own_tokenizer_and_checks_it(corpus, tmp_path):
    from memext.tokenizer import train_bpe

    bpe = tmp_path / "bpe.json"
    tok = train_bpe([p.read_text() for p in corpus.iterdir()], 300, bpe)
    cfg = _cfg(corpus, **{"data.tokenizer": str(bpe), "model.vocab_size": str(tok.vocab_size)})
    out = tmp_path / "run"
    train(cfg.override({"train.steps": "2"}), out, **QUIET)
    copy = (out / ckpt.TOKENIZER).read_bytes()
    train_bpe(["something else entirely " * 50], 290, bpe)  # the file the config names changes
    logs: list[str] = []
    train(cfg.override({"train.steps": "3"}), out, resume=True, progress=False, log=logs.append)
    assert any("changed since the run started" in m for m in logs), logs
    assert (out / ckpt.TOKENIZER).read_bytes() == copy
    (out / ckpt.TOKENIZER).write_bytes(bpe.read_bytes())  # the run's own copy tampered with
    before = _snapshot(out)
    with pytest.raises(MemextError, match="tokenizer changed"):
        train(cfg.override({"train.steps": "4"}), out, resume=True, **QUIET)
    assert _snapshot(out) == before


# --- non-finite values ---------------------------------------------------------------------


def test_a_checkpoint_never_holds_non_finite_weights(corpus, tmp_path):
    from memext.train import run_dir, trainer

    out = tmp_path / "run"
    train(_cfg(corpus, **{"train.steps": "1"}), out, **QUIET)
    model = trainer.build_model(_cfg(corpus).model, seed=0)
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    opt = trainer.build_optimizer(model, _cfg(corpus))
    before = _snapshot(out)
    with pytest.raises(TrainingDiverged, match="NaN or inf"):
        run_dir.commit_checkpoint(out, model, opt, 2)
    assert _snapshot(out) == before


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_configs_refuse_non_finite_numbers(text, tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"format": "memext-config", "train": {"lr": ' + text + "}}")
    with pytest.raises(ValueError, match=r"train\.lr=.* expected a finite number"):
        Config.load(path)
    with pytest.raises(ValueError, match=r"train\.lr"):
        Config.preset("tiny").override({"train.lr": text.lower().replace("infinity", "inf")})


def test_config_sections_must_be_mappings(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"format": "memext-config", "model": []}')
    _fails(["config", "--config", str(path)], "section 'model' must be a mapping")
    path.write_text('{"format": "memext-config"}')
    _fails(["config", "--config", str(path), "--preset", "nosuch"], "unknown preset 'nosuch'")


def test_a_huge_loss_has_an_infinite_perplexity_not_an_overflow():
    from memext.evals.perplexity import perplexity

    assert perplexity(1e6) == float("inf") and perplexity(0.0) == 1.0


# --- one line and exit 2 for every other user error ------------------------------------------


def test_extend_refuses_an_infinite_factor(run, tmp_path):
    _fails(
        ["extend", str(run), "--out", str(tmp_path / "x"), "--factor", "inf", "--no-eval"],
        "factor=inf is invalid",
    )
    assert not (tmp_path / "x").exists()


def test_a_wordpiece_tokenizer_given_as_bpe_is_refused(corpus, tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "wordpiece.json"
    vocab = {"[UNK]": 0, "a": 1, "##b": 2, "é": 3}
    Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]")).save(str(path))
    out = tmp_path / "run"
    _fails(
        ["train", "--no-eval", "--out", str(out), *_sets(corpus, **{"data.tokenizer": str(path)})],
        "not a byte-level BPE",
        "WordPiece",
    )
    assert not out.exists()


def test_info_survives_malformed_results_files(run):
    # info read eval.json's rows unchecked (a TypeError); it now reads the suite results in
    # eval/, and one it cannot read is passed over, not a traceback.
    (run / "eval.json").write_text('{"results": [1, 2]}')
    (run / "eval").mkdir()
    (run / "eval" / "quick.json").write_text(
        '{"format": "memext-suite-results", "schema_version": 1, "cells": [], "summary": {}}'
    )
    (run / "eval" / "other.json").write_text("[1, 2]")
    result = runner.invoke(app, ["info", str(run)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["-5", "0"])
def test_max_tokens_must_be_positive(run, value):
    _fails(["eval", str(run), "--max-tokens", value, "--device", "cpu"], f"--max-tokens={value}")


def test_stream_has_cache_defaults_and_names_the_memory_reason(run, corpus, tmp_path):
    result = runner.invoke(
        app, ["stream", str(run), "--text", str(corpus), "--tokens", "200", "--chunk", "16"]
    )
    assert result.exit_code == 0, result.output
    memory = tmp_path / "memory"
    cfg = _cfg(corpus, **{"model.memory": "xl", "model.mem_len": "16", "train.segment_len": "16"})
    train(cfg.override({"train.steps": "1"}), memory, **QUIET)
    _fails(["stream", str(memory), "--text", str(corpus)], "through its memory", "memext eval")


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug(run, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("an internal mistake")

    monkeypatch.setattr(ckpt, "load_config", broken)
    result = runner.invoke(app, ["info", str(run)])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "TypeError: an internal mistake" in result.output
    assert "this is a bug in memext" in result.output


def test_files_get_their_mode_without_touching_the_umask(tmp_path, monkeypatch):
    from memext.io import atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)

    def forbidden(*args):
        raise AssertionError("os.umask sets the mask of every thread for a moment")

    monkeypatch.setattr(os, "umask", forbidden)
    atomic_write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask
