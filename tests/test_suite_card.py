"""A real model's report card: ``memext report`` takes any model the adapters resolve (a known
name's results live in its converted folder in the cache), shows a model's readings and its
extended copies side by side, keeps one suite with ``--suite``, prints the suite's note (where
its lengths stop); and the SmolLM2 card's suite file is what docs/evaluation.md says it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from memext.adapters import KNOWN_MODELS, Reading, open_model
from memext.cli import app
from memext.evals.report_runs import load_runs
from memext.evals.suite import SuiteSpec, get_suite, plan, run_suite
from memext.evals.suite_tasks import SUITE_TASKS, Cell
from tiny_hf import save_tiny_llama

runner = CliRunner()
CARD = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "smollm2-card.yaml"
SPEC = SuiteSpec(
    "card", {"passkey": {}}, lengths=(160,), depths=(0.5,), samples=1, note="stops at 160"
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "llama")


def _results(adapter_path: Path, home: Path, reading: Reading | None = None) -> Path:
    """Suite results of the tiny Llama as if its home were ``home`` (a known model's folder)."""
    adapter = open_model(adapter_path, reading=reading)
    name = "card" + (f"-{reading.slug()}" if reading else "")
    out = home / "eval" / f"{name}.json"
    run_suite(adapter, SPEC, out, progress=False)
    return out


def test_report_takes_a_known_name_and_shows_its_readings_side_by_side(
    llama: Path, tmp_path: Path
) -> None:
    home = KNOWN_MODELS["smollm2"].folder()  # in the tests' own cache (conftest)
    _results(llama, home)
    window = Reading.of("window", {"window": 64}, 32)
    _results(llama, home, window)
    other = SuiteSpec("quick", {"passkey": {}}, lengths=(160,), depths=(0.5,), samples=1)
    run_suite(open_model(llama), other, home / "eval" / "quick.json", progress=False)
    copy = Path(shutil.copytree(llama, tmp_path / "llama-yarn4"))  # an extended copy's folder
    _results(copy, copy)
    out = tmp_path / "card"
    r = runner.invoke(app, ["report", "smollm2", str(copy), "--suite", "card", "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("|  | "))
    assert header == "|  | llama | llama (window, chunk 32) | llama-yarn4 |"  # the copy: its folder
    assert "| suite | card | card | card |" in md  # not the model's quick results
    assert "| reading | the model's own" in md and "window(window=64), chunk 32" in md
    assert md.count("Suite note: stops at 160") == 1
    assert "Suite note: stops at 160" in (out / "report.html").read_text()
    # Without --suite every results file of the model is shown; the default folder is its home.
    r = runner.invoke(app, ["report", "smollm2"])
    assert r.exit_code == 0, r.output
    assert len(load_runs(["smollm2"])) == 3 and (home / "report" / "report.md").is_file()


def test_report_refuses_what_it_cannot_resolve_in_one_line(llama: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(llama, tmp_path / "model", ignore=shutil.ignore_patterns("eval")))
    for args, says in (
        (["report", "smolm2"], "did you mean 'smollm2'"),
        (["report", str(model), "--suite", "card"], "no suite results in"),
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and says in r.output, r.output
        assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1, r.output
    _results(model, model)
    r = runner.invoke(app, ["report", str(model), "--suite", "longctx"])
    assert r.exit_code == 2 and "no results of suite 'longctx'" in r.output
    assert "(it holds card)" in r.output


def test_eval_names_its_results_by_the_reading(llama: Path, tmp_path: Path) -> None:
    suite = tmp_path / "mine.yaml"
    suite.write_text("lengths: [160]\ndepths: [0.5]\nsamples: 1\ntasks: {passkey: {}}\n")
    r = runner.invoke(
        app,
        ["eval", str(llama), "--suite", str(suite), "--cache", "window", "--cache-opt",
         "window=64", "--chunk", "32", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads((llama / "eval" / "mine-window-window64-chunk32.json").read_text())
    assert data["model"]["name"] == "llama (window, chunk 32)"
    assert data["model"]["reading"].startswith("window(window=64), chunk 32")
    assert f"memext report {llama}" in r.output


# --- the SmolLM2 card's suite ------------------------------------------------------------------
def test_the_smollm2_card_is_the_suite_the_docs_describe() -> None:
    spec = get_suite(str(CARD))
    assert spec.lengths[0] == 512 and max(spec.lengths) == 4096
    assert spec.samples * len(spec.depths) >= 20  # samples per length
    assert set(spec.tasks) == {"passkey", "niah", "bpb"} and "4,096" in spec.note

    class Reader:  # what ``plan`` reads of an adapter
        trained_length, max_context = 8192, None

    _, grid = plan(spec, Reader())  # type: ignore[arg-type]
    tokens = {
        name: sum(t.tokens(c, spec.samples) for t, c in grid if c.task == name)
        for name in spec.tasks
    }
    # The figures docs/evaluation.md and the suite file state.
    assert tokens == {"passkey": 153_600, "niah": 153_600, "bpb": 9_216}
    bpb = SUITE_TASKS.build("bpb", max_tokens=1024)
    assert bpb.tokens(Cell("bpb", 32768, None), 1) == 17_408  # a 32k window for 1,024 scored


def test_dynamic_scaling_reads_as_the_base_model_within_the_original_length(
    llama: Path, tmp_path: Path
) -> None:
    """What the card's note says of its dynamic x4 column below 8k, on a tiny Llama (128)."""
    from memext.hf.model import extend_hf

    dynamic = open_model(extend_hf(llama, tmp_path / "dynamic", "dynamic", 4.0))
    base = open_model(llama)
    x = torch.randint(0, 250, (1, 200))
    assert torch.equal(dynamic.logits(x[:, :128]), base.logits(x[:, :128]))
    assert (dynamic.logits(x) - base.logits(x)).abs().max() > 1e-5  # rescaled past 128
