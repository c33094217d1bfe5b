"""Leaks and endurance: RSS slope per cycle and per token, file descriptors and threads back to start.

Four loops on the synthetic model (or ``--model PATH``): context create/close,
model load/close, generated tokens in one context (with KV clears), and sampler
chains (with a grammar). The resident set size is sampled along each loop
(after ``malloc_trim``, so allocator fragmentation does not read as a leak) and
its slope taken by least squares after a warm-up; descriptors and threads must
be back to their starting counts. CI runs small counts (marked ``slow``, a few seconds);
the full counts of issue 11 run by one command, in a fresh process, and print
the figures::

    python tests/test_endurance.py --full        # or PYLLAMA_ENDURANCE=full pytest tests/test_endurance.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import synth  # noqa: E402

FULL = {"contexts": 10_000, "models": 200, "tokens": 100_000, "samplers": 1_000}
SMALL = {"contexts": 300, "models": 20, "tokens": 3_000, "samplers": 100}
# Goals of issue 11 for the full counts; CI's short loops are noisier (allocator arenas
# settle over hundreds of cycles), so they check a looser bound.
GOAL_PER_CYCLE, GOAL_PER_TOKEN = 1024.0, 10.0
CI_PER_CYCLE, CI_PER_TOKEN = 16 * 1024.0, 64.0
GRAMMAR = 'root ::= "yes" | "no" | [a-z]+ " " [0-9]+'

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system, so RSS shows what is held, not fragmentation."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss() -> int:
    _malloc_trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def n_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    return float(np.polyfit(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), 1)[0])


@dataclass
class Figures:
    loop: str
    n: int
    unit: str
    rss_start_mib: float
    rss_end_mib: float
    slope_bytes: float  # per cycle or per token, after warm-up
    fds_delta: int
    threads_delta: int


def _measure(loop: str, unit: str, n: int, step: Callable[[int], int], samples: int = 50) -> Figures:
    """Run ``step(i)`` (returns units done) until ``n`` units; sample RSS along the way."""
    gc.collect()
    fds0, thr0, rss0 = n_fds(), n_threads(), rss()
    done, xs, ys, i = 0, [], [], 0
    every = max(1, n // samples)
    next_sample = every
    while done < n:
        done += step(i)
        i += 1
        if done >= next_sample:
            xs.append(float(done))
            ys.append(float(rss()))
            next_sample += every
    gc.collect()
    warm = len(xs) // 5  # the first fifth warms caches and allocator arenas up
    return Figures(loop, n, unit, rss0 / 2**20, rss() / 2**20, slope(xs[warm:], ys[warm:]),
                   n_fds() - fds0, n_threads() - thr0)


def run(counts: dict[str, int], model_path: Path) -> list[Figures]:
    import pyllama

    out = []
    with pyllama.Model(model_path, n_gpu_layers=0) as model:
        prompt = model.tokenize("Hello world, the people of the world")

        def context_cycle(i: int) -> int:
            with model.context(n_ctx=256, n_threads=1) as ctx:
                if i % 10 == 0:
                    ctx.evaluate(prompt)
            return 1

        out.append(_measure("context create/close", "cycle", counts["contexts"], context_cycle))

        with model.context(n_ctx=512, n_threads=1) as ctx:
            def token_chunk(i: int) -> int:
                ctx.kv.clear()
                with pyllama.generate(ctx, prompt, max_tokens=400) as gen:
                    for _ in gen:
                        pass
                return gen.n_generated

            token_chunk(0)
            out.append(_measure("generated tokens, one context", "token", counts["tokens"], token_chunk))

            def sampler_cycle(i: int) -> int:
                specs = [pyllama.Grammar(GRAMMAR), pyllama.TopK(40), pyllama.TopP(0.9), pyllama.Temp(0.8),
                         pyllama.Dist(seed=i)] if i % 2 else [pyllama.Penalties(), pyllama.MinP(0.05),
                                                              pyllama.Dist(seed=i)]
                with pyllama.SamplerChain(specs, model) as chain:
                    chain.sample(ctx, -1)
                return 1

            ctx.evaluate(prompt)
            out.append(_measure("sampler chains (half with a grammar)", "cycle", counts["samplers"], sampler_cycle))

    def model_cycle(i: int) -> int:
        with pyllama.Model(model_path, n_gpu_layers=0) as m, m.context(n_ctx=64, n_threads=1) as c:
            c.evaluate(m.tokenize("hi"))
        return 1

    out.append(_measure("model load/close", "cycle", counts["models"], model_cycle, samples=min(50, counts["models"])))
    return out


def report(figures: list[Figures]) -> str:
    lines = [f"{'loop':40s} {'n':>8s} {'RSS start→end MiB':>20s} {'slope':>18s} {'fds':>4s} {'thr':>4s}"]
    for f in figures:
        lines.append(f"{f.loop:40s} {f.n:8d} {f.rss_start_mib:9.1f} →{f.rss_end_mib:8.1f} "
                     f"{f.slope_bytes:10.1f} B/{f.unit:5s} {f.fds_delta:+4d} {f.threads_delta:+4d}")
    return "\n".join(lines)


@pytest.mark.slow
def test_no_leaks_in_long_loops(synth_model_path: Path) -> None:
    full = os.environ.get("PYLLAMA_ENDURANCE") == "full"
    figures = run(FULL if full else SMALL, synth_model_path)
    print("\n" + report(figures))
    per_cycle, per_token = (GOAL_PER_CYCLE, GOAL_PER_TOKEN) if full else (CI_PER_CYCLE, CI_PER_TOKEN)
    for f in figures:
        assert f.fds_delta == 0, f
        assert f.threads_delta == 0, f
        assert f.slope_bytes < (per_token if f.unit == "token" else per_cycle), report(figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Endurance loops; prints RSS slopes, fd and thread deltas.")
    parser.add_argument("--full", action="store_true", help="issue 11's counts (takes minutes)")
    parser.add_argument("--json", action="store_true")
    for k, v in SMALL.items():
        parser.add_argument(f"--{k}", type=int, help=f"override the count (small: {v}, full: {FULL[k]})")
    parser.add_argument("--model", type=Path, help="a GGUF model to use instead of the synthetic one")
    args = parser.parse_args(argv)
    counts = dict(FULL if args.full else SMALL)
    counts.update({k: getattr(args, k) for k in counts if getattr(args, k) is not None})
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(counts, args.model or synth.write_llama_model(Path(tmp) / "m.gguf"))
    print(json.dumps([asdict(f) for f in figures], indent=1) if args.json else report(figures))
    ok = all(f.fds_delta == 0 and f.threads_delta == 0 and
             f.slope_bytes < (GOAL_PER_TOKEN if f.unit == "token" else GOAL_PER_CYCLE) for f in figures)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
