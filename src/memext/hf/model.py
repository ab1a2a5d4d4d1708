"""Local Hugging Face causal LMs behind memext's model interface, and RoPE context extension.

``load_causal_lm`` reads a model folder offline (never the Hub) and wraps it as ``HFCausalLM``,
whose ``forward(tokens, state) -> (logits, state)`` is ``LongLM``'s, so memext's evaluators run
on it unchanged. ``rope`` applies a ``memext.nn.rope_scaling`` rule through the config's
``rope_parameters`` (transformers 5.x). ``extend_hf`` writes a copy of a model folder with such a
config and the weights as safetensors.

Each rule writes its own ``rope_parameters`` and ``max_position_embeddings``
(``RopeRule.hf_parameters``, ``hf_max_positions``). transformers' ``dynamic`` type takes the
original length from ``max_position_embeddings``, so a dynamic model keeps that at the original
length; ``HFCausalLM.max_seq_len`` is then factor times it. Every other rule raises
``max_position_embeddings`` to factor times the original length.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from memext.errors import MemextError
from memext.nn.rope_scaling import build_rule, check_rope_args
from memext.nn.transformer import State

# Weight files that extend_hf copies or rewrites itself; every other top-level file is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class RopeSpec(NamedTuple):
    """A rotary scaling rule for a Hugging Face model; a plain tuple in this order works too.
    ``original_len=None``: the config's ``max_position_embeddings`` (the length trained at).
    ``alpha``/``beta``: YaRN's ramp ends, None for its defaults; refused by other rules."""

    name: str
    factor: float
    original_len: int | None = None
    alpha: float | None = None
    beta: float | None = None


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar (local loads take well under a second),
    then restore the user's setting."""
    logging = _transformers().utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "memext.hf needs transformers: pip install 'memext[hf]' (transformers >= 5)"
        ) from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(
            f"memext.hf needs transformers >= 5 (config.rope_parameters), found "
            f"{transformers.__version__}: pip install -U 'transformers>=5'"
        )
    return transformers


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a transformers forward, under the name it takes: ``cache`` in recent
    transformers 5.x, where ``past_key_values`` warns that it is going away, else that."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


class HFCausalLM(nn.Module):
    """A transformers causal LM as a memext model: ``forward(tokens, state) -> (logits, state)``.

    ``State.cache`` carries transformers' ``past_key_values`` (a ``DynamicCache`` is started when
    it is None and ``use_cache``), ``State.pos`` the tokens read so far, which are the positions
    of the next call. Without a cache each call attends to its own tokens only, at positions
    continuing from ``pos`` (``LongLM`` without cache or memory does the same).
    ``max_seq_len``: the longest stream accepted (the config's length unless given).
    """

    def __init__(self, model: nn.Module, max_seq_len: int | None = None, use_cache: bool = True):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len or context_length(model.config)
        self.use_cache = use_cache

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (B, T) int64 -> logits (B, T, vocab) in the model's dtype, and the next State."""
        state = state or State()
        end = state.pos + tokens.shape[1]
        if end > self.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens exceeds the model's limit max_seq_len={self.max_seq_len}"
            )
        cache = state.cache
        if cache is None and self.use_cache:
            cache = _transformers().DynamicCache(config=self.model.config)
        if cache is not None:
            _check_cache(cache, state.pos)
        positions = torch.arange(state.pos, end, device=tokens.device).expand(tokens.shape[0], -1)
        out = self.model(
            input_ids=tokens,
            position_ids=positions,
            use_cache=cache is not None,
            **cache_kwargs(self.model, cache),
        )
        # transformers fills the Cache passed in, in place.
        return out.logits, replace(state, pos=end, cache=cache)


def _check_cache(cache: Any, pos: int) -> None:
    if not isinstance(cache, _transformers().Cache):
        raise ValueError(
            f"HFCausalLM carries transformers' Cache in State.cache, got {type(cache).__name__}"
        )
    held = cache.get_seq_length()
    if held != pos:
        raise ValueError(
            f"the state's cache holds {held} positions but State.pos={pos}: "
            "pass the State this model returned"
        )


