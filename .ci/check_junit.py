"""Read pytest's junit report: count the tests, list every skip, refuse skips outside the allow-list.

Usage: python3 .ci/check_junit.py REPORT.xml ALLOWED_SKIPS.txt MIN_TESTS

Exit status 0 when the report holds at least one test, at least MIN_TESTS of them ran (not
skipped), and every skipped test (xfails included) is named in the allow-list; 1 otherwise,
saying why. The allow-list holds one test id per line (``tests/test_x.py::test_y[param]``),
then whitespace and the reason it may skip; blank lines and lines starting with # are comments.
A line without a reason is refused, so every allowed skip says why.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def test_id(classname: str, name: str, root: Path) -> str:
    """junit's dotted classname back to pytest's id: ``tests.test_x.TestY`` -> ``tests/test_x.py::TestY``."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (root / path).is_file():
            return "::".join([path, *parts[i:], name])
    return "::".join([classname.replace(".", "/") + ".py", name])


def read_allowed(path: Path) -> dict[str, str]:
    allowed: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            raise ValueError(f"{path}:{n}: {parts[0]!r} has no reason; write the id, then why")
        allowed[parts[0]] = parts[1]
    return allowed


def check(report: Path, allowed_file: Path, min_tests: int, root: Path) -> list[str]:
    """The problems found (empty when CI may pass); prints the counts and every skip."""
    tree = ET.parse(report).getroot()
    suites = [tree] if tree.tag == "testsuite" else tree.findall("testsuite")
    total = sum(int(s.get("tests", 0)) for s in suites)
    skips: list[tuple[str, str]] = []
    for case in tree.iter("testcase"):
        for child in case:
            if child.tag == "skipped":
                tid = test_id(case.get("classname", ""), case.get("name", ""), root)
                skips.append((tid, child.get("message", "")))
    ran = total - len(skips)
    problems: list[str] = []
    try:
        allowed = read_allowed(allowed_file)
    except ValueError as exc:
        return [str(exc)]
    print(f"CI: junit report: {total} tests, {ran} ran, {len(skips)} skipped")
    for tid, message in skips:
        verdict = "allowed" if tid in allowed else "NOT ALLOWED"
        print(f"CI: skipped ({verdict}): {tid}: {message}")
    if total == 0:
        problems.append("the junit report counts zero tests")
    if ran < min_tests:
        problems.append(f"only {ran} tests ran; expected at least {min_tests}")
    refused = [tid for tid, _ in skips if tid not in allowed]
    if refused:
        problems.append(
            f"{len(refused)} skip(s) outside {allowed_file}: {', '.join(refused)} "
            "(fix the cause, or add the id with its reason to the allow-list)"
        )
    unused = sorted(set(allowed) - {tid for tid, _ in skips})
    for tid in unused:
        print(f"CI: note: allowed skip did not happen (remove it?): {tid}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    report, allowed, min_tests = Path(argv[1]), Path(argv[2]), int(argv[3])
    problems = check(report, allowed, min_tests, Path.cwd())
    for p in problems:
        print(f"CI: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
