"""``memext.hf.growing``: transformers' ``DynamicCache`` with room allocated ahead.

Reference: transformers' own ``DynamicLayer`` (concatenation). Tolerance: none, the tensors
returned are equal element for element (torch.equal), and so are a tiny Llama's logits and greedy
tokens through ``generate``.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicLayer

from memext.hf.growing import GrowingLayer, growing_cache

torch.manual_seed(0)
MODEL = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
        vocab_size=264,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
).eval()


def _kv(t: int, seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, t, 8, generator=g), torch.randn(batch, 3, t, 8, generator=g)


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    capacity=st.integers(0, 40),
)
def test_updates_equal_concatenation(chunks: list[int], capacity: int) -> None:
    grow, ref = GrowingLayer(capacity), DynamicLayer()
    for i, t in enumerate(chunks):
        k, v = _kv(t, i)
        _same(grow.update(k, v), ref.update(k, v))
        assert grow.get_seq_length() == ref.get_seq_length() == sum(chunks[: i + 1])


def test_room_is_allocated_once_when_the_capacity_suffices() -> None:
    layer = GrowingLayer(capacity=20)
    layer.update(*_kv(5, 0))
    room = layer._room[0].data_ptr()
    for i in range(15):
        layer.update(*_kv(1, i + 1))
    assert layer._room[0].data_ptr() == room and layer.get_seq_length() == 20
    layer.update(*_kv(1, 99))  # outgrown: doubled, contents kept
    assert layer._room[0].shape[-2] >= 40 and layer.get_seq_length() == 21


def test_crop_reorder_and_reset_keep_it_equal_to_concatenation() -> None:
    grow, ref = GrowingLayer(8), DynamicLayer()
    for layer in (grow, ref):
        layer.update(*_kv(6, 0))
        layer.crop(-2)  # 4 left
    _same(grow.update(*_kv(3, 1)), ref.update(*_kv(3, 1)))
    for layer in (grow, ref):
        layer.reorder_cache(torch.tensor([1, 0]))  # new tensors, not the room's rows
    _same(grow.update(*_kv(2, 2)), ref.update(*_kv(2, 2)))
    for layer in (grow, ref):
        layer.reset()
    _same(grow.update(*_kv(3, 3)), ref.update(*_kv(3, 3)))


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        GrowingLayer(-1)


def test_generate_and_logits_equal_dynamic_cache() -> None:
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    cache = growing_cache(MODEL.config, 12 + 20)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    with torch.no_grad():
        ref = MODEL.generate(
            prompt,
            max_new_tokens=20,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        got = MODEL.generate(
            prompt,
            max_new_tokens=20,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            cache=cache,
        )
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits, strict=True))
    assert len(set(ref.sequences[0, 12:].tolist())) > 3


def test_special_layers_keep_transformers_own() -> None:
    config = MODEL.config.__class__(
        **{
            **MODEL.config.to_dict(),
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    )
    cache = growing_cache(config, 16)
    assert not any(isinstance(layer, GrowingLayer) for layer in cache.layers)
