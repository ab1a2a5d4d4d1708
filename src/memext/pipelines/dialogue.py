"""Dialogue memory: recent turns verbatim, older turns in a retrieval store.

A ``Conversation`` keeps its latest turns word for word while they fit ``recent_tokens``; each
older turn moves into a ``RetrievalStore`` (chunked and embedded by the store's encoder). For a
model with a fixed window, ``context`` builds the prompt: the older turns most relevant to the
question, in the order they were said, then as many recent turns as fit, newest always included.
``reply`` answers a message with any model the adapters open (an instruct model reads the
transcript as a user turn of its chat template, whose tokens count against the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from memext.errors import MemextError
from memext.pipelines.ask import QUESTION, prompt_reader
from memext.pipelines.chunking import count_tokens, special_token_count, token_spans
from memext.pipelines.store import Hit, RetrievalStore


@dataclass(frozen=True)
class Turn:
    """One utterance; ``index`` counts the conversation's turns from 0."""

    index: int
    role: str
    text: str

    @property
    def line(self) -> str:
        """How the turn reads in a prompt."""
        return f"{self.role}: {self.text}"


class Conversation:
    """Turns of one conversation, the recent ones in memory, the older ones in ``store``.

    Args:
        store: where older turns go; it needs an encoder (turns are embedded to be found).
            Several conversations may share one store: each searches only its own turns.
        recent_tokens: the budget of turns kept verbatim (the newest turn stays even if it
            alone is longer).
        tokenizer: counts ``recent_tokens``; default the store encoder's tokenizer.
        conversation_id: names this conversation's documents in the store
            (``"{conversation_id}/{turn index}"``).
        mode: how older turns are searched ("embedding", "bm25" or "hybrid").
        k: how many older pieces a context considers.
    """

    def __init__(
        self,
        store: RetrievalStore,
        *,
        recent_tokens: int = 1024,
        tokenizer: Any = None,
        conversation_id: str = "conversation",
        mode: Literal["embedding", "bm25", "hybrid"] = "hybrid",
        k: int = 8,
    ) -> None:
        if store.encoder is None:
            raise MemextError("a Conversation's store needs an encoder to file older turns")
        if recent_tokens < 1:
            raise MemextError(f"recent_tokens={recent_tokens} is invalid: expected >= 1")
        if "/" in conversation_id or not conversation_id:
            raise MemextError(f"conversation_id={conversation_id!r} must be non-empty without '/'")
        self.store = store
        self.recent_tokens = recent_tokens
        self.tokenizer = tokenizer if tokenizer is not None else store.encoder.tokenizer
        self.conversation_id = conversation_id
        self.mode = mode
        self.k = k
        self.recent: list[Turn] = []
        self._recent_costs: list[int] = []
        self.n_turns = 0
        self.n_stored = 0  # turns moved to the store

    def add(self, role: str, text: str) -> Turn:
        """Append a turn; the oldest recent turns move to the store while over budget."""
        if not isinstance(role, str) or not role.strip():
            raise MemextError(f"role={role!r} is invalid: expected a non-empty name")
        if not isinstance(text, str):
            raise TypeError(f"a turn's text is a str, got {type(text).__name__}")
        turn = Turn(self.n_turns, role, text)
        self.n_turns += 1
        self.recent.append(turn)
        self._recent_costs.append(count_tokens(turn.line, self.tokenizer, special=False))
        while len(self.recent) > 1 and sum(self._recent_costs) > self.recent_tokens:
            self._file(self.recent.pop(0))
            self._recent_costs.pop(0)
        return turn

    def _file(self, turn: Turn) -> None:
        self.store.add_text(
            f"{self.conversation_id}/{turn.index:09d}",
            turn.line,
            metadata={"conversation": self.conversation_id, "turn": turn.index, "role": turn.role},
        )
        self.n_stored += 1

    def context(self, question: str, window_tokens: int, tokenizer: Any) -> str:
        """A prompt of at most ``window_tokens`` tokens of ``tokenizer`` (its special tokens
        counted): relevant older turns, in order, then the recent turns, one per line.

        ``question`` only chooses the older turns (add it as a turn first if the prompt should
        show it). The most recent turn is always in the prompt; if it alone exceeds the window it
        is truncated from the left, keeping its end (its "role: " prefix may then be cut off;
        it is empty only if not even its last character fits).
        Recent turns come newest first until one does not fit; older ones by relevance.
        """
        n_special = special_token_count(tokenizer)
        if window_tokens <= n_special:
            raise MemextError(
                f"window_tokens={window_tokens} leaves no room: the tokenizer adds {n_special} "
                "special tokens"
            )
        if not self.recent:
            return ""
        sep = count_tokens("\n", tokenizer, special=False)
        last = _fit_left(self.recent[-1].line, window_tokens, tokenizer)
        used = count_tokens(last, tokenizer)
        recent = [last]
        for turn in reversed(self.recent[:-1]):
            cost = count_tokens(turn.line, tokenizer, special=False) + sep
            if used + cost > window_tokens:
                break
            recent.insert(0, turn.line)
            used += cost
        older: list[Hit] = []  # most relevant first
        if self.n_stored and used < window_tokens:
            for hit in self.store.search(
                question, self.k, mode=self.mode, doc_prefix=f"{self.conversation_id}/"
            ):
                cost = count_tokens(hit.text, tokenizer, special=False) + sep
                if used + cost <= window_tokens:
                    older.append(hit)
                    used += cost
        # The counts above add pieces up; tokens can merge across a join, so check the whole
        # and drop the least relevant older piece, then the oldest recent turn, until it fits.
        # The newest turn alone fits (_fit_left checked it), so this ends.
        while True:
            said = sorted(
                older, key=lambda h: (h.metadata.get("turn", 0), h.metadata.get("chunk", 0))
            )
            prompt = "\n".join([h.text for h in said] + recent)
            if count_tokens(prompt, tokenizer) <= window_tokens:
                return prompt
            if older:
                older.pop()
            else:
                recent.pop(0)


