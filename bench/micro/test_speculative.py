"""Speculative decoding on the starter model against llama.cpp's own programs, interleaved round by round.

The task is bench/speculative.py's (copy a given text, greedy, 256 tokens, drafts of
up to 8, 2 threads, flash attention auto). pytest-benchmark times pyllama's
speculative generation; each round's untimed set-up runs the two references first —
llama.cpp's program from the same tree (``llama-lookup``, ``llama-speculative-simple``)
and pyllama without a draft — so the three arms alternate (A B C A B C ...). The
speed figures are decode rates as the llama.cpp programs print them (generated
tokens over the time after the prompt's evaluation); the summary gives the
speed-up over plain pyllama, the ratio to llama.cpp's program and both acceptance
rates. The text must equal plain greedy decoding's: a difference fails the run.

- ``ngram``: prompt lookup (``draft="ngram"``) against ``llama-lookup``;
- ``draft``: the starter drafting for a larger target of its vocabulary, the starter
  converted to F16 through ``llama_model_quantize`` (no second model is at hand; a Q8_0
  copy decodes faster than the Q4_K_M starter on this CPU, so it cannot gain from
  a draft), against ``llama-speculative-simple``.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import SUMMARY, load_bench, native_tool_or_skip

import pyllama

THREADS, N_PREDICT, DRAFT_MAX, N_CTX, ROUNDS = 2, 256, 8, 2048, 5


@pytest.fixture(scope="module")
def spec() -> Any:
    return load_bench("speculative")


@pytest.fixture(scope="module")
def prompt_file(spec: Any, starter_as_native: pyllama.Model) -> Iterator[tuple[str, Path]]:
    prompt = spec.chat_prompt(starter_as_native)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompt.txt"
        path.write_text(prompt)
        yield prompt, path


def _context(model: pyllama.Model) -> pyllama.Context:
    return model.context(n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS, flash_attn="auto")


def _compare(benchmark: Any, spec: Any, label: str, native_name: str, native: Callable[[], dict[str, Any]],
             plain: Callable[[], dict[str, Any]], speculative: Callable[[], dict[str, Any]]) -> None:
    rounds: dict[str, list[dict[str, Any]]] = {"native": [], "plain": [], "spec": []}

    def setup() -> None:
        rounds["native"].append(native())
        rounds["plain"].append(plain())

    def timed() -> None:
        rounds["spec"].append(speculative())

    setup()
    timed()  # warm-up round: page cache, first-use allocations
    for runs in rounds.values():
        runs.clear()
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1)
    text = rounds["plain"][-1]["text"]
    assert all(r["text"] == text for r in rounds["spec"]), "speculative output differs from plain greedy"
    assert spec.same_text(text, rounds["native"][-1]["text"]), f"{native_name} printed another text"

    def tps(arm: str) -> list[float]:
        return [r["tps"] for r in rounds[arm]]

    speed_up = [s / p for s, p in zip(tps("spec"), tps("plain"))]
    vs_native = [s / n for s, n in zip(tps("spec"), tps("native"))]
    ours, theirs = rounds["spec"][-1], rounds["native"][-1]
    benchmark.extra_info.update(decode_tps=round(statistics.median(tps("spec")), 2),
                                speed_up=round(statistics.median(speed_up), 3),
                                vs_native=round(statistics.median(vs_native), 3))
    SUMMARY.append(f"speculative decoding, {label}: copy-this-text, starter, {THREADS} threads, -n {N_PREDICT}, "
                   f"drafts <= {DRAFT_MAX}, {ROUNDS} interleaved rounds, decode t/s median [min-max]:")
    for name, arm in (("pyllama, no draft", "plain"), (f"pyllama, {label}", "spec"), (native_name, "native")):
        rates = tps(arm)
        line = f"  {name:28s} {statistics.median(rates):8.2f} [{min(rates):.2f}-{max(rates):.2f}]"
        last = rounds[arm][-1]
        if last["drafted"]:
            line += f"  accepted {last['accepted']}/{last['drafted']} ({last['accepted'] / last['drafted']:.1%})"
        SUMMARY.append(line)
    SUMMARY.append(f"  speed-up over no draft x{_spread(speed_up)}; over {native_name} x{_spread(vs_native)}; "
                   f"text identical to plain greedy ({ours['n']} tokens; {native_name} {theirs['n']})")


def _spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"


def test_speculative_ngram(benchmark: Any, spec: Any, starter_path: Path, starter_as_native: pyllama.Model,
                           prompt_file: tuple[str, Path]) -> None:
    native_tool_or_skip("llama-lookup")
    prompt, path = prompt_file
    cmd = spec.lookup_command(starter_path, path, THREADS, N_CTX, N_PREDICT, DRAFT_MAX)
    with _context(starter_as_native) as ctx, pyllama.Speculator(ctx, "ngram", n_max=DRAFT_MAX) as lookup:
        # llama-lookup generates one token past -n: pyllama generates as many
        _compare(benchmark, spec, "n-gram lookup", "llama-lookup",
                 lambda: spec.run_native(cmd),
                 lambda: spec.run_pyllama(ctx, prompt, N_PREDICT + 1, None),
                 lambda: spec.run_pyllama(ctx, prompt, N_PREDICT + 1, lookup))


def test_speculative_draft_model(benchmark: Any, spec: Any, starter_path: Path, starter_as_native: pyllama.Model,
                                 prompt_file: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    native_tool_or_skip("llama-speculative-simple")
    prompt, path = prompt_file
    target_path = spec.quantize(starter_path, tmp_path_factory.mktemp("target") / "starter-f16.gguf", "f16")
    cmd = spec.speculative_simple_command(target_path, starter_path, path, THREADS, N_CTX, N_PREDICT, DRAFT_MAX)
    with pyllama.Model(target_path) as target, _context(target) as ctx, \
            pyllama.Speculator(ctx, starter_as_native, n_max=DRAFT_MAX) as draft:
        _compare(benchmark, spec, "draft model", "llama-speculative-simple",
                 lambda: spec.run_native(cmd),
                 lambda: spec.run_pyllama(ctx, prompt, N_PREDICT + 1, None),
                 lambda: spec.run_pyllama(ctx, prompt, N_PREDICT + 1, draft))
