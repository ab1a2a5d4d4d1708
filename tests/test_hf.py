"""The Hugging Face adapter (``memext.hf``): a tiny random Llama saved to disk loads offline,
computes what transformers computes, carries its KV cache in memext's State, takes rotary
scaling through its config exactly as memext's own Rotary computes it, and runs memext's
evaluators."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # >= 5 (rope_parameters), in the dev extra

from memext.data.tasks import make_samples
from memext.errors import MemextError
from memext.evals.perplexity import evaluate_lengths
from memext.evals.tasks import evaluate_samples
from memext.hf import HFCausalLM, context_length, extend_hf, load_causal_lm
from memext.nn.rope_scaling import hf_rope_parameters
from memext.nn.rotary import Rotary
from memext.tokenizer import ByteTokenizer

MAX_POS, HEAD_DIM, BASE = 256, 8, 10000.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A random 2-layer Llama over memext's byte ids, saved with save_pretrained."""
    config = transformers.LlamaConfig(
        vocab_size=264,  # memext's ByteTokenizer ids fit
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")  # stands for the files extend_hf copies
    return path, model


def _tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


# --- round trip and state ---------------------------------------------------------------------
def test_loaded_model_computes_what_transformers_computes(llama) -> None:
    path, reference = llama
    wrapper = load_causal_lm(path)
    assert isinstance(wrapper, HFCausalLM) and wrapper.max_seq_len == MAX_POS
    tokens = _tokens(2, 40)
    with torch.no_grad():
        logits, state = wrapper(tokens)
        want = reference(tokens).logits
    assert logits.shape == (2, 40, 264) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=0.0, atol=1e-5)
    assert state.pos == 40 and state.cache.get_seq_length() == 40


def test_state_carried_over_two_chunks_equals_one_pass(llama) -> None:
    wrapper = load_causal_lm(llama[0])
    tokens = _tokens(2, 50, seed=1)
    with torch.no_grad():
        whole, _ = wrapper(tokens)
        first, state = wrapper(tokens[:, :23])
        second, state = wrapper(tokens[:, 23:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0.0, atol=1e-5)
    assert state.pos == 50 and state.cache.get_seq_length() == 50


def test_without_cache_each_call_reads_alone_at_continuing_positions(llama) -> None:
    wrapper = load_causal_lm(llama[0], use_cache=False)
    tokens = _tokens(1, 30, seed=2)
    with torch.no_grad():
        _, state = wrapper(tokens[:, :10])
        alone, state = wrapper(tokens[:, 10:], state)
        whole, _ = wrapper(tokens)
    assert state.cache is None and state.pos == 30
    assert not torch.allclose(alone, whole[:, 10:], atol=1e-3)  # no context from the first call


def test_refuses_streams_beyond_max_seq_len_and_foreign_states(llama) -> None:
    wrapper = load_causal_lm(llama[0])
    with pytest.raises(ValueError, match=f"exceeds the model's limit max_seq_len={MAX_POS}"):
        wrapper(_tokens(1, MAX_POS + 1))
    _, state = wrapper(_tokens(1, 8))
    state.pos = 5
    with pytest.raises(ValueError, match=r"cache holds 8 positions but State\.pos=5"):
        wrapper(_tokens(1, 4), state)
    state.cache = object()
    with pytest.raises(ValueError, match="transformers' Cache"):
        wrapper(_tokens(1, 4), state)


# --- rotary scaling through the config --------------------------------------------------------
@pytest.mark.parametrize(
    "rope",
    [
        ("linear", 4.0, 64),
        ("yarn", 4.0, 64, 1.0, 32.0),
        ("yarn", 2.5, 100, 2.0, 16.0),
        ("ntk", 4.0, 64),
        ("dynamic", 4.0, 64),
    ],
)
def test_config_rope_gives_memext_rotarys_cos_and_sin(llama, rope: tuple) -> None:
    wrapper = load_causal_lm(llama[0], rope=rope)
    name, factor, original = rope[:3]
    alpha, beta = rope[3:] if len(rope) > 3 else (1.0, 32.0)
    assert wrapper.max_seq_len == math.floor(factor * original)
    ours = Rotary(HEAD_DIM, BASE, name, factor, original, alpha, beta)
    positions = torch.arange(wrapper.max_seq_len)
    theirs = wrapper.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions[None])
    for got, want in zip(ours(positions), theirs, strict=True):
        # Frequencies agree to float32 rounding; angles reach ~max_seq_len radians.
        torch.testing.assert_close(got, want[0], rtol=0.0, atol=2e-5)
    if name == "yarn":
        assert wrapper.model.model.rotary_emb.attention_scaling == pytest.approx(
            ours.attention_factor
        )


