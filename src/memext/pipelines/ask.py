"""Retrieval-backed answering: the most relevant stored chunks, as many as the model's window
holds beside the question and the answer's room, then greedy generation from any model the
adapters read (``memext.adapters``: a memext run, a local Hugging Face causal LM, a GGUF file,
a known model such as ``smollm2``). An instruct model reads the prompt as a user turn of its chat
template, and the template's tokens are counted against the window."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memext.errors import MemextError
from memext.pipelines.store import Hit

HEADER = "Answer the question from the context.\n\nContext:\n"
QUESTION = "\n\nQuestion: {question}\nAnswer:"


def prompt_text(context: str, question: str) -> str:
    """The one prompt template: the header, ``context``, then the question (``benchmarks/
    llm_qa.py`` gives every reading of a document this template)."""
    return HEADER + context + QUESTION.format(question=question.strip())


def prompt_reader(model: Any, chat: bool | None) -> Callable[[str], list[int]]:
    """``text -> ids`` as ``model`` (an adapter) reads a prompt: in its chat template with
    ``chat`` (None: when its tokenizer has one); a ``chat=True`` it cannot honour fails here."""
    if hasattr(model, "prompt_ids"):
        model.prompt_ids(HEADER, chat)  # refuses chat=True without a template

        def read(text: str) -> list[int]:
            return model.prompt_ids(text, chat)

        return read
    if chat:
        raise MemextError(f"{model.name} has no chat template: drop --chat")
    return model.tokenizer.encode


@dataclass(frozen=True)
class Prompt:
    text: str
    used: list[Hit]  # the chunks it holds, best first
    tokens: int


def assemble(
    question: str, hits: Sequence[Hit], count: Callable[[str], int], budget: int
) -> Prompt:
    """The header, then chunks in rank order while the whole prompt stays within ``budget``
    tokens (a chunk that does not fit is skipped, a shorter one after it may still fit), then
    the question. Refuses a question that alone exceeds the budget."""
    if not question.strip():
        raise MemextError("the question is empty")
    base = count(prompt_text("", question))
    if base > budget:
        raise MemextError(
            f"the question alone takes {base} tokens, more than the prompt's budget of {budget} "
            "(the model's window less the answer's room, or --context-tokens): shorten it, "
            "raise the budget or use a model with a longer window"
        )
    used: list[Hit] = []
    for hit in hits:
        if count(prompt_text("\n\n".join(h.text for h in [*used, hit]), question)) <= budget:
            used.append(hit)
    text = prompt_text("\n\n".join(h.text for h in used), question)
    return Prompt(text, used, count(text))


def ask(
    store: Any,
    model: str | Path | Any,
    question: str,
    *,
    k: int = 8,
    mode: str = "hybrid",
    max_new_tokens: int = 64,
    device: str = "cpu",
    chat: bool | None = None,
    context_tokens: int | None = None,
    doc_prefix: str | None = None,
) -> dict[str, Any]:
    """Search ``store`` for ``question``, assemble a prompt within ``model``'s window and
    answer greedily; returns the answer, the prompt and the chunks used.

    ``model``: a path or name (opened on ``device``) or an adapter already open. ``chat``: the
    prompt as a user turn of the chat template (None: when the tokenizer has one). ``context_
    tokens``: the prompt's budget when less than the window (a small model reads a short prompt
    better than a full window; the answer's room is taken from the window, not from this).
    ``doc_prefix``: search only the documents whose id starts with it."""
    from memext.adapters import open_model

    gen = open_model(model, device) if isinstance(model, (str, Path)) else model
    budget = gen.window - max_new_tokens
    if budget <= 0:
        raise MemextError(
            f"max_new_tokens={max_new_tokens} fills the model's whole window ({gen.window})"
        )
    if context_tokens is not None:
        if context_tokens < 1:
            raise MemextError(f"context_tokens={context_tokens} is invalid: expected >= 1")
        budget = min(budget, context_tokens)
    # Counted as the model will read it: an instruct model's chat template adds its own tokens.
    read = prompt_reader(gen, chat)  # before the search: a chat=True refused costs nothing
    hits = store.search(question, k=k, mode=mode, doc_prefix=doc_prefix)
    prompt = assemble(question, hits, lambda text: len(read(text)), budget)
    answer = gen.generate(prompt.text, max_new_tokens, temperature=0.0, chat=chat)
    return {
        "answer": "".join(answer),
        "prompt": prompt.text,
        "prompt_tokens": prompt.tokens,
        "window": gen.window,
        "budget": budget,
        "used": [{"doc_id": h.doc_id, "score": h.score} for h in prompt.used],
    }
