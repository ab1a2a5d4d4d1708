"""`memext eval` and `memext report` on an encoder-decoder run: the held-out pairs of its task at
several source lengths, whole and by a prefix baseline, against direct calls of
``evaluate_pairs`` on the same samples; resumption; retrieval past ``max_seq_len``; the report's
figure; the refusals.

The run is tiny and untrained, so greedy decoding is replaced by a perfect reader of the source
it is handed (the digest's "Fact n: WORD." sentences, in order): its scores are the prefix
oracle's when it reads a prefix, 100 on the whole input, which tells the readings apart. The
teacher-forced loss is the real model's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import memext.evals.seq2seq as s2s
import memext.evals.seq2seq_suite as suite
from memext import build_model
from memext import checkpoint as ckpt
from memext.checkpoint import load, run_tokenizer
from memext.cli import app
from memext.config import Config
from memext.data.filler import Filler
from memext.data.prepare import prepare_data
from memext.evals.seq2seq import evaluate_pairs, held_out_samples, oracle_scores
from tiny_runs import save_tiny_corpus, save_tiny_run

runner = CliRunner()
SCORES = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "loss")
FACT = re.compile(r"Fact \d+: ([a-z]+)\.")
#: max_seq_len is 256: 320 is read with retrieval cross-attention.
ARGS = ["--lengths", "192,320", "--keep", "128", "--samples", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("s2s")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 80)
    cfg = Config.preset("seq2seq-tiny").override(
        {
            "model.d_model": "32",
            "model.n_heads": "2",
            "model.window": "16",
            "model.max_seq_len": "256",
            "model.max_target_len": "24",
            "data.corpus": str(corpus),
            "data.mixture": "[{task: digest, lengths: [160]}]",
            "train.seq_len": "160",
            "train.curriculum": "",
            "train.curriculum_steps": "",
            "eval.lengths": "[192]",
            "eval.probes": "",
            "eval.probe_samples": "2",
        }
    )
    path = root / "run"
    path.mkdir()
    cfg.save(path / ckpt.CONFIG)
    ckpt.save_weights(build_model(cfg.model, seed=0), path / ckpt.WEIGHTS, {"step": "0"})
    return path


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Greedy decoding replaced by a perfect reader of the source; each call's retrieval
    options are recorded."""
    from memext.tokenizer import ByteTokenizer

    tok, calls = ByteTokenizer(), []

    def perfect(model, src, bos, eos, limit, **retrieval):
        calls.append({"source": src.shape[1], **retrieval})
        return [tok.encode(" ".join(FACT.findall(tok.decode(row)))) for row in src.tolist()]

    monkeypatch.setattr(s2s, "greedy_decode", perfect)
    return calls


def _eval(run: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["eval", str(run), *ARGS, *args])
    assert result.exit_code == 0, result.output
    return json.loads((run / "eval" / "seq2seq.json").read_text())


def _cells(results: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(c["length"], c["reading"]): c for c in results["cells"]}


def test_cells_are_evaluate_pairs_on_the_same_samples(run: Path, reader: list) -> None:
    cells = _cells(_eval(run))
    assert set(cells) == {(n, r) for n in (192, 320) for r in ("whole", "prefix")}
    model, cfg = load(run)
    tok = run_tokenizer(run)
    filler = Filler(prepare_data(cfg.data, tok, lambda m: None)[0].validation)
    # Chunks of the trained length, every state read, logits scaled from the trained length.
    retrieval = {"encode_chunk": 160, "cross_topk": None, "trained_len": 160}
    for (length, reading), cell in cells.items():
        samples = held_out_samples("digest", tok, filler, length, 3)
        keep = 128 if reading == "prefix" else None
        past = reading == "whole" and length > 256
        assert cell["retrieval"] == (retrieval if past else None)
        direct = evaluate_pairs(model, tok, samples, keep=keep, **(retrieval if past else {}))
        for name in SCORES:
            assert cell[name] == pytest.approx(direct[name], rel=1e-5), (length, reading, name)
        assert cell["source_tokens"] == (keep or length) and cell["n"] == 3
        assert cell["oracle"] == pytest.approx(oracle_scores(tok, samples, keep))
        assert cell["seconds"] >= 0
    # The perfect reader scores what the oracle of the same tokens scores: the prefix cells
    # read the first 128 tokens and no more; the whole input gives every word.
    for length in (192, 320):
        prefix = cells[length, "prefix"]
        assert prefix["rougeL"] == pytest.approx(prefix["oracle"]["rougeL"])
        assert prefix["rougeL"] < 100 and cells[length, "whole"]["rougeL"] == pytest.approx(100)
    assert np.isfinite(cells[320, "whole"]["loss"])


