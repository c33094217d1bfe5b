"""Default thread counts: llama.cpp's own choice (cpu_get_num_math), capped by the CPU affinity."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

import pyllama
from pyllama.context_params import thread_choice


def test_default_matches_llamacpp_and_affinity(model: Any) -> None:
    choice = thread_choice()
    allowed = len(os.sched_getaffinity(0))
    math = int(pyllama._ffi.lib.pyllama_cpu_get_num_math())
    assert choice.n_threads == min(math, allowed) >= 1
    assert choice.reason
    assert not model.fully_offloaded  # nothing is on a GPU here
    with model.context(n_ctx=64) as ctx:
        assert ctx.n_threads == choice.n_threads


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity control")
def test_affinity_caps_the_default() -> None:
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from pyllama.context_params import thread_choice; c = thread_choice(); print(c.n_threads, c.reason)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    n, reason = out.stdout.split(" ", 1)
    assert int(n) == 1, reason


def test_inspect_shows_the_choice() -> None:
    out = subprocess.run([sys.executable, "-m", "pyllama", "inspect", "build"], capture_output=True, text=True,
                         timeout=120, check=True)
    assert f"default threads: {thread_choice().n_threads} (" in out.stdout
