"""`memext bench seq2seq`: the three contenders at tiny sizes, the timed path, the written ratios."""

from __future__ import annotations

import json
import statistics
from importlib import metadata

import pytest
from typer.testing import CliRunner

from memext.bench import seq2seq as s2s
from memext.cli import app
from memext.infer.seq2seq import greedy_decode

TINY = s2s.Seq2SeqShape(
    d_model=32, encoder_layers=2, decoder_layers=1, heads=2, window=16, new_tokens=12
)
LENGTH = 128
#: Without LED's position table and global projections, and LongT5's relative-bias tables,
#: the three differ only by biases, norms and memext's slot vectors.
CORE_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def built() -> dict[str, s2s.Built]:
    return {c.name: c.build(TINY, LENGTH) for c in s2s.contenders()}


def test_every_contender_writes_exactly_the_asked_tokens(built: dict[str, s2s.Built]) -> None:
    for name, b in built.items():
        ids = b.run()
        assert len(ids) == TINY.new_tokens, name
        assert all(0 <= i < TINY.vocab_size for i in ids), name
        assert b.run() == ids, f"{name}: greedy decoding is deterministic"


def test_parameter_counts_match_within_tolerance(built: dict[str, s2s.Built]) -> None:
    ours = built["memext"].params
    assert ours.positions == ours.global_projections == 0  # rotary, and slots are the globals
    led, longt5 = built["led"].params, built["longt5"].params
    # LED learns one position row per (window-padded) source and target position.
    d = TINY.d_model
    assert led.positions == d * (LENGTH + TINY.new_tokens + 1)
    # ... and global q/k/v (weights and biases) in every encoder layer.
    assert led.global_projections == TINY.encoder_layers * 3 * (d * d + d)
    assert longt5.positions > 0
    for name, p in (("led", led), ("longt5", longt5)):
        assert abs(p.core - ours.core) / ours.core < CORE_TOLERANCE, (name, p, ours)


def test_peers_are_configured_as_memext(built: dict[str, s2s.Built]) -> None:
    led = built["led"].model.config
    assert led.attention_window == [TINY.window] * TINY.encoder_layers
    assert led.encoder_ffn_dim == TINY.ffn * 3 // 2 and led.d_model == TINY.d_model
    t5 = built["longt5"].model.config
    assert t5.encoder_attention_type == "transient-global"
    assert t5.local_radius == TINY.window // 2 and t5.d_ff == TINY.ffn
    assert (t5.num_layers, t5.num_decoder_layers) == (TINY.encoder_layers, TINY.decoder_layers)
    ours = built["memext"].model
    assert ours.n_slots == TINY.global_tokens
    assert ours.encoder[0].attn.kernel.window == TINY.window


def test_memext_times_greedy_decode_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return greedy_decode(*args, **kwargs)

    monkeypatch.setattr("memext.infer.seq2seq.greedy_decode", spy)
    b = s2s.build_memext(TINY, LENGTH)
    ids = b.run()
    assert len(calls) == 1 and calls[0][0] is b.model
    # The recomputing twin (no caches) of the same model writes the same tokens.
    eos = TINY.vocab_size  # never an argmax: the length is forced, not cut
    twin = greedy_decode(b.model, s2s.source(LENGTH), s2s.BYTES, eos, TINY.new_tokens, cache=None)
    assert ids == twin[0]
    # With an eos the model does emit, greedy_decode would stop early: the forcing matters.
    short = greedy_decode(b.model, s2s.source(LENGTH), s2s.BYTES, ids[0], TINY.new_tokens)
    assert len(short[0]) < TINY.new_tokens


def test_a_slow_contender_stops_growing() -> None:
    (ours,) = s2s.select("memext")[0]
    recs = s2s.measure([ours], [64, 96], TINY, repeats=2, memory=False, time_limit=0.0)
    first, second = recs
    assert first.status.startswith("one run") and first.times == [first.warmup_s]
    assert first.seconds == first.warmup_s
    assert second.status.startswith("skipped") and second.seconds is None


ARGS = ["bench", "seq2seq", "--lengths", "64,128", "--d-model", "32", "--encoder-layers", "1"]
ARGS += ["--decoder-layers", "1", "--heads", "2", "--window", "16", "--new-tokens", "6"]
ARGS += ["--repeats", "2", "--threads", "1"]


def test_cli_writes_the_ratios_of_its_measured_times(tmp_path) -> None:
    path = tmp_path / "s2s.json"
    result = CliRunner().invoke(app, [*ARGS, "--out", str(path)])
    assert result.exit_code == 0, result.output
    payload = json.loads(path.read_text())
    assert payload["format"] == "memext-benchmark"
    assert payload["command"].startswith("memext ") and payload["provenance"]["threads"] == 1
    assert payload["provenance"]["cpu"]
    recs = {(r["name"], r["length"]): r for r in payload["records"]}
    assert set(recs) == {(n, t) for n in ("memext", "led", "longt5") for t in (64, 128)}
    for r in recs.values():
        assert r["status"] == "ok", r
        assert len(r["times"]) == 2 and r["seconds"] == statistics.median(r["times"])
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["seconds"])
        assert r["peak_bytes"] > 0
    rows = payload["comparisons"]
    assert {(row["theirs"], row["length"]) for row in rows} == {
        (n, t) for n in ("led", "longt5") for t in (64, 128)
    }
    for row in rows:
        mine, theirs = recs[("memext", row["length"])], recs[(row["theirs"], row["length"])]
        assert row["speedup"] == pytest.approx(theirs["seconds"] / mine["seconds"], abs=1e-3)
        ratio = theirs["peak_bytes"] / mine["peak_bytes"]
        assert row["memory_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert "time x" in result.output


def test_a_missing_peer_is_reported_not_fatal(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name == "transformers":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(s2s.metadata, "version", version)
    path = tmp_path / "s2s.json"
    result = CliRunner().invoke(app, [*ARGS, "--no-memory", "--out", str(path)])
    assert result.exit_code == 0, result.output
    payload = json.loads(path.read_text())
    assert set(payload["left_out"]) == {"led", "longt5"}
    assert "not installed" in payload["left_out"]["led"]
    assert {r["name"] for r in payload["records"]} == {"memext"}
    assert payload["comparisons"] == []
    assert "led: left out" in result.output


def test_a_failing_peer_is_a_record_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(shape: s2s.Seq2SeqShape, length: int) -> s2s.Built:
        raise RuntimeError("no such model")

    chosen = [s2s.contenders()[0], s2s.Contender("led", "transformers", broken)]
    recs = s2s.measure(chosen, [64], TINY, repeats=1, memory=False)
    assert recs[0].status == "ok" and recs[0].seconds
    assert recs[1].status == "error: RuntimeError: no such model" and recs[1].seconds is None
    assert s2s.comparisons(recs) == []
