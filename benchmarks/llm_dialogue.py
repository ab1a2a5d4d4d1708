"""A fact said early in a long dialogue, asked for at its end: dialogue memory against the last
window alone, with one reader (issue 18 item 7.2).

Each dialogue has ``--turns`` turns (default 120), user and assistant in turn: small talk drawn
from a dozen topics (seeded, so every run sees the same dialogues), ``--distractors`` turns
that give other codes of the same form ("my bike lock code is 60412"; none by default: the issue
asks for one fact among filler, and SmolLM2-135M mixes up codes it is shown together), one user
turn that states the fact ("my locker combination is 48213"), drawn uniformly from the first ``--fact-span`` of the
dialogue, and a last turn that asks for it. The reader (default SmolLM2-135M-Instruct, greedy,
prompt continued as plain text) answers from a prompt of at most ``--window`` tokens, framed the
same way for both (``memext.pipelines.dialogue.reply_prompt``: the transcript, then the question,
then "Answer:"). Plain text, not the chat template, because the frame already ends where the
answer starts: wrapped as a chat turn, SmolLM2-135M often described the chat instead ("The user
is asking about the bike lock code."). Tuning dialogues, memory reading: seed 2 (40) recalled
0.80 with the template and 1.00 without; seed 1 (40) 1.00 without (0.95 of 20 with it).
``--chat`` restores the template:

- ``memory``: ``Conversation``: the turns within ``--recent-tokens`` verbatim, older ones filed
  in a retrieval store (all-MiniLM-L6-v2, hybrid search), and ``reply`` fills the window with the
  older turns most relevant to the question, then the recent ones;
- ``window``: the newest whole turns that fit the same window, nothing else.

A dialogue is recalled when the reply contains the value (SQuAD-normalised, as whole tokens);
``em`` is the exact match of the reply's first line less the question's and the fact's words
(and "you", "your": the reader speaks to the user).
The table gives recall for each reading, the fraction of dialogues whose fact turn lies inside
the window (what the window alone can at best recall), and recall split by that.

    python benchmarks/llm_dialogue.py                     # 50 dialogues, ~15 min CPU
    python benchmarks/llm_dialogue.py --dialogues 2 --out /tmp/dialogue.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memext.data.inserted_facts import contains_answer, exact_match, first_line, strip_words
from memext.errors import MemextError
from memext.pipelines.ask import prompt_reader
from memext.pipelines.dialogue import Conversation, reply, reply_prompt
from memext.runtime import resolve_device, write_result

READINGS = ("memory", "window")
KEYS = (
    "locker combination",
    "bike lock code",
    "parking permit number",
    "library card number",
    "gym membership number",
    "storage unit code",
    "voicemail PIN",
    "alarm panel code",
)
_CITIES = ("Lisbon", "Oslo", "Kyoto", "Tallinn", "Porto", "Ghent", "Lyon", "Bergen", "Krakow")
_FOODS = ("lentil soup", "risotto", "banana bread", "dumplings", "shakshuka", "paella", "curry")
_BOOKS = ("a mystery novel", "a biography of Darwin", "a book on bridges", "an old atlas")
_PLANTS = ("tomatoes", "basil", "sunflowers", "a lemon tree", "ferns", "strawberries")
_SPORTS = ("swimming", "cycling", "climbing", "rowing", "tennis", "running")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_PETS = ("dog", "cat", "parrot", "rabbit", "tortoise")
# (user, assistant) pairs; {city} etc. are drawn per turn, {n} is a small number.
_SMALL_TALK = (
    (
        "I'm thinking of visiting {city} in spring. Is that a good time?",
        "Spring is a fine time for {city}: mild weather and fewer crowds than summer.",
    ),
    (
        "I cooked {food} last night and it turned out well.",
        "{food} is a good choice; it keeps well and tastes better the next day.",
    ),
    (
        "I started reading {book} this week.",
        "That sounds interesting. Reading a little every day makes long books easy.",
    ),
    (
        "My {plant} are finally growing in the garden.",
        "Good news. Water them in the morning and they should do well.",
    ),
    (
        "I went {sport} on {day} for about {n} hours.",
        "{n} hours of {sport} is a lot of exercise; remember to rest afterwards.",
    ),
    (
        "The weather was grey all {day}, so I stayed in.",
        "A quiet day indoors can be restful. Did you do anything fun?",
    ),
    (
        "My {pet} kept me awake last night.",
        "Pets can be restless. A walk or some play before bed sometimes helps.",
    ),
    (
        "Can you suggest something to do on {day} evening?",
        "You could try a new recipe, call a friend, or go for a short walk.",
    ),
    (
        "I found an old photo of a trip to {city}.",
        "Old photos bring back memories. {city} must have been lovely.",
    ),
    (
        "I have a meeting at {n} o'clock tomorrow and I'm a bit nervous.",
        "Prepare a few notes tonight and you will feel calmer tomorrow.",
    ),
    (
        "We planted {plant} with the neighbours on {day}.",
        "Gardening together is a nice way to spend a {day}.",
    ),
    (
        "I'm trying to drink more water during the day.",
        "A bottle on your desk makes that easier. Small habits add up.",
    ),
)


@dataclass(frozen=True)
class Dialogue:
    """``turns``: (role, text), the last one the question; ``fact_turn``: the index of the
    turn stating ``answer`` (the value of ``key``)."""

    turns: list[tuple[str, str]]
    fact_turn: int
    key: str
    answer: str
    question: str


def make_dialogue(
    seed: int | str, n_turns: int = 120, fact_span: float = 0.6, distractors: int = 0
) -> Dialogue:
    """A dialogue of ``n_turns`` turns (>= 10): user and assistant in turn, the fact in a user
    turn among the first ``fact_span`` of them, ``distractors`` other codes, the question last."""
    if n_turns < 10:
        raise MemextError(f"n_turns={n_turns} is too short: expected >= 10")
    if not 0 < fact_span <= 1:
        raise MemextError(f"fact_span={fact_span} is invalid: expected a fraction in (0, 1]")
    rng = random.Random(f"llm-dialogue:{seed}")
    keys = rng.sample(KEYS, 1 + distractors)
    values = [str(v) for v in rng.sample(range(10_000, 100_000), 1 + distractors)]
    # User turns are the even ones; the last turn (the question) must be a user turn too.
    users = [i for i in range(0, n_turns - 1) if (n_turns - 1 - i) % 2 == 0]
    span = [i for i in users if i < max(1, int(fact_span * (n_turns - 1)))] or users[:1]
    fact_turn = rng.choice(span)
    others = rng.sample([i for i in users if i != fact_turn], distractors)
    special = {fact_turn: 0} | {t: j + 1 for j, t in enumerate(others)}
    turns: list[tuple[str, str]] = []
    pair = None
    for i in range(n_turns - 1):
        role = "user" if i in users else "assistant"
        if i in special:
            key, value = keys[special[i]], values[special[i]]
            text = f"Please remember this for me: my {key} is {value}."
            pair = (None, "Noted, I will keep that in mind.")
        elif role == "user":
            slots = {
                "city": rng.choice(_CITIES),
                "food": rng.choice(_FOODS),
                "book": rng.choice(_BOOKS),
                "plant": rng.choice(_PLANTS),
                "sport": rng.choice(_SPORTS),
                "day": rng.choice(_DAYS),
                "pet": rng.choice(_PETS),
                "n": rng.randint(2, 9),
            }
            user, assistant = rng.choice(_SMALL_TALK)
            text = user.format(**slots)
            pair = (None, assistant.format(**slots))
        else:
            text = pair[1] if pair else "Hello! What would you like to talk about today?"
            text = text[0].upper() + text[1:]
        turns.append((role, text))
    question = f"By the way, what is my {keys[0]}?"
    turns.append(("user", question))
    return Dialogue(turns, fact_turn, keys[0], values[0], question)


def window_transcript(
    turns: Sequence[tuple[str, str]],
    message: str,
    budget: int,
    read: Callable[[str], list[int]],
) -> tuple[str, int]:
    """The newest whole ``turns`` whose prompt (``reply_prompt`` with ``message``) reads as at
    most ``budget`` tokens, one per line as ``Turn.line`` writes them, and the index of the oldest
    turn kept (``len(turns)`` when none fits)."""
    lines = [f"{role}: {text}" for role, text in turns]
    first = len(lines)
    while first > 0 and len(read(reply_prompt("\n".join(lines[first - 1 :]), message))) <= budget:
        first -= 1
    return "\n".join(lines[first:]), first


def score(d: Dialogue, answer: str) -> dict[str, Any]:
    frame = d.turns[d.fact_turn][1].replace(d.answer, " ")
    # The reader speaks to the user: "Your locker combination is 48213." restates the fact too.
    scored = strip_words(first_line(answer), d.question, frame, "you your")
    return {
        "recalled": contains_answer(answer, d.answer),
        "em": exact_match(scored, d.answer),
        "scored": scored,
    }


def run_dialogue(
    model: Any, store: Any, d: Dialogue, index: int, s: dict[str, Any]
) -> list[dict[str, Any]]:
    """Both readings of one dialogue: a row each."""
    read = prompt_reader(model, s["chat"])
    rows = []
    base = {
        "dialogue": index,
        "fact_turn": d.fact_turn,
        "turns": len(d.turns),
        "key": d.key,
        "answer": d.answer,
    }
    started, cpu = time.perf_counter(), time.process_time()
    conv = Conversation(
        store,
        recent_tokens=s["recent_tokens"],
        conversation_id=f"d{index:04d}",
        mode=s["mode"],
        k=s["k"],
    )
    for role, text in d.turns[:-1]:
        conv.add(role, text)
    r = reply(
        conv,
        model,
        d.question,
        window_tokens=s["window"],
        max_new_tokens=s["new_tokens"],
        chat=s["chat"],
    )
    fact_line = f"user: {d.turns[d.fact_turn][1]}"
    rows.append(
        base
        | {
            "reading": "memory",
            "reply": r["answer"],
            "prompt_tokens": r["prompt_tokens"],
            "fact_seen": fact_line in r["prompt"],
            "stored_turns": conv.n_stored,
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu,
        }
        | score(d, r["answer"])
    )
    started, cpu = time.perf_counter(), time.process_time()
    transcript, first = window_transcript(
        d.turns[:-1], d.question, s["window"] - s["new_tokens"], read
    )
    prompt = reply_prompt(transcript, d.question)
    answer = "".join(model.generate(prompt, s["new_tokens"], temperature=0.0, chat=s["chat"]))
    rows.append(
        base
        | {
            "reading": "window",
            "reply": answer,
            "prompt_tokens": len(read(prompt)),
            "fact_seen": d.fact_turn >= first,
            "first_turn": first,
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu,
        }
        | score(d, answer)
    )
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reading: dialogues, recall, exact match, fact-in-prompt rate, recall with the fact
    inside / outside the window (the window reading's), seconds."""
    inside = {r["dialogue"] for r in rows if r["reading"] == "window" and r["fact_seen"]}
    table = []
    for reading in READINGS:
        ran = [r for r in rows if r["reading"] == reading]
        if not ran:
            continue

        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        table.append(
            {
                "reading": reading,
                "n": len(ran),
                "recall": mean([r["recalled"] for r in ran]),
                "em": mean([r["em"] for r in ran]),
                "fact_seen": mean([float(r["fact_seen"]) for r in ran]),
                "fact_in_window": len(inside) / len(ran),
                "recall_fact_in_window": mean(
                    [r["recalled"] for r in ran if r["dialogue"] in inside]
                ),
                "recall_fact_outside": mean(
                    [r["recalled"] for r in ran if r["dialogue"] not in inside]
                ),
                "prompt_tokens": mean([r["prompt_tokens"] for r in ran]),
                "seconds": mean([r["seconds"] for r in ran]),
                "cpu_seconds": mean([r["cpu_seconds"] for r in ran]),
            }
        )
    return table


