"""Run directories: weights round-trip bit-exactly; corrupt or mismatched files are refused."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

import memext
from memext.checkpoint import CONFIG, WEIGHTS, load_weights, save_weights, weights_metadata
from memext.config import Config, EvalConfig, ModelConfig, TrainConfig
from memext.errors import MemextError
from memext.model import build_model


def _config(model_cfg: ModelConfig) -> Config:
    return Config(model=model_cfg, train=TrainConfig(seq_len=64), eval=EvalConfig(lengths=(64,)))


def _run_dir(path: Path, model_cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """Write config.json + model.safetensors for a freshly initialised model; return the model."""
    path.mkdir(parents=True, exist_ok=True)
    _config(model_cfg).save(path / CONFIG)
    model = build_model(model_cfg, seed=seed).eval()
    save_weights(model, path / WEIGHTS, {"step": "7"})
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_and_load_give_bit_identical_logits(tmp_path: Path, tiny_model_cfg, tie) -> None:
    cfg = dataclasses.replace(tiny_model_cfg, tie_embeddings=tie)
    model = _run_dir(tmp_path, cfg, seed=3)
    loaded, loaded_cfg = memext.load(tmp_path)
    assert loaded_cfg.model == cfg
    assert not loaded.training
    assert (loaded.head.weight is loaded.embed.weight) == tie
    tokens = torch.randint(0, 264, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert weights_metadata(tmp_path / WEIGHTS)["step"] == "7"


def test_loading_really_replaces_the_initial_weights(tmp_path: Path, tiny_model_cfg) -> None:
    model = _run_dir(tmp_path, tiny_model_cfg, seed=5)
    other = build_model(tiny_model_cfg, seed=6)
    assert not torch.equal(other.embed.weight, model.embed.weight)
    load_weights(other, tmp_path / WEIGHTS)
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert torch.equal(other.blocks[1].ffn.down.weight, model.blocks[1].ffn.down.weight)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: os.urandom(len(raw)),
        lambda raw: raw[: len(raw) // 2],
        lambda raw: raw[:5],
        lambda raw: b"",
    ],
    ids=["random bytes", "truncated", "header cut", "empty"],
)
def test_corrupt_weights_raise_memext_error(tmp_path: Path, tiny_model_cfg, damage) -> None:
    _run_dir(tmp_path, tiny_model_cfg)
    path = tmp_path / WEIGHTS
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(MemextError, match=r"model\.safetensors' is corrupt or not a safetensors"):
        memext.load(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layers": 3}, r"missing \['blocks\.2\."),
        ({"n_layers": 1}, r"unexpected \['blocks\.1\."),
        ({"d_model": 64}, r"shape \[.blocks\.0\.attn\.out\.weight \(32, 32\) != \(64, 64\)"),
        ({"tie_embeddings": False}, r"missing \['head\.weight'\]"),
    ],
    ids=["more layers", "fewer layers", "wider", "untied head"],
)
def test_weights_of_another_architecture(tmp_path: Path, tiny_model_cfg, change, message) -> None:
    _run_dir(tmp_path, tiny_model_cfg)  # weights of a 2-layer, d_model=32 model with tied head
    _config(dataclasses.replace(tiny_model_cfg, **change)).save(tmp_path / CONFIG)
    with pytest.raises(MemextError, match=r"another architecture than its config\.json") as info:
        memext.load(tmp_path)
    assert re.search(message, str(info.value)), str(info.value)


def test_untied_weights_into_a_tied_config_are_refused(tmp_path: Path, tiny_model_cfg) -> None:
    _run_dir(tmp_path, dataclasses.replace(tiny_model_cfg, tie_embeddings=False))
    _config(tiny_model_cfg).save(tmp_path / CONFIG)  # says tie_embeddings=True
    with pytest.raises(MemextError, match="another architecture"):
        memext.load(tmp_path)


def test_missing_pieces(tmp_path: Path, tiny_model_cfg) -> None:
    with pytest.raises(MemextError, match="does not exist"):
        memext.load(tmp_path / "nowhere")
    with pytest.raises(MemextError, match=r"is not a memext run: it has no config\.json"):
        memext.load(tmp_path)
    _run_dir(tmp_path, tiny_model_cfg)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(MemextError, match="the run has no weights yet"):
        memext.load(tmp_path)


def test_unreadable_config_is_a_memext_error(tmp_path: Path, tiny_model_cfg) -> None:
    _run_dir(tmp_path, tiny_model_cfg)
    (tmp_path / CONFIG).write_text('{"format": "memext-config", "schema_version": 99}')
    with pytest.raises(MemextError, match=r"cannot read the run's config: .*schema_version=99"):
        memext.load(tmp_path)


def test_saved_files_get_the_mode_a_plain_open_would(tmp_path: Path, tiny_model_cfg) -> None:
    # Written through a temporary file (mkstemp: 0600) that safetensors may recreate; the run's
    # files must still be readable by whoever could read a file the user wrote with open().
    _run_dir(tmp_path, tiny_model_cfg)
    mask = os.umask(0)
    os.umask(mask)
    for name in (WEIGHTS, CONFIG):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
