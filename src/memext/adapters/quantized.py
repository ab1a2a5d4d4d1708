"""A weight-only quantized model (kind ``quantized``): a directory ``memext compress quantize``
writes, read as the model it was made from with its linear layers quantized.

The directory holds two files and no copy of the model:

- ``quantized.json``: the format and version, the scheme (``weights`` int8 or int4, ``group``),
  the base model (``base.source``: a known model's name, or the absolute path of a memext run,
  a Hugging Face directory or a GGUF file; ``base.kind``), and each quantized layer by name with
  its shape and a checksum of the float weights it was made from (``memext.nn.quant``);
- ``quantized.safetensors``: each layer's ``NAME.q``, ``NAME.scale`` (and ``NAME.min``, int4).

Opening it opens the base through its own kind (``open_model``), checks that the base's weights
are still those that were quantized, and replaces those linear layers by ``QuantLinear`` layers
(``nn.quant.apply_quantized``). Everything else (tokenizer, reading, generation, validation text)
is the base adapter's (``adapters/derived.py``, shared with ``pruned``), so every command that
opens models reads a quantized one. Nothing is unpickled: safetensors and JSON only. A directory
is written whole or not at all (``io.atomic_dir``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.adapters import derived
from memext.adapters.base import Reading, register_model_kind
from memext.errors import MemextError
from memext.nn import quant

META = "quantized.json"
TENSORS = "quantized.safetensors"
FORMAT = "memext-quantized"
VERSION = 1


def linear_root(adapter: Any) -> torch.nn.Module:
    """The module whose linear layers are quantized, named as saved: a memext run's ``LongLM``,
    a Hugging Face model's transformers module (``model.layers.0.self_attn.q_proj``, ...)."""
    from memext.adapters.hf_dir import HFAdapter

    adapter = getattr(adapter, "_base", adapter)  # a quantized model's: its base's
    return adapter.model.model if isinstance(adapter, HFAdapter) else adapter.model


def quantize(
    source: str | Path,
    out: str | Path,
    weights: str = "int8",
    group: int = 128,
    activations: str = "float32",
    method: str = "rtn",
    calibration: str = "stdlib",
    calibration_tokens: int = 8192,
    *,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Quantize the linear layers of the model at ``source`` (any kind ``open_model`` reads)
    with scheme ``weights`` (int4 in groups of ``group``) into the new directory ``out``;
    returns its metadata. ``method`` "gptq" chooses int4 levels by GPTQ (``memext.nn.gptq``)
    from ``calibration_tokens`` tokens of ``calibration`` text (``stdlib``: the built-in
    corpus's train split). Refused before anything is loaded or written: an unknown scheme or
    method, an ``out`` that exists, a model that is already quantized."""
    from safetensors.torch import save_file

    from memext.adapters.open import detect_kind, open_model
    from memext.io import atomic_dir

    quant.check_scheme(weights, group)
    _check_activations(activations)
    check_method(method, weights)
    if method == "gptq" and calibration_tokens < CALIBRATION_CONTEXT:
        raise ValueError(
            f"--calibration-tokens {calibration_tokens}: give at least {CALIBRATION_CONTEXT}"
        )
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise MemextError(f"{str(out)!r} already exists: give a new --out (nothing was written)")
    kind = detect_kind(source)
    if kind == "quantized":
        meta = read_meta(source)
        raise MemextError(
            f"{str(source)!r} is already quantized ({describe_scheme(meta)} of "
            f"{meta['base']['source']}): quantize its base model instead"
        )
    adapter = open_model(source, device)
    root = linear_root(adapter)
    hessians = None
    if method == "gptq":
        names = quant.quantizable(root)[0]
        log(f"calibrating on {calibration_tokens} tokens of {calibration} ...")
        hessians = calibration_hessians(
            adapter, names, calibration, calibration_tokens, CALIBRATION_CONTEXT, log
        )
        log(f"GPTQ over {len(names)} layers ...")
    report = quant.quantize_model(root, weights, group, log=log, hessians=hessians)
    if not report["layers"]:
        raise MemextError(f"{str(source)!r} has no linear layer to quantize")
    tensors = quant.quantized_tensors(root)
    sizes = quant.linear_bytes(root)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "weights": weights,
        "group": report["group"],
        "activations": activations,
        "method": method,
        "calibration": (
            {"text": calibration, "tokens": calibration_tokens} if method == "gptq" else None
        ),
        "base": {"source": derived.base_source(source, kind), "kind": kind},
        "layers": report["layers"],
        "skipped": report["skipped"],
        "linear_bytes": sizes,
    }
    with atomic_dir(out) as tmp:
        header = {"format": FORMAT, "version": str(VERSION), "weights": weights}
        save_file(tensors, str(tmp / TENSORS), metadata=header)
        derived.write_record(tmp, META, meta)
    return meta


#: What ``--method`` takes: how int4 levels are chosen.
METHODS = ("rtn", "gptq")
#: Tokens per calibration window (a forward of the model each).
CALIBRATION_CONTEXT = 512


def check_method(method: str, weights: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "gptq" and weights != "int4":
        raise ValueError(
            "--method gptq rounds int4 weights; int8 uses round-to-nearest (its 255 levels leave "
            "little for GPTQ to recover)"
        )


def calibration_windows(
    text: str, tok: Any, tokens: int, context: int, log: Callable[[str], None] = print
) -> np.ndarray:
    """(windows, context) ids: ``tokens`` tokens of ``text`` in windows spread evenly through it.
    ``stdlib`` reads the built-in corpus's *train* split (the held-out split stays unseen, so
    the bits-per-byte measured on it is not fitted to); another text is read whole."""
    from memext.data.prepare import text_ids

    if tokens < context or context < 2:
        raise ValueError(f"calibration needs tokens >= context >= 2, got {tokens} and {context}")
    ids = text_ids(text, tok, log, split="train" if text == "stdlib" else "validation")
    n = tokens // context
    if len(ids) < n * context:
        raise MemextError(
            f"the calibration text {text!r} has {len(ids)} tokens; {n * context} were asked for"
        )
    starts = np.linspace(0, len(ids) - context, n).astype(np.int64)
    return np.stack([ids[a : a + context] for a in starts]).astype(np.int64)


def calibration_hessians(
    adapter: Any,
    names: list[str],
    text: str = "stdlib",
    tokens: int = 8192,
    context: int = 512,
    log: Callable[[str], None] = print,
) -> dict[str, torch.Tensor]:
    """The inputs' ``XᵀX`` of each linear layer in ``names`` (``linear_root``'s names) over
    ``tokens`` tokens of calibration ``text``, read as the adapter reads input."""
    from memext.nn.gptq import input_hessians

    windows = calibration_windows(text, adapter.tokenizer, tokens, context, log)
    last = torch.tensor([context - 1])  # the head's output is not needed: one row

    def feed() -> None:
        for row in windows:
            adapter.logits(torch.as_tensor(row)[None], positions=last)

    return input_hessians(linear_root(adapter), names, feed)


#: What ``--activations`` takes: the dtype the native kernels read the input in.
ACTIVATIONS = {"float32": None, "bfloat16": torch.bfloat16}


def _check_activations(activations: Any) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"--activations {activations!r}: expected one of {', '.join(ACTIVATIONS)}")


def describe_scheme(meta: dict[str, Any]) -> str:
    group = f" in groups of {meta['group']}" if meta.get("group") else ""
    return meta["weights"] + group + (" (GPTQ)" if meta.get("method") == "gptq" else "")


def read_meta(path: str | Path) -> dict[str, Any]:
    """``quantized.json`` of the directory ``path``, checked; a MemextError says what is wrong."""
    return derived.read_record(path, META, "quantized", _meta_problem)


def _meta_problem(meta: Any) -> str | None:
    bad = derived.header_problem(meta, FORMAT, VERSION)
    if bad:
        return bad
    weights, group = meta.get("weights"), meta.get("group")
    try:
        quant.check_scheme(weights, group if weights == "int4" else 128)
    except ValueError as e:
        return str(e)
    try:
        _check_activations(meta.get("activations", "float32"))
        check_method(meta.get("method", "rtn"), weights)
    except ValueError as e:
        return str(e)
    bad = derived.base_problem(meta)
    if bad:
        return bad
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        return "no layers"
    for name, layer in layers.items():
        if not isinstance(layer, dict) or not all(
            isinstance(layer.get(k), int) and layer[k] > 0 for k in ("in", "out")
        ):
            return f"layer {name!r} has no shape"
        if not all(isinstance(layer.get(k), (int, float)) for k in ("sum", "abs_sum")):
            return f"layer {name!r} has no checksum"
    return None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``quantized.safetensors`` of ``path`` (safetensors: nothing is unpickled)."""
    from safetensors import SafetensorError, safe_open

    file = Path(path) / TENSORS
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise MemextError(f"{str(file)!r} is not a memext quantized weights file")
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise MemextError(f"{str(file)!r} is corrupt or not a safetensors file ({e})") from None


