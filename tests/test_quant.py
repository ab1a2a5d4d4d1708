"""Weight-only quantization (``memext.nn.quant``, ``memext compress quantize``, the ``quantized``
model kind) on tiny random models: every weight within its scheme's bound, torch's kernels equal
to the reference path within the float rounding of a K-term dot product, the quantized model's
logits near float32's, the command's round trip through generate/eval/info, the linear-weight
byte ratios from the saved tensors, and one clear line (exit 2, nothing written) for bad input."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from memext import build_model
from memext.adapters import open_model
from memext.adapters.quantized import META, TENSORS, linear_root
from memext.cli import app
from memext.config import ModelConfig
from memext.errors import MemextError
from memext.nn import quant
from memext.nn.quant import QuantLinear
from tiny_hf import save_tiny_llama
from tiny_runs import save_tiny_corpus, save_tiny_run

runner = CliRunner()
EPS = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff


def gamma(n: int) -> float:
    """Higham's bound on the relative rounding error of an n-term float32 dot product."""
    return n * EPS / (1 - n * EPS)


# --- every weight within its scheme's bound ----------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    group=st.sampled_from(quant.INT4_GROUPS),
    spread=st.floats(1e-3, 1e3),
    offset=st.floats(-10, 10),
    seed=st.integers(0, 2**16),
)
def test_every_weight_is_within_half_a_step(
    n: int, k: int, group: int, spread: float, offset: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * spread + offset * spread
    w[0, : k // 2] = w[0, 0]  # a constant run: a constant group is stored exactly
    # int8: |w - ŵ| <= scale / 2, up to the rounding of w / scale and q * scale.
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (w - quant.dequantize_int8(q, scale)).abs()
    bound = quant.error_bound(scale, k) + 4 * EPS * w.abs().amax(1, keepdim=True)
    assert bool((err <= bound).all()), float((err - bound).max())
    # int4, groups along the input (the last one ragged): |w - ŵ| <= scale / 2 of its group.
    q4, s4, lo = quant.quantize_int4(w, group)
    assert q4.dtype == torch.uint8 and int(q4.max()) <= 15 and q4.shape == (n, k)
    assert s4.shape == lo.shape == (n, quant.groups_of(k, group))
    err4 = (w - quant.dequantize_int4(q4, s4, lo, group)).abs()
    magnitude = (lo.abs() + 15 * s4).repeat_interleave(group, 1)[:, :k]
    bound4 = quant.error_bound(s4, k, group) + 4 * EPS * magnitude
    assert bool((err4 <= bound4).all()), float((err4 - bound4).max())
    # The nibbles round-trip.
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(q4), k), q4)


# --- the kernels equal the reference -----------------------------------------------------------


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("k,n", [(576, 192), (256, 48), (100, 32), (256, 40), (33, 7)])
def test_the_native_kernel_equals_the_reference_path(weights: str, k: int, n: int) -> None:
    torch.manual_seed(k * n)
    linear = torch.nn.Linear(k, n)
    layer = QuantLinear.from_linear(linear, weights, 128)
    # The int4 kernel takes 16 outputs at a time; anything else runs the reference path.
    assert layer.native == (weights == "int8" or n % 16 == 0)
    x = torch.randn(3, 5, k)
    native, reference = layer(x), layer.reference(x)
    assert native.shape == reference.shape == (3, 5, n)
    # Both compute sum_k x_k * ŵ_k + b in float32, ŵ built from at most 3 rounded operations
    # (reference min + q*scale, kernel (q - 8)*scale + zero), so each is within
    # gamma(K + 4) * sum_k |x_k| |terms of ŵ_k| (+ |b|) of the exact value: twice that apart.
    if weights == "int8":
        terms = layer.dequantize().abs()
    else:
        terms = (layer.min.abs() + 16 * layer.scale).repeat_interleave(128, 1)[:, :k]
    size = x.abs() @ terms.T + linear.bias.abs()
    assert bool(((native - reference).abs() <= 2 * gamma(k + 4) * size).all())
    # And the reference is the float layer within the weights' bound: sum_k |x_k| scale/2.
    group = 128 if weights == "int4" else None
    bound = x.abs() @ quant.error_bound(layer.scale, k, group).T
    exact = linear(x).detach()
    assert bool(((reference - exact).abs() <= bound + 2 * gamma(k + 4) * size).all())
    if layer.native:  # the reference path also runs wherever the kernel does not (float64)
        torch.testing.assert_close(layer(x.double()), reference.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_bfloat16_activations_stay_within_their_rounding(weights: str) -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(576, 192), weights, 128)
    x = torch.randn(2, 576)
    reference = layer.reference(x)
    quant.set_activation_dtype(layer, torch.bfloat16)
    fast = layer(x)
    assert fast.dtype == torch.float32
    # x rounded to bfloat16 (unit roundoff 2^-8), the product accumulated and rounded back:
    # within 2 * 2^-8 * sum_k |x_k| |ŵ_k| + |b|, plus the float32 bound.
    size = x.abs() @ layer.dequantize().abs().T + layer.bias.abs()
    assert bool(((fast - reference).abs() <= (2 * 2**-8 + 2 * gamma(580)) * size).all())


