"""Hugging Face models in memext: load a local causal LM behind memext's model interface, and
extend its context through rotary scaling. Needs the ``hf`` extra (transformers >= 5), imported
only when a function here is called."""

from memext.hf.model import (
    HFCausalLM,
    RopeSpec,
    context_length,
    extend_hf,
    load_causal_lm,
    load_config,
)

__all__ = [
    "HFCausalLM",
    "RopeSpec",
    "context_length",
    "extend_hf",
    "load_causal_lm",
    "load_config",
]
