"""GGUF files (llama.cpp's format) as Hugging Face model directories.

``read_header`` checks a file without loading its weights: a GGUF whose every tensor lies inside
the file, of an architecture memext converts (``ARCHITECTURES``). ``convert_gguf`` turns it into a
local Hugging Face directory (``config.json``, ``model.safetensors``, the tokenizer and its chat
template) in one step, so the rest of memext reads it as any Hugging Face model.

transformers dequantizes a GGUF to fp32 as it loads it (``from_pretrained(dir, gguf_file=...)``,
with the ``gguf`` package) but refuses to ``save_pretrained`` a model loaded that way. Its state
dict copies into a fresh model of the same config, which saves. The converted weights are checked
against the GGUF-loaded model's logits before the directory is renamed into place.

Needs the ``gguf`` extra (``gguf`` and ``accelerate``, with transformers >= 5), imported when a
file is read.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from memext.errors import MemextError
from memext.io import atomic_dir

#: ``general.architecture`` values memext converts: Llama-shaped decoders, whose rotary layout
#: transformers' loader restores and whose attention memext's KV-cache policies handle.
ARCHITECTURES = ("llama",)

#: What the converted directory records about its source, beside the model files.
SOURCE_FILE = "memext-source.json"

#: A short input on which the converted weights must give the GGUF loader's logits.
_PROBE = "The capital of France is Paris. 0123456789"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MemextError(
            "reading GGUF files needs the gguf package: pip install 'memext[gguf]'"
        ) from None
    return gguf


def read_header(path: str | Path, label: str | None = None) -> dict[str, Any]:
    """The model a GGUF file describes (architecture, sizes, tensor types), read from its
    header; a MemextError for a file that is missing, not GGUF, cut short or of an architecture
    memext does not convert. ``label`` names the file in messages (default: its path)."""
    path = Path(path)
    name = label or repr(str(path))
    if not path.is_file():
        raise MemextError(f"{name} is not a file: give a .gguf file")
    gguf = _gguf()
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {
            k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")
        }
        tensors = list(reader.tensors)
        end = max((t.data_offset + int(t.n_bytes) for t in tensors), default=0)
    except Exception as e:  # the reader raises what numpy raises on a short or foreign file
        raise MemextError(
            f"{name} is not a complete GGUF file ({type(e).__name__}: {e}); a download or copy "
            "cut short? fetch it again"
        ) from None
    if end > size or not tensors:
        raise MemextError(
            f"{name} is not a complete GGUF file: its tensors end at byte {end:,}, the file at "
            f"{size:,}; a download or copy cut short? fetch it again"
        )
    arch = str(fields.get("general.architecture", "?"))
    if arch not in ARCHITECTURES:
        raise MemextError(
            f"{name} holds a {arch!r} model: memext converts GGUF files of architecture "
            f"{', '.join(ARCHITECTURES)} only"
        )
    return {
        "architecture": arch,
        "name": fields.get("general.name"),
        "context_length": fields.get(f"{arch}.context_length"),
        "layers": fields.get(f"{arch}.block_count"),
        "hidden": fields.get(f"{arch}.embedding_length"),
        "heads": fields.get(f"{arch}.attention.head_count"),
        "kv_heads": fields.get(f"{arch}.attention.head_count_kv"),
        "rope_base": fields.get(f"{arch}.rope.freq_base"),
        "vocab_size": fields.get(f"{arch}.vocab_size"),
        "tensors": len(tensors),
        "types": sorted({t.tensor_type.name for t in tensors}),
        "bytes": size,
    }


def convert_gguf(
    path: str | Path,
    out: str | Path,
    source: dict[str, Any] | None = None,
    label: str | None = None,
) -> Path:
    """Write the model in GGUF file ``path`` as a Hugging Face directory at ``out`` (which must
    not exist), in one step: a failure leaves nothing at ``out``. ``source`` (where the file came
    from) is recorded in ``out/memext-source.json``; ``label`` names the file in messages
    (default: its path). Returns ``out``."""
    from memext.hf.model import _transformers, quiet_loading

    path, out = Path(path), Path(out)
    header = read_header(path, label)
    tf = _transformers()
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        try:
            with quiet_loading():
                loaded = tf.AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
                ).eval()
                tokenizer = tf.AutoTokenizer.from_pretrained(
                    path.parent, gguf_file=path.name, local_files_only=True
                )
        except (ValueError, KeyError, IndexError, RuntimeError, OSError) as e:
            name = label or repr(str(path))
            raise MemextError(f"cannot load {name} as a GGUF model: {e}") from None
        config = copy.deepcopy(loaded.config)
        del config.quantization_config  # what makes save_pretrained refuse the loaded model
        with torch.device("meta"):
            fresh = type(loaded)(config)
        fresh.load_state_dict(loaded.state_dict(), assign=True)
        fresh.tie_weights()
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_logits(loaded, tmp, tokenizer, tf)
        record = {
            "gguf": path.name,
            "architecture": header["architecture"],
            "tensor_types": header["types"],
            "converted_by": "memext.hf.gguf.convert_gguf",
            "seconds": round(time.perf_counter() - started, 1),
            **(source or {}),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


@torch.no_grad()
def _check_logits(loaded: Any, folder: Path, tokenizer: Any, tf: Any) -> None:
    """The converted directory, read back, must give the GGUF-loaded model's logits exactly."""
    from memext.hf.model import quiet_loading

    with quiet_loading():
        converted = tf.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True
        ).eval()
    ids = torch.tensor([tokenizer.encode(_PROBE, add_special_tokens=False)])
    diff = (converted(ids).logits - loaded(ids).logits).abs().max().item()
    if diff != 0.0:
        raise MemextError(
            f"the converted weights give other logits than the GGUF file (max difference "
            f"{diff:.3g}); nothing was kept: please report it"
        )
