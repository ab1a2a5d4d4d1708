"""Documents from files: labelled long documents from JSON Lines (``.jsonl`` or ``.jsonl.gz``),
one object a line, every failure named by its line; and a text file read in pieces
(``text_pieces``), every failure named by its file."""

from __future__ import annotations

import codecs
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memext.errors import MemextError


@dataclass(frozen=True)
class Documents:
    """Documents read from a JSONL file; ``lines[i]`` is document i's line (from 1)."""

    texts: list[str]
    labels: list[str] | None
    lines: list[int]


def read_documents(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str | None = "label",
    split_field: str | None = None,
    split: str | None = None,
) -> Documents:
    """Read one document per line of a JSONL file (``.jsonl.gz`` too); blank lines are skipped.

    Labels are read as strings (``1`` and ``"1"`` name the same class); ``label_field=None``
    reads unlabeled documents. With ``split_field``, only the lines whose field equals ``split``.

    Raises:
        MemextError: a missing file, bytes that are not UTF-8, a line that is not a JSON object,
            a missing field, a document that is empty or only whitespace, a label that is not a
            string or an integer, or no documents at all; each says which line.
    """
    path = Path(path)
    if (split_field is None) != (split is None):
        raise MemextError("pass split_field and split together (e.g. 'split' and 'train')")
    if not path.is_file():
        raise MemextError(f"data file {str(path)!r} does not exist")
    texts: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    for n, row in _json_lines(path):
        where = f"{path} line {n}"
        if split_field is not None and _field(row, split_field, where) != split:
            continue
        text = _field(row, text_field, where)
        if not isinstance(text, str):
            raise MemextError(
                f"{where}: {text_field!r} must be a string, got {type(text).__name__}"
            )
        if not text.strip():
            raise MemextError(f"{where}: the document is empty or only whitespace")
        if label_field is not None:
            label = _field(row, label_field, where)
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise MemextError(
                    f"{where}: label {label!r} is invalid: expected a string or an integer"
                )
            labels.append(str(label))
        texts.append(text)
        lines.append(n)
    if not texts:
        only = f" with {split_field}={split!r}" if split_field is not None else ""
        raise MemextError(f"{path} holds no documents{only}")
    return Documents(texts, labels if label_field is not None else None, lines)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MemextError(
                        f"{path} line {n}: not valid UTF-8 (byte {e.start} of the line: "
                        f"{e.reason}); re-encode the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MemextError(
                        f"{path} line {n}: not JSON ({e.msg} at column {e.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise MemextError(f"{path} line {n}: expected a JSON object, got {line[:40]!r}")
                yield n, row
    except (OSError, EOFError) as e:  # gzip raises these for a truncated or non-gzip file
        raise MemextError(f"cannot read {path}: {e}") from None


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise MemextError(f"{where}: no field {name!r} (it has {sorted(row)[:8]})")
    return row[name]


def text_pieces(
    path: str | Path, *, block: int = 1 << 16, on_read: Callable[[int], object] | None = None
) -> Iterator[str]:
    """A UTF-8 text file as consecutive ``str`` pieces of about ``block`` bytes: the whole text
    is never in memory at once. ``on_read(n)`` hears of every ``n`` bytes read (a progress bar).

    Raises:
        MemextError: the file cannot be read, or is not UTF-8 (naming the file and the byte).
    """
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes decoded before this block
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(block)
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    # the decoder holds back up to 3 bytes of an unfinished character
                    at = offset + e.start - len(e.object) + len(data)
                    raise MemextError(
                        f"{path}: not valid UTF-8 (byte {at}: {e.reason}); re-encode the file "
                        "as UTF-8"
                    ) from None
                offset += len(data)
                if on_read is not None and data:
                    on_read(len(data))
                if text:
                    yield text
                if not data:
                    return
    except OSError as e:
        raise MemextError(f"cannot read {path}: {e.strerror or e}") from None
