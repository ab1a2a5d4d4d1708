"""benchmarks/distill.py's bookkeeping, without its hours of training: the runs are laid out as
finished (or interrupted) runs with their logs and suite results, and the processes it would
start are recorded in place of being started. Checked: the table has the teacher, the CE
student and a KD student per ``--kd`` asked for; the gap closed is (bpb_CE - bpb_KD) /
(bpb_CE - bpb_teacher); finished runs are neither trained nor graded again, an interrupted one
is resumed, a new ``--kd`` variant is trained; the commands it records are ``memext`` commands
with options those commands have, naming configs that exist. ``memext train``/``distill``/
``eval`` themselves are tested in test_distill.py and test_suite*.py."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from memext import Config
from memext import checkpoint as ckpt
from memext.cli import app

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_distill", ROOT / "benchmarks" / "distill.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lay_out(run: Path, step: int) -> None:
    """A run trained to ``step`` of STEPS: its config, metrics and a weights file (the benchmark
    reads only whether it is there; nothing here loads it)."""
    run.mkdir(parents=True, exist_ok=True)
    student = Config.load(ROOT / "benchmarks" / "configs" / "distill-student.yaml")
    student.override({"train.steps": str(STEPS)}).save(run / ckpt.CONFIG)
    (run / ckpt.WEIGHTS).write_bytes(b"")
    rows = [{"step": s, "loss": 1.0} for s in range(1, step + 1)]
    (run / ckpt.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _suite(path: Path, bpb: float, passkey_512: float) -> None:
    """A `memext eval` results file, as much of it as the benchmark reads."""
    tasks = {
        "bpb": {"by_length": {"512": bpb + 0.5, "1024": bpb}},
        "passkey": {"by_length": {"512": passkey_512, "1024": passkey_512 / 2}},
    }
    path.write_text(json.dumps({"summary": {"tasks": tasks}}))


def _finish(runs: Path, name: str, bpb: float, passkey_512: float, seconds: int) -> None:
    _lay_out(runs / name, STEPS)
    (runs / f"{name}.log").write_text(f"... completed at step {STEPS} in {seconds}s\n")
    _suite(runs / f"{name}-suite.json", bpb, passkey_512)


# bpb at 1,024 and passkey at 512 (4x the window) of each run laid out as finished.
GRADES = {
    "teacher": (3.0, 0.75, 40),
    "ce": (3.5, 0.25, 20),
    "kd-a0.5-t2": (3.25, 0.5, 30),  # closes half the gap
    "kd-a0.5-t1": (3.375, 0.125, 31),  # a quarter, and a worse passkey than CE's
}


class Launched:
    """Stands in for the benchmark's ``subprocess``: records what would have run, and leaves
    behind what the run would have (a finished run and its log; a suite results file)."""

    STDOUT = subprocess.STDOUT
    DEVNULL = subprocess.DEVNULL

    def __init__(self, grades: dict[str, tuple[float, float, int]]) -> None:
        self.grades = grades
        self.trained: list[list[str]] = []
        self.graded: list[list[str]] = []

    def Popen(self, cmd: list[str], stdout: Any, stderr: Any) -> Any:
        self.trained.append(cmd)
        run = Path(
            cmd[cmd.index("--out") + 1] if "--out" in cmd else cmd[cmd.index("--resume") + 1]
        )
        _lay_out(run, STEPS)
        stdout.write(f"completed at step {STEPS} in {self.grades[run.name][2]}s\n")
        stdout.flush()
        return type("Done", (), {"wait": lambda self: 0})()

    def run(self, cmd: list[str], check: bool, stdout: Any) -> None:
        self.graded.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        _suite(out, *self.grades[out.name.removesuffix("-suite.json")][:2])


def _no_process(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a finished, graded run was trained or graded again")


NOTHING_RUNS = SimpleNamespace(
    Popen=_no_process, run=_no_process, STDOUT=subprocess.STDOUT, DEVNULL=subprocess.DEVNULL
)


def test_the_table_has_every_run_asked_for_and_the_gap_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench, runs, out = _bench(), tmp_path / "runs", tmp_path / "distill.json"
    for name, grade in GRADES.items():
        _finish(runs, name, *grade)
    monkeypatch.setattr(bench, "subprocess", NOTHING_RUNS)
    bench.main([f"--runs={runs}", "--kd=0.5:2", "--kd=0.5:1", f"--out={out}"])
    result = json.loads(out.read_text())

    students = ["kd-a0.5-t2", "kd-a0.5-t1"]
    assert result["kd"] == {
        "kd-a0.5-t2": {"alpha": 0.5, "temperature": 2.0},
        "kd-a0.5-t1": {"alpha": 0.5, "temperature": 1.0},
    }
    assert list(result["scores"]) == ["teacher", "ce", *students] == list(result["runs"])
    assert result["scores"]["ce"]["bits_per_byte"]["1024"] == 3.5
    assert result["bits_per_byte_at"] == 1024 and result["passkey_at"] == 4 * bench.WINDOW
    assert result["gap_closed"] == {"kd-a0.5-t2": 0.5, "kd-a0.5-t1": 0.25}
    assert result["targets"] == {
        "kd-a0.5-t2": {"gap_closed_at_least_0.4": True, "kd_improves_passkey_at_4x_window": True},
        "kd-a0.5-t1": {"gap_closed_at_least_0.4": False, "kd_improves_passkey_at_4x_window": False},
    }
    assert result["command"].startswith("python benchmarks/distill.py --runs=")
    assert result["command"].endswith(" --kd 0.5:2 --kd 0.5:1")
    for name, (_, _, seconds) in GRADES.items():
        assert result["runs"][name]["train_seconds"] == seconds
        assert "resumed" not in result["runs"][name]
    kd = shlex.split(result["runs"]["kd-a0.5-t1"]["command"])
    assert kd[:2] == ["memext", "distill"]
    assert kd[kd.index("--teacher") + 1] == str(runs / "teacher")
    assert kd[kd.index("--alpha") + 1] == "0.5" and kd[kd.index("--temperature") + 1] == "1"
    assert kd[kd.index("--out") + 1] == str(runs / "kd-a0.5-t1")


def test_the_recorded_commands_are_memext_commands_on_configs_that_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench()
    runs = tmp_path / "runs"
    for name, grade in GRADES.items():
        _finish(runs, name, *grade)
    monkeypatch.setattr(bench, "subprocess", NOTHING_RUNS)
    bench.main(
        [f"--runs={runs}", "--kd=0.5:2", "--teacher-steps=1200", f"--out={tmp_path / 'd.json'}"]
    )
    logged = json.loads((tmp_path / "d.json").read_text())["runs"]
    teacher = shlex.split(logged["teacher"]["command"])
    assert teacher[teacher.index("--set") + 1] == "train.steps=1200"
    assert "--set" not in logged["ce"]["command"]  # the students keep equal steps
    runner = CliRunner()
    for name, entry in logged.items():
        words = shlex.split(entry["command"])
        assert words[0] == "memext", name
        shown = runner.invoke(app, [words[1], "--help"])
        assert shown.exit_code == 0, entry["command"]
        for option in (w for w in words if w.startswith("--")):
            assert option in shown.output, f"{option} is not an option of `memext {words[1]}`"
        for flag in ("--config", "--student"):
            if flag in words:  # relative to the repository root, where the benchmark runs
                assert (ROOT / words[words.index(flag) + 1]).is_file(), entry["command"]
    assert (ROOT / bench.SUITE).is_file()


def test_the_teacher_config_is_an_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    runs = tmp_path / "runs"
    for name, grade in GRADES.items():
        _finish(runs, name, *grade)
    monkeypatch.setattr(bench, "subprocess", NOTHING_RUNS)
    curriculum = "benchmarks/configs/distill-teacher-curriculum.yaml"
    bench.main([f"--runs={runs}", f"--teacher-config={curriculum}", f"--out={tmp_path / 'd.json'}"])
    teacher = shlex.split(
        json.loads((tmp_path / "d.json").read_text())["runs"]["teacher"]["command"]
    )
    assert teacher[teacher.index("--config") + 1] == curriculum
    cfg = Config.load(ROOT / curriculum)  # passkeys inside 128-token sequences come first
    first = [s for s in cfg.data.mixture if s.task == "passkey" and s.stages == (0,)]
    assert cfg.train.seq_len == 128 and first and first[0].lengths == (128,)
    assert cfg.model == Config.load(ROOT / "benchmarks/configs/distill-teacher.yaml").model


def test_seed_sets_the_students_seed_and_leaves_the_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench()
    runs = tmp_path / "runs"
    _finish(runs, "teacher", *GRADES["teacher"])  # a teacher copied in, as for a second seed
    launched = Launched(GRADES)
    monkeypatch.setattr(bench, "subprocess", launched)
    bench.main([f"--runs={runs}", "--seed=3", "--kd=0.5:2", f"--out={tmp_path / 'd.json'}"])
    assert sorted(Path(c[c.index("--out") + 1]).name for c in launched.trained) == [
        "ce",
        "kd-a0.5-t2",
    ]
    for cmd in launched.trained:
        assert cmd[cmd.index("--set") + 1] == "train.seed=3"
    recorded = json.loads((tmp_path / "d.json").read_text())["runs"]
    assert "train.seed" not in recorded["teacher"]["command"]
    assert "--set train.seed=3" in recorded["kd-a0.5-t2"]["command"]


def test_a_sweep_resumes_the_interrupted_and_trains_only_the_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench, runs, out = _bench(), tmp_path / "runs", tmp_path / "distill.json"
    for name in ("teacher", "ce", "kd-a0.5-t2"):
        _finish(runs, name, *GRADES[name])
    _lay_out(runs / "kd-a0.5-t1", 3)  # interrupted half-way: no suite results yet
    (runs / "kd-a0.5-t1.log").write_text("training...\n")
    launched = Launched({**GRADES, "kd-a1-t2": (3.1, 0.875, 33)})
    monkeypatch.setattr(bench, "subprocess", launched)  # the benchmark's alone, not provenance's
    bench.main([f"--runs={runs}", "--kd=0.5:2", "--kd=0.5:1", "--kd=1:2", f"--out={out}"])
    result = json.loads(out.read_text())

    resumed, new = launched.trained
    assert resumed[3:] == ["distill", "--resume", str(runs / "kd-a0.5-t1"), "--no-eval",
                           "--device", "cpu"]  # fmt: skip
    assert new[3:5] == ["distill", "--teacher"] and "--resume" not in new
    assert new[new.index("--out") + 1] == str(runs / "kd-a1-t2")
    assert new[new.index("--alpha") + 1] == "1" and new[new.index("--temperature") + 1] == "2"
    # Only the runs without suite results are graded.
    assert [cmd[cmd.index("eval") + 1] for cmd in launched.graded] == [
        str(runs / "kd-a0.5-t1"),
        str(runs / "kd-a1-t2"),
    ]
    assert result["runs"]["kd-a0.5-t1"]["resumed"] is True
    assert result["runs"]["kd-a0.5-t1"]["train_seconds"] == 31
    assert result["runs"]["kd-a1-t2"]["train_seconds"] == 33
    assert list(result["gap_closed"]) == ["kd-a0.5-t2", "kd-a0.5-t1", "kd-a1-t2"]
    assert result["gap_closed"]["kd-a1-t2"] == pytest.approx(0.8)


def test_with_init_the_kd_students_start_from_the_teacher_and_a_ce_run_shows_its_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench, runs, out = _bench(), tmp_path / "runs", tmp_path / "distill.json"
    for name in ("teacher", "ce"):
        _finish(runs, name, *GRADES[name])
    launched = Launched({**GRADES, "ce-init": (3.4, 0.25, 21), "kd-a1-t1": (3.2, 0.25, 22)})
    monkeypatch.setattr(bench, "subprocess", launched)
    wide = "benchmarks/configs/distill-student-wide.yaml"
    bench.main([f"--runs={runs}", "--kd=1:1", "--init", f"--student={wide}", f"--out={out}"])
    result = json.loads(out.read_text())

    assert result["init_from_teacher"] is True and result["student"] == wide
    assert list(result["gap_closed"]) == ["kd-a1-t1", "ce-init"]
    assert result["gap_closed"]["ce-init"] == pytest.approx(0.2)
    assert result["gap_closed"]["kd-a1-t1"] == pytest.approx(0.6)
    for cmd in launched.trained:
        assert cmd[3] == "distill" and "--init-from-teacher" in cmd
        assert cmd[cmd.index("--student") + 1] == wide
    (ce_init,) = (c for c in launched.trained if c[c.index("--out") + 1].endswith("ce-init"))
    assert ce_init[ce_init.index("--alpha") + 1] == "0"
    assert (ROOT / wide).is_file()
