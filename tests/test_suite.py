"""Evaluation suites (``memext.evals.suite``): cells on a grid, scores that accept the right
answer and reject wrong ones, the effective context length, a results file with provenance that
resumes without recomputing finished cells, the same suite on a Hugging Face model, and clear
refusals of bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from memext.adapters import MemextAdapter, open_model
from memext.errors import MemextError
from memext.evals import suite_tasks as suite_mod
from memext.evals.results import (
    FORMAT,
    SCHEMA_VERSION,
    effective_length,
    load_results,
    summarize,
)
from memext.evals.suite import SUITES, SuiteSpec, get_suite, plan, run_suite
from tiny_hf import save_tiny_llama
from tiny_runs import save_tiny_corpus, save_tiny_run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_corpus(tmp_path_factory.mktemp("corpus"), docs=4, lines=400)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("runs") / "plain", corpus)


HAY = SuiteSpec(
    "tiny",
    {"bpb": {"max_tokens": 128}, "passkey": {}, "common_words": {"n_common": 2}},
    lengths=(160, 256),
    depths=(0.0, 1.0),
    samples=2,
)


# --- the effective context length -------------------------------------------------------------
def test_effective_length_is_the_longest_length_that_holds_the_threshold() -> None:
    scores = {64: 1.0, 128: 0.95, 256: 0.85, 512: 0.95}
    assert effective_length(scores, 0.9) == 128  # 256 drops below: 512 does not count
    assert effective_length(scores, 0.8) == 512
    assert effective_length({64: 0.0, 128: 0.0}, 0.9) is None  # nothing to hold
    assert effective_length({64: 2.0, 128: 2.1, 256: 2.5}, 0.9, higher_is_better=False) == 128
    with pytest.raises(ValueError, match="threshold"):
        effective_length(scores, 0.0)


def test_summary_averages_depths_and_leaves_speed_out() -> None:
    cells = [
        {"task": "passkey", "length": 64, "depth": 0.0, "metric": "exact_match",
         "higher_is_better": True, "score": 1.0},
        {"task": "passkey", "length": 64, "depth": 1.0, "metric": "exact_match",
         "higher_is_better": True, "score": 0.5},
        {"task": "passkey", "length": 128, "depth": 0.0, "metric": "exact_match",
         "higher_is_better": True, "score": 0.25},
        {"task": "speed", "length": 64, "depth": None, "metric": "tokens_per_s",
         "higher_is_better": True, "score": 9000.0},
    ]  # fmt: skip
    s = summarize(cells, 0.9)
    assert s["tasks"]["passkey"]["by_length"] == {"64": 0.75, "128": 0.25}
    assert s["accuracy_tasks"] == ["passkey"] and s["tasks"]["speed"]["effective_context"] is None
    assert s["effective_context"] == 64 and "0.9 times" in s["definition"]


def test_overall_effective_context_counts_only_the_tasks_the_model_solves() -> None:
    """The main job once read an effective context of 1024 with and without memory: the mean of
    seven accuracy tasks, six of them near 0 with noise that rose with length, held while the
    one task it solved (passkey) fell to 0.2 without memory."""

    def cells(task: str, metric: str, scores: list[float]) -> list[dict]:
        return [
            {"task": task, "length": n, "depth": None, "metric": metric,
             "higher_is_better": True, "score": v}
            for n, v in zip((128, 256, 512, 1024), scores, strict=True)
        ]  # fmt: skip

    without_memory = [
        *cells("passkey", "exact_match", [1.0, 1.0, 0.2, 0.2]),
        *cells("common_words", "f1", [0.1, 0.3, 0.9, 0.9]),
        *cells("niah", "exact_match", [0.0, 0.0, 0.0, 0.0]),
    ]
    s = summarize(without_memory, 0.9)
    assert s["solved_tasks"] == ["passkey"] and s["effective_context"] == 256
    with_memory = cells("passkey", "exact_match", [1.0, 1.0, 1.0, 1.0])
    assert summarize(with_memory + without_memory[4:], 0.9)["effective_context"] == 1024
    assert summarize(without_memory[4:], 0.9)["effective_context"] is None  # nothing solved
    assert "solves (score >= 0.5)" in s["definition"]


# --- plan ---------------------------------------------------------------------------------------
def test_plan_resolves_lengths_from_the_trained_length(run: Path) -> None:
    adapter = MemextAdapter(run)
    spec = SuiteSpec("m", {"passkey": {}, "bpb": {}}, length_multiples=(0.5, 1, 2))
    lengths, grid = plan(spec, adapter)
    assert adapter.trained_length == 128 and lengths == [64, 128, 256]
    assert len([c for t, c in grid if c.task == "passkey"]) == 3 * 5
    assert [c.depth for t, c in grid if c.task == "bpb"] == [None] * 3
    assert set(SUITES) >= {"quick", "longctx"}


# --- scoring: an oracle is right everywhere, a random model nowhere ----------------------------
class Oracle:
    """An adapter that knows every sample the suite generated: one-hot logits of the truth."""

    def __init__(self, inner: MemextAdapter, known: dict[bytes, np.ndarray], wrong: bool = False):
        self.inner, self.known, self.wrong = inner, known, wrong

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def logits(self, tokens: torch.Tensor, positions=None) -> torch.Tensor:
        if tokens.shape[1] not in {s.size - 1 for s in self.known.values()}:
            return self.inner.logits(tokens, positions)  # speed probes
        out = torch.zeros(*tokens.shape, 264)
        for i, row in enumerate(tokens.numpy()):
            target = self.known[row.astype(np.int64).tobytes()][1:].copy()
            if self.wrong:
                target[-1] = (target[-1] + 1) % 256
            out[i, torch.arange(tokens.shape[1]), torch.from_numpy(target)] = 1.0
        return out if positions is None else out[:, torch.as_tensor(positions)]


def _recording(monkeypatch: pytest.MonkeyPatch) -> dict[bytes, np.ndarray]:
    known: dict[bytes, np.ndarray] = {}
    real = suite_mod.make_samples

    def record(*args, **kwargs):
        samples = real(*args, **kwargs)
        for s in samples:
            known[s.tokens[:-1].tobytes()] = s.tokens
        return samples

    monkeypatch.setattr(suite_mod, "make_samples", record)
    return known


@pytest.mark.parametrize("wrong", [False, True])
def test_scores_accept_the_right_answer_and_reject_a_wrong_one(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrong: bool
) -> None:
    known = _recording(monkeypatch)
    spec = dataclasses.replace(HAY, tasks={"passkey": {}, "niah": {}, "common_words": {}})
    r = run_suite(Oracle(MemextAdapter(run), known, wrong), spec, tmp_path / "o.json", False)
    by_task = {(c["task"], c["length"], c["depth"]): c for c in r["cells"]}
    assert len(by_task) == 2 * 2 * 2 + 2 and not r["skipped"]
    for c in by_task.values():
        if c["task"] == "common_words":
            assert c["exact_match"] == (0.0 if wrong else 1.0)
            # One letter of the last word wrong: that word is missed, the others found.
            assert (c["score"] < 1.0) if wrong else (c["score"] == 1.0)
        else:
            assert c["score"] == (0.0 if wrong else 1.0)


def test_a_random_model_is_at_chance(run: Path, tmp_path: Path) -> None:
    spec = dataclasses.replace(HAY, tasks={"passkey": {}})
    r = run_suite(MemextAdapter(run), spec, tmp_path / "r.json", progress=False)
    assert all(c["score"] == 0.0 and c["chance"] == pytest.approx(1 / 90000) for c in r["cells"])
    assert r["summary"]["effective_context"] is None


# --- the results file, resumption ---------------------------------------------------------------
def test_results_file_has_schema_provenance_and_every_cell(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval" / "tiny.json"
    r = run_suite(MemextAdapter(run), HAY, out, progress=False)
    data = load_results(out)
    assert data["format"] == FORMAT and data["schema_version"] == SCHEMA_VERSION
    assert data["model"]["kind"] == "memext" and data["model"]["trained_length"] == 128
    assert len(data["corpus"]["hash"]) == 64 and data["seed"] == 0
    assert {"torch", "memext", "scikit-learn"} <= set(data["provenance"])
    assert [c["length"] for c in data["cells"] if c["task"] == "bpb"] == [160, 256]
    bpb = [c["score"] for c in data["cells"] if c["task"] == "bpb"]
    assert all(0 < b < 20 for b in bpb)
    assert r["summary"]["tasks"]["bpb"]["effective_context"] in (160, 256)


def test_interrupted_suite_resumes_without_recomputing(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "resume.json"
    spec = dataclasses.replace(HAY, tasks={"passkey": {}, "bpb": {"max_tokens": 64}})
    calls: list[str] = []
    real = suite_mod.AnswerTask.run

    def counted(self, cell, ctx):
        calls.append(cell.key())
        if len(calls) == 3 and not ran_once:
            raise KeyboardInterrupt  # a user's ctrl-c in the middle of the suite
        return real(self, cell, ctx)

    monkeypatch.setattr(suite_mod.AnswerTask, "run", counted)
    ran_once = False
    with pytest.raises(KeyboardInterrupt):
        run_suite(MemextAdapter(run), spec, out, progress=False)
    assert not out.exists() and len(calls) == 3
    first = list(calls)
    ran_once = True
    calls.clear()
    r = run_suite(MemextAdapter(run), spec, out, progress=False)
    assert first[-1] in calls and not set(first[:2]) & set(calls)  # finished cells not rerun
    assert len(r["cells"]) == 4 + 2
    calls.clear()
    run_suite(MemextAdapter(run), spec, out, progress=False)
    assert calls == []  # everything cached
    # A torn last line (a kill mid-write) is ignored, not fatal.
    log = out.with_suffix(".cells.jsonl")
    log.write_text(log.read_text() + '{"suite_key": "x", "ce')
    assert len(run_suite(MemextAdapter(run), spec, out, progress=False)["cells"]) == 6


def test_estimate_is_printed_before_a_suite_starts(run: Path, tmp_path: Path) -> None:
    said: list[str] = []
    spec = dataclasses.replace(HAY, tasks={"passkey": {}})
    run_suite(MemextAdapter(run), spec, tmp_path / "e.json", progress=False, log=said.append)
    assert len(said) == 1 and "4 of 4 cells to run" in said[0]
    assert "tok/s" in said[0] and "MiB of tensors for one 256-token input" in said[0]


def test_a_changed_suite_does_not_reuse_cells(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    spec = dataclasses.replace(HAY, tasks={"passkey": {}})
    run_suite(MemextAdapter(run), spec, out, progress=False)
    before = out.with_suffix(".cells.jsonl").read_text().count("\n")
    run_suite(MemextAdapter(run), dataclasses.replace(spec, seed=1), out, progress=False)
    assert out.with_suffix(".cells.jsonl").read_text().count("\n") == 2 * before


# --- user suites and bad input ------------------------------------------------------------------
def test_yaml_suite_with_a_custom_needle(run: Path, tmp_path: Path) -> None:
    hay = tmp_path / "hay.txt"
    hay.write_text("Ships sail the wide sea under grey skies. " * 50)
    path = tmp_path / "mine.yaml"
    path.write_text(
        "lengths: [200]\ndepths: [0.5]\nsamples: 1\n"
        f"haystack: {hay}\n"
        "tasks:\n  niah:\n    needle: 'The secret word is {value}.'\n"
        "    question: ' The secret word is '\n"
    )
    spec = get_suite(str(path))
    assert spec.name == "mine" and spec.tasks["niah"]["needle"].startswith("The secret")
    r = run_suite(MemextAdapter(run), spec, tmp_path / "m.json", progress=False)
    assert [c["task"] for c in r["cells"]] == ["niah"]


def test_bad_input_is_refused_clearly(run: Path, tmp_path: Path) -> None:
    with pytest.raises(MemextError, match=r"unknown task\(s\) passkee .*did you mean 'passkey'"):
        SuiteSpec("x", {"passkee": {}})
    # Misspelt options fail when the suite is read: the generator's, and the task's own.
    with pytest.raises(MemextError, match=r"task niah: .*takes no setting neddle .*'needle'"):
        SuiteSpec("x", {"niah": {"neddle": "The word is {value}."}})
    with pytest.raises(MemextError, match=r"task bpb: .*takes no option max_token\b"):
        SuiteSpec("x", {"bpb": {"max_token": 10}})
    with pytest.raises(MemextError, match="unknown suite"):
        get_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {passkey: {}}\nlenghts: [1]\n")
    with pytest.raises(MemextError, match="unknown suite field"):
        get_suite(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    spec = dataclasses.replace(HAY, haystack=str(empty), tasks={"passkey": {}})
    with pytest.raises(MemextError, match="empty"):
        run_suite(MemextAdapter(run), spec, tmp_path / "e.json", progress=False)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(MemextError, match="not UTF-8"):
        run_suite(
            MemextAdapter(run),
            dataclasses.replace(spec, haystack=str(binary)),
            tmp_path / "b.json",
            progress=False,
        )
    # Beyond what a model without memory reads (max_seq_len 512).
    long = dataclasses.replace(HAY, lengths=(1024,), tasks={"passkey": {}})
    with pytest.raises(MemextError, match=r"exceeds .* limit of 512"):
        run_suite(MemextAdapter(run), long, tmp_path / "l.json", progress=False)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": FORMAT, "schema_version": 99}))
    with pytest.raises(MemextError, match="schema version 99"):
        load_results(other)
    with pytest.raises(MemextError, match="neither a memext run"):
        open_model(tmp_path)


def test_memory_model_reads_any_length_in_segments(tmp_path: Path, corpus: Path) -> None:
    path = save_tiny_run(tmp_path / "xl", corpus, memory="xl", mem_len=64, max_seq_len=128)
    adapter = MemextAdapter(path)
    assert adapter.max_context is None and adapter.segment_len == 64
    x = torch.randint(0, 256, (1, 300))
    assert adapter.logits(x).shape == (1, 300, 264)  # past max_seq_len, through memory
    spec = dataclasses.replace(HAY, lengths=(600,), tasks={"passkey": {}})
    r = run_suite(adapter, spec, tmp_path / "x.json", progress=False)
    assert len(r["cells"]) == 2


# --- a Hugging Face model through the same suite -------------------------------------------------
def test_the_same_suite_grades_a_local_hf_model(tmp_path: Path) -> None:
    path = save_tiny_llama(tmp_path / "llama")
    adapter = open_model(path)
    assert adapter.kind == "hf" and adapter.trained_length == 128
    ids = adapter.tokenizer.encode("The pass key is 12345.")
    assert adapter.tokenizer.decode(ids) == "The pass key is 12345."
    assert adapter.tokenizer.byte_lengths()[ids].sum() == len(b"The pass key is 12345.")
    spec = SuiteSpec("hf", {"passkey": {}}, lengths=(160, 256), depths=(0.5,), samples=1)
    r = run_suite(adapter, spec, tmp_path / "hf.json", progress=False)
    assert r["model"]["kind"] == "hf" and len(r["cells"]) == 2  # 256 > 128: read anyway
    assert "transformers" in r["provenance"]


def test_no_memory_adapter_reads_each_segment_alone(tmp_path: Path, corpus: Path) -> None:
    run = save_tiny_run(tmp_path / "xl", corpus, memory="xl", mem_len=64)
    x = torch.randint(0, 256, (2, 192))
    with_memory = MemextAdapter(run).logits(x)
    without = MemextAdapter(run, memory=False)
    alone = without.model(x[:, 128:])[0]  # the last segment read with no state at all
    assert torch.allclose(without.logits(x)[:, 128:], alone, atol=1e-6)
    assert not torch.allclose(with_memory[:, 128:], alone, atol=1e-3)  # memory changes it
    assert torch.allclose(with_memory[:, :64], without.logits(x)[:, :64])  # nothing to recall yet
    assert without.name.endswith("(no memory)")
    assert without.fingerprint() != MemextAdapter(run).fingerprint()
    # Segments are cut from the end: the last one is whole whatever the length.
    y = torch.randint(0, 256, (1, 200))
    assert torch.allclose(without.logits(y)[:, -64:], without.model(y[:, -64:])[0], atol=1e-6)
    with pytest.raises(MemextError, match="neither a memext run"):
        open_model(tmp_path, memory=False)
