"""Benchmark commands are recorded so a fresh clone can rerun them: relative paths, real flags,
at the head of each result file beside its provenance."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from memext.runtime import command_line, provenance, write_result

ROOT = Path(__file__).resolve().parents[1]


def test_command_line_writes_paths_relative_and_flags_as_argparse_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    args = argparse.Namespace(
        data=tmp_path / "data" / "x.jsonl", passkey_batch=16, out=tmp_path / "o.json"
    )
    cmd = command_line("benchmarks/b.py", args, ("out",))
    assert cmd == "python benchmarks/b.py --data=data/x.jsonl --passkey-batch=16"
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path)
    p.add_argument("--passkey-batch", type=int)
    parsed = p.parse_args(cmd.split()[2:])
    assert parsed.data == Path("data/x.jsonl") and parsed.passkey_batch == 16


def test_flags_none_and_repeated_options_read_back_as_they_were_parsed() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--init", action="store_true")
    p.add_argument("--smollm2", action="store_true")
    p.add_argument("--peak", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--text", action="append")
    p.add_argument("--recover-steps", type=int)
    for argv in (
        ["--init", "--no-peak", "--text=a.txt", "--text=b.txt"],
        ["--smollm2", "--chat", "--recover-steps=3"],
        [],
    ):
        args = p.parse_args(argv)
        cmd = command_line("benchmarks/b.py", args, parser=p)
        assert p.parse_args(cmd.split()[2:]) == args, cmd
        assert "None" not in cmd and "True" not in cmd and "False" not in cmd
    # Without the parser a False flag is left out: right for store_true and default-False flags.
    args = p.parse_args(["--init"])
    assert command_line("benchmarks/b.py", args) == "python benchmarks/b.py --init --peak"


def test_a_result_file_leads_with_its_command_and_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(seed=3, out=tmp_path / "r" / "o.json")
    write_result(args.out, "benchmarks/b.py", args, None, {"table": [1], "rows": []}, ("out",))
    text = args.out.read_text()
    assert text.endswith("}\n") and '\n "table": [\n  1\n ]' in text  # indented by one
    assert list(json.loads(text).items()) == [
        ("command", "python benchmarks/b.py --seed=3"),
        ("provenance", provenance()),
        ("table", [1]),
        ("rows", []),
    ]


def test_no_recorded_result_or_doc_names_an_absolute_machine_path() -> None:
    files = [*(ROOT / "benchmarks" / "results").glob("*.json"), *(ROOT / "docs").glob("*.md")]
    pattern = re.compile(r"(?<![\w.])/(?:work|root|home|tmp|Users)/")
    hits = [f"{f.name}: {m.group(0)}" for f in files for m in pattern.finditer(f.read_text())]
    assert not hits, hits
