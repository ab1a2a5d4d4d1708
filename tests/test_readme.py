"""The README's examples run: its Python blocks in order, its console commands exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from memext.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "completed 60" in printed
    assert "torch.Size([1, 64, 264]) 64" in printed
    assert (tmp_path / "runs" / "quickstart" / "eval" / "default.json").is_file()


def test_console_commands_parse():
    runner = CliRunner()
    lines = [ln for b in _blocks("console") for ln in b.splitlines() if ln.startswith("$ memext")]
    assert len(lines) >= 8
    for line in lines:
        words = shlex.split(line[2:].split("  #")[0])[1:]
        # Every subcommand named in the README exists and accepts the options shown.
        sub = words[:2] if words[0] in ("tokenizer", "bench", "memory", "classify") else words[:1]
        result = runner.invoke(app, [*sub, "--help"])
        assert result.exit_code == 0, line
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            assert option in result.output, f"{option} is not an option of `memext {' '.join(sub)}`"
