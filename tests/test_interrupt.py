"""Ctrl-C interrupts a long prompt evaluation and leaves the context usable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = r"""
import signal, sys, numpy as np, pyllama
# A suite started as a background job (nohup, `&` in a script) passes SIGINT on
# ignored, and Python then keeps it ignored; a program run from a terminal has
# the default handler, which is the case under test.
signal.signal(signal.SIGINT, signal.default_int_handler)
model = pyllama.Model(sys.argv[1])
ctx = model.context(n_ctx=4096, n_batch=4096, n_ubatch=16, n_threads=1)
toks = np.resize(model.tokenize("Hello world the cat sat", add_special=False), 4000).astype(np.int32)
print("ready", flush=True)
try:
    for _ in range(1000):  # far longer than the test waits
        ctx.kv.clear()
        ctx.decode(pyllama.Batch.from_tokens(toks))
    print("finished", flush=True)
except KeyboardInterrupt:
    print("interrupted", ctx.kv.pos_range(0), flush=True)
print("after", pyllama.generate_text(ctx, "Hello", max_tokens=3) != "", flush=True)
"""


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigint_interrupts_decode(synth_model_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(synth_model_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # inside a long decode by now
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "interrupted None", out  # the partial batch was removed from the KV cache
    assert lines[1] == "after True"
    assert time.monotonic() - started < 30