def test_a_source_past_max_seq_len_is_read_with_retrieval(run: Path, reader: list) -> None:
    model, _ = load(run)
    tok = run_tokenizer(run)
    samples = held_out_samples("digest", tok, Filler.from_text(tok, "A b c. " * 50), 320, 1)
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        evaluate_pairs(model, tok, samples)  # the plain model cannot read 320 tokens at all
    reader.clear()
    _eval(run, "--out", str(run / "elsewhere.json"))
    assert {c["source"]: c.get("encode_chunk") for c in reader} == {
        192: None,
        128: None,
        320: 160,
    }
    assert all(c.get("trained_len") == 160 for c in reader if c["source"] == 320)
    assert all(c.get("cross_topk") is None for c in reader if c["source"] == 320)


def test_resume_keeps_finished_cells_and_recomputes_none(
    run: Path, reader: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _cells(_eval(run))
    calls: list[int | None] = []
    real = suite.evaluate_pairs

    def counted(model, tok, samples, *args, **kwargs):
        calls.append(kwargs.get("keep"))
        return real(model, tok, samples, *args, **kwargs)

    monkeypatch.setattr(suite, "evaluate_pairs", counted)
    again = _cells(_eval(run))
    assert calls == [] and again == first
    # A new length runs its two cells only; the others are kept as they were.
    longer = _cells(_eval(run, "--lengths", "192,320,384"))
    assert calls == [None, 128]
    assert {k: longer[k] for k in first} == first and longer[384, "whole"]["retrieval"]
    # Another prefix is another evaluation: every cell is run again.
    calls.clear()
    _eval(run, "--keep", "96")
    assert sorted(calls, key=str) == [96, 96, None, None]
    # A source that fits in the prefix has no prefix cell: it would be the whole reading.
    results = _eval(run, "--keep", "192")
    assert set(_cells(results)) == {(192, "whole"), (320, "whole"), (320, "prefix")}
    assert [(c["length"], c["reading"]) for c in results["skipped"]] == [(192, "prefix")]


def test_report_draws_scores_against_length(run: Path, reader: list) -> None:
    cells = _cells(_eval(run))
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report" / "report.html").read_text()
    alt = "plot: digest: ROUGE-L, BLEU and chrF against input length"
    (img,) = re.findall(rf'<img class="plot" [^>]*alt="{alt}"[^>]*>', page)
    series = json.loads(re.search(r'data-series="([^"]*)"', img)[1].replace("&quot;", '"'))
    lines = {(s["panel"], s["label"]): s for s in series}
    for metric in ("rougeL", "bleu", "chrf"):
        whole, prefix = lines[metric, "whole input"], lines[metric, "prefix 128"]
        oracle = lines[metric, "prefix oracle 128"]
        assert whole["x"] == prefix["x"] == oracle["x"] == [192, 320]
        assert whole["y"] == [cells[n, "whole"][metric] for n in (192, 320)]
        assert prefix["y"] == [cells[n, "prefix"][metric] for n in (192, 320)]
        assert oracle["y"] == [cells[n, "prefix"]["oracle"][metric] for n in (192, 320)]
        assert whole["retrieval"] == [320] and prefix["retrieval"] == []
    markdown = (run / "report" / "report.md").read_text()
    assert (
        "| run | digest | 320 | whole (retrieval: chunks of 160, scaled from 160) | 320 |"
        in markdown
    )


def test_defaults_come_from_the_run(run: Path) -> None:
    spec = suite.plan_seq2seq(run)
    assert spec.lengths == (192,) and spec.tasks == ("digest",) and spec.samples == 2
    assert suite.DEFAULT_KEEP == 512 and spec.keep == 256  # capped at max_seq_len
    assert suite.plan_seq2seq(run, keep=100, samples=5).keep == 100
    assert (spec.encode_chunk, spec.cross_topk, spec.trained_len) == (160, 0, 160)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "digset"], "unknown task 'digset'"),
        (["--task", ","], "--task names no task"),
        (["--keep", "300"], "--keep=300"),
        (["--suite", "quick"], "--suite: options of the suite"),
        (["--cache", "sinks"], "--cache: options of the suite"),
    ],
)
def test_bad_seq2seq_options_exit_2(run: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["eval", str(run), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_seq2seq_options_on_a_decoder_only_run_exit_2(tmp_path: Path) -> None:
    corpus = save_tiny_corpus(tmp_path / "corpus", docs=2, lines=10)
    plain = save_tiny_run(tmp_path / "plain", corpus)
    result = runner.invoke(app, ["eval", str(plain), "--task", "digest", "--samples", "2"])
    assert result.exit_code == 2, result.output
    assert "--task, --samples: options for encoder-decoder runs" in result.output
    assert not (plain / "eval").exists()
