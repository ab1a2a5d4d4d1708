"""Docs that are generated from the code stay current."""

from pathlib import Path

from memext.config import fields_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_current():
    text = (DOCS / "configuration.md").read_text()
    assert fields_markdown() in text, (
        "regenerate docs/configuration.md with `memext config --markdown`"
    )
