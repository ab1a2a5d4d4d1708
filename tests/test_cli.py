"""The command line end to end, and every bad input getting one clear line and a non-zero exit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memext.checkpoint import read_metrics
from memext.cli import app

runner = CliRunner()
SMALL = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=256",
    "train.seq_len=32",
    "train.segment_len=16",  # read in segments through an xl memory
    "model.memory=xl",
    "model.mem_len=16",
    "data.mixture=[]",  # corpus text only (the tiny preset also trains on passkeys)
    "train.curriculum=",
    "train.curriculum_steps=",
    "eval.reach=1,4",
    "train.batch_size=4",
    "train.steps=30",
    "train.eval_every=0",
    "train.eval_tokens=128",
    "eval.lengths=16,32,64",
    "eval.max_tokens=256",
    "eval.probes=passkey@128",  # a held-out task probe at the end (train.eval_every=0)
    "eval.probe_samples=2",
]


def _sets(*extra: str) -> list[str]:
    return [f"--set={s}" for s in (*SMALL, *extra)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(5):
        (root / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 60)
    return root


@pytest.fixture
def trained(tmp_path: Path, corpus: Path) -> tuple[Path, str]:
    """The main job in small: a run and what `memext train` printed."""
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            *("--out", str(out), "--device", "cpu", "--suite", "quick"),
            *_sets(f"data.corpus={corpus}"),
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture
def run_dir(trained: tuple[Path, str]) -> Path:
    return trained[0]


def _fails(args: list[str], message: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert message in result.output, result.output
    return result.output


def _bpb_row(output: str, title: str) -> list[str]:
    """The bits-per-byte figures of the bpb row of the printed table titled ``title``."""
    table = output.split(title, 1)[1]
    row = next(line for line in table.splitlines() if line.strip("│┃ ").startswith("bpb"))
    return re.findall(r"\d+\.\d{3}", row)


def test_train_eval_generate_info_end_to_end(run_dir: Path):
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "train_state.pt",
        "metrics.jsonl",
        "run.json",
        "eval",
    }
    # The command hands the trainer its probes: validation and the held-out task, at the end.
    (probed,) = [r for r in read_metrics(run_dir) if "val_bits_per_byte" in r]
    assert probed["step"] == 30 and probed["probe/passkey@128"] in (0.0, 0.5, 1.0)
    # The main job ends with its suite, read through memory and without, and the report.
    suite = json.loads((run_dir / "eval" / "quick.json").read_text())
    assert suite["lengths"] == [16, 32, 64] and suite["model"]["trained_length"] == 32
    blind = json.loads((run_dir / "eval" / "quick-no-memory.json").read_text())
    assert blind["model"]["name"].endswith("(no memory)")
    page = (run_dir / "report" / "report.html").read_text()
    assert page.count('class="plot"') >= 2 and (run_dir / "report" / "report.md").is_file()
    again = runner.invoke(app, ["report", str(run_dir), "--out", str(run_dir / "r2")])
    assert again.exit_code == 0 and (run_dir / "r2" / "report.html").is_file(), again.output
    _fails(["report", str(run_dir / "run.json")], "not a memext suite results file")

    # `memext eval RUN`: the default suite, bits-per-byte and memory reach. With quick's grid
    # and scored tokens its bits-per-byte are quick's, figure for figure: one evaluation path.
    ev = runner.invoke(
        app,
        [
            "eval",
            str(run_dir),
            *("--lengths", "16,32,64", "--max-tokens", "1024"),
            *("--out", str(run_dir / "e2.json"), "--device", "cpu"),
        ],
    )
    assert ev.exit_code == 0, ev.output
    default = json.loads((run_dir / "e2.json").read_text())
    bpb = {c["length"]: c["score"] for c in default["cells"] if c["task"] == "bpb"}
    assert bpb == {c["length"]: c["score"] for c in suite["cells"] if c["task"] == "bpb"}
    reach = {c["length"]: c["score"] for c in default["cells"] if c["task"] == "reach"}
    assert sorted(reach) == [16, 32, 64]  # W = 16: every length is a reach of whole segments
    assert "reach: the last segment" in " ".join(ev.output.split())

    gen = runner.invoke(
        app,
        [
            "generate",
            str(run_dir),
            "--prompt",
            "def f",
            "--max-new-tokens",
            "20",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert gen.exit_code == 0, gen.output
    text = gen.output.removesuffix("\n")
    assert 0 < len(text.encode()) <= 20  # byte tokenizer: at most one byte per new token

    info = runner.invoke(app, ["info", str(run_dir)])
    assert info.exit_code == 0 and "step 30 of 30" in info.output
    assert "last validation bits/byte" in info.output
    assert "eval/quick.json: effective context" in info.output


def test_the_main_job_prints_each_figure_once(trained: tuple[Path, str]):
    """The main job once printed a one-pass bits-per-byte table (2.10 at 128) and then the
    suite's (1.37 at 128) with nothing saying why: now the suite's figures alone, which are the
    results file's, and the training checks say they are one-pass checks."""
    run_dir, printed = trained
    assert "validation bits-per-byte by context length" not in printed
    suite = json.loads((run_dir / "eval" / "quick.json").read_text())
    shown = _bpb_row(printed, "quick: score by length — run")
    assert shown == [f"{c['score']:.3f}" for c in suite["cells"] if c["task"] == "bpb"]
    assert "val bits/byte" not in printed or "training check" in printed


def test_version_and_help_list_every_setting():
    assert runner.invoke(app, ["--version"]).output.startswith("memext ")
    helptext = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    for name in ("model.n_layers", "train.lr", "eval.lengths", "data.corpus"):
        assert name in helptext


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    _fails(
        ["train", "--out", str(tmp_path / "r"), *_sets(f"data.corpus={tmp_path / 'empty'}")],
        "has no text",
    )


