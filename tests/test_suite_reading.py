"""How the suite reads a model (``memext.adapters.Reading``): scoring only the scored positions
equals the full logits for every kind; the evaluators take those positions from an adapter; a KV
policy that claims exactness scores what the plain reading scores; under a policy that chooses
what to attend to per forward (``retrieval``) a teacher-forced answer is scored as greedy
decoding emits it; and bad readings are refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from memext.adapters import ModelAdapter, Reading, Whole, open_model
from memext.adapters import base as adapter_base
from memext.cli import app
from memext.data.filler import Filler
from memext.data.tasks import make_samples
from memext.errors import MemextError
from memext.evals.perplexity import score_length
from memext.evals.suite import SuiteSpec, run_suite
from memext.evals.tasks import evaluate_samples
from memext.infer.cache import CACHES
from memext.infer.generate import generate_ids
from tiny_runs import save_tiny_models

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_models(
        tmp_path_factory.mktemp("models"), seq_len=128, max_seq_len=512, lines=300
    )


def _covering(policy: str, tokens: int) -> dict[str, Any]:
    """The policy's options under which it claims to keep everything (the reading supplies
    ``max_len`` itself)."""
    options = dict(CACHES.lookup(policy).covering(tokens) or {})
    options.pop("max_len", None)
    return options


class Naive(torch.nn.Module):
    """An adapter read the former way: every position's logits, scored by the evaluator."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, None]:
        return self.adapter.logits(tokens), None


# --- only what is scored ------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["memext", "memext-xl", "hf", "hf-unsplit"])
def test_scored_positions_equal_the_full_logits(models: dict[str, Path], which: str) -> None:
    adapter = open_model(models[which.removesuffix("-unsplit")])
    if which == "hf-unsplit":  # a head that is not a plain projection: transformers' own rows
        adapter._split = False
    x = torch.randint(0, 250, (2, 200))  # past the xl model's segment and the tiny Llama's 128
    full = adapter.logits(x)
    rows = torch.tensor([0, 5, 63, 64, 130, 199])
    torch.testing.assert_close(adapter.logits(x, rows), full[:, rows], rtol=1e-5, atol=1e-6)
    targets = torch.randint(0, 250, (2, rows.numel()))
    naive = full.float().log_softmax(-1)[:, rows].gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(adapter.log_probs(x, rows, targets), naive, rtol=1e-5, atol=1e-5)
    assert adapter.logits(x, []).shape == (2, 0, full.shape[-1])
    with pytest.raises(ValueError, match="increase strictly"):
        adapter.logits(x, [5, 3])


