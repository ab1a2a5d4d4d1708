"""A tiny random Hugging Face Llama directory with a byte-level BPE tokenizer of its own, for
tests that read a local HF model (the adapter, the suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_tiny_llama(path: Path, **config: Any) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer of its own; ``config`` overrides
    fields of its ``LlamaConfig``."""
    import tokenizers
    import transformers

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["The pass key is 12345. Remember it."] * 20, trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    llama = transformers.LlamaConfig(
        **{
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            **config,
        }
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama).save_pretrained(path)
    tok.save_pretrained(path)
    return path
