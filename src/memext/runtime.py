"""Devices, precision, the provenance recorded with every run and result, and the result file
of a benchmark that records them."""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from memext.errors import MemextError
from memext.io import atomic_write_text

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise MemextError(f"--device {name!r} is invalid: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MemextError("--device cuda was asked for, but PyTorch sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MemextError("--device mps was asked for, but PyTorch sees no MPS device")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked (or 'auto' on a GPU); otherwise plain fp32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` is empty or the bare
    architecture on Linux); a speed figure names the CPU it ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device | None = None) -> dict[str, Any]:
    import numpy

    import memext

    info: dict[str, Any] = {
        "memext": memext.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line(
    script: str, args: Any, leave_out: tuple[str, ...] = (), parser: Any = None
) -> str:
    """The command that reproduces a benchmark: ``python SCRIPT --opt=value ...`` from parsed
    ``args`` (an argparse Namespace), written as argparse reads it back. Paths are written
    relative to the working directory (the repository root the benchmarks run from), never as
    this machine's absolute path. None is left out (an option not given); True is the bare flag;
    False is left out, or ``--no-opt`` where ``parser`` (the ArgumentParser) says the option
    defaults to True; a list is its option repeated, one item each (``action="append"``)."""
    import os

    defaults = {a.dest: a.default for a in parser._actions} if parser is not None else {}

    def shown(value: Any) -> Any:
        if isinstance(value, Path):
            return Path(os.path.relpath(value.resolve(), Path.cwd().resolve())).as_posix()
        return value

    opts = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key in leave_out or value is None:
            continue
        if value is True:
            opts.append(flag)
        elif value is False:
            if defaults.get(key) is True:
                opts.append("--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            opts += [f"{flag}={shown(v)}" for v in value]
        else:
            opts.append(f"{flag}={shown(value)}")
    return " ".join([f"python {script}", *opts])


def write_result(
    path: str | Path,
    script: str,
    args: Any,
    device: torch.device | None,
    fields: dict[str, Any],
    leave_out: tuple[str, ...] = (),
) -> None:
    """Write a benchmark's result file atomically, as indented JSON: the command that reproduces
    it (``command_line``), the provenance of this run (``provenance(device)``), then ``fields``
    in their order."""
    result = {
        "command": command_line(script, args, leave_out),
        "provenance": provenance(device),
        **fields,
    }
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
