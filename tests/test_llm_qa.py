"""A real reader for `ask` and dialogue memory (issue 18 item 7): any adapter-opened model answers
(its chat template counted against the window), and the two benchmarks run end to end on a tiny
Hugging Face Llama in seconds, resuming where they stopped."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from memext.adapters import open_model
from memext.data.inserted_facts import fact_questions
from memext.errors import MemextError
from memext.pipelines.ask import ask, prompt_text
from memext.pipelines.dialogue import Conversation, reply, reply_prompt
from memext.pipelines.encoder import Encoder
from memext.pipelines.store import RetrievalStore
from tiny_bert import write_tiny_bert
from tiny_hf import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PARAGRAPH = (
    "The pass key is not here. Remember the scheduler reads the run queue. "
    "Locks have owners and interrupts wait. Barriers order memory. "
)


def _bench(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


#: The tiny Llama is configured for 128 positions, which its byte-level tokenizer fills with the
#: prompt's frame alone; a random model reads any position, so the tests give it a longer window.
WINDOW = 512


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Llama, plain: its tokenizer has no chat template."""
    model = open_model(save_tiny_llama(tmp_path_factory.mktemp("llama") / "m"))
    model.window = WINDOW
    return model


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Llama with a chat template, as an instruct model has."""
    import transformers

    path = save_tiny_llama(tmp_path_factory.mktemp("chat") / "m")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    model = open_model(path)
    model.window = WINDOW
    return model


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return Encoder(write_tiny_bert(tmp_path_factory.mktemp("bert")), cache=False, progress=False)


# --- ask and dialogue with an adapter as the reader ---------------------------------------------


def _store(encoder: Encoder) -> RetrievalStore:
    store = RetrievalStore(":memory:", encoder=encoder)
    store.add_text("a/doc", PARAGRAPH * 4)
    store.add_text("b/doc", "the man is eating bread " * 20)
    return store


def test_ask_counts_the_chat_template_against_the_budget(chat_llama: Any, encoder: Encoder) -> None:
    with _store(encoder) as store:
        r = ask(store, chat_llama, "Who owns the locks?", max_new_tokens=4, context_tokens=200)
        assert r["budget"] == 200 and 0 < r["prompt_tokens"] <= 200 and r["used"]
        # Counted in the template: more tokens than the plain text takes.
        assert r["prompt_tokens"] == len(chat_llama.prompt_ids(r["prompt"], True))
        assert r["prompt_tokens"] > len(chat_llama.tokenizer.encode(r["prompt"]))
        plain = ask(store, chat_llama, "Who owns the locks?", max_new_tokens=4, chat=False)
        assert plain["prompt_tokens"] == len(chat_llama.tokenizer.encode(plain["prompt"]))
        only_a = ask(store, chat_llama, "bread", max_new_tokens=2, doc_prefix="a/")
        assert {u["doc_id"] for u in only_a["used"]} == {"a/doc"}
        with pytest.raises(MemextError, match="context_tokens=0"):
            ask(store, chat_llama, "Who?", context_tokens=0)


def test_ask_refuses_chat_without_a_template(llama: Any, encoder: Encoder) -> None:
    with _store(encoder) as store, pytest.raises(MemextError, match="no chat template"):
        ask(store, llama, "Who owns the locks?", max_new_tokens=4, chat=True)


def test_reply_stays_within_the_window_and_records_the_answer(
    chat_llama: Any, encoder: Encoder
) -> None:
    conv = Conversation(RetrievalStore(":memory:", encoder=encoder), recent_tokens=30, k=4)
    conv.add("user", "remember the code 4817 for later")
    for i in range(12):
        conv.add("assistant" if i % 2 else "user", f"the man is eating bread, part {i}")
    r = reply(conv, chat_llama, "what was the code?", window_tokens=200, max_new_tokens=5)
    assert r["prompt_tokens"] <= 195
    assert r["prompt_tokens"] == len(chat_llama.prompt_ids(r["prompt"], None))
    # The transcript, then the message as the question (not a transcript line of its own).
    assert r["prompt"].startswith(reply_prompt("", "x")[:20])
    assert r["prompt"].endswith("Question: what was the code?\nAnswer:")
    assert "user: what was the code?" not in r["prompt"]
    assert [(t.role, t.text) for t in conv.recent[-2:]] == [
        ("user", "what was the code?"),
        ("assistant", r["answer"]),
    ]
    with pytest.raises(MemextError, match="no room"):
        reply(conv, chat_llama, "again?", window_tokens=10, max_new_tokens=5)
    with pytest.raises(MemextError, match="empty"):
        reply(conv, chat_llama, "  ")


# --- benchmarks/llm_qa.py -----------------------------------------------------------------------


def test_truncated_context_is_the_longest_beginning_that_fits(llama: Any) -> None:
    qa = _bench("llm_qa")
    read = llama.tokenizer.encode
    text = PARAGRAPH * 10
    cut = qa.truncated_context(text, "Who?", read, 100)
    assert text.startswith(cut) and len(read(prompt_text(cut, "Who?"))) <= 100
    assert len(read(prompt_text(text[: len(cut) + 1], "Who?"))) > 100
    assert qa.truncated_context("short", "Who?", read, 100) == "short"


def test_llm_qa_runs_every_configuration_and_resumes(
    llama: Any, encoder: Encoder, tmp_path: Path
) -> None:
    qa = _bench("llm_qa")
    rows = [{"id": f"d{i}", "text": PARAGRAPH * (1 + 4 * i)} for i in range(4)]
    count = lambda t: len(llama.tokenizer.encode(t))  # noqa: E731
    docs = qa.long_documents(rows, count, WINDOW, 10_000)
    assert [d[0] for d in docs] == ["d1", "d2", "d3"] and all(d[2] > WINDOW for d in docs)
    items = fact_questions([(d, t) for d, t, _ in docs[:2]], 2, seed=0)
    s = {"chat": None, "new_tokens": 4, "k": 4, "mode": "hybrid", "context_tokens": 200,
         "cache_options": {"sinks": 2, "window": 16, "block": 8, "topk": 2}, "chunk": 16}  # fmt: skip
    path = tmp_path / "rows.jsonl"
    lines: list[str] = []
    got = qa.run(llama, encoder, items, [d[2] for d in docs[:2]], qa.CONFIGS, s, path, lines.append)
    assert len(got) == 2 * len(qa.CONFIGS) == len(path.read_text().splitlines())
    by = {(r["q"], r["config"]): r for r in got}
    for q, item in enumerate(items):
        assert "does not fit" in by[q, "full"]["skipped"]  # longer than the window: (d) refused
        trunc = by[q, "truncated"]
        assert trunc["prompt_tokens"] <= llama.window - s["new_tokens"]
        budget = llama.window - s["new_tokens"]
        kept = qa.truncated_context(item.text, item.question, llama.tokenizer.encode, budget)
        assert trunc["fact_seen"] == (item.fact in kept)
        assert by[q, "retrieval"]["prompt_tokens"] <= 200
        assert by[q, "memory"]["fact_seen"] is None
        for c in ("retrieval", "truncated", "memory"):
            assert set(by[q, c]) >= {"em", "f1", "em_strict", "contains", "reply", "cpu_seconds"}
            assert by[q, c]["answer"] == item.answer
    table = qa.summarize(got, qa.CONFIGS)
    assert [e["n"] for e in table] == [2, 2, 2, 0] and table[-1]["skipped"] == 2
    assert all(e["em"] is None or 0 <= e["em"] <= 100 for e in table)
    qa.print_table(table)
    # Resumed: nothing is measured again; a torn last line and rows of other settings are left.
    with open(path, "a") as f:
        f.write('{"key": "other", "q": 0, "config": "retrieval"}\n{"torn')
    again = qa.run(llama, encoder, items, [0, 0], qa.CONFIGS, s, path, lines.append)
    assert [json.dumps(r, sort_keys=True) for r in again] == [
        json.dumps(r, sort_keys=True) for r in got
    ]
    assert any("resuming: 8 row(s)" in line for line in lines)
    # A shorter run over the same settings takes its own questions' rows only.
    first = qa.run(llama, encoder, items[:1], [0], qa.CONFIGS, s, path, lines.append)
    assert first == [r for r in got if r["q"] == 0] and len(first) == len(qa.CONFIGS)


def test_a_document_that_fits_is_read_whole(llama: Any) -> None:
    qa = _bench("llm_qa")
    items = fact_questions([("d", PARAGRAPH)], 1, seed=0)
    s = {"chat": None, "new_tokens": 4, "k": 4, "mode": "bm25", "context_tokens": 200,
         "cache_options": {"sinks": 2, "window": 16, "block": 8, "topk": 2}, "chunk": 16}  # fmt: skip
    # No retrieval reading, no encoder needed.
    rows = qa.run(llama, None, items, [0], ["truncated", "full"], s, None, lambda m: None)
    full, trunc = (next(r for r in rows if r["config"] == c) for c in ("full", "truncated"))
    assert "skipped" not in full and full["fact_seen"] and trunc["fact_seen"]
    assert full["prompt_tokens"] == trunc["prompt_tokens"]  # (d) = (b) where the document fits


# --- benchmarks/llm_dialogue.py -----------------------------------------------------------------


def test_dialogues_are_deterministic_and_well_formed() -> None:
    dl = _bench("llm_dialogue")
    d = dl.make_dialogue("0/1", 101, fact_span=0.6, distractors=3)
    assert d == dl.make_dialogue("0/1", 101, fact_span=0.6, distractors=3)
    assert d != dl.make_dialogue("0/2", 101, fact_span=0.6, distractors=3)
    assert len(d.turns) == 101 and d.turns[-1] == ("user", d.question)
    assert d.turns[d.fact_turn][0] == "user" and d.answer in d.turns[d.fact_turn][1]
    assert d.fact_turn < 0.6 * 100
    assert sum(d.answer in text for _, text in d.turns) == 1  # said once, never again
    assert sum("Please remember" in text for _, text in d.turns) == 4  # the fact + 3 others
    roles = [r for r, _ in d.turns]
    assert all(a != b for a, b in itertools.pairwise(roles))
    assert len({text for _, text in d.turns}) > 40  # varied, not one line repeated
    with pytest.raises(MemextError, match="n_turns=5"):
        dl.make_dialogue(0, 5)
    with pytest.raises(MemextError, match="fact_span=0"):
        dl.make_dialogue(0, 100, fact_span=0)


def test_llm_dialogue_runs_both_readings(llama: Any, encoder: Encoder) -> None:
    dl = _bench("llm_dialogue")
    s = {"window": 300, "recent_tokens": 60, "k": 4, "mode": "bm25", "new_tokens": 4,
         "chat": None}  # fmt: skip
    read = llama.tokenizer.encode
    rows = []
    with RetrievalStore(":memory:", encoder=encoder) as store:
        for i in range(2):
            d = dl.make_dialogue(f"t/{i}", 30, fact_span=0.3, distractors=i)
            transcript, first = dl.window_transcript(d.turns[:-1], d.question, 296, read)
            assert len(read(reply_prompt(transcript, d.question))) <= 296
            assert transcript.endswith(d.turns[-2][1])  # the newest turns, up to the question
            role, text = d.turns[first - 1]
            longer = f"{role}: {text}\n{transcript}"
            assert len(read(reply_prompt(longer, d.question))) > 296
            assert d.fact_turn < first  # early fact, short window: outside
            rows += dl.run_dialogue(llama, store, d, i, s)
    assert [r["reading"] for r in rows] == ["memory", "window"] * 2
    assert all(r["prompt_tokens"] <= 296 for r in rows)
    assert all(not r["fact_seen"] for r in rows if r["reading"] == "window")
    # BM25 finds the turn that names the key: memory puts the fact in the prompt.
    assert all(r["fact_seen"] for r in rows if r["reading"] == "memory")
    table = dl.summarize(rows)
    assert [e["reading"] for e in table] == ["memory", "window"]
    assert table[0]["fact_in_window"] == 0.0 and table[1]["fact_seen"] == 0.0
    dl.print_table(table)
    assert dl.score(d, f"It is {d.answer}.")["recalled"] == 1.0
    assert dl.score(d, f"Your {d.key} is {d.answer}.")["em"] == 1.0