def test_extend_hf_writes_a_scaled_copy(llama, tmp_path: Path) -> None:
    src, _ = llama
    out = extend_hf(src, tmp_path / "ext", "yarn", 4.0, alpha=1.0, beta=32.0)
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 4 * MAX_POS
    assert config["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": BASE,
        "factor": 4.0,
        "original_max_position_embeddings": MAX_POS,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    extended = load_causal_lm(out)
    assert extended.max_seq_len == 4 * MAX_POS
    with torch.no_grad():
        logits, _ = extended(_tokens(1, 3 * MAX_POS))
    assert torch.isfinite(logits).all()
    ours = Rotary(HEAD_DIM, BASE, "yarn", 4.0, MAX_POS)
    positions = torch.arange(64)
    theirs = extended.model.model.rotary_emb(torch.zeros(1), positions[None])
    torch.testing.assert_close(ours(positions)[0], theirs[0][0], rtol=0.0, atol=2e-5)


def test_extend_hf_rewrites_other_weight_formats_as_safetensors(llama, tmp_path: Path) -> None:
    reference = llama[1]
    legacy = tmp_path / "legacy"
    reference.config.save_pretrained(legacy)
    torch.save(reference.state_dict(), legacy / "pytorch_model.bin")
    out = extend_hf(legacy, tmp_path / "ext", "linear", 2.0)
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    loaded = load_causal_lm(out).model.state_dict()
    for name, weight in reference.state_dict().items():
        assert torch.equal(loaded[name], weight), name


def test_dynamic_keeps_the_original_length_in_the_config(llama, tmp_path: Path) -> None:
    out = extend_hf(llama[0], tmp_path / "dyn", "dynamic", 2.0)
    config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    # transformers' dynamic type reads its threshold from max_position_embeddings.
    assert config.max_position_embeddings == MAX_POS
    assert context_length(config) == 2 * MAX_POS == load_causal_lm(out).max_seq_len


# --- memext's evaluators ----------------------------------------------------------------------
def test_perplexity_evaluator_runs_on_the_wrapper(llama) -> None:
    tok = ByteTokenizer()
    text = "def f(x):\n    return x * 2  # doubles\n" * 12
    tokens = np.array(tok.encode(text), dtype=np.uint16)
    wrapper = load_causal_lm(llama[0])
    rows = evaluate_lengths(wrapper, tokens, (16, 32), 64, tok.byte_lengths(), batch_size=4)
    assert [r["length"] for r in rows] == [16, 32]
    # A random model over 264 ids: about ln(264) nats per byte-token.
    assert all(0.5 * math.log2(264) < r["bits_per_byte"] < 2 * math.log2(264) for r in rows)


def test_task_evaluator_reads_segments_through_the_cache(llama) -> None:
    samples = make_samples("copy", ByteTokenizer(), None, 120, 0.0, 4, seed=0, span=6)
    wrapper = load_causal_lm(llama[0])
    segmented = evaluate_samples(wrapper, samples, segment_len=40, batch_size=2)
    whole = evaluate_samples(wrapper, samples, segment_len=200, batch_size=2)
    for key in ("correct", "token_accuracy", "exact_match"):
        assert segmented[key] == whole[key]


# --- bad input --------------------------------------------------------------------------------
def test_refuses_what_is_not_a_local_causal_lm(llama, tmp_path: Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(MemextError, match="is not a directory"):
        load_causal_lm(file)
    with pytest.raises(MemextError, match="is not a directory"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(MemextError, match=r"has no config\.json"):
        load_causal_lm(tmp_path)
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=264, hidden_size=32, num_hidden_layers=1).save_pretrained(
        bert
    )
    with pytest.raises(MemextError, match=r"model_type='bert'.* bidirectional encoder"):
        load_causal_lm(bert)
    with pytest.raises(MemextError, match="bidirectional encoder"):
        extend_hf(bert, tmp_path / "bert-ext", "linear", 2.0)


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_refuses_factors_that_are_not_positive(llama, tmp_path: Path, factor: float) -> None:
    with pytest.raises(ValueError, match=f"factor={factor} is invalid: expected a number > 0"):
        load_causal_lm(llama[0], rope=("linear", factor, 64))
    with pytest.raises(ValueError, match=f"factor={factor} is invalid"):
        extend_hf(llama[0], tmp_path / "out", "linear", factor)
    assert not (tmp_path / "out").exists()


def test_refuses_an_infinite_factor(llama, tmp_path: Path) -> None:
    # `memext extend HF_DIR --factor inf` overflowed computing the new length.
    with pytest.raises(ValueError, match="factor=inf is invalid: expected a finite number > 0"):
        extend_hf(llama[0], tmp_path / "out", "linear", float("inf"))
    assert not (tmp_path / "out").exists()


def test_extend_refuses_a_non_empty_out_dir_and_rescaling(llama, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(MemextError, match="exists and is not empty"):
        extend_hf(llama[0], tmp_path / "busy", "linear", 2.0)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    once = extend_hf(llama[0], tmp_path / "empty", "linear", 2.0)  # an empty folder is fine
    with pytest.raises(ValueError, match="already uses rope_type='linear'"):
        extend_hf(once, tmp_path / "twice", "yarn", 2.0)
    with pytest.raises(ValueError, match="unknown rope scaling 'yarm'"):
        extend_hf(llama[0], tmp_path / "typo", "yarm", 2.0)


@pytest.mark.parametrize("rule", ["linear", "ntk", "dynamic", "yarn"])
def test_cli_extends_a_hf_directory_with_every_rule(llama, tmp_path: Path, rule: str) -> None:
    """`memext extend HF_DIR --out OUT --scaling RULE --factor 4`, options left at their
    defaults (YaRN's alpha and beta unset once crashed it), writes a copy that loads with RULE."""
    from typer.testing import CliRunner

    from memext.cli import app

    out = tmp_path / rule
    args = ["extend", str(llama[0]), "--out", str(out), "--scaling", rule, "--factor", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    params = json.loads((out / "config.json").read_text())["rope_parameters"]
    want = hf_rope_parameters(rule, 4.0, MAX_POS, base=BASE, head_dim=HEAD_DIM)
    assert {k: params[k] for k in want} == want
    assert load_causal_lm(out).max_seq_len == 4 * MAX_POS


def test_extend_refuses_ramp_ends_for_a_rule_without_a_ramp(llama, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rope scaling 'linear' takes no setting yarn_alpha"):
        extend_hf(llama[0], tmp_path / "out", "linear", 2.0, alpha=2.0)
    assert not (tmp_path / "out").exists()


def test_missing_transformers_is_named_with_the_extra(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'memext\[hf\]'"):
        load_causal_lm(tmp_path)
