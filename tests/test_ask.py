"""Retrieval-backed answering (``memext.pipelines.ask``) and the `memext memory` / `memext ask`
commands: the prompt holds the best chunks that fit the model's window and never more."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from memext import build_model
from memext import checkpoint as ckpt
from memext.cli import app
from memext.config import Config, EvalConfig, ModelConfig
from memext.errors import MemextError
from memext.pipelines.ask import assemble
from memext.pipelines.store import Hit
from tiny_bert import write_tiny_bert

runner = CliRunner()


def _hit(doc: str, text: str, score: float) -> Hit:
    return Hit(id=0, doc_id=doc, text=text, score=score, metadata={})


def test_assemble_keeps_rank_order_within_the_budget() -> None:
    hits = [_hit("a", "x" * 50, 3.0), _hit("b", "y" * 500, 2.0), _hit("c", "z" * 40, 1.0)]
    prompt = assemble("Why?", hits, len, 250)
    assert [h.doc_id for h in prompt.used] == ["a", "c"]  # b does not fit, c still does
    assert prompt.tokens == len(prompt.text) <= 250
    assert prompt.text.index("x" * 50) < prompt.text.index("z" * 40)
    assert prompt.text.endswith("Question: Why?\nAnswer:")
    assert assemble("Why?", hits, len, 90).used == []
    with pytest.raises(MemextError, match="question alone"):
        assemble("Why " * 100, hits, len, 90)
    with pytest.raises(MemextError, match="empty"):
        assemble("  ", hits, len, 900)


def test_memory_and_ask_commands(tmp_path: Path) -> None:
    enc = write_tiny_bert(tmp_path / "bert")
    docs = []
    for name, text in {
        "ships": "Ships sail across the sea. " * 20,
        "bread": "The baker bakes bread every morning. " * 20,
    }.items():
        docs.append(tmp_path / f"{name}.txt")
        docs[-1].write_text(text)
    store = tmp_path / "store.sqlite"
    args = ["--store", str(store), "--encoder", str(enc)]
    added = runner.invoke(app, ["memory", "add", *map(str, docs), *args])
    assert added.exit_code == 0, added.output
    again = runner.invoke(app, ["memory", "add", str(docs[0]), *args])
    assert "ships.txt: 0 new chunk(s)" in " ".join(again.output.split())  # idempotent
    found = runner.invoke(app, ["memory", "search", "baker bread", *args, "--mode", "bm25"])
    ranked = [line for line in found.output.splitlines() if ".txt" in line]
    assert found.exit_code == 0 and "bread.txt" in ranked[0], found.output

    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, max_seq_len=256)
    run = tmp_path / "run"
    run.mkdir()
    Config(model=cfg, eval=EvalConfig(lengths=(128,))).save(run / ckpt.CONFIG)
    ckpt.save_weights(build_model(cfg, seed=0), run / ckpt.WEIGHTS, {"step": "0"})
    answer = runner.invoke(
        app, ["ask", "Who bakes bread?", *args, "--model", str(run), "--max-new-tokens", "8"]
    )
    assert answer.exit_code == 0, answer.output
    # The window (256) less the answer's 8 is the prompt's budget.
    assert "of 256 tokens" in " ".join(answer.output.split())
    bad = runner.invoke(app, ["ask", "Who?", *args, "--model", str(run), "--max-new-tokens", "256"])
    assert bad.exit_code == 2 and "whole window" in " ".join(bad.output.split())
