"""The README's promises table names tests that exist, and a run of the whole suite fails when one did not pass."""
from __future__ import annotations

from types import SimpleNamespace

from promises import GPU_TIER, PromiseCheck, missing_tests, promises


def test_every_promise_names_tests_that_exist():
    rows = promises()
    assert len(rows) >= 10, "the README's promises table lost its rows"
    assert missing_tests(rows) == []


def test_a_promised_test_that_was_skipped_or_did_not_run_is_a_failure_of_the_run():
    cpu_tests = sorted({test for row in promises() for test in row.tests if not test.startswith(GPU_TIER)})
    skipped, absent, parametrised, *passed = cpu_tests
    check = PromiseCheck(config=None)
    for nodeid, when, outcome in [(skipped, "setup", "skipped"), (f"{parametrised}[a]", "call", "passed"),
                                  (f"{parametrised}[b]", "call", "failed"),
                                  *((node, "call", "passed") for node in passed)]:
        check.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, when=when, outcome=outcome))
    assert sorted(check.unproven()) == sorted([f"{skipped}: skipped", f"{absent}: did not run",
                                       f"{parametrised}: failed"])
