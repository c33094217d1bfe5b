"""``PYLLAMA_TESTS_STRICT=1`` (set by ``tools/dev.sh test``, hence CI): a skip is a failure.

Where the README's test command built and installed everything, a test that skips because a dependency,
the starter model or the vendored tree is missing is a test that did not run: the run fails and names
it. Only tests marked ``may_skip`` (they need a GPU, another build, data the vendored tree may lack)
may skip. Loaded by conftest.py; ``python -m pytest -p strict_skips`` loads it alone.
"""

from __future__ import annotations

import os

import pytest

_STRICT = "PYLLAMA_TESTS_STRICT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "may_skip: a test that skips by design where the machine, the build or the vendored data lacks "
                   f"what it tests; any other skip fails a {_STRICT}=1 run (tools/dev.sh test)")
    config.stash[_unexpected] = []


_unexpected = pytest.StashKey[list[str]]()


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _note(config: pytest.Config, report: pytest.CollectReport | pytest.TestReport, allowed: bool) -> None:
    if report.skipped and not allowed and os.environ.get(_STRICT) == "1":
        config.stash[_unexpected].append(f"{report.nodeid}: {_reason(report)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    _note(item.config, report, item.get_closest_marker("may_skip") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield
    _note(collector.config, outcome.get_result(), False)  # a module-level importorskip: none of it ran


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    unexpected = session.config.stash[_unexpected]
    if unexpected and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    unexpected = terminalreporter.config.stash[_unexpected]
    if unexpected:
        terminalreporter.section(f"skips that fail this run ({_STRICT}=1)", red=True)
        for line in unexpected:
            terminalreporter.line(line, red=True)
