"""The suite's own rules: in a strict run (tools/dev.sh test, CI) a skip fails unless the test may skip;
every test has a time limit, so a deadlock fails its test instead of hanging CI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

SAMPLE = textwrap.dedent("""
    import pytest

    def test_runs():
        pass

    def test_skips_for_want_of_a_dependency():
        pytest.importorskip("pyllama_no_such_module")

    @pytest.mark.may_skip
    def test_needs_a_gpu():
        pytest.skip("no GPU device")
""")


def _run(tmp_path: Path, strict: str, *files: tuple[str, str]) -> subprocess.CompletedProcess[str]:
    for name, text in files:
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYLLAMA_TESTS_STRICT": strict, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "strict_skips", "-p", "no:cacheprovider",
                           "-o", "addopts=", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)


def test_a_strict_run_fails_on_a_skip_that_is_not_allowed(tmp_path: Path) -> None:
    lax = _run(tmp_path, "0", ("test_sample.py", SAMPLE))
    assert lax.returncode == 0, lax.stdout
    strict = _run(tmp_path, "1")
    assert strict.returncode == 1, strict.stdout
    assert "test_skips_for_want_of_a_dependency" in strict.stdout and "test_needs_a_gpu" not in strict.stdout


def test_a_module_skipped_at_import_fails_a_strict_run(tmp_path: Path) -> None:
    only_gpu = SAMPLE.replace("def test_skips_for_want_of_a_dependency():\n    pytest.importorskip(\"pyllama_no_such_module\")\n", "")
    assert _run(tmp_path, "1", ("test_sample.py", only_gpu)).returncode == 0
    module = "import pytest\npytest.importorskip('pyllama_no_such_module')\n\ndef test_x():\n    pass\n"
    strict = _run(tmp_path, "1", ("test_module.py", module))
    assert strict.returncode == 1 and "test_module.py" in strict.stdout, strict.stdout


def test_every_test_has_a_time_limit(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.hasplugin("timeout"), "pytest-timeout is part of the test extra"
    assert float(request.config.getini("timeout")) > 0