def _fit_left(text: str, window_tokens: int, tokenizer: Any) -> str:
    """``text``, or its longest end (cut between characters) that fits ``window_tokens``;
    "" if not even the last character fits."""
    if count_tokens(text, tokenizer) <= window_tokens:
        return text
    spans = token_spans(text, tokenizer)
    n, room = len(spans.ids), window_tokens - special_token_count(tokenizer)
    j = max(1, n - room)
    while j < n:
        if spans.starts[j] >= spans.ends[j - 1]:  # not inside a character
            tail = text[spans.starts[j] :]
            over = count_tokens(tail, tokenizer) - window_tokens
            if over <= 0:
                return tail
            j += over  # re-tokenizing the cut text took more tokens: cut that many more
        else:
            j += 1
    return ""


CONVERSATION_HEADER = "Answer the question from the conversation.\n\nConversation:\n"


def reply_prompt(transcript: str, message: str) -> str:
    """The prompt a reader answers ``message`` from: the header, the conversation before it, then
    the message as the question (``ask``'s layout). Asked after the transcript, not as its last
    line: SmolLM2-135M, shown the question as a transcript line, repeated it instead of answering
    (4 of 4 smoke dialogues) and answered once asked after it (the window-only baseline of
    ``benchmarks/llm_dialogue.py`` uses this prompt too)."""
    return CONVERSATION_HEADER + transcript + QUESTION.format(question=message.strip())


def reply(
    conversation: Conversation,
    model: str | Path | Any,
    message: str,
    *,
    role: str = "user",
    window_tokens: int | None = None,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    device: str = "cpu",
    **sampling: Any,
) -> dict[str, Any]:
    """Answer ``message`` from the conversation's memory with ``model`` (a path or name, or an
    adapter already open), then add the message (as a turn of ``role``) and the answer (as an
    "assistant" turn) to the conversation.

    The prompt (``reply_prompt`` around ``conversation.context(message, ...)``) stays within
    ``window_tokens`` (default: the model's window) less ``max_new_tokens``, counted as the
    model reads it. ``sampling``: the adapter's generation options (default greedy). Returns
    the answer, the prompt and its length in tokens."""
    from memext.adapters import open_model

    if not isinstance(message, str) or not message.strip():
        raise MemextError("the message is empty")
    gen = open_model(model, device) if isinstance(model, (str, Path)) else model
    window = gen.window if window_tokens is None else window_tokens
    read = prompt_reader(gen, chat)
    limit = window - max_new_tokens
    budget = limit - len(read(reply_prompt("", message)))
    if budget < 1:
        raise MemextError(
            f"a window of {window} tokens leaves no room for the conversation beside the "
            f"message, the prompt's frame and max_new_tokens={max_new_tokens}"
        )
    # The frame's tokens and the transcript's can merge or split where they join: shrink the
    # transcript's budget by what the whole overshoots, until it fits.
    while True:
        prompt = reply_prompt(conversation.context(message, budget, gen.tokenizer), message)
        over = len(read(prompt)) - limit
        if over <= 0:
            break
        if budget <= 1:
            raise MemextError(f"no transcript fits a window of {window} tokens with this frame")
        budget = max(1, budget - over)
    answer = "".join(
        gen.generate(prompt, max_new_tokens, chat=chat, **({"temperature": 0.0} | sampling))
    )
    conversation.add(role, message)
    conversation.add("assistant", answer)
    return {"answer": answer, "prompt": prompt, "prompt_tokens": len(read(prompt))}
