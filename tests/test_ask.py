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
from memext.pipelines.store import Hit, RetrievalStore
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


# --- the commands' errors: one line each, exit 2 ------------------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("enc") / "bert")


def error_lines(result) -> list[str]:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return [x for x in result.output.splitlines() if x.startswith("error:")]


def test_read_only_commands_refuse_a_missing_store(bert: Path, tmp_path: Path) -> None:
    """A mistyped --store is an error, not an empty store that answers from nothing."""
    typo = tmp_path / "notes.sqlit"
    args = ["--store", str(typo), "--encoder", str(bert)]
    for command in (
        ["memory", "search", "cat", *args],
        ["ask", "Who?", *args, "--model", str(tmp_path)],
        ["memory", "delete", "a.txt", "--store", str(typo)],
    ):
        (line,) = error_lines(runner.invoke(app, command))
        assert f"no retrieval store at {typo}" in line and "memext memory add" in line
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_add_reports_every_bad_file_and_keeps_the_good_ones(bert: Path, tmp_path: Path) -> None:
    good = [tmp_path / "one.txt", tmp_path / "two.txt"]
    good[0].write_text("the cat sat on the mat. " * 10)
    good[1].write_text("the dog ate the bread. " * 10)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n ")
    files = [good[0], latin1, tmp_path / "missing.txt", blank, tmp_path, good[1]]
    store = tmp_path / "m.sqlite"
    result = runner.invoke(
        app, ["memory", "add", *map(str, files), "--store", str(store), "--encoder", str(bert)]
    )
    lines = error_lines(result)
    assert len(lines) == 5, result.output  # four bad files, then the summary
    assert f"{latin1}: not valid UTF-8 (byte 3" in lines[0]
    assert f"cannot read {tmp_path / 'missing.txt'}" in lines[1]
    assert f"{blank}: the text is only whitespace" in lines[2]
    assert f"cannot read {tmp_path}" in lines[3]
    assert "4 file(s) not added (each named above); the 2 other(s) are stored" in lines[4]
    with RetrievalStore(store, readonly=True) as db:
        rows = db.db.execute("SELECT DISTINCT doc_id FROM chunks ORDER BY doc_id").fetchall()
    assert [r[0] for r in rows] == ["one.txt", "two.txt"]


def test_readding_replaces_and_delete_removes(
    bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`a.txt` and `./a.txt` are one document; an edited file replaces its chunks (the old text
    is no longer found); `memory delete` removes a document, all or none."""
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("the passkey is tomato. " * 12)
    Path("b.txt").write_text("the cat sat on the mat. " * 12)
    args = ["--store", "m.sqlite", "--encoder", str(bert)]
    assert runner.invoke(app, ["memory", "add", "a.txt", "b.txt", *args]).exit_code == 0
    Path("a.txt").write_text("the passkey is pasta. " * 12)
    again = runner.invoke(app, ["memory", "add", "./a.txt", *args])
    assert again.exit_code == 0 and "stale removed" in again.output, again.output
    assert "./a.txt: 0 new" not in again.output
    found = runner.invoke(app, ["memory", "search", "tomato", *args, "--mode", "bm25"])
    assert found.exit_code == 0 and "a.txt" not in found.output, found.output
    found = runner.invoke(app, ["memory", "search", "pasta", *args, "--mode", "bm25"])
    assert "a.txt" in found.output and "./a.txt" not in found.output
    refused = runner.invoke(app, ["memory", "delete", "a.txt", "c.txt", "--store", "m.sqlite"])
    (line,) = error_lines(refused)
    assert "holds no document c.txt, so nothing was removed" in line
    gone = runner.invoke(app, ["memory", "delete", "./a.txt", "--store", "m.sqlite"])
    assert gone.exit_code == 0 and "removed 1 document(s)" in gone.output, gone.output
    with RetrievalStore("m.sqlite", readonly=True) as db:
        assert not db.has_document("a.txt") and db.has_document("b.txt")


def test_ask_checks_the_device_first(
    bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    args = ["ask", "Who?", "--store", str(tmp_path / "m.sqlite"), "--model", str(tmp_path)]
    (line,) = error_lines(runner.invoke(app, [*args, "--device", "bogus"]))
    assert "--device 'bogus' is invalid: expected one of auto, cpu, cuda, mps" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (line,) = error_lines(runner.invoke(app, [*args, "--device", "cuda"]))
    assert "--device cuda was asked for, but PyTorch sees no CUDA device" in line
