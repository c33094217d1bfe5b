"""The short version of bench/load.py's load test, on the synthetic model: 16 users for 15 s, a mix of
chat, completions (streamed and not), embeddings and tokenize, 10 % of streams abandoned and 5 % read a
chunk a second. No error other than a 503, no stalled request, the server up, its descriptors and threads
back at the end. (The 64-user, 10-minute run on the chat starter: `python bench/load.py`.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_short_load_loses_nothing(synth_model_path: Path, tmp_path: Path) -> None:
    report = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "-m", str(synth_model_path),
                          "--users", "16", "--duration", "15", "--slots", "4", "--ctx-slot", "512",
                          "--max-tokens", "32", "--stall", "60", "--seed", "1", "-o", str(report)],
                         capture_output=True, text=True, timeout=400)
    assert report.exists(), run.stderr[-3000:]
    got = json.loads(report.read_text())
    print(json.dumps(got))
    assert got["unexpected"] == {}, got
    assert got["server_alive"] and got["statuses"].get("ok", 0) > 100, got
    assert got["statuses"].get("abandoned", 0) > 0 and got["slow_streams"] > 0, got  # the misbehaviour happened
    assert got["fds"][1] <= got["fds"][0] + 2 and got["threads"][1] <= got["threads"][0] + 2, got
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
