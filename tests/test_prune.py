"""Head pruning (``memext.nn.prune``, ``memext.hf.prune``, ``memext.adapters.pruned``): a pruned
model equals the model whose removed heads are gated to zero, for memext and a tiny GQA Llama;
the importance is the gate's gradient; the directory every command reads; bad input refused.

Tolerance of "equal": the pruned model computes the same float32 products as the gated one, and
drops terms that are exact zeros from the output projection's sums; only the order in which a
matmul adds its terms can change (a kernel picks its blocking by the width). Each logit then
moves by at most a few float32 roundings of its magnitude: checked with rtol = atol = 1e-5,
against logits of order 1, while masking any other set of heads moves them by > 1e-3 (checked
too, so the comparison can fail).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memext import build_model
from memext import checkpoint as ckpt
from memext.adapters import open_model
from memext.adapters.pruned import META, RECORD
from memext.cli import app
from memext.config import ModelConfig
from memext.errors import MemextError
from memext.hf.prune import llama_slots, prune_llama
from memext.infer.generate import new_state
from memext.nn import prune as P
from tiny_hf import save_tiny_llama
from tiny_runs import save_tiny_corpus, save_tiny_run

runner = CliRunner()
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _gated(model, slots, gates, x: torch.Tensor, call) -> torch.Tensor:
    with torch.no_grad(), P.gate_heads(slots, gates):
        return call(model, x)


def _memext_logits(model, x):
    return model(x)[0]


def _llama_logits(lm, x):
    return lm(input_ids=x).logits


def _random_keep(slots: list[P.HeadSlots], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    keep = []
    for s in slots:
        n = int(torch.randint(1, s.n_groups + 1, (1,), generator=g))
        keep.append(sorted(torch.randperm(s.n_groups, generator=g)[:n].tolist()))
    return keep


@settings(max_examples=8, deadline=None)
@given(
    heads=st.sampled_from([2, 3, 6]),
    layers=st.integers(1, 3),
    seed=st.integers(0, 1000),
    t=st.sampled_from([1, 7, 33]),
)
def test_pruned_memext_equals_masked(heads: int, layers: int, seed: int, t: int) -> None:
    cfg = ModelConfig(vocab_size=97, d_model=12 * heads, n_layers=layers, n_heads=heads)
    model = build_model(cfg, seed=seed).eval()
    slots = P.self_attention_slots(model)
    keep = _random_keep(slots, seed)
    x = torch.randint(0, 97, (2, t), generator=torch.Generator().manual_seed(seed))
    masked = _gated(model, slots, P.head_gates(slots, keep), x, _memext_logits)
    for block, groups in zip(model.blocks, keep, strict=True):
        P.prune_self_attention(block.attn, groups)
    with torch.no_grad():
        pruned = model(x)[0]
    torch.testing.assert_close(pruned, masked, **TOL)
    assert [b.attn.qkv.out_features for b in model.blocks] == [36 * len(k) for k in keep]
    # The same weights rebuilt from a config that names the head counts load into the model.
    again = build_model(dataclasses.replace(cfg, heads=tuple(map(len, keep))), seed=None)
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], pruned, rtol=0, atol=0)


def test_the_comparison_can_fail() -> None:
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4)
    model = build_model(cfg, seed=0).eval()
    slots = P.self_attention_slots(model)
    x = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    a = _gated(model, slots, P.head_gates(slots, [[0, 1, 2], [0, 1, 2, 3]]), x, _memext_logits)
    b = _gated(model, slots, P.head_gates(slots, [[0, 1, 3], [0, 1, 2, 3]]), x, _memext_logits)
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.parametrize(("q", "kv"), [(6, 3), (6, 2), (4, 4), (6, 1)], ids=str)
def test_pruned_llama_equals_masked(tmp_path: Path, q: int, kv: int) -> None:
    import transformers

    path = save_tiny_llama(tmp_path / "hf", num_hidden_layers=3, hidden_size=8 * q,
                           num_attention_heads=q, num_key_value_heads=kv)  # fmt: skip
    lm = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    slots = llama_slots(lm)
    assert [(s.n_heads, s.group) for s in slots] == [(q, q // kv)] * 3
    keep = _random_keep(slots, q + kv)
    x = torch.randint(0, 200, (2, 19), generator=torch.Generator().manual_seed(1))
    masked = _gated(lm, slots, P.head_gates(slots, keep), x, _llama_logits)
    full = _gated(lm, slots, [torch.ones(s.n_heads) for s in slots], x, _llama_logits)
    prune_llama(lm, keep)
    with torch.no_grad():
        pruned = lm(input_ids=x).logits
    torch.testing.assert_close(pruned, masked, **TOL)
    if any(len(k) < s.n_groups for k, s in zip(keep, slots, strict=True)):
        assert float((full - masked).abs().max()) > 1e-4  # something was removed
    attn = lm.model.layers[0].self_attn
    assert attn.k_proj.out_features == 8 * len(keep[0])
    assert attn.q_proj.out_features == 8 * len(keep[0]) * (q // kv)


def test_importance_is_the_gate_gradient() -> None:
    cfg = ModelConfig(vocab_size=50, d_model=24, n_layers=2, n_heads=3)
    model = build_model(cfg, seed=3).double().eval()
    slots = P.self_attention_slots(model)
    x = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2))

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])[0]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    got = P.head_importance(slots, loss, [x, x.flip(1)])
    eps = 1e-4  # truncation error ~eps^2; smaller steps meet the loss's rounding noise
    for layer, s in enumerate(slots):
        for h in range(s.n_heads):
            want = 0.0
            for tokens in (x, x.flip(1)):
                values = []
                for sign in (1, -1):
                    gates = [torch.ones(t.n_heads, dtype=torch.float64) for t in slots]
                    gates[layer][h] += sign * eps
                    with torch.no_grad(), P.gate_heads(slots, gates):
                        values.append(float(loss(tokens)))
                want += abs(values[0] - values[1]) / (2 * eps)  # central difference
            assert abs(float(got[layer][h]) - want) < 1e-6 * max(1.0, want), (layer, h)


def test_choice_removes_the_least_important_and_keeps_one_per_layer() -> None:
    slots = [
        P.HeadSlots(torch.nn.Linear(4, 4), 4, 1, 2),
        P.HeadSlots(torch.nn.Linear(4, 4), 4, 1, 2),
    ]
    # Groups (sum of 2 heads): layer 0: [3, 4] (norm 5), layer 1: [0.3, 0.4] (norm 0.5).
    scores = [torch.tensor([1.0, 2.0, 2.0, 2.0]), torch.tensor([0.1, 0.2, 0.2, 0.2])]
    # Normalized: 0.6, 0.8 in both; the best of each layer stays, so two can go.
    assert P.choose_groups(slots, scores, 1) in ([[1], [0, 1]], [[0, 1], [1]])
    assert P.choose_groups(slots, scores, 2) == [[1], [1]]
    with pytest.raises(ValueError, match="only 2 can go"):
        P.choose_groups(slots, scores, 3)
    assert P.groups_to_remove(0.5, slots) == 2
    with pytest.raises(ValueError, match="leaves 0 heads in some layer"):
        P.groups_to_remove(0.75, slots)
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            P.groups_to_remove(bad, slots)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prune")
    corpus = save_tiny_corpus(root / "corpus", docs=3, lines=60)
    return {
        "corpus": corpus,
        "memext": save_tiny_run(root / "run", corpus, seq_len=64, d_model=48, n_heads=4),
        "hf": save_tiny_llama(
            root / "hf",
            num_hidden_layers=3,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=3,
        ),
    }


def _prune(src: Path, out: Path, *extra: str) -> str:
    done = runner.invoke(app, ["compress", "prune", str(src), "--out", str(out), "--device",
                               "cpu", "--batches", "2", "--seq-len", "32", *extra])  # fmt: skip
    assert done.exit_code == 0, done.output
    return re.sub(r"\s+", " ", done.output)


def test_pruned_run_reads_as_the_masked_base(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p"
    said = _prune(models["memext"], out, "--heads", "0.25")
    assert "6 of 8 attention heads kept" in said, said
    record = json.loads((out / RECORD).read_text())
    cfg = ckpt.load_config(out)
    assert list(cfg.model.heads) == record["heads_after"] and sum(cfg.model.heads) == 6
    base, pruned = open_model(models["memext"]), open_model(out)
    assert pruned.kind == "memext"
    slots = P.self_attention_slots(base.model)
    x = torch.randint(0, 264, (1, 40), generator=torch.Generator().manual_seed(0))
    masked = _gated(base.model, slots, P.head_gates(slots, record["keep"]), x, _memext_logits)
    with torch.no_grad():
        torch.testing.assert_close(pruned.model(x)[0], masked, **TOL)
        # Cached decoding (per-layer head counts in the KV cache) == one full forward.
        logits, state = pruned.model(x[:, :30], new_state(pruned.model, 1, 40))
        steps = [logits]
        for i in range(30, 40):
            logits, state = pruned.model(x[:, i : i + 1], state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), pruned.model(x)[0].detach(), **TOL)
    gen = runner.invoke(app, ["generate", str(out), "--prompt", "The value", "--max-new-tokens",
                              "5", "--temperature", "0", "--device", "cpu"])  # fmt: skip
    assert gen.exit_code == 0, gen.output


def test_pruned_llama_dir_reads_as_the_masked_base(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p"
    said = _prune(models["hf"], out, "--heads", "0.34", "--text", str(models["corpus"] / "d0.txt"))
    assert "12 of 18 attention heads kept (whole KV groups removed)" in said, said
    meta = json.loads((out / META).read_text())
    assert sorted(p.name for p in out.iterdir()) == [META]  # the weights stay the base's
    base, pruned = open_model(models["hf"]), open_model(out)
    assert pruned.kind == "pruned" and "12/18 heads" in pruned.name
    lm = base.model.model
    slots = llama_slots(lm)
    x = torch.randint(0, 200, (1, 23), generator=torch.Generator().manual_seed(0))
    masked = _gated(lm, slots, P.head_gates(slots, meta["keep"]), x, _llama_logits)
    torch.testing.assert_close(pruned.logits(x), masked, **TOL)
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "12 of 18 attention heads kept" in re.sub(
        r"\s+", " ", info.output
    ), info.output
    gen = runner.invoke(app, ["generate", str(out), "--prompt", "The pass", "--max-new-tokens",
                              "4", "--temperature", "0", "--device", "cpu"])  # fmt: skip
    assert gen.exit_code == 0, gen.output


def test_recovery_trains_the_pruned_run(models: dict[str, Path], tmp_path: Path) -> None:
    plain, recovered = tmp_path / "p", tmp_path / "r"
    _prune(models["memext"], plain, "--heads", "0.25")
    said = _prune(models["memext"], recovered, "--heads", "0.25", "--recover-steps", "2",
                  "--recover-lr", "0.01", "--recover-data", "corpus")  # fmt: skip
    assert "recovered 2 steps" in said, said
    a, b = open_model(plain), open_model(recovered)
    assert a.cfg.model.heads == b.cfg.model.heads
    assert json.loads((recovered / RECORD).read_text())["recover"] == {
        "steps": 2,
        "lr": 0.01,
        "data": "corpus",
    }
    assert ckpt.load_config(recovered).data.mixture == ()
    moved = [
        float((p - q).detach().abs().max())
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    ]
    assert max(moved) > 1e-4  # the fine-tune changed the weights


def test_recovery_with_the_unpruned_models_soft_targets(
    models: dict[str, Path], tmp_path: Path
) -> None:
    plain, taught = tmp_path / "plain", tmp_path / "kd"
    common = ["--heads", "0.25", "--recover-steps", "2", "--recover-lr", "0.01",
              "--recover-data", "corpus"]  # fmt: skip
    _prune(models["memext"], plain, *common)
    said = _prune(models["memext"], taught, *common, "--recover-kd", "1")
    assert "recovered 2 steps" in said, said
    assert json.loads((taught / RECORD).read_text())["recover"]["kd"] == 1.0
    t = ckpt.load_config(taught).train
    assert (t.distill_teacher, t.distill_alpha, t.distill_temperature) == (
        str(models["memext"].resolve()),
        1.0,
        1.0,
    )
    assert ckpt.load_config(plain).train.distill_teacher == ""
    # The teacher was read: its term is logged, and the two recoveries differ.
    assert all(r["loss_kd"] >= 0 for r in ckpt.read_metrics(taught) if "loss" in r)
    a, b = open_model(plain), open_model(taught)
    pairs = zip(a.model.parameters(), b.model.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)


def _fails(args: list[str], message: str) -> None:
    done = runner.invoke(app, args)
    assert done.exit_code == 2, done.output
    line = re.sub(r"\s+", " ", done.output)
    assert "error:" in line and message in line and "Traceback" not in line, done.output


def test_bad_input_is_one_line_and_writes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p"
    for src in ("memext", "hf"):
        prune = ["compress", "prune", str(models[src]), "--out", str(out), "--device", "cpu"]
        for bad in ("1.0", "0", "-0.5", "1.5", "nan"):
            _fails([*prune, "--heads", bad], r"expected the fraction of heads to remove, in (0, 1)")
        _fails([*prune, "--heads", "0.9"], "leaves 0 heads in some layer")
        _fails([*prune, "--heads", "0.01"], "removes none")
        _fails([*prune, "--seq-len", "1"], "--seq-len 1")
        _fails([*prune, "--recover-data", "tasks"], "--recover-data 'tasks'")
        _fails([*prune, "--recover-kd", "1.5"], "--recover-kd 1.5: expected a weight in [0, 1]")
        _fails([*prune, "--recover-kd", "0.5"], "give --recover-steps")
        _fails([*prune, "--text", str(tmp_path / "missing.txt")], "cannot be read")
    assert not out.exists()
    hf = ["compress", "prune", str(models["hf"]), "--out", str(out), "--device", "cpu"]
    _fails([*hf, "--recover-steps", "3"], "fine-tunes memext runs only")
    _prune(models["memext"], out, "--heads", "0.25")
    _fails(["compress", "prune", str(models["memext"]), "--out", str(out)], "already exists")
    _fails(["compress", "prune", str(out), "--out", str(tmp_path / "q")], "already pruned")
    _prune(models["hf"], tmp_path / "h", "--heads", "0.34")
    _fails(["compress", "prune", str(tmp_path / "h"), "--out", str(tmp_path / "q")],
           "already pruned")  # fmt: skip
    quant = runner.invoke(app, ["compress", "quantize", str(models["memext"]), "--out",
                                str(tmp_path / "int8"), "--device", "cpu"])  # fmt: skip
    assert quant.exit_code == 0, quant.output
    _fails(["compress", "prune", str(tmp_path / "int8"), "--out", str(tmp_path / "q")],
           "is quantized: prune its base model")  # fmt: skip
    assert not (tmp_path / "q").exists()
    # A base that changed since it was pruned is refused on opening.
    meta = json.loads((tmp_path / "h" / META).read_text())
    meta["checksums"][1]["sum"] += 1.0
    (tmp_path / "h" / META).write_text(json.dumps(meta))
    with pytest.raises(MemextError, match="attention weights are not those that were pruned"):
        open_model(tmp_path / "h")


def test_config_heads_checks() -> None:
    with pytest.raises(ValueError, match=r"model\.heads"):
        ModelConfig(n_layers=2, n_heads=4, heads=(4,))
    with pytest.raises(ValueError, match=r"model\.heads"):
        ModelConfig(n_layers=2, n_heads=4, heads=(0, 4))
    with pytest.raises(ValueError, match="memory"):
        ModelConfig(n_layers=2, n_heads=4, heads=(2, 3), memory="knn")
    ok = ModelConfig(n_layers=2, n_heads=4, heads=(2, 3), memory="xl", mem_len=8)
    assert ok.layer_heads() == (2, 3) and ok.head_dim == 32


def test_the_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "compression.md"
    blocks = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.S)
    mine = [b for b in blocks if "prune_self_attention" in b]
    assert len(mine) == 1
    exec(compile(mine[0], str(docs), "exec"), {})
    printed = capsys.readouterr().out
    assert "heads kept per layer:" in printed
    gap = float(re.search(r"max \|pruned - masked\|: (\S+)", printed).group(1))
    assert gap <= 1e-5, printed
