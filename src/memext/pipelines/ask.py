"""Retrieval-backed answering: the most relevant stored chunks, as many as the model's window
holds beside the question and the answer's room, then greedy generation from any model the
adapters read (``memext.adapters``: a memext run, a local Hugging Face causal LM)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memext.errors import MemextError
from memext.pipelines.store import Hit

HEADER = "Answer the question from the context.\n\nContext:\n"
QUESTION = "\n\nQuestion: {question}\nAnswer:"


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
    tail = QUESTION.format(question=question.strip())
    base = count(HEADER + tail)
    if base > budget:
        raise MemextError(
            f"the question alone takes {base} tokens, more than the {budget} the model's window "
            "leaves: shorten it or use a model with a longer window"
        )
    used: list[Hit] = []
    for hit in hits:
        trial = HEADER + "\n\n".join(h.text for h in [*used, hit]) + tail
        if count(trial) <= budget:
            used.append(hit)
    text = HEADER + "\n\n".join(h.text for h in used) + tail
    return Prompt(text, used, count(text))


def ask(
    store: Any,
    model: str | Path,
    question: str,
    *,
    k: int = 8,
    mode: str = "hybrid",
    max_new_tokens: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Search ``store`` for ``question``, assemble a prompt within ``model``'s window and
    answer greedily; returns the answer, the prompt and the chunks used."""
    from memext.adapters import open_model

    gen = open_model(model, device)
    budget = gen.window - max_new_tokens
    if budget <= 0:
        raise MemextError(
            f"max_new_tokens={max_new_tokens} fills the model's whole window ({gen.window})"
        )
    hits = store.search(question, k=k, mode=mode)
    # Counted as the model will read it: an instruct model's chat template adds its own tokens.
    read = getattr(gen, "prompt_ids", gen.tokenizer.encode)
    prompt = assemble(question, hits, lambda text: len(read(text)), budget)
    return {
        "answer": "".join(gen.generate(prompt.text, max_new_tokens, temperature=0.0)),
        "prompt": prompt.text,
        "prompt_tokens": prompt.tokens,
        "window": gen.window,
        "used": [{"doc_id": h.doc_id, "score": h.score} for h in prompt.used],
    }
