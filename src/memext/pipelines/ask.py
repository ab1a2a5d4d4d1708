"""Retrieval-backed answering: the most relevant stored chunks, as many as the model's window
holds beside the question and the answer's room, then generation from a memext run or a local
Hugging Face causal LM."""

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


class _Generator:
    """A model that counts tokens, knows its window and continues a prompt greedily."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from memext.checkpoint import is_memext_run

        self.memext = is_memext_run(Path(path))
        self.device = device
        if self.memext:
            from memext.checkpoint import load, run_tokenizer

            self.model, _ = load(path, device)
            self.tok = run_tokenizer(path)
            # Memory models read any length; their window is still what they attend over.
            self.window = self.model.max_seq_len
        else:
            from memext.hf.model import context_length, load_causal_lm
            from memext.hf.tokenizer import HFTokenizer

            self.model = load_causal_lm(path).to(device)
            self.tok = HFTokenizer(path)
            self.window = context_length(self.model.config)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        if self.memext:
            from memext.infer.generate import generate_text

            return "".join(
                generate_text(self.model, self.tok, prompt, max_new_tokens, temperature=0.0)
            )
        import torch

        ids = torch.tensor([self.tok.encode(prompt)], device=self.device)
        with torch.no_grad():
            out = self.model.model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
            )
        return self.tok.decode(out[0, ids.shape[1] :].tolist())


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
    gen = _Generator(model, device)
    budget = gen.window - max_new_tokens
    if budget <= 0:
        raise MemextError(
            f"max_new_tokens={max_new_tokens} fills the model's whole window ({gen.window})"
        )
    hits = store.search(question, k=k, mode=mode)
    prompt = assemble(question, hits, gen.count, budget)
    return {
        "answer": gen.generate(prompt.text, max_new_tokens),
        "prompt": prompt.text,
        "prompt_tokens": prompt.tokens,
        "window": gen.window,
        "used": [{"doc_id": h.doc_id, "score": h.score} for h in prompt.used],
    }