def test_missing_corpus_path(tmp_path):
    _fails(
        ["train", "--out", str(tmp_path / "r"), *_sets(f"data.corpus={tmp_path / 'nope'}")],
        "does not exist",
    )


def test_corpus_of_only_invalid_utf8(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\xff\xfe\x00\x80" * 100)
    (tmp_path / "bin" / "b.dat").write_bytes(b"\xc3\x28" * 100)
    _fails(
        ["train", "--out", str(tmp_path / "r"), *_sets(f"data.corpus={tmp_path / 'bin'}")],
        "not valid UTF-8",
    )
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_unknown_override_suggests_the_field(tmp_path):
    out = _fails(
        ["train", "--out", str(tmp_path / "r"), "--set", "model.n_layer=4"], "unknown setting"
    )
    assert "model.n_layers" in out


def test_ill_typed_override(tmp_path):
    _fails(
        ["train", "--out", str(tmp_path / "r"), "--set", "model.n_layers=four"],
        "expected an integer",
    )
    _fails(["train", "--out", str(tmp_path / "r"), "--set", "train.lr=-1"], "train.lr")


def test_corrupt_checkpoint(run_dir: Path):
    (run_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _fails(["eval", str(run_dir)], "corrupt")
    _fails(["generate", str(run_dir), "--prompt", "x"], "corrupt")


def test_checkpoint_of_another_architecture(run_dir: Path):
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["model"]["n_layers"] = 3
    (run_dir / "config.json").write_text(json.dumps(cfg))
    _fails(["eval", str(run_dir)], "another architecture")


def test_output_directory_holding_a_run_is_refused(run_dir: Path, corpus: Path):
    before = (run_dir / "model.safetensors").read_bytes()
    _fails(["train", "--out", str(run_dir), *_sets(f"data.corpus={corpus}")], "already holds a run")
    assert (run_dir / "model.safetensors").read_bytes() == before


def test_eval_length_over_the_model_limit(tmp_path: Path, corpus: Path):
    from memext import build_model
    from memext import checkpoint as ckpt
    from memext.config import Config

    plain = Config.preset("tiny").override(
        {"model.memory": "none", "model.max_seq_len": "256", "train.segment_len": "0",
         "train.curriculum": "", "train.curriculum_steps": "", "data.mixture": "[]",
         "eval.lengths": "128", "data.corpus": str(corpus)}
    )  # fmt: skip
    run = tmp_path / "plain"
    run.mkdir()
    plain.save(run / ckpt.CONFIG)
    ckpt.save_weights(build_model(plain.model, seed=0), run / ckpt.WEIGHTS, {"step": "0"})
    _fails(["eval", str(run), "--lengths", "512"], "limit of 256 tokens")


def test_generate_reads_prompts_beyond_the_limit_through_memory(run_dir: Path, tmp_path: Path):
    """The run reads in segments with xl memory: a prompt longer than max_seq_len is fine (the
    plain model's refusal is tested in test_generate.py)."""
    prompt = tmp_path / "long.txt"
    prompt.write_text("x" * 300)  # max_seq_len=256
    result = runner.invoke(
        app, ["generate", str(run_dir), "--prompt-file", str(prompt), "--max-new-tokens", "5"]
    )
    assert result.exit_code == 0, result.output
    prompt.write_bytes(b"\xff\xfe")
    _fails(["generate", str(run_dir), "--prompt-file", str(prompt)], "not valid UTF-8")


def test_not_a_run_directory(tmp_path):
    _fails(["eval", str(tmp_path)], "neither a memext run")
    _fails(["info", str(tmp_path / "missing")], "does not exist")


def test_user_errors_print_no_traceback_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "memext", "train", "--set", "model.d_model=0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "model.d_model=0 is invalid" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_bpe_tokenizer_end_to_end(tmp_path: Path, corpus: Path):
    tok = tmp_path / "bpe.json"
    made = runner.invoke(
        app,
        ["tokenizer", "train", "--out", str(tok), "--corpus", str(corpus), "--vocab-size", "300"],
    )
    assert made.exit_code == 0, made.output
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    run = tmp_path / "bpe-run"
    result = runner.invoke(
        app,
        [
            "train",
            *("--out", str(run), "--device", "cpu", "--suite", "none"),
            *_sets(
                f"data.corpus={corpus}", f"data.tokenizer={tok}", f"model.vocab_size={len(vocab)}"
            ),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run / "tokenizer.json").read_bytes() == tok.read_bytes()  # the run keeps its copy
    tok.unlink()  # eval and generate must not need the original file
    ev = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--max-tokens", "256"])
    assert ev.exit_code == 0, ev.output
    cells = json.loads((run / "eval" / "default.json").read_text())["cells"]
    assert {c["task"] for c in cells} == {"bpb", "reach"}
    assert all(c["bytes"] > c["n"] for c in cells if c["task"] == "bpb")  # BPE tokens span bytes
    gen = runner.invoke(
        app, ["generate", str(run), "--prompt", "def", "--max-new-tokens", "5", "--device", "cpu"]
    )
    assert gen.exit_code == 0, gen.output


def test_vocab_larger_than_the_model_is_refused(tmp_path: Path, corpus: Path):
    tok = tmp_path / "bpe.json"
    runner.invoke(
        app,
        ["tokenizer", "train", "--out", str(tok), "--corpus", str(corpus), "--vocab-size", "300"],
    )
    _fails(
        [
            "train",
            "--out",
            str(tmp_path / "r"),
            *_sets(f"data.corpus={corpus}", f"data.tokenizer={tok}"),
        ],
        "set model.vocab_size=",
    )