@register_model_kind("quantized")
class QuantizedAdapter(derived.DerivedAdapter):
    """A quantized directory: the base model's adapter with its linear layers quantized. Every
    attribute the contract names that is not set here is the base adapter's."""

    kind = "quantized"
    META = META
    FINGERPRINT = "q"
    HOLDS = "the quantized layers only, and reads the rest from its base"

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        memory: bool = True,
        reading: Reading | None = None,
    ) -> None:
        self.meta = meta = read_meta(path)
        tensors = read_tensors(path)  # both files checked before the base is loaded
        source = meta["base"]["source"]
        self._base = self.open_base(path, "quantizes", device, memory=memory, reading=reading)
        try:
            quant.apply_quantized(
                linear_root(self._base), tensors, meta["weights"], meta.get("group"), meta["layers"]
            )
        except ValueError as e:
            raise MemextError(f"{str(path)!r} does not fit its base {source!r}: {e}") from None
        act = ACTIVATIONS[meta.get("activations", "float32")]
        quant.set_activation_dtype(linear_root(self._base), act)
        self.path = str(path)
        self.name = f"{Path(path).resolve().name} ({self._base.name}, {meta['weights']})"
        self._files = [Path(path) / META, Path(path) / TENSORS]

    @staticmethod
    def summary(path: str | Path) -> list[str]:
        meta = read_meta(path)
        size = meta.get("linear_bytes") or {}
        ratio = size["fp32"] / size["quantized"] if size.get("quantized") else float("nan")
        lines = [
            f"model: {meta['base']['source']} ({meta['base'].get('kind')}) quantized: "
            f"weights {describe_scheme(meta)}",
            f"layers: {len(meta['layers'])} quantized, {len(meta.get('skipped') or {})} kept "
            f"in float32 ({', '.join(sorted(meta.get('skipped') or {})) or 'none'})",
        ]
        if size:
            lines.append(
                f"linear weights: {size['quantized'] / 1e6:,.2f} MB, {ratio:.2f}x smaller than "
                f"float32 ({size['fp32'] / 1e6:,.2f} MB)"
            )
        return lines

    def describe(self) -> dict[str, Any]:
        scheme = {k: self.meta.get(k) for k in ("weights", "group", "activations", "method",
                                                 "calibration", "base", "skipped")}  # fmt: skip
        return {**self._base.describe(), "quantized": scheme}
