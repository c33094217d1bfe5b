"""llama.cpp's own server tests (vendor/llama.cpp/tools/server/tests), run offline against `pyllama serve`.

The vendored suite runs unchanged with bench/server_suite.py as a pytest plugin: the server binary
is `python -m pyllama serve` given llama-server's own flags, the model presets are the starters and
tests/synth.py models (see that script). tests/llama_server_suite.json records, for the OpenAI/HTTP
subset of the suite, the test ids llama-server (built from the same tree) passes on those models and
the ids `pyllama serve` passes; here the latter are run against `pyllama serve` and every one must
pass (CI time: the full reference is for bench/server_suite.py). The record only grows: `python bench/server_suite.py --update` adds new passes;
`python bench/server_suite.py --table` prints the per-file table.

Select or leave out with `-m llama_server_suite` / `-m "not llama_server_suite"`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bench_scripts

pytestmark = [pytest.mark.llama_server_suite, pytest.mark.starter, pytest.mark.slow,
              pytest.mark.timeout(1800)]  # the first test runs the whole suite (total_timeout=900 s)

ROOT = Path(__file__).resolve().parent.parent
RECORD = json.loads((Path(__file__).parent / "llama_server_suite.json").read_text())


suite = bench_scripts.load("server_suite")


def _ids_of(ids: list[str], file: str) -> list[str]:
    return [i for i in ids if i.startswith(f"unit/{file}::")]


def test_record_is_consistent() -> None:
    assert RECORD["files"] == list(suite.FILES)
    assert set(RECORD["pyllama"]) <= set(RECORD["llama_server"]), "pyllama's list counts llama-server's passes only"
    assert all(suite._file_of(i) in suite.FILES for i in RECORD["llama_server"])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, chat_starter_path: Path, starter_model_path: Path,
            synth_model_path: Path, synth_embedding_model_path: Path, synth_lora_path: Path) -> dict[str, Any]:
    """The recorded passes of `pyllama serve`, run once against it (the whole reference takes ~4x longer:
    `python bench/server_suite.py --reference` runs it and finds new passes)."""
    if not (suite.SUITE_DIR / "utils.py").is_file():
        pytest.skip("vendor/llama.cpp/tools/server/tests is missing: python tools/vendor.py")
    for module in ("requests", "openai", "starlette", "uvicorn"):
        pytest.importorskip(module)
    workdir = tmp_path_factory.mktemp("server-suite")
    models = suite.prepare_models(workdir / "models", chat=chat_starter_path, base=starter_model_path,
                                  synth_model=synth_model_path, embedding=synth_embedding_model_path,
                                  lora=synth_lora_path)
    out: dict[str, Any] = suite.run_suite(suite.pyllama_wrapper(workdir), models, workdir,
                                          only=RECORD["pyllama"], timeout=60, total_timeout=900)
    return out


@pytest.mark.parametrize("file", suite.FILES)
def test_pyllama_serve_passes(results: dict[str, Any], file: str) -> None:
    expected = _ids_of(RECORD["pyllama"], file)
    lost = {i: results.get(i, {"outcome": "not collected", "reason": "the vendored suite has no such test"})
            for i in expected if results.get(i, {}).get("outcome") != "passed"}
    assert not lost, "recorded passes of llama.cpp's server tests that now fail:\n" + "\n".join(
        f"{i}: {r['outcome']}: {r['reason']} {'; '.join(r.get('server_log', [])[:2])}" for i, r in lost.items())
