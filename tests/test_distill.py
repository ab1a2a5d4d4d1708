"""Distillation (``memext.train.distill``, ``memext distill``): the KD loss against a hand-written
KL, alpha = 0 against plain training, the teacher's logits lined up with a memory student's
segments, a run through the command line, exact resumption, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from memext import Config, build_model, load
from memext import checkpoint as ckpt
from memext.adapters import open_model
from memext.checkpoint import read_metrics
from memext.cli import app
from memext.errors import MemextError
from memext.train import train
from memext.train.distill import Distillation, init_from_teacher, kd_loss, teacher_blocks
from memext.train.step import sequence_backward
from tiny_hf import save_tiny_llama
from tiny_runs import save_tiny_corpus, save_tiny_run

runner = CliRunner()

# A 2-layer d32 student with a Transformer-XL memory, reading 256-token sequences in two
# segments, on corpus text and passkeys (the shortest whose key can lie a segment away).
STUDENT = {
    "model.d_model": "32",
    "model.n_layers": "2",
    "model.n_heads": "2",
    "model.max_seq_len": "256",
    "model.memory": "xl",
    "model.mem_len": "64",
    "train.seq_len": "256",
    "train.segment_len": "128",
    "train.curriculum": "",
    "train.curriculum_steps": "",
    "data.mixture": "[{task: lm, batch_size: 2}, {task: passkey, batch_size: 2}]",
    "train.batch_size": "2",
    "train.steps": "6",
    "train.log_every": "1",
    "train.save_every": "100",
    "train.eval_every": "0",
    "train.eval_tokens": "256",
    "train.warmup_steps": "2",
    "eval.lengths": "128,256",
    "eval.max_tokens": "256",
}


def _naive_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """T^2 * sum_v p (log p - log q) and its gradient T * (q - p), in float64, written out."""

    def log_softmax(z: torch.Tensor) -> torch.Tensor:
        z = z - z.max(dim=-1, keepdim=True).values
        return z - z.exp().sum(dim=-1, keepdim=True).log()

    log_p = log_softmax(teacher.double() / temperature)
    log_q = log_softmax(student.double() / temperature)
    kl = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return kl, temperature * (log_q.exp() - log_p.exp())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 3),
    positions=st.integers(1, 7),
    vocab=st.sampled_from([2, 5, 97]),
    temperature=st.floats(0.5, 4.0),
    spread=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**16),
)
def test_kd_loss_equals_the_hand_written_kl(rows, positions, vocab, temperature, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, positions, vocab, generator=gen) * spread).requires_grad_()
    teacher = torch.randn(rows, positions, vocab, generator=gen) * spread
    fast = kd_loss(student, teacher, temperature)
    fast.sum().backward()
    kl, grad = _naive_kl(student.detach(), teacher, temperature)
    # float32 log-softmax values are off by ~1e-7 of their size, which is at most the logits'
    # range over T; summed over the vocabulary, times T^2.
    scale = 1.0 + 2 * spread * 4 / temperature
    assert fast.shape == (rows, positions)
    assert torch.allclose(fast.double(), kl, rtol=0, atol=1e-6 * vocab * scale * temperature**2)
    assert torch.allclose(student.grad.double(), grad, rtol=0, atol=1e-6 * temperature)


def test_kd_loss_is_zero_against_itself_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits, 2.0).abs().max() < 1e-6
    assert (kd_loss(logits, logits.flip(1), 2.0)[:, [0, 1, 3, 4]] > 1e-3).all()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_mix_weighs_both_terms(alpha):
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    nll = torch.rand(6)
    mixed, kd = Distillation(None, alpha, 1.5).mix(student, nll, teacher)  # type: ignore[arg-type]
    expected = (1 - alpha) * nll.double() + alpha * _naive_kl(student, teacher, 1.5)[0].reshape(-1)
    assert torch.allclose(mixed.double(), expected, rtol=0, atol=1e-5)
    assert torch.allclose(kd.double(), _naive_kl(student, teacher, 1.5)[0].reshape(-1), atol=1e-5)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return save_tiny_corpus(tmp_path / "corpus", docs=4, lines=60)


@pytest.fixture
def teacher(tmp_path: Path, corpus: Path) -> Path:
    """A full-attention run (random weights, sharpened so its predictions differ by position)."""
    return _sharp_run(save_tiny_run(tmp_path / "teacher", corpus, seq_len=64, max_seq_len=512))


def _sharp_run(path: Path) -> Path:
    # The tied embedding scaled up: random logits of std ~1 rather than ~0.02.
    model, _ = load(path)
    with torch.no_grad():
        model.embed.weight.mul_(30.0)
    ckpt.save_weights(model, path / ckpt.WEIGHTS, {"step": "0"})
    return path


def _cfg(corpus: Path, **extra: str) -> Config:
    return Config.preset("tiny").override({**STUDENT, "data.corpus": str(corpus), **extra})


def _quiet(message: str) -> None:
    pass


def _same_weights(a: Path, b: Path) -> None:
    x, _ = load(a)
    y, _ = load(b)
    for (name, p), q in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_alpha_zero_is_plain_training_bit_for_bit(tmp_path, corpus, teacher):
    cfg = _cfg(corpus)
    plain = train(cfg, tmp_path / "plain", progress=False, log=_quiet)
    kd_cfg = cfg.override({"train.distill_teacher": str(teacher), "train.distill_alpha": "0"})
    taught = train(
        kd_cfg, tmp_path / "kd0", progress=False, log=_quiet, teacher=open_model(teacher)
    )
    assert taught.losses == plain.losses  # every step's loss, exactly
    _same_weights(tmp_path / "plain", tmp_path / "kd0")
    # The teacher was read: its term is logged, and it is not zero.
    assert all(r["loss_kd"] > 0 for r in read_metrics(tmp_path / "kd0") if "loss" in r)
    # With alpha > 0 the run differs.
    half = train(
        kd_cfg.override({"train.distill_alpha": "0.5"}),
        tmp_path / "kd5",
        progress=False,
        log=_quiet,
        teacher=open_model(teacher),
    )
    assert half.losses[1:] != plain.losses[1:]


def test_the_teachers_logits_line_up_with_the_students_segments(tmp_path, corpus):
    # The teacher is the student itself, read the adapter's way (segment by segment through its
    # memory): at every position of every segment the two predictions agree, so the KL is ~0.
    run = _sharp_run(
        save_tiny_run(tmp_path / "xl", corpus, seq_len=64, max_seq_len=64, memory="xl", mem_len=32)
    )
    student, cfg = load(run)
    student.train()
    x = torch.randint(0, 256, (3, 128))
    parts: dict[str, float] = {}
    distill = Distillation(open_model(run), alpha=1.0, temperature=1.0)
    loss = sequence_backward(
        student, x, x.roll(-1, 1), cfg.train, torch.device("cpu"), distill=distill, parts=parts
    )
    assert cfg.train.segment_len == 32 and parts["ce"] > 1.0
    assert abs(parts["kd"]) < 1e-5 and abs(loss) < 1e-5
    # The same teacher's logits one position late are far from the student's.
    parts.clear()
    late = Distillation(_Late(open_model(run)), alpha=1.0, temperature=1.0)
    sequence_backward(
        student, x, x.roll(-1, 1), cfg.train, torch.device("cpu"), distill=late, parts=parts
    )
    assert parts["kd"] > 0.1


class _Late:
    """A teacher whose logits at position i are those of position i - 1."""

    def __init__(self, teacher):
        self.teacher = teacher

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.teacher.logits(tokens).roll(1, dims=1)


def test_distill_through_the_cli_then_resume_equals_uninterrupted(tmp_path, corpus, teacher):
    cfg = _cfg(corpus)
    cfg.save(tmp_path / "student.yaml")
    out = tmp_path / "full"
    done = runner.invoke(
        app,
        [
            "distill",
            "--teacher",
            str(teacher),
            "--student",
            str(tmp_path / "student.yaml"),
            "--out",
            str(out),
            "--alpha",
            "0.7",
            "--temperature",
            "3",
            "--no-eval",
            "--device",
            "cpu",
        ],
    )
    assert done.exit_code == 0, done.output
    saved = Config.load(out / ckpt.CONFIG).train
    assert (saved.distill_teacher, saved.distill_alpha, saved.distill_temperature) == (
        str(teacher),
        0.7,
        3.0,
    )
    info = json.loads((out / ckpt.RUN_INFO).read_text())
    assert info["teacher"] == {"name": "teacher", "fingerprint": open_model(teacher).fingerprint()}
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:  # the logged loss is the mix of its logged terms
        assert r["loss"] == pytest.approx(0.3 * r["loss_ce"] + 0.7 * r["loss_kd"], rel=1e-5)

    def stop_at_2(loop):
        if loop.step == 2:
            loop.stop_requested = True

    part = tmp_path / "part"
    kd_cfg = Config.load(out / ckpt.CONFIG)
    stopped = train(
        kd_cfg, part, progress=False, log=_quiet, callback=stop_at_2, teacher=open_model(teacher)
    )
    assert stopped.status == "interrupted"
    resumed = runner.invoke(app, ["distill", "--resume", str(part), "--no-eval", "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output
    assert [(r["step"], r["loss"]) for r in read_metrics(part) if "loss" in r] == [
        (r["step"], r["loss"]) for r in rows
    ]
    _same_weights(out, part)


def test_resuming_with_another_teacher_is_refused(tmp_path, corpus, teacher):
    other = _sharp_run(save_tiny_run(tmp_path / "other", corpus, seq_len=64, max_seq_len=512))
    cfg = _cfg(corpus, **{"train.distill_teacher": str(teacher), "train.steps": "2"})
    train(cfg, tmp_path / "run", progress=False, log=_quiet, teacher=open_model(teacher))
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    done = runner.invoke(
        app, ["distill", "--resume", str(tmp_path / "run"), "--teacher", str(other), "--no-eval"]
    )
    assert done.exit_code == 2
    assert "cannot resume: the run distils from" in done.output
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tokenizer", "uses another tokenizer"),
        ("vocab", "predicts 272 token ids but the student model.vocab_size=264"),
        ("missing", "the teacher (train.distill_teacher): "),
        ("short", "reads at most 128 tokens but the student trains on sequences of 256"),
        ("alpha", "train.distill_alpha=1.5 is invalid"),
        ("temperature", "train.distill_temperature=0.0 is invalid"),
    ],
)
def test_a_teacher_that_cannot_teach_is_refused(tmp_path, corpus, teacher, case, message):
    path, extra = str(teacher), []
    if case == "tokenizer":
        path = str(save_tiny_llama(tmp_path / "llama"))
    elif case == "vocab":
        path = str(save_tiny_run(tmp_path / "wide", corpus, vocab_size=272))
    elif case == "missing":
        path = str(tmp_path / "nowhere")
    elif case == "short":
        path = str(save_tiny_run(tmp_path / "short", corpus, seq_len=128, max_seq_len=128))
    elif case == "alpha":
        extra = ["--alpha", "1.5"]
    elif case == "temperature":
        extra = ["--temperature", "0"]
    _cfg(corpus).save(tmp_path / "student.yaml")
    out = tmp_path / "out"
    done = runner.invoke(
        app,
        [
            "distill",
            "--teacher",
            path,
            "--student",
            str(tmp_path / "student.yaml"),
            "--out",
            str(out),
            "--no-eval",
            "--device",
            "cpu",
            *extra,
        ],
    )
    assert done.exit_code == 2, done.output
    assert message in " ".join(done.output.split())
    assert not out.exists()  # refused before anything was written


def test_the_guides_commands_parse():
    docs = Path(__file__).resolve().parents[1] / "docs" / "compression.md"
    section = docs.read_text().split("## Distillation", 1)[1]
    lines = [ln[2:] for ln in section.splitlines() if ln.startswith("$ memext ")]
    assert len(lines) >= 4
    for line in lines:
        words = line.split("  #")[0].split()[1:]
        shown = runner.invoke(app, [words[0], "--help"])
        assert shown.exit_code == 0, line
        for option in (w for w in words if w.startswith("--")):
            assert option in shown.output, f"{option} is not an option of `memext {words[0]}`"


@pytest.mark.parametrize(
    ("teacher_depth", "student_depth", "picks"),
    [(4, 2, [0, 3]), (6, 3, [0, 2, 5]), (2, 2, [0, 1]), (5, 1, [4]), (12, 6, [0, 2, 4, 7, 9, 11])],
)
def test_the_student_blocks_start_from_evenly_spaced_teacher_blocks(
    teacher_depth, student_depth, picks
):
    assert teacher_blocks(teacher_depth, student_depth) == picks


def test_a_student_deeper_than_its_teacher_cannot_start_from_it():
    with pytest.raises(MemextError, match="no deeper than it"):
        teacher_blocks(2, 3)


def test_init_from_teacher_copies_every_weight_the_teacher_has(tmp_path, corpus, teacher):
    # The student reads with an xl memory (a gate the teacher lacks) and half the depth.
    deep = _sharp_run(save_tiny_run(tmp_path / "deep", corpus, seq_len=64, n_layers=4))
    student = build_model(_cfg(corpus, **{"model.n_layers": "2"}).model, seed=1)
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    assert init_from_teacher(student, open_model(deep)) == [0, 3]
    theirs = load(deep)[0].state_dict()
    for name, value in student.state_dict().items():
        if name.startswith("blocks."):
            i, rest = name.split(".", 2)[1:]
            name = f"blocks.{[0, 3][int(i)]}.{rest}"
        if name in theirs:
            assert torch.equal(value, theirs[name]), name
        else:  # the memory's own parameters keep their initialisation
            assert name.startswith("memory.") and torch.equal(value, fresh[name]), name
    # At the teacher's own depth and kernel the student is the teacher: the same logits.
    twin = build_model(load(teacher)[1].model, seed=1)
    init_from_teacher(twin, open_model(teacher))
    x = torch.randint(0, 256, (2, 40))
    assert torch.equal(twin(x)[0], load(teacher)[0](x)[0])


def test_distill_init_through_the_cli_starts_from_the_teacher(tmp_path, corpus, teacher):
    _cfg(corpus, **{"train.steps": "1"}).save(tmp_path / "student.yaml")
    args = ["distill", "--teacher", str(teacher), "--student", str(tmp_path / "student.yaml"),
            "--no-eval", "--device", "cpu", "--alpha", "0"]  # fmt: skip
    runs = {}
    for flag in ("--init-from-teacher", "--random-init"):
        out = tmp_path / flag.strip("-")
        done = runner.invoke(app, [*args, flag, "--out", str(out)])
        assert done.exit_code == 0, done.output
        runs[flag] = read_metrics(out)[0]["loss"]
        assert Config.load(out / ckpt.CONFIG).train.distill_init is (flag == "--init-from-teacher")
    assert "starting from the teacher's weights (its blocks [0, 1])" in " ".join(
        runner.invoke(
            app, [*args, "--init-from-teacher", "--out", str(tmp_path / "again")]
        ).output.split()
    )
    # The first step's loss is the teacher's weights' (sharpened: far from a random start's).
    assert runs["--init-from-teacher"] != runs["--random-init"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("width", "needs the same d_model, heads and feed-forward width"),
        ("deep", "needs a student no deeper than it"),
    ],
)
def test_distill_init_refuses_what_it_cannot_map(tmp_path, corpus, teacher, case, message):
    cfg, path = _cfg(corpus), str(teacher)
    cfg = cfg.override({"model.d_model": "64"} if case == "width" else {"model.n_layers": "3"})
    cfg.save(tmp_path / "student.yaml")
    out = tmp_path / "out"
    done = runner.invoke(
        app,
        ["distill", "--teacher", path, "--student", str(tmp_path / "student.yaml"),
         "--init-from-teacher", "--out", str(out), "--no-eval", "--device", "cpu"],
    )  # fmt: skip
    assert done.exit_code == 2, done.output
    assert message in " ".join(done.output.split())
    assert not out.exists()  # refused before anything was written


def test_a_hugging_face_teacher_cannot_start_a_student(tmp_path, corpus):
    # (Through the command line its tokenizer is refused first: this is the second line.)
    llama = open_model(save_tiny_llama(tmp_path / "llama"))
    with pytest.raises(MemextError, match="needs a memext run as the teacher"):
        init_from_teacher(build_model(_cfg(corpus).model), llama)


def test_distill_init_without_a_teacher_is_an_invalid_config(corpus):
    with pytest.raises(ValueError, match=r"train\.distill_init=True is invalid"):
        _cfg(corpus, **{"train.distill_init": "true"})
