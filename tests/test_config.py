"""The typed config: validation messages, dotted overrides, files and presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from memext.config import (
    SCHEMA_VERSION,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    to_dict,
)
from memext.fields import plain
from memext.presets import PRESETS

# (constructor, its arguments, strings the message must contain: field=value, what is accepted)
INVALID = {
    "d_model not divisible by n_heads": (
        ModelConfig,
        {"d_model": 30, "n_heads": 4},
        ["model.d_model=30", "multiple of n_heads=4"],
    ),
    "odd head_dim": (ModelConfig, {"d_model": 6, "n_heads": 2}, ["model.n_heads=2", "even"]),
    "n_layers zero": (ModelConfig, {"n_layers": 0}, ["model.n_layers=0", "> 0"]),
    "window zero": (ModelConfig, {"window": 0}, ["model.window=0", "> 0"]),
    "odd lsh buckets": (ModelConfig, {"lsh_buckets": 3}, ["model.lsh_buckets=3", "even"]),
    "negative ff_chunk": (ModelConfig, {"ff_chunk": -1}, ["model.ff_chunk=-1", ">= 0"]),
    "unknown attention": (
        ModelConfig,
        {"attention": "nope"},
        ["model.attention='nope'", "one of block_sparse, chunked, full, lsh, sliding"],
    ),
    "dropout one": (ModelConfig, {"dropout": 1.0}, ["model.dropout=1.0", "[0, 1)"]),
    "negative d_ff": (ModelConfig, {"d_ff": -1}, ["model.d_ff=-1", "positive"]),
    "lr zero": (TrainConfig, {"lr": 0.0}, ["train.lr=0.0", "> 0"]),
    "lr negative": (TrainConfig, {"lr": -1e-3}, ["train.lr=-0.001", "> 0"]),
    "bool is not a number": (TrainConfig, {"batch_size": True}, ["train.batch_size=True", "> 0"]),
    "beta2 above one": (TrainConfig, {"beta2": 1.5}, ["train.beta2=1.5", "[0, 1]"]),
    "negative warmup": (TrainConfig, {"warmup_steps": -1}, ["train.warmup_steps=-1", ">= 0"]),
    "bad precision": (
        TrainConfig,
        {"precision": "fp16"},
        ["train.precision='fp16'", "'auto'", "'fp32'", "'bf16'"],
    ),
    "odd eval length": (EvalConfig, {"lengths": (128, 255)}, ["eval.lengths=(128, 255)", "even"]),
    "empty eval lengths": (EvalConfig, {"lengths": ()}, ["eval.lengths=()", "non-empty"]),
    "val_percent 100": (DataConfig, {"val_percent": 100.0}, ["data.val_percent=100.0", "(0, 100)"]),
    "empty corpus": (DataConfig, {"corpus": ""}, ["data.corpus=''", "'stdlib'"]),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_validation_names_field_value_and_what_is_accepted(case) -> None:
    cls, kwargs, expected = case
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    for text in expected:
        assert text in str(info.value)


def test_cross_section_checks() -> None:
    model = ModelConfig(max_seq_len=128)
    with pytest.raises(ValueError, match=r"train\.seq_len=256 .*max_seq_len=128"):
        Config(model=model, eval=EvalConfig(lengths=(64,)))
    with pytest.raises(ValueError, match=r"eval\.lengths=.*max_seq_len=128"):
        Config(model=model, train=TrainConfig(seq_len=64), eval=EvalConfig(lengths=(64, 256)))


def test_override_parses_strings_by_field_type() -> None:
    cfg = Config.preset("tiny").override(
        {
            "model.n_layers": "6",
            "model.rope_base": "500000",
            "model.tie_embeddings": "false",
            "train.lr": "1e-3",
            "train.compile": "yes",
            "train.precision": "bf16",
            "eval.lengths": "64,128",
            "data.corpus": "some/dir",
        }
    )
    assert cfg.model.n_layers == 6 and type(cfg.model.n_layers) is int
    assert cfg.model.rope_base == 500000.0 and type(cfg.model.rope_base) is float
    assert cfg.model.tie_embeddings is False
    assert cfg.train.lr == 1e-3
    assert cfg.train.compile is True
    assert cfg.train.precision == "bf16"
    assert cfg.eval.lengths == (64, 128)
    assert cfg.data.corpus == "some/dir"
    # Everything not overridden keeps the preset's value.
    assert cfg.model.d_model == Config.preset("tiny").model.d_model


def test_override_accepts_typed_values_and_replace() -> None:
    cfg = Config.preset("tiny").override({"model.n_layers": 3, "train.lr": 1})
    assert cfg.model.n_layers == 3
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    cfg2 = Config.preset("tiny").replace(**{"model.n_heads": 8})
    assert cfg2.model.n_heads == 8


def test_override_is_validated() -> None:
    with pytest.raises(ValueError, match=r"train\.lr=0\.0 is invalid"):
        Config.preset("tiny").override({"train.lr": "0"})


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("model.n_layer", r"unknown setting 'model\.n_layer' \(did you mean model\.n_layers"),
        ("train.learning_rate", r"unknown setting 'train\.learning_rate'"),
        ("modle.n_layers", r"SECTION\.FIELD with SECTION one of model, data, train, eval"),
        ("model", r"unknown setting 'model'"),
    ],
)
def test_override_unknown_key(key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.preset("tiny").override({key: "1"})


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("model.n_layers", "four", "model.n_layers='four' is invalid: expected an integer"),
        ("model.n_layers", "2.5", "model.n_layers='2.5' is invalid: expected an integer"),
        ("train.lr", "fast", "train.lr='fast' is invalid: expected a number"),
        ("train.compile", "maybe", "train.compile='maybe' is invalid: expected true or false"),
        ("eval.lengths", "64,abc", "eval.lengths='64,abc' is invalid: expected a comma-separated"),
    ],
)
def test_override_ill_typed(key: str, raw: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Config.preset("tiny").override({key: raw})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"n_layers": 2.5}}, r"model\.n_layers=2\.5 is invalid: expected an integer"),
        ({"model": {"n_layers": True}}, r"model\.n_layers=True is invalid"),
        ({"train": {"compile": 1}}, r"train\.compile=1 is invalid: expected true or false"),
        ({"model": {"n_layerz": 2}}, r"unknown field\(s\) model\.n_layerz"),
        ({"optim": {}}, r"unknown section"),
        ({"model": [1, 2]}, r"section 'model' must be a mapping"),
    ],
)
def test_from_dict_rejects_ill_typed_values(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_dict(data)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    cfg = Config.preset("small").override(
        {"model.rope_base": "12345.5", "train.precision": "fp32", "eval.lengths": "256,2048"}
    )
    path = tmp_path / f"run{suffix}"
    cfg.save(path)
    loaded = Config.load(path)
    assert loaded == cfg
    assert loaded.eval.lengths == (256, 2048)  # lists come back as tuples
    text = path.read_text()
    data = yaml.safe_load(text) if suffix != ".json" else json.loads(text)
    assert data["format"] == "memext-config"
    assert data["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schema_version", SCHEMA_VERSION + 1, r"schema_version=2; this memext reads version 1"),
        ("format", "other-tool", r"is not a memext config \(format='other-tool'\)"),
    ],
)
def test_foreign_files_are_refused(
    tmp_path: Path, suffix: str, field: str, value: object, message: str
) -> None:
    path = tmp_path / f"cfg{suffix}"
    Config().save(path)
    data = yaml.safe_load(path.read_text())
    data[field] = value
    path.write_text(yaml.safe_dump(data) if suffix == ".yaml" else json.dumps(data))
    with pytest.raises(ValueError, match=message):
        Config.load(path)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Config.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid json"):
        Config.load(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="does not hold a mapping"):
        Config.load(listed)


def test_partial_file_takes_defaults(tmp_path: Path) -> None:
    path = tmp_path / "partial.yaml"
    path.write_text("model:\n  n_layers: 2\ntrain:\n  lr: 1\n")
    cfg = Config.load(path)
    assert cfg.model.n_layers == 2
    assert cfg.train.lr == 1.0
    assert cfg.data == DataConfig()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads(name: str, tmp_path: Path) -> None:
    cfg = Config.preset(name)
    assert isinstance(cfg, Config)
    # Each preset's values are really applied (not silently dropped).
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            got = plain(getattr(getattr(cfg, section), key))
            # A mixture source's unset fields take their defaults: compare the ones it sets.
            if key == "mixture":
                got = [{k: g[k] for k in v} for g, v in zip(got, value, strict=True)]
            assert got == value, (section, key)
    assert from_dict(to_dict(cfg)) == cfg
    cfg.save(tmp_path / "cfg.yaml")
    assert Config.load(tmp_path / "cfg.yaml") == cfg


def test_unknown_preset() -> None:
    with pytest.raises(
        ValueError, match=r"unknown preset 'huge': expected one of tiny, small, base"
    ):
        Config.preset("huge")