def test_the_vocabulary_projection_sees_only_the_scored_rows(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2 at 32k would hold 32k x 49,152 logits per sample: the head must see only the
    positions scored, a piece at a time."""
    adapter = open_model(models["hf"])
    seen: list[int] = []
    head = adapter.model.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    monkeypatch.setattr(adapter_base, "PIECE", 16)
    try:
        x = torch.randint(0, 250, (2, 300))
        adapter._separable()  # its one probe, before counting
        seen.clear()
        adapter.logits(x, [250, 299])
        assert seen == [2]
        seen.clear()
        adapter.log_probs(x, torch.arange(150, 300), torch.randint(0, 250, (2, 150)))
        assert max(seen) == 16 and sum(seen) == 150
    finally:
        handle.remove()


@pytest.mark.parametrize("which", ["memext", "hf"])
def test_the_evaluators_score_only_the_scored_positions(
    models: dict[str, Path], which: str
) -> None:
    adapter = open_model(models[which])
    tok = adapter.tokenizer
    samples = make_samples("passkey", tok, Filler.stdlib(tok), 180, 0.5, 5, 3)
    fast = evaluate_samples(Whole(adapter), samples, 2**62, batch_size=2, keep=True)
    slow = evaluate_samples(Naive(adapter), samples, 2**62, batch_size=2, keep=True)
    for key in ("correct", "predicted", "exact_match", "token_accuracy"):
        assert fast[key] == slow[key]
    tokens = adapter.validation()[0]
    bytes_ = tok.byte_lengths()
    fast = score_length(Whole(adapter), tokens, 64, 128, 200, bytes_, batch_size=3)
    slow = score_length(Naive(adapter), tokens, 64, 128, 200, bytes_, batch_size=3)
    assert fast["scored_tokens"] == slow["scored_tokens"] == 200
    assert fast["bits_per_byte"] == pytest.approx(slow["bits_per_byte"], rel=1e-6)


# --- reading through a KV policy ----------------------------------------------------------------
@pytest.mark.parametrize("policy", ["full", "window", "sinks", "retrieval"])
@pytest.mark.parametrize("chunk", [None, 48])
def test_a_policy_that_keeps_everything_reads_as_the_plain_model(
    models: dict[str, Path], policy: str, chunk: int | None
) -> None:
    plain = open_model(models["hf"])
    x = torch.randint(0, 250, (2, 200))
    reading = Reading.of(policy, _covering(policy, 200), chunk)
    adapter = open_model(models["hf"], reading=reading)
    rows = torch.arange(150, 200)  # the prefix in chunks, then one token per forward
    torch.testing.assert_close(adapter.logits(x, rows), plain.logits(x, rows), rtol=1e-4, atol=2e-5)
    targets = torch.randint(0, 250, (2, rows.numel()))
    torch.testing.assert_close(
        adapter.log_probs(x, rows, targets), plain.log_probs(x, rows, targets), rtol=1e-4, atol=1e-4
    )
    assert adapter.fingerprint() != plain.fingerprint() and policy in adapter.name


def test_a_covering_policy_scores_the_suite_as_the_plain_reading(
    models: dict[str, Path], tmp_path: Path
) -> None:
    spec = SuiteSpec(
        "covering",
        {"passkey": {}, "niah": {}, "bpb": {"max_tokens": 96}},
        lengths=(160, 256),
        depths=(0.5,),
        samples=3,
    )
    plain = run_suite(open_model(models["hf"]), spec, tmp_path / "plain.json", progress=False)
    reading = Reading.of("retrieval", _covering("retrieval", 300), 64)
    adapter = open_model(models["hf"], reading=reading)
    read = run_suite(adapter, spec, tmp_path / "plain.json", progress=False)
    assert len(read["cells"]) == len(plain["cells"]) == 2 + 2 + 2  # none reused from plain
    for a, b in zip(plain["cells"], read["cells"], strict=True):
        assert (a["task"], a["length"]) == (b["task"], b["length"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)
        assert a.get("token_accuracy") == b.get("token_accuracy")
    assert read["model"]["reading"].startswith("retrieval(block=4, ")
    assert read["model"]["name"] == "llama (retrieval, chunk 64)"


@pytest.mark.parametrize("chunk", [5, None])
def test_scoring_under_retrieval_is_greedy_decoding_under_it(
    models: dict[str, Path], chunk: int | None
) -> None:
    """Retrieval chooses blocks by each forward's queries, so an answer read in one chunk is not
    the answer decoded token by token: the reading decodes the answer positions one by one. With
    the answer being greedy decoding's own output, teacher-forced scoring must accept it all."""
    options = {"sinks": 2, "window": 8, "block": 4, "topk": 2}  # far less than the prompt
    adapter = open_model(models["hf"], reading=Reading.of("retrieval", options, chunk))
    torch.manual_seed(1)
    prompt = torch.randint(0, 250, (60,)).tolist()
    emitted = list(
        adapter._generate_ids(
            prompt, 6, temperature=0.0, cache="retrieval", cache_options=options, chunk=chunk
        )
    )
    x = torch.tensor([prompt + emitted[:-1]])
    assert adapter.logits(x, range(59, 65)).argmax(-1)[0].tolist() == emitted
    # The same for a memext run's own cache.
    run = open_model(models["memext"], reading=Reading.of("retrieval", options, chunk))
    emitted = list(
        generate_ids(
            run.model, prompt, 6, temperature=0.0, cache="retrieval", cache_options=options,
            chunk=chunk,
        )
    )  # fmt: skip
    x = torch.tensor([prompt + emitted[:-1]])
    assert run.logits(x, range(59, 65)).argmax(-1)[0].tolist() == emitted


def test_reading_cuts_the_input_as_generation_reads_a_prompt() -> None:
    r = Reading.of("window", {"window": 8}, 4)
    assert r.cuts(12, 9) == [(0, 4), (4, 8), (8, 10), (10, 11), (11, 12)]
    assert r.cuts(10, None) == [(0, 4), (4, 8), (8, 10)]
    assert Reading.of("window", {"window": 8}).cuts(6, 3) == [(0, 4), (4, 5), (5, 6)]
    # A policy's tail: the scored prefix's last tokens are a forward of their own.
    assert r.cuts(12, 9, tail=3) == [(0, 4), (4, 7), (7, 10), (10, 11), (11, 12)]
    assert Reading.of(chunk=16).cache == "full" and Reading.of().plain
    assert r.slug() == "window-window8-chunk4" and r.label() == "window, chunk 4"


# --- refusals -----------------------------------------------------------------------------------
def _one_line(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


def test_bad_readings_are_refused_in_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    hf, xl = str(models["hf"]), str(models["memext-xl"])
    assert "did you mean 'retrieval'" in _one_line(["eval", hf, "--cache", "retreival"])
    assert "takes no option windw" in _one_line(
        ["eval", hf, "--cache", "window", "--cache-opt", "windw=4"]
    )
    assert "needs sinks=N" in _one_line(["eval", hf, "--cache", "retrieval"])
    assert "the reading supplies it" in _one_line(
        ["eval", hf, "--cache", "full", "--cache-opt", "max_len=9"]
    )
    assert "reads in segments through its memory" in _one_line(
        ["eval", xl, "--cache", "window", "--cache-opt", "window=8"]
    )
    from memext.hf.model import extend_hf

    dynamic = extend_hf(models["hf"], tmp_path / "dynamic", "dynamic", 2.0)
    line = _one_line(
        ["eval", str(dynamic), "--cache", "retrieval"]
        + [f"--cache-opt={k}={v}" for k, v in _covering("retrieval", 8).items()]
    )
    assert "rope_type 'dynamic'" in line
    with pytest.raises(MemextError, match="reads no input through a KV-cache policy"):
        _refuse_kind_without_reading(models["hf"])


def _refuse_kind_without_reading(path: Path) -> None:
    """A kind whose constructor takes no ``reading`` is refused one, not handed it."""
    from memext.adapters import MODEL_KINDS, register_model_kind

    class Fixed:
        def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
            raise AssertionError("opened")

        @staticmethod
        def claims(path: str | Path) -> bool:
            return True

    register_model_kind("fixed-reading")(Fixed)
    try:
        open_model(path, kind="fixed-reading", reading=Reading.of("full"))
    finally:
        del MODEL_KINDS._entries["fixed-reading"]
