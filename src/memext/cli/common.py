"""What every command group shares: the consoles, the user-error guard, config and cache-option
parsing, the common option types, and `default`, which reads an option's default from the
library."""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import click
import typer
from rich.console import Console

from memext.config import Config
from memext.errors import MemextError, is_environmental, storage_error
from memext.presets import PRESETS

P = ParamSpec("P")
R = TypeVar("R")

out = Console()
err = Console(stderr=True)


BUG = (
    "this is a bug in memext, not something you did: please report it with the traceback "
    "above and the command you ran"
)


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn errors a user can fix into one red line and exit code 2, never a traceback.

    Errors a user can fix are ``MemextError`` (a ``StorageError`` among them: a full disk, a
    read-only folder), ``ValueError`` (the config's checks) and an ``OSError`` whose cause is
    the machine. Anything else is a bug: its traceback is shown, with a line that says so, and
    the exit code is 1.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.Abort, click.ClickException):
            raise  # typer's and click's own exits and usage errors
        except (MemextError, ValueError) as e:
            _one_line(str(e))
        except OSError as e:
            if not is_environmental(e):
                _bug()
            _one_line(str(storage_error(e, e.filename or "a file", "use")))
        except Exception:
            _bug()

    return wrapper


def _one_line(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _bug() -> NoReturn:
    traceback.print_exc(file=sys.stderr)
    err.print(f"[bold red]error:[/] {BUG}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def default(source: Callable[..., Any], name: str) -> Any:
    """The library's default of ``name``, a parameter of ``source`` (a function, or a dataclass
    whose field it is). Options that the library also takes declare no default of their own, so
    the command and the library cannot drift apart."""
    value = inspect.signature(source).parameters[name].default
    if value is inspect.Parameter.empty:
        raise TypeError(f"{source.__qualname__} gives {name!r} no default")
    return value


def assignments(overrides: list[str]) -> dict[str, str]:
    result = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is invalid: expected SECTION.FIELD=VALUE")
        result[key.strip()] = value
    return result


def build_config(preset: str, config: Path | None, overrides: list[str]) -> Config:
    base = Config.preset(preset)  # checked even with --config: it names the default run folder
    cfg = Config.load(config) if config else base
    return cfg.override(assignments(overrides))


PresetOpt = Annotated[str, typer.Option(help=f"Preset: {', '.join(PRESETS)}.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="A config file (JSON or YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting: SECTION.FIELD=VALUE (repeatable)."),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")]
#: What a model argument may be (``memext.adapters`` reads each kind).
MODEL_HELP = (
    "A model: a memext run, a local Hugging Face model dir, a GGUF file or a known model name "
    "(smollm2; `memext info` lists them), fetched and converted once into the memext cache."
)
ModelArg = Annotated[Path, typer.Argument(help=MODEL_HELP)]
CacheOpt = Annotated[
    str, typer.Option(help="KV-cache policy by name, see `memext info` (docs/context.md).")
]
CacheOptsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--cache-opt",
        help="A cache policy option KEY=VALUE, e.g. window=1024, sinks=4, axis=channel, "
        "policy=sinks (repeatable).",
    ),
]
EncoderOpt = Annotated[
    Path | None,
    typer.Option(help="A local Hugging Face encoder dir (default: all-MiniLM-L6-v2, shipped)."),
]


def cache_options(items: list[str] | None) -> dict[str, Any]:
    """``--cache-opt KEY=VALUE`` items as keyword options: integers, numbers and true/false
    become what they say (``budget=800``, ``outliers=0.025``, ``pre_rotary=true``), the rest
    stays text (``pool=max``)."""
    return {key: _option_value(value) for key, value in assignments(items or []).items()}


def _option_value(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    return {"true": True, "false": False}.get(text.lower(), text)
