"""CI's guard against silent skips (`.ci/check_junit.py`): it counts the junit report's tests,
lists every skip and refuses those outside `.ci/allowed-skips.txt`; and the suite itself skips
nothing on a missing dev dependency."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_junit", ROOT / ".ci" / "check_junit.py")
assert _spec is not None and _spec.loader is not None
check_junit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_junit)


def _report(tmp_path: Path, cases: list[tuple[str, str, str | None]]) -> Path:
    """junit XML as pytest writes it; a case is (classname, name, skip message or None)."""
    rows = []
    for classname, name, skip in cases:
        inner = "" if skip is None else f'<skipped type="pytest.skip" message="{skip}"/>'
        rows.append(
            f'<testcase classname="{classname}" name="{name}" time="0.1">{inner}</testcase>'
        )
    skipped = sum(s is not None for _, _, s in cases)
    xml = (
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" '
        f'failures="0" skipped="{skipped}" tests="{len(cases)}">{"".join(rows)}</testsuite>'
        "</testsuites>"
    )
    path = tmp_path / "report.xml"
    path.write_text(xml, encoding="utf-8")
    return path


def _allowed(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "allowed.txt"
    path.write_text(text, encoding="utf-8")
    return path


CASES = [
    ("tests.test_report", "test_every_plot_shows_in_a_browser", "chromium is not on PATH"),
    ("tests.test_model", "test_a[x-1]", None),
    ("tests.test_model", "test_b", None),
]


def test_a_skip_outside_the_allow_list_fails(tmp_path: Path) -> None:
    problems = check_junit.check(_report(tmp_path, CASES), _allowed(tmp_path, ""), 1, ROOT)
    assert len(problems) == 1
    assert "tests/test_report.py::test_every_plot_shows_in_a_browser" in problems[0]


def test_an_allowed_skip_passes_and_is_listed(tmp_path: Path, capsys) -> None:
    allowed = _allowed(
        tmp_path,
        "# comment\n\ntests/test_report.py::test_every_plot_shows_in_a_browser  no display\n",
    )
    assert check_junit.check(_report(tmp_path, CASES), allowed, 2, ROOT) == []
    out = capsys.readouterr().out
    assert "3 tests, 2 ran, 1 skipped" in out
    assert "skipped (allowed): tests/test_report.py::test_every_plot_shows_in_a_browser" in out


def test_zero_tests_and_the_floor_fail(tmp_path: Path) -> None:
    empty = check_junit.check(_report(tmp_path, []), _allowed(tmp_path, ""), 0, ROOT)
    assert empty == ["the junit report counts zero tests"]
    floor = check_junit.check(_report(tmp_path, CASES[1:]), _allowed(tmp_path, ""), 3, ROOT)
    assert floor == ["only 2 tests ran; expected at least 3"]


def test_an_allowed_skip_needs_a_reason(tmp_path: Path) -> None:
    allowed = _allowed(tmp_path, "tests/test_report.py::test_every_plot_shows_in_a_browser\n")
    (problem,) = check_junit.check(_report(tmp_path, CASES), allowed, 1, ROOT)
    assert "has no reason" in problem


def test_junit_classnames_map_back_to_pytest_ids() -> None:
    assert check_junit.test_id("tests.test_model", "test_a[x-1]", ROOT) == (
        "tests/test_model.py::test_a[x-1]"
    )
    assert check_junit.test_id("tests.test_model.TestThing", "test_c", ROOT) == (
        "tests/test_model.py::TestThing::test_c"
    )


def test_the_allow_list_is_well_formed_and_names_real_tests() -> None:
    allowed = check_junit.read_allowed(ROOT / ".ci" / "allowed-skips.txt")
    for tid in allowed:
        path, _, name = tid.partition("::")
        assert (ROOT / path).is_file(), tid
        assert re.search(rf"def {re.escape(name.split('[')[0])}\b", (ROOT / path).read_text()), tid


def test_no_test_skips_on_a_missing_import() -> None:
    # Every dependency the suite needs is in the `dev` extra: tests import them directly, so a
    # missing one is an install error (a failure), never a skip that CI would not notice.
    offenders = [
        p.name
        for p in (ROOT / "tests").glob("*.py")
        if p.name != Path(__file__).name and "importorskip" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []
