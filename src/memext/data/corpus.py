"""Corpus sources: the built-in standard-library corpus, files, directories, globs, .gz.

The built-in ``stdlib`` corpus is every ``.py`` file under the running Python's standard library
(``sysconfig.get_paths()["stdlib"]``), except those with a directory component in
``STDLIB_EXCLUDED`` — test suites, IDLE, installed packages and the parts some distributions ship
separately — sorted by their POSIX path relative to that root. The same CPython version gives
the same files on any distribution.

Train/validation split: a file is held out for validation when
``int(sha256(relative_path)[:8], 16) % 10000 < val_percent * 100``; a one-file corpus holds out
its last ``val_percent`` of bytes instead.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from memext.errors import MemextError

STDLIB_EXCLUDED = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "venv",
    }
)


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the corpus root (or the file name)
    data: bytes


@dataclass(frozen=True)
class Corpus:
    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    skipped: tuple[str, ...]  # files dropped because they are not valid UTF-8

    @property
    def fingerprint(self) -> str:
        """sha256 over every document's name and bytes, in order: equal hash, equal data."""
        h = hashlib.sha256()
        for split, docs in (("train", self.train), ("validation", self.validation)):
            for d in docs:
                h.update(f"{split}\0{d.name}\0{len(d.data)}\0".encode())
                h.update(d.data)
        return h.hexdigest()


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not STDLIB_EXCLUDED.intersection(p.relative_to(root).parts[:-1])
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _resolve(source: str) -> tuple[Path, list[Path]]:
    if source == "stdlib":
        return stdlib_files()
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        # Skip hidden files and everything under hidden folders (.git, .venv, ...).
        files = [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        return path, sorted(files, key=lambda p: p.relative_to(path).as_posix())
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if files:
            return Path("."), files
        raise MemextError(f"corpus glob {source!r} matches no files")
    raise MemextError(
        f"corpus path {source!r} does not exist (use 'stdlib', a file, a directory or a glob)"
    )


def _read(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise MemextError(f"{path} is not a readable .gz file: {e}") from None
    return path.read_bytes()


def file_bucket(name: str) -> int:
    """The file's hash bucket in [0, 10000): the split rule every file-level split shares."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 10000


def _is_validation(name: str, val_percent: float) -> bool:
    return file_bucket(name) < val_percent * 100


def read_corpus(source: str, val_percent: float = 5.0, raw_bytes: bool = False) -> Corpus:
    """Read a corpus and split it; raise MemextError when no text is left."""
    root, files = _resolve(source)
    if not files:
        raise MemextError(f"corpus {source!r} holds no files")
    docs, skipped = [], []
    for path in files:
        data = _read(path)
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        if not raw_bytes:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(name)
                continue
        if data:
            docs.append(Document(name, data))
    if skipped:
        shown = ", ".join(skipped[:5]) + (
            f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        )
        warnings.warn(
            f"skipped {len(skipped)} file(s) that are not valid UTF-8: {shown} "
            "(set data.raw_bytes=true to read them as bytes)",
            stacklevel=2,
        )
    if not docs:
        why = (
            f"all {len(skipped)} file(s) are not valid UTF-8" if skipped else "every file is empty"
        )
        raise MemextError(f"corpus {source!r} has no text: {why}")
    if len(docs) == 1:
        (doc,) = docs
        cut = len(doc.data) - max(1, int(len(doc.data) * val_percent / 100))
        if cut <= 0:
            raise MemextError(f"corpus {source!r} is too small to split ({len(doc.data)} bytes)")
        train = (Document(doc.name, doc.data[:cut]),)
        val = (Document(doc.name + "#validation", doc.data[cut:]),)
    else:
        val = tuple(d for d in docs if _is_validation(d.name, val_percent)) or (docs[-1],)
        if len(val) == len(docs):  # every file hashed into validation: keep one to train on
            val = val[1:]
        train = tuple(d for d in docs if d not in val)
    return Corpus(train, val, tuple(skipped))
