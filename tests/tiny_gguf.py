"""Tiny GGUF files written in the test itself with the ``gguf`` package: nothing is downloaded.

``write_llama`` builds a random two-layer Llama and a byte-level BPE of its own (ChatML special
tokens and a chat template, as SmolLM2 ships) and writes them as llama.cpp lays a Llama out:
llama.cpp's tensor names, its interleaved rotary layout for the query and key rows, the
tokenizer as ``gpt2`` tokens and merges. transformers' GGUF loader undoes the interleaving, so
the loaded model must compute what the Hugging Face model it came from computes.
``write_other`` writes a file of another architecture; ``truncate`` cuts a file short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "The pass key is 12345. Remember it. The capital of France is Paris. user assistant\n"


def _tokenizer() -> Any:
    """A byte-level BPE of ~320 tokens whose first three ids are the ChatML specials."""
    import tokenizers

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([TEXT] * 20, trainer)
    return bpe


def _interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's rotate-half rows of each head -> llama.cpp's pairwise layout: per head, the
    rows (0 .. d/2-1 | d/2 .. d-1) become (0, d/2, 1, d/2+1, ...)."""
    rows = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, rows // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_llama(vocab_size: int, seed: int = 0, tie: bool = True) -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        initializer_range=0.2,  # peaked logits: greedy choices far from ties
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def write_llama(
    path: Path, seed: int = 0, tie: bool = True, quant: str | None = None
) -> tuple[Path, Any]:
    """A tiny Llama GGUF at ``path``, F32, or its matrices quantized to ``quant`` (a
    ``gguf.GGMLQuantizationType`` name such as "Q8_0"); returns the path and the transformers
    model it was written from (equal to the file's weights when F32)."""
    import gguf

    bpe = _tokenizer()
    vocab = bpe.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(pair) for pair in _merges(bpe)]
    model = hf_llama(len(tokens), seed, tie)
    c = model.config
    w = _Writer(str(path), "llama")
    w.quant = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     _interleave(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))  # fmt: skip
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     _interleave(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))  # fmt: skip
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    _finish(w)
    return path, model


def _writer_class() -> Any:
    import gguf

    class Writer(gguf.GGUFWriter):
        """Quantizes every matrix to ``quant`` (norm vectors stay F32, as llama.cpp keeps them)."""

        quant = None

        def add_tensor(self, name: str, tensor: np.ndarray, **kwargs: Any) -> None:
            if self.quant is not None and tensor.ndim == 2:
                packed = gguf.quants.quantize(tensor, self.quant)
                return super().add_tensor(name, packed, raw_dtype=self.quant)
            return super().add_tensor(name, tensor, **kwargs)

    return Writer


def _Writer(*args: Any) -> Any:
    return _writer_class()(*args)


def _merges(bpe: Any) -> list[tuple[str, str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def write_other(path: Path, arch: str = "gpt2") -> Path:
    """A small, well-formed GGUF of architecture ``arch`` (not a Llama)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    _finish(w)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut the file at ``path`` to ``keep`` of its bytes (a download or copy cut short)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _finish(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