def context_length(config: Any) -> int:
    """The longest stream a config is meant to read: ``max_position_embeddings``, times the factor
    for transformers' ``dynamic`` type (whose max_position_embeddings is the original length)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "dynamic":
        return int(rope["factor"] * config.max_position_embeddings)
    return int(config.max_position_embeddings)


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise MemextError(
            f"{str(path)!r} is not a directory: give a local model folder (config.json and "
            "weights); nothing is downloaded"
        )
    if not (path / "config.json").is_file():
        raise MemextError(f"{str(path)!r} has no config.json: not a Hugging Face model folder")
    return path


def load_config(path: str | Path) -> Any:
    """The config of the causal LM in local folder ``path``, refusing anything else."""
    tf = _transformers()
    path = _model_dir(path)
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise MemextError(f"cannot read {str(path / 'config.json')!r}: {e}") from None
    _check_causal(config, path)
    return config


def _check_causal(config: Any, path: Path) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    where = f"{str(path)!r} (model_type={kind!r})"
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.is_encoder_decoder:
        raise MemextError(f"{where} is not a decoder-only causal language model")
    # Encoders such as BERT register a causal head too, but it is causal only with is_decoder.
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder:
        raise MemextError(
            f"{where} is a bidirectional encoder (is_decoder=False), not a causal language model"
        )
    heads = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    if archs and not heads.intersection(archs):
        raise MemextError(
            f"{where} holds {', '.join(archs)}, which has no causal language-model head"
        )


def _apply_rope(config: Any, rope: RopeSpec) -> None:
    """Write rule ``rope`` into ``config.rope_parameters`` and its length into
    ``max_position_embeddings`` (see the module docstring for ``dynamic``)."""
    current = dict(getattr(config, "rope_parameters", None) or {})
    kind = current.get("rope_type", "default")
    if kind != "default":
        raise ValueError(
            f"the model already uses rope_type={kind!r}; memext scales only plain RoPE "
            "(rope_type='default')"
        )
    base = current.get("rope_theta")
    if base is None:
        raise ValueError(f"model_type={config.model_type!r} has no rope_theta: it is not RoPE")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * current.get("partial_rotary_factor", 1.0))
    original = rope.original_len or int(config.max_position_embeddings)
    check_rope_args(rope.name, rotary_dim, rope.factor, original)
    rule = build_rule(rope.name, rope.alpha, rope.beta, strict=True)
    params = rule.hf_parameters(base, rope.factor, original, rotary_dim)
    if "partial_rotary_factor" in current:
        params["partial_rotary_factor"] = current["partial_rotary_factor"]
    config.rope_parameters = params
    config.max_position_embeddings = rule.hf_max_positions(rope.factor, original)


def load_causal_lm(
    path: str | Path,
    rope: RopeSpec | tuple | None = None,
    dtype: torch.dtype | str = torch.float32,
    use_cache: bool = True,
) -> HFCausalLM:
    """Load the causal LM in local folder ``path`` (offline) as an ``HFCausalLM``.

    ``rope``: ``(name, factor, original_len, alpha, beta)`` (``RopeSpec``) applied through the
    config before the weights load; ``dtype``: a torch dtype or "auto" (the checkpoint's).
    """
    tf = _transformers()
    config = load_config(path)
    if rope is not None:
        _apply_rope(config, RopeSpec(*rope))
    try:
        with quiet_loading():
            model = tf.AutoModelForCausalLM.from_pretrained(
                Path(path), config=config, dtype=dtype, local_files_only=True
            )
    except OSError as e:
        raise MemextError(f"cannot load the weights in {str(path)!r}: {e}") from None
    return HFCausalLM(model.eval(), use_cache=use_cache)


def extend_hf(
    src_dir: str | Path,
    out_dir: str | Path,
    scaling: str,
    factor: float,
    original_len: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> Path:
    """Write a context-extended copy of model folder ``src_dir`` to ``out_dir``: its config with
    the rotary rule (see ``load_causal_lm``'s ``rope``), the weights as safetensors (copied byte
    for byte when they already are), and every other top-level file (tokenizer, generation
    config). ``out_dir`` must not exist or be empty. Returns ``out_dir``."""
    # Refused before any file is read; original_len=None is checked once the config gives it.
    check_rope_args(scaling, None, factor, original_len or 1)
    build_rule(scaling, alpha, beta, strict=True)
    out, src = Path(out_dir), Path(src_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MemextError(f"{str(out)!r} exists and is not empty: choose a new folder")
    config = load_config(src)
    _apply_rope(config, RopeSpec(scaling, factor, original_len, alpha, beta))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside out_dir and renamed into place, so a failure leaves no half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_weights(src, tmp, config)
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not _is_weights(f):
                shutil.copy2(f, tmp / f.name)
        config.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_weights(f: Path) -> bool:
    return f.name in _WEIGHT_INDEXES or f.suffix in _WEIGHT_SUFFIXES


def _write_weights(src: Path, out: Path, config: Any) -> None:
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        for f in [*shards, *src.glob("model.safetensors.index.json")]:
            shutil.copy2(f, out / f.name)
        return
    # Other formats: load once in their own dtype and save as safetensors.
    tf = _transformers()
    with quiet_loading():
        model = tf.AutoModelForCausalLM.from_pretrained(
            src, config=config, dtype="auto", local_files_only=True
        )
    model.save_pretrained(out)