def print_table(table: Sequence[dict[str, Any]]) -> None:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(
        f"\n{'reading':<8} {'n':>4} {'recall':>6} {'EM':>5} {'fact in prompt':>14} "
        f"{'recall (in window)':>18} {'(outside)':>9} {'tokens':>6} {'cpu s':>6}"
    )
    for e in table:
        print(
            f"{e['reading']:<8} {e['n']:>4} {num(e['recall']):>6} {num(e['em']):>5} "
            f"{num(e['fact_seen']):>14} {num(e['recall_fact_in_window']):>18} "
            f"{num(e['recall_fact_outside']):>9} {e['prompt_tokens']:>6.0f} "
            f"{num(e['cpu_seconds']):>6}"
        )
    if table:
        print(f"fact inside the window in {table[0]['fact_in_window']:.2f} of the dialogues")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="A model path or name (the reader).")
    p.add_argument("--dialogues", type=int, default=50)
    p.add_argument(
        "--turns", type=int, default=120, help="Turns per dialogue, the question included."
    )
    p.add_argument(
        "--fact-span",
        type=float,
        default=0.6,
        help="The fact is in a user turn among the first this fraction of turns.",
    )
    p.add_argument(
        "--distractors",
        type=int,
        default=0,
        help="Other codes of the same form said in the dialogue (a harder variant: 3).",
    )
    p.add_argument("--window", type=int, default=1024, help="Prompt budget of both readings.")
    p.add_argument(
        "--recent-tokens",
        type=int,
        default=256,
        help="memory: turns kept verbatim (encoder tokens).",
    )
    p.add_argument("--k", type=int, default=8, help="memory: older pieces considered.")
    p.add_argument("--mode", default="hybrid", help="memory: embedding, bm25 or hybrid.")
    p.add_argument("--encoder", type=Path, default=None, help="memory: default all-MiniLM-L6-v2.")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Wrap the prompt in the chat template (default: no, the prompt is continued as "
        "text; see the module doc).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_dialogue.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    from memext.adapters import open_model
    from memext.pipelines import Encoder
    from memext.pipelines.store import RetrievalStore

    model = open_model(args.model, device)
    s = {
        k: getattr(args, k) for k in ("window", "recent_tokens", "k", "mode", "new_tokens", "chat")
    }
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    encoder = Encoder(args.encoder, progress=False)
    with RetrievalStore(":memory:", encoder=encoder) as store:
        for i in range(args.dialogues):
            d = make_dialogue(f"{args.seed}/{i}", args.turns, args.fact_span, args.distractors)
            for row in run_dialogue(model, store, d, i, s):
                rows.append(row)
                shown = (
                    "dialogue",
                    "reading",
                    "fact_turn",
                    "fact_seen",
                    "recalled",
                    "scored",
                    "prompt_tokens",
                    "cpu_seconds",
                )
                print(json.dumps({k: row[k] for k in shown}), flush=True)
    table = summarize(rows)
    print_table(table)
    settings = s | {k: getattr(args, k) for k in ("turns", "fact_span", "distractors", "seed")}
    seconds = time.perf_counter() - started
    fields = {"settings": settings, "table": table, "seconds": seconds, "rows": rows}
    write_result(args.out, "benchmarks/llm_dialogue.py", args, device, fields)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
