"""The memory contract, for every variant: empty memory == the plain model, a paused and resumed
document gives the same outputs, and Transformer-XL read in segments == one masked pass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from memext import build_model
from memext.checkpoint import load_state, save_state
from memext.config import ModelConfig
from memext.errors import MemextError
from memext.nn import reference
from memext.nn.memory import MEMORY

BASE = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, max_seq_len=512)

# One small setting per variant; each must fill its memory within two 16-token segments.
VARIANTS = {
    "xl": {"mem_len": 24},
    "compressive": {"mem_len": 8, "cmem_len": 4, "cmem_rate": 2},
    "tokens": {"mem_tokens": 4},
    "knn": {"mem_len": 8, "knn_topk": 4},
}


def _cfg(name: str) -> ModelConfig:
    return dataclasses.replace(BASE, memory=name, **VARIANTS[name])


def test_every_registered_variant_is_covered() -> None:
    assert set(MEMORY) - {"none"} == set(VARIANTS)


def _tokens(t: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, t), generator=torch.Generator().manual_seed(seed))


def _run(model, tokens: torch.Tensor, segment: int, state=None):
    outs = []
    for s in range(0, tokens.shape[1], segment):
        logits, state = model(tokens[:, s : s + segment], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("name", sorted(VARIANTS))
@torch.no_grad()
def test_empty_memory_equals_the_plain_model(name: str) -> None:
    cfg = _cfg(name)
    plain = build_model(BASE, seed=0).eval()
    model = build_model(cfg, seed=0).eval()
    # The variant's own parameters are extra; the shared ones must be the plain model's.
    model.load_state_dict(plain.state_dict(), strict=False)
    x = _tokens(16)
    if name == "tokens":  # RMT with m=0 is the plain model; with m>0 it reads memory tokens.
        model = build_model(dataclasses.replace(cfg, mem_tokens=0), seed=0).eval()
    assert torch.equal(model(x)[0], plain(x)[0])


@pytest.mark.parametrize("name", sorted(VARIANTS))
@torch.no_grad()
def test_memory_is_used_across_segments(name: str) -> None:
    """Changing the first segment changes the second one's logits: something was carried."""
    model = build_model(_cfg(name), seed=0).eval()
    if name == "knn":
        for block in model.memory.modules():  # open the gate so retrieval shows in the output
            if hasattr(block, "gate"):
                block.gate.fill_(2.0)
    a, b = _tokens(32, seed=1), _tokens(32, seed=1)
    b[:, :16] = _tokens(16, seed=2)
    out_a, _ = _run(model, a, 16)
    out_b, _ = _run(model, b, 16)
    assert (out_a[:, 16:] - out_b[:, 16:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(VARIANTS))
@torch.no_grad()
def test_saving_and_loading_the_state_reproduces_the_next_outputs(
    name: str, tmp_path: Path
) -> None:
    model = build_model(_cfg(name), seed=0).eval()
    x = _tokens(64, seed=3)
    _, state = _run(model, x[:, :48], 16)
    expected, _ = _run(model, x[:, 48:], 16, state)
    save_state(state, tmp_path / "doc.safetensors", name)
    restored = load_state(tmp_path / "doc.safetensors", model_name=name)
    assert restored.pos == 48
    again, _ = _run(model, x[:, 48:], 16, restored)
    assert torch.equal(again, expected)


def test_a_foreign_or_corrupt_state_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MemextError, match="corrupt"):
        load_state(bad)
    model = build_model(_cfg("xl"), seed=0).eval()
    _, state = model(_tokens(16))
    save_state(state, tmp_path / "xl.safetensors", "xl")
    with pytest.raises(MemextError, match="'xl' memory"):
        load_state(tmp_path / "xl.safetensors", model_name="knn")


@pytest.mark.parametrize("segment,mem_len", [(8, 8), (8, 5), (16, 24), (4, 0)])
def test_xl_in_segments_equals_one_pass_under_the_equivalent_mask(
    segment: int, mem_len: int
) -> None:
    cfg = dataclasses.replace(BASE, memory="xl", mem_len=mem_len)
    model = build_model(cfg, seed=0).eval()
    x = _tokens(40, seed=4)
    out, _ = _run(model, x, segment)

    mask = reference.segment_memory_mask(40, segment, mem_len)

    class Masked(torch.nn.Module):
        shared_qk = False

        def forward(self, q, k, v, *, causal=True, key_padding=None):
            return reference.attention(q, k, v, mask)

    one_pass = build_model(dataclasses.replace(BASE, max_seq_len=512), seed=0).eval()
    for block in one_pass.blocks:
        block.attn.kernel = Masked()
    ref, _ = one_pass(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_xl_gradients_cross_segments_only_when_not_detached() -> None:
    model = build_model(_cfg("xl"), seed=0)
    x = _tokens(32, seed=5)
    emb = []

    def keep(module, inputs, output) -> None:
        output.retain_grad()
        emb.append(output)

    model.embed.register_forward_hook(keep)
    _, state = model(x[:, :16])
    for detach in (False, True):
        carried = model.memory.detach(state.memory) if detach else state.memory
        logits, _ = model(x[:, 16:], dataclasses.replace(state, memory=carried))
        emb[0].grad = None
        logits.sum().backward(retain_graph=True)
        reached = emb[0].grad is not None and emb[0].grad.abs().sum() > 0
        assert reached != detach


def test_xl_reset_forgets_a_row() -> None:
    model = build_model(_cfg("xl"), seed=0).eval()
    x = _tokens(32, seed=6)
    with torch.no_grad():
        _, state = model(x[:, :16])
        state.memory = model.memory.reset(state.memory, torch.tensor([True, False]))
        out, _ = model(x[:, 16:], state)
        fresh, _ = model(x[:1, 16:], dataclasses.replace(state, memory=None))
        kept, _ = model(x[:, 16:], dataclasses.replace(state, memory=None))
    # Row 0 forgot its past: it equals a model that never saw it (at the same positions).
    torch.testing.assert_close(out[0], fresh[0], atol=1e-5, rtol=1e-5)
    assert (out[1] - kept[1]).abs().max() > 1e-4


def test_memory_models_read_unbounded_input_but_one_call_is_limited() -> None:
    cfg = dataclasses.replace(_cfg("xl"), max_seq_len=32)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        _, state = _run(model, _tokens(128), 32)
        assert state.pos == 128
        with pytest.raises(ValueError, match="max_seq_len=32"):
            model(_tokens(33), state)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"memory": "nope"}, "model.memory"),
        ({"memory": "xl", "mem_len": -1}, "model.mem_len"),
        ({"memory": "xl", "reversible": True}, "reversible"),
        ({"knn_layer": 5}, "model.knn_layer"),
        ({"arch": "lstm", "memory": "xl"}, "lstm"),
    ],
)
def test_invalid_memory_settings_are_refused(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **changes)
