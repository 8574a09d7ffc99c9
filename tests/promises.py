"""The README's promises table: which test proves each promise, and whether this run proved it.

README.md's section `## Promises` holds one row per promise (safety, exactness, outcomes) naming, in backticks, the
tests that prove it (`tests/test_x.py::test_name`; a parametrised test is named without its parameters and proves
the promise only if every parametrisation passed). tests/test_promises.py checks that every named test exists; the
hooks below (registered by tests/conftest.py) turn a run of the whole CPU suite in which a promised test did not pass
(skipped, deselected by a skip condition, failed, missing) into a failure listed in the summary. Tests under
tests/gpu/ run on a GPU machine only (BENCHMARKS.md records those runs); here they are checked to exist.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
SECTION = "## Promises"
TEST_NAME = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
GPU_TIER = "tests/gpu/"


@dataclass(frozen=True)
class Promise:
    text: str
    tests: tuple[str, ...]  # node ids without parameters: tests/test_x.py::test_name


def promises(readme: Path = README) -> list[Promise]:
    """The rows of the README's promises table."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        raise AssertionError(f"{readme} has no '{SECTION}' section") from None
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        tests = tuple(f"{path}::{name}" for path, name in TEST_NAME.findall(line))
        if tests:
            rows.append(Promise(cells[0], tests))
    return rows


def defined_tests(path: Path) -> set[str]:
    """Names of the module-level test functions of a test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}


def missing_tests(rows: list[Promise]) -> list[str]:
    missing = []
    for node in sorted({test for row in rows for test in row.tests}):
        path, name = node.split("::")
        if not (REPO_ROOT / path).is_file() or name not in defined_tests(REPO_ROOT / path):
            missing.append(node)
    return missing


class PromiseCheck:
    """Collects every test's outcome (on the pytest-xdist controller too) and, after a run of the whole CPU suite,
    reports each promised CPU-tier test that did not pass as one failure."""

    def __init__(self, config):
        self.config = config
        self.outcomes: dict[str, list[str]] = {}

    def whole_suite(self) -> bool:
        import pytest
        option = self.config.option
        selected = option.keyword or option.markexpr or getattr(option, "lf", False) or \
            getattr(option, "deselect", None)
        if selected:
            return False
        if self.config.args_source == pytest.Config.ArgsSource.TESTPATHS:
            return True
        return all(Path(arg).resolve() == REPO_ROOT / "tests" for arg in self.config.args)

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes.setdefault(report.nodeid, []).append(report.outcome)

    def unproven(self) -> list[str]:
        found = []
        for node in sorted({test for row in promises() for test in row.tests if not test.startswith(GPU_TIER)}):
            outcomes = [outcome for nodeid, seen in self.outcomes.items()
                        if nodeid == node or nodeid.startswith(node + "[") for outcome in seen]
            if not outcomes:
                found.append(f"{node}: did not run")
            elif set(outcomes) != {"passed"}:
                found.append(f"{node}: {', '.join(sorted(set(outcomes) - {'passed'}))}")
        return found

    def pytest_sessionfinish(self, session) -> None:
        if hasattr(self.config, "workerinput") or self.config.option.collectonly or session.shouldfail \
                or session.shouldstop or not self.whole_suite():
            return
        unproven = self.unproven()
        if not unproven:
            return
        from _pytest.reports import TestReport
        report = TestReport(nodeid="README.md::Promises", location=("README.md", 0, "Promises"), keywords={},
                            outcome="failed", when="call",
                            longrepr="a promise of the README is not proven by this run of the whole suite:\n  "
                                     + "\n  ".join(unproven))
        self.config.hook.pytest_runtest_logreport(report=report)
        session.exitstatus = 1
