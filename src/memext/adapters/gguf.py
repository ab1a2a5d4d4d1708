"""A GGUF file (llama.cpp's format) as a ``ModelAdapter`` (kind ``gguf``).

The first use converts the file into a Hugging Face directory in the memext cache
(``$MEMEXT_CACHE/models/gguf/STEM-KEY``, ``memext.hf.gguf.convert_gguf``, one rename), which
every later use reads as a Hugging Face model. KEY names the file by its resolved path, size and
modification time, so a file replaced in place is converted again. Needs the ``gguf`` extra.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from memext.adapters.base import Reading, models_dir, reading_name, register_model_kind
from memext.adapters.hf_dir import HFAdapter

MAGIC = b"GGUF"


def converted_dir(path: str | Path) -> Path:
    """Where the conversion of GGUF file ``path`` lives (present once converted)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return models_dir() / "gguf" / f"{path.stem}-{key}"


def convert(path: str | Path) -> Path:
    """The converted directory of GGUF file ``path``, converting it on first use."""
    from memext.hf.gguf import convert_gguf
    from memext.io import sweep_temp_dirs

    out = converted_dir(path)
    if (out / "config.json").is_file():  # renamed into place whole: present means complete
        return out
    if out.parent.is_dir():
        sweep_temp_dirs(out.parent)
    return convert_gguf(path, out, {"gguf_path": str(Path(path).resolve())})


@register_model_kind("gguf")
class GGUFAdapter(HFAdapter):
    kind = "gguf"

    def __init__(
        self, path: str | Path, device: torch.device | str = "cpu", reading: Reading | None = None
    ) -> None:
        super().__init__(convert(path), device, reading)
        self.path, self.name = str(path), reading_name(Path(path).name, self.reading)

    @staticmethod
    def claims(path: str | Path) -> bool:
        path = Path(path)
        if not path.is_file():
            return False
        if path.suffix.lower() == ".gguf":
            return True  # a broken one too: opening it says what is wrong with it
        with open(path, "rb") as f:
            return f.read(4) == MAGIC

    @staticmethod
    def home(path: str | Path) -> Path:
        return converted_dir(path)

    @staticmethod
    def hf_dir(path: str | Path) -> Path:
        """The converted directory, converted first if need be."""
        return convert(path)

    @staticmethod
    def summary(path: str | Path) -> list[str]:
        """The file's header, without converting it."""
        from memext.hf.gguf import read_header

        h = read_header(path)
        out = converted_dir(path)
        return [
            f"model: GGUF {h['architecture']} {h['name'] or ''}, {h['layers']} layers x hidden "
            f"{h['hidden']}, {h['heads']} heads ({h['kv_heads']} key/value), vocabulary "
            f"{h['vocab_size'] or '?'}",
            f"context: {h['context_length']} tokens (rope base {h['rope_base']})",
            f"file: {h['bytes'] / 1e6:,.1f} MB, {h['tensors']} tensors ({', '.join(h['types'])})",
            f"converted: {out}" if (out / "config.json").is_file()
            else f"not converted yet: the first use converts it into {out}",
        ]  # fmt: skip
