"""Docs that are generated from the code stay current."""

import re
from pathlib import Path

from memext.config import fields_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_current():
    text = (DOCS / "configuration.md").read_text()
    assert fields_markdown() in text, (
        "regenerate docs/configuration.md with `memext config --markdown`"
    )


def test_context_guide_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "context.md").read_text(), flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/context.md", "exec"), namespace)
    printed = capsys.readouterr().out.split("\n")
    assert printed[0].startswith("1.1386")
    assert printed[1] == "8"
    assert printed[2] == "1024 torch.Size([1, 300, 264])"
