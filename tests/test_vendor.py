"""The vendor tree is materialised from the pin, never committed, and not fetched twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_vendor_tree_is_not_tracked() -> None:
    out = subprocess.run(["git", "ls-files", "vendor"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = out.stdout.split()
    assert tracked == ["vendor/llama.cpp.lock"]


def test_second_vendor_run_fetches_nothing() -> None:
    out = subprocess.run([sys.executable, "tools/vendor.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "nothing to do" in out.stdout
    assert "pip" not in out.stdout
    check = subprocess.run([sys.executable, "tools/vendor.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0