def test_tied_and_named_layers_stay_float32() -> None:
    cfg = ModelConfig(vocab_size=264, d_model=64, n_layers=1, n_heads=2, max_seq_len=64)
    model = build_model(cfg, seed=0)
    assert model.head.weight is model.embed.weight
    done = quant.quantize_model(model, "int8", skip=())
    assert done["skipped"] == {"head": "tied to another module's weight"}
    assert isinstance(model.head, torch.nn.Linear) and model.head.weight is model.embed.weight
    untied = build_model(dataclasses.replace(cfg, tie_embeddings=False), seed=0)
    assert quant.quantize_model(untied, "int4")["skipped"] == {"head": "skipped by name"}
    floats = [n for n, m in untied.named_modules() if type(m) is torch.nn.Linear]
    assert floats == ["head"]
    with pytest.raises(ValueError, match="not a scheme"):
        quant.quantize_model(untied, "int3")
    with pytest.raises(ValueError, match="not an int4 group size"):
        quant.quantize_model(untied, "int4", group=100)


# --- whole models, through the command ---------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A memext run and a Llama, with inputs wide enough (256) that per-channel or per-group
    scales weigh what they weigh in a real model."""
    root = tmp_path_factory.mktemp("quant")
    corpus = save_tiny_corpus(root / "corpus", docs=3, lines=200)
    return {
        "memext": save_tiny_run(
            root / "run", corpus, seq_len=64, max_seq_len=256, d_model=256, n_heads=4
        ),
        "hf": save_tiny_llama(root / "llama", hidden_size=256, intermediate_size=512),
    }


def _quantize(source: Path, out: Path, weights: str, *extra: str) -> None:
    done = runner.invoke(app, ["compress", "quantize", str(source), "--weights", weights,
                               "--out", str(out), "--device", "cpu", *extra])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "x smaller" in done.output


@pytest.mark.parametrize("which", ["memext", "hf"])
def test_quantized_models_read_everywhere(
    models: dict[str, Path], which: str, tmp_path: Path
) -> None:
    base = open_model(models[which])
    tokens = torch.tensor([base.tokenizer.encode("The value of item 2 is 14. The pass key")])
    fp32 = base.logits(tokens)
    ratios = {"int8": 3.9, "int4": 6.5}
    errors: dict[str, float] = {}
    for weights, ratio in ratios.items():
        out = tmp_path / weights
        _quantize(models[which], out, weights)
        # The linear weights' bytes, from the saved tensors, against their float32 bytes.
        meta = json.loads((out / META).read_text())
        saved = load_file(out / TENSORS)
        fp32_bytes = sum(4 * layer["in"] * layer["out"] for layer in meta["layers"].values())
        q_bytes = sum(t.numel() * t.element_size() for t in saved.values())
        assert fp32_bytes / q_bytes >= ratio, (weights, fp32_bytes / q_bytes)
        adapter = open_model(out)
        assert adapter.kind == "quantized" and adapter.tokenizer is not None
        layers = [m for m in adapter.model.modules() if isinstance(m, QuantLinear)]
        assert len(layers) == len(meta["layers"]) and all(m.native for m in layers)
        logits = adapter.logits(tokens)
        # The quantized model is the float model with its weights dequantized, up to float
        # rounding; and int8 stays much nearer float32 than int4.
        twin = open_model(models[which])
        for name, m in linear_root(adapter).named_modules():
            if isinstance(m, QuantLinear):
                linear_root(twin).get_submodule(name).weight.data = m.dequantize()
        scale = float(fp32.abs().max())
        assert float((logits - twin.logits(tokens)).abs().max()) <= 1e-4 * scale
        errors[weights] = float((logits - fp32).abs().max() / fp32.std())
        assert adapter.fingerprint() != base.fingerprint()
        # The command line reads it: info, generate (greedy = the adapter's), eval.
        info = runner.invoke(app, ["info", str(out)])
        said = re.sub(r"\s+", " ", info.output)
        assert info.exit_code == 0 and f"weights {weights}" in said, info.output
        want = "".join(adapter.generate("The pass", 6, temperature=0.0))
        gen = runner.invoke(app, ["generate", str(out), "--prompt", "The pass", "--temperature",
                                  "0", "--max-new-tokens", "6", "--device", "cpu"])  # fmt: skip
        assert gen.exit_code == 0 and gen.output[:-1] == want, gen.output
    assert errors["int8"] < 0.05 and errors["int8"] < errors["int4"] / 4, errors
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nlengths: [32]\ndepths: [0.5]\nsamples: 1\ntasks: {passkey: {}}\n")
    ev = runner.invoke(app, ["eval", str(tmp_path / "int4"), "--suite", str(suite), "--out",
                             str(tmp_path / "r.json"), "--device", "cpu"])  # fmt: skip
    assert ev.exit_code == 0 and "(quantized)" in re.sub(r"\s+", " ", ev.output), ev.output
    assert json.loads((tmp_path / "r.json").read_text())["model"]["kind"] == "quantized"


def _fails(args: list[str], message: str) -> None:
    done = runner.invoke(app, args)
    assert done.exit_code == 2, done.output
    line = re.sub(r"\s+", " ", done.output)
    assert "error:" in line and message in line and "Traceback" not in line, done.output


def test_bad_input_is_one_line_and_writes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    run, out = str(models["memext"]), tmp_path / "q"
    quantize = ["compress", "quantize", run, "--device", "cpu", "--out"]
    _fails([*quantize, str(out), "--weights", "int3"], "'int3' is not a scheme")
    _fails([*quantize, str(out), "--weights", "int4", "--group", "100"], "not an int4 group")
    _fails([*quantize, str(out), "--activations", "fp8"], "--activations 'fp8'")
    assert not out.exists()
    _quantize(models["memext"], out, "int8")
    _fails([*quantize, str(out)], "already exists")
    _fails(["compress", "quantize", str(out), "--out", str(tmp_path / "qq")], "already quantized")
    assert not (tmp_path / "qq").exists()

    def broken(name: str, change) -> Path:  # a copy of the quantized dir with one change
        copy = tmp_path / name
        copy.mkdir()
        for f in (META, TENSORS):
            (copy / f).write_bytes((out / f).read_bytes())
        change(copy)
        return copy

    def meta_with(**fields) -> callable:
        def change(d: Path) -> None:
            meta = json.loads((d / META).read_text())
            (d / META).write_text(json.dumps({**meta, **fields}))

        return change

    gen = ["--prompt", "a", "--device", "cpu"]
    corrupt = broken("corrupt", lambda d: (d / TENSORS).write_bytes(b"\x00" * 40))
    _fails(["generate", str(corrupt), *gen], "corrupt or not a safetensors file")
    foreign = broken("foreign", lambda d: (d / META).write_text("[1, 2]"))
    _fails(["generate", str(foreign), *gen], "is not a memext quantized model")
    bad_scheme = broken("int3", meta_with(weights="int3"))
    _fails(["generate", str(bad_scheme), *gen], "'int3' is not a scheme")
    gone = broken("gone", meta_with(base={"source": str(tmp_path / "nowhere"), "kind": "memext"}))
    _fails(["generate", str(gone), *gen], "not there any more")

    def swap_scales(d: Path) -> None:
        tensors = load_file(d / TENSORS)
        name = next(k for k in tensors if k.endswith(".scale"))
        tensors[name] = -tensors[name]
        save_file(tensors, str(d / TENSORS), metadata={"format": "memext-quantized"})

    negative = broken("negative", swap_scales)
    _fails(["generate", str(negative), *gen], "finite and positive")
    fast = tmp_path / "fast"
    _quantize(models["memext"], fast, "int8", "--activations", "bfloat16")
    assert {
        m.act_dtype for m in open_model(fast).model.modules() if isinstance(m, QuantLinear)
    } == {torch.bfloat16}
    # Another base's weights: the checksums refuse it.
    other = tmp_path / "other-run"
    other.mkdir()
    for f in models["memext"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    moved = broken("moved", meta_with(base={"source": str(other), "kind": "memext"}))
    from memext import checkpoint as ckpt

    cfg = ckpt.load_config(other).model
    ckpt.save_weights(build_model(cfg, seed=1), other / ckpt.WEIGHTS, {"step": "0"})
    _fails(["generate", str(moved), *gen], "not those that were quantized")
    with pytest.raises(MemextError, match="only memext runs have a memory"):
        hf_q = tmp_path / "hf-q"
        _quantize(models["hf"], hf_q, "int8")
        open_model(hf_q, memory=False)


def test_a_failed_write_leaves_no_directory(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    def fail(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    out = tmp_path / "q"
    done = runner.invoke(app, ["compress", "quantize", str(models["memext"]), "--out", str(out),
                               "--device", "cpu"])  # fmt: skip
    assert done.exit_code == 2 and "the disk is full" in done.output, done.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "compression.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(docs), "exec"), {})
    printed = capsys.readouterr().out
    assert "tied to another module's weight" in printed and "layers quantized" in printed


def test_stream_reads_a_quantized_model(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "q"
    _quantize(models["hf"], out, "int4")
    text = tmp_path / "t.txt"
    text.write_text("The pass key is 12345. Remember it. " * 40)
    done = runner.invoke(app, ["stream", str(out), "--text", str(text), "--tokens", "96",
                               "--chunk", "16", "--every", "48", "--no-chunk-peak", "--device",
                               "cpu", "--out", str(tmp_path / "s.json")])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "s.json").read_text())["kind"] == "quantized"


def test_windowed_bits_per_byte_is_the_log_loss_over_bytes(models: dict[str, Path]) -> None:
    # What the quantize and prune benchmarks compare configurations on, from full logits.
    import math

    import numpy as np

    from memext.evals.perplexity import windowed_bits_per_byte

    model = open_model(models["memext"])
    ids = np.random.default_rng(0).integers(0, model.tokenizer.vocab_size, 70)
    lengths = np.asarray(model.tokenizer.byte_lengths())
    nats, nbytes = 0.0, 0
    for a in range(0, 69, 32):
        w = torch.as_tensor(ids[a : a + 32], dtype=torch.int64)[None]
        if w.shape[1] < 2:
            break
        lp = torch.log_softmax(model.logits(w)[0, :-1].double(), -1)
        nats -= float(lp.gather(1, w[0, 1:, None]).sum())
        nbytes += int(lengths[w[0, 1:].numpy()].sum())
    want = nats / math.log(2) / nbytes
    assert abs(windowed_bits_per_byte(model, ids, 32) - want) < 1e-4 * want
