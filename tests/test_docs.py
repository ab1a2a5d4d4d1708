"""Docs that are generated from the code stay current."""

import re
from pathlib import Path

from memext.config_docs import fields_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_current():
    text = (DOCS / "configuration.md").read_text()
    assert fields_markdown() in text, (
        "regenerate docs/configuration.md with `memext config --markdown`"
    )


def test_context_guide_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "context.md").read_text(), flags=re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/context.md", "exec"), namespace)
    printed = capsys.readouterr().out.split("\n")
    assert printed[0].startswith("1.1386")
    assert printed[1] == "8"
    assert printed[2] == "1024 torch.Size([1, 300, 264])"
    assert printed[3] == "520 74"
    assert printed[4] == "63360 True"


def test_evaluation_guide_examples_run(tmp_path):
    from memext.evals.suite import get_suite

    text = (DOCS / "evaluation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2  # retrieval cross-attention, effective length
    for block in blocks:
        exec(compile(block, "docs/evaluation.md", "exec"), {})
    (suite,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)  # a valid suite file
    (tmp_path / "mine.yaml").write_text(suite)
    spec = get_suite(str(tmp_path / "mine.yaml"))
    assert spec.name == "mine" and spec.lengths == (512, 1024, 2048)
    assert spec.tasks["niah"]["needle"] == "The secret word is {value}."
