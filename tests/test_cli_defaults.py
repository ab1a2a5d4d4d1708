"""A command's option and the library parameter it feeds have one default.

Every option whose name is also a parameter (or dataclass field) of the library code its command
calls must default to the library's value; the few that differ on purpose are listed below with
the reason. This is how `generate`'s temperature 0.8 / top-p 0.95 once drifted from the
library's 1.0 / 1.0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import typer

from memext.adapters.pruned import prune
from memext.adapters.quantized import quantize
from memext.bench.attention import measure, train_tokens_per_s
from memext.bench.peers import Shape
from memext.bench.seq2seq import Seq2SeqShape
from memext.bench.seq2seq import measure as measure_seq2seq
from memext.cli import app
from memext.evals.runner import evaluate_model
from memext.evals.streaming import streaming_perplexity
from memext.extend import extend_run
from memext.hf import extend_hf
from memext.infer.generate import generate_ids
from memext.pipelines.ask import ask
from memext.pipelines.classify import ClassifierConfig, load_classifier, train_classifier
from memext.pipelines.documents import read_documents
from memext.pipelines.store import RetrievalStore
from memext.train import train

# What each command calls, with the options it passes on under the same name.
DRIVES: dict[str, tuple[Callable[..., Any], ...]] = {
    "train": (train,),
    "distill": (train,),
    "eval": (evaluate_model,),
    "generate": (generate_ids,),
    "stream": (streaming_perplexity,),
    "extend": (extend_run, extend_hf),
    "bench attention": (Shape, measure, train_tokens_per_s),
    "bench seq2seq": (Seq2SeqShape, measure_seq2seq),
    "memory add": (RetrievalStore.add_file,),
    "memory search": (RetrievalStore.search,),
    "ask": (ask,),
    "classify train": (ClassifierConfig, train_classifier),
    "classify eval": (read_documents, load_classifier),
    "classify predict": (read_documents, load_classifier),
    "compress quantize": (quantize,),
    "compress prune": (prune,),
}

# (command, option) -> why the command's default differs from the library's.
DIFFER: dict[tuple[str, str], str] = {
    ("*", "device"): "commands take 'auto' and resolve it (runtime.resolve_device); library "
    "functions take the device to use",
    ("train", "resume"): "the command names the run directory to continue; train() takes a flag",
    ("distill", "resume"): "as train's: the command names the run directory to continue",
    ("memory search", "mode"): "the command's query is text, and searches as `ask` does "
    "(hybrid); RetrievalStore.search also takes query vectors, which only 'embedding' can use",
    ("memory add", "overlap"): "the command stores documents for retrieval, whose chunks overlap "
    "so a passage cut at a chunk border is still found whole; add_text's 0 serves the dialogue "
    "memory's turns (add_file keeps add_text's default)",
    ("classify eval", "split"): "the command scores one split (the validation one unless told) "
    "of a file whose lines name theirs; read_documents' default reads every line",
}


def _commands(group: Any, prefix: str = "") -> dict[str, Any]:
    # Typer's groups and commands (its own Click), by their command line: "memory add".
    found = {}
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(cmd, "commands"):
            found.update(_commands(cmd, f"{path} "))
        else:
            found[path] = cmd
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _library_defaults(command: str) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for source in DRIVES[command]:
        for name, p in inspect.signature(source).parameters.items():
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(name, p.default)
    return defaults


def test_every_command_is_mapped() -> None:
    # A new command must say what it calls (or map to nothing) for the check below to cover it.
    unmapped = (
        set(COMMANDS)
        - set(DRIVES)
        - {"report", "info", "config", "tokenizer train", "memory delete"}
    )
    assert not unmapped, f"add {sorted(unmapped)} to DRIVES"


@pytest.mark.parametrize("command", sorted(DRIVES))
def test_cli_defaults_are_the_library_defaults(command: str) -> None:
    library = _library_defaults(command)
    shared = [p for p in COMMANDS[command].params if p.name in library]
    assert shared, f"{command} shares no option with what DRIVES says it calls"
    wrong = {
        p.name: (p.default, library[p.name])
        for p in shared
        if (command, p.name) not in DIFFER
        and ("*", p.name) not in DIFFER
        and p.default != library[p.name]
    }
    assert not wrong, f"{command}: option default != library default: {wrong}"


def test_listed_differences_still_differ() -> None:
    # An entry that no longer differs (or names a gone option) is stale: drop it.
    for (command, name), _ in DIFFER.items():
        if command == "*":
            continue
        option = next(p for p in COMMANDS[command].params if p.name == name)
        assert option.default != _library_defaults(command)[name], (command, name)
