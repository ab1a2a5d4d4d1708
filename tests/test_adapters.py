"""Model adapters (``memext.adapters``): both kinds keep the one contract on tiny random models,
the registry of kinds refuses unknown names helpfully, and every place that used to tell "memext
run or Hugging Face directory" apart itself now opens models through the adapters, so a kind
registered once is read everywhere."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import memext
from memext import build_model
from memext import checkpoint as ckpt
from memext.adapters import (
    MODEL_KINDS,
    HFAdapter,
    MemextAdapter,
    ModelAdapter,
    Reading,
    detect_kind,
    open_model,
    register_model_kind,
)
from memext.adapters.base import as_rows, target_log_probs
from memext.cli import app
from memext.config import Config, EvalConfig, TrainConfig
from memext.curriculum import trained_length
from memext.errors import MemextError
from memext.tokenizer import ByteTokenizer
from tiny_runs import save_tiny_models

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_tiny_models(
        tmp_path_factory.mktemp("models"), seq_len=64, max_seq_len=256, lines=200
    )


def _naive_greedy(adapter: ModelAdapter, prompt: str, n: int) -> str:
    """Greedy decoding by full recompute: the reference every cached generation must equal."""
    ids = adapter.tokenizer.encode(prompt)
    eod = adapter.tokenizer.special_id("<eod>")
    new: list[int] = []
    for _ in range(n):
        nxt = int(adapter.logits(torch.tensor([ids + new]))[0, -1].argmax())
        if nxt == eod:
            break
        new.append(nxt)
    return adapter.tokenizer.decode(new)


# --- the contract, for every kind --------------------------------------------------------------
@pytest.mark.parametrize("which", ["memext", "hf"])
def test_every_kind_keeps_the_contract(models: dict[str, Path], which: str) -> None:
    adapter = open_model(models[which])
    assert isinstance(adapter, ModelAdapter) and adapter.kind == which
    assert adapter.trained_length == {"memext": 64, "hf": 128}[which]
    assert adapter.max_context == {"memext": 256, "hf": None}[which]
    assert adapter.window == {"memext": 256, "hf": 128}[which]
    assert adapter.params > 0 and adapter.device == torch.device("cpu")
    text = "The pass key is 12345."
    assert adapter.tokenizer.decode(adapter.tokenizer.encode(text)) == text
    x = torch.tensor([adapter.tokenizer.encode(text)] * 2)
    vocab = adapter.logits(x).shape[-1]
    # forward with state: two calls carrying the state cover the input's positions in order.
    first, state = adapter.forward(x[:, :5])
    second, _ = adapter.forward(x[:, 5:], state)
    assert first.shape == (2, 5, vocab) and second.shape == (2, x.shape[1] - 5, vocab)
    torch.testing.assert_close(first, adapter.logits(x[:, :5]))
    # generate: cached greedy decoding equals greedy by full recompute.
    got = "".join(adapter.generate("The pass", 12, temperature=0.0))
    assert got == _naive_greedy(adapter, "The pass", 12)
    stop = got[3:6]
    stopped = "".join(adapter.generate("The pass", 12, temperature=0.0, stop=[stop]))
    assert stopped == got[: got.find(stop)]
    # fingerprint: stable across opens, changed by new weights.
    again = open_model(models[which])
    assert again.fingerprint() == adapter.fingerprint()
    tokens, corpus, digest = adapter.validation()
    assert tokens.size > 0 and corpus and len(digest) == 64
    assert isinstance(adapter.describe()["config"], dict)


def test_a_memory_model_reads_past_its_window_and_its_fingerprint_names_the_reading(
    models: dict[str, Path],
) -> None:
    adapter = open_model(models["memext-xl"])
    assert adapter.max_context is None and adapter.window == 64
    assert adapter.logits(torch.randint(0, 256, (1, 200))).shape == (1, 200, 264)
    blind = open_model(models["memext-xl"], memory=False)
    assert blind.fingerprint() != adapter.fingerprint()
    assert adapter.fingerprint().endswith("segments-from-end")  # the suite cache's key holds it
    with pytest.raises(MemextError, match="only memext runs have a memory"):
        open_model(models["hf"], memory=False)


def test_fingerprint_changes_with_the_weights(models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(models["memext"], tmp_path / "copy"))
    before = open_model(copy).fingerprint()
    cfg = ckpt.load_config(copy).model
    ckpt.save_weights(build_model(cfg, seed=1), copy / ckpt.WEIGHTS, {"step": "1"})
    assert open_model(copy).fingerprint() != before


def test_hf_generation_follows_a_cache_policy(models: dict[str, Path]) -> None:
    adapter = open_model(models["hf"])
    full = "".join(adapter.generate("The pass key", 6, temperature=0.0))
    # A window that covers everything keeps everything: the same text.
    wide = adapter.generate("The pass key", 6, temperature=0.0, cache="window",
                            cache_options={"window": 64})  # fmt: skip
    assert "".join(wide) == full
    chunked = adapter.generate("The pass key", 6, temperature=0.0, chunk=2)
    assert "".join(chunked) == full


def test_summary_counts_every_stage_of_a_curriculum(tmp_path: Path) -> None:
    train = TrainConfig(seq_len=64, steps=10, curriculum=(128,), curriculum_steps=(8,))
    run = tmp_path / "run"
    run.mkdir()
    Config(train=train, eval=EvalConfig(lengths=(64, 128))).save(run / ckpt.CONFIG)
    (run / ckpt.METRICS).write_text('{"step": 18, "loss": 1.0}\n')
    lines = MemextAdapter.summary(run)
    assert "training: step 18 of 18; checkpoint missing" in lines  # once "18 of 10"


def test_one_trained_length() -> None:
    train = TrainConfig(seq_len=64, curriculum=(128, 256), curriculum_steps=(1, 1))
    cfg = Config(train=train, eval=EvalConfig(lengths=(64, 256)))
    assert trained_length(cfg) == 256
    src = Path(memext.__file__).parent
    defined = [p for p in src.rglob("*.py") if "def trained_length" in p.read_text()]
    assert [p.name for p in defined] == ["curriculum.py"]


# --- the registry of kinds ---------------------------------------------------------------------
def test_unknown_kind_is_refused_with_a_did_you_mean(models: dict[str, Path]) -> None:
    assert {"memext", "hf"} <= set(MODEL_KINDS.names())
    with pytest.raises(MemextError, match=r"unknown model kind 'memxt'.*did you mean 'memext'"):
        open_model(models["memext"], kind="memxt")
    with pytest.raises(MemextError, match="holds a model of kind 'memext', not 'hf'"):
        open_model(models["memext"], kind="hf")
    assert isinstance(open_model(models["hf"], kind="hf"), HFAdapter)
    assert isinstance(open_model(models["memext"], kind="memext"), MemextAdapter)


def test_what_no_kind_claims_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(
        MemextError, match=r"neither a memext run .* kinds: gguf, hf, known, memext"
    ):
        detect_kind(tmp_path)
    with pytest.raises(MemextError, match="does not exist"):
        detect_kind(tmp_path / "missing")


# --- a new kind, registered once, is read everywhere -------------------------------------------
class _Echo:
    """A stand-in kind (as a GGUF file or a named model would be): a folder marked ``echo``,
    whose model predicts the byte after the input's last byte."""

    kind = "echo"

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path, self.name, self.device = str(path), Path(path).name, torch.device(device)
        self.tokenizer = ByteTokenizer()
        self.trained_length, self.max_context, self.window, self.params = 64, 64, 256, 0
        self.segment_len, self.reading = None, Reading()

    @staticmethod
    def claims(path: str | Path) -> bool:
        return (Path(path) / "echo").is_file()

    @staticmethod
    def summary(path: str | Path) -> list[str]:
        return ["model: an echo of the input"]

    def forward(self, tokens: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return torch.nn.functional.one_hot((tokens + 1) % 264, 264).float(), state

    def logits(self, tokens: torch.Tensor, positions: Any = None) -> torch.Tensor:
        return self.forward(tokens)[0][:, as_rows(positions, tokens.shape[1])]

    def log_probs(
        self, tokens: torch.Tensor, positions: Any, targets: torch.Tensor
    ) -> torch.Tensor:
        return target_log_probs(self.logits(tokens, positions), targets)

    def generate(self, prompt: str, max_new_tokens: int, **sampling: Any) -> Iterator[str]:
        yield "echo:" + prompt[-3:]

    def validation(self) -> tuple[np.ndarray, str, str]:
        return np.arange(1000) % 256, "count", "0" * 64

    def describe(self) -> dict[str, Any]:
        return {}

    def fingerprint(self) -> str:
        return "echo"


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[Path]:
    register_model_kind("echo")(_Echo)
    path = tmp_path / "echo-model"
    path.mkdir()
    (path / "echo").write_text("")
    try:
        yield path
    finally:
        del MODEL_KINDS._entries["echo"]  # the registry is global: leave it as found


def test_a_registered_kind_reaches_every_former_dispatch(echo: Path, tmp_path: Path) -> None:
    from memext.extend import extend_model
    from memext.pipelines.ask import ask

    assert detect_kind(echo) == "echo" and isinstance(open_model(echo), ModelAdapter)
    info = runner.invoke(app, ["info", str(echo)])
    assert info.exit_code == 0 and "an echo of the input" in info.output, info.output
    gen = runner.invoke(app, ["generate", str(echo), "--prompt", "abcdef", "--device", "cpu"])
    assert gen.exit_code == 0 and "echo:def" in gen.output, gen.output

    class Store:
        def search(self, question: str, k: int, mode: str, doc_prefix: str | None = None) -> list:
            return []

    answered = ask(Store(), echo, "Why?", max_new_tokens=8)
    assert answered["answer"] == "echo:er:" and answered["window"] == 256
    with pytest.raises(MemextError, match=r"echo model: extend reads memext, hf"):
        extend_model(echo, tmp_path / "out", "yarn", 2.0)
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nlengths: [16, 32]\ndepths: [0.5]\nsamples: 1\ntasks: {passkey: {}}\n"
    )
    ev = runner.invoke(app, ["eval", str(echo), "--suite", str(suite), "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert ev.exit_code == 0 and "(echo)" in re.sub(r"\s+", " ", ev.output), ev.output
