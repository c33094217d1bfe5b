"""Find the fastest threads / batch / micro-batch / flash-attention / KV-type settings for a model.

    python -m pyllama.benchmark.tune -m model.gguf [-ngl 99] [-p 512] [-n 128] [-d 0] [-r 3]
    python bench/tune.py -m model.gguf                       # the same, from a checkout

A coordinate search over llama-bench's own tests (measured through pyllama,
with llama-bench's warm-up and timing):

1. threads, separately for prompt processing (``pp``) and generation (``tg``),
   since a context takes both (``n_threads_batch`` and ``n_threads``);
2. flash attention x KV cache type, shared by both: the winner maximises the
   geometric mean of pp and tg throughput relative to the starting point;
3. batch x micro-batch, for prompt processing only;
4. threads again with the chosen settings (``--passes``).

The result is printed as ``pyllama bench`` / ``llama-bench`` flags and as
``Model.context()`` keyword arguments. Every measurement is printed as it is
made (to stderr), so an interrupted sweep still tells what it found.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .params import (
    CACHE_TYPES,
    FLASH_ATTN_AUTO,
    FLASH_ATTN_NAMES,
    FLASH_ATTN_OFF,
    FLASH_ATTN_ON,
    UsageError,
    cpu_get_num_math,
    parse_args,
    parse_int_range,
)


@dataclass(frozen=True)
class Setting:
    """The knobs being tuned."""

    threads_pp: int
    threads_tg: int
    n_batch: int
    n_ubatch: int
    flash_attn: int
    type_k: str
    type_v: str

    def bench_flags(self, which: str) -> str:
        t = self.threads_pp if which == "pp" else self.threads_tg
        fa = FLASH_ATTN_NAMES[self.flash_attn]
        return (f"-t {t} -b {self.n_batch} -ub {self.n_ubatch} -fa {fa} "
                f"-ctk {self.type_k} -ctv {self.type_v}")

    def context_kwargs(self) -> str:
        fa = FLASH_ATTN_NAMES[self.flash_attn]
        return (f"n_threads={self.threads_tg}, n_threads_batch={self.threads_pp}, n_batch={self.n_batch}, "
                f"n_ubatch={self.n_ubatch}, flash_attn={fa!r}, type_k={self.type_k!r}, type_v={self.type_v!r}")


def _default_threads() -> list[int]:
    import os

    hi = max(cpu_get_num_math(), 1)
    logical = os.cpu_count() or hi
    vals = {1, hi, logical}
    v = 2
    while v < hi:
        vals.add(v)
        v *= 2
    return sorted(vals)


class Tuner:
    """Measures pp and tg throughput for a setting (cached), through pyllama's benchmark runner."""

    def __init__(self, model: str, *, n_prompt: int, n_gen: int, depth: int, reps: int, n_gpu_layers: int,
                 log: Callable[[str], None]) -> None:
        from .runner import DepthCache, ModelCache

        self.model, self.n_prompt, self.n_gen, self.depth, self.reps = model, n_prompt, n_gen, depth, reps
        self.n_gpu_layers = n_gpu_layers
        self.models = ModelCache()
        self.depth_cache = DepthCache()
        self.rng = np.random.default_rng(0)
        self.cache: dict[tuple[str, Setting], float] = {}
        self.log = log

    def measure(self, which: str, s: Setting) -> float:
        """Average tokens/s of ``pp<N>`` or ``tg<N>`` with setting ``s`` (0.0 if the setting fails)."""
        key_s = replace(s, threads_tg=0) if which == "pp" else replace(s, threads_pp=0, n_batch=0, n_ubatch=0)
        if (which, key_s) in self.cache:
            return self.cache[(which, key_s)]
        from pyllama.errors import LlamaError

        from .runner import BenchError, PyllamaTest

        threads = s.threads_pp if which == "pp" else s.threads_tg
        argv = ["-m", self.model, "-r", str(self.reps), "-d", str(self.depth), "-ngl", str(self.n_gpu_layers),
                "-t", str(threads), "-b", str(s.n_batch), "-ub", str(s.n_ubatch),
                "-fa", FLASH_ATTN_NAMES[s.flash_attn], "-ctk", s.type_k, "-ctv", s.type_v]
        argv += ["-p", str(self.n_prompt), "-n", "0"] if which == "pp" else ["-p", "0", "-n", str(self.n_gen)]
        (inst,) = parse_args(argv).instances()
        ts = 0.0
        try:
            model = self.models.get(inst)
            test = PyllamaTest(inst, model, self.depth_cache, self.rng)
            try:
                test.warmup()
                samples = [test.rep() for _ in range(self.reps)]
            finally:
                test.close()
            n = inst.n_prompt + inst.n_gen
            ts = float(np.mean([1e9 * n / x for x in samples]))
            self.log(f"  {inst.name:>12s}  {s.bench_flags(which):48s} {ts:10.2f} t/s")
        except (BenchError, LlamaError) as exc:
            self.log(f"  {inst.name:>12s}  {s.bench_flags(which):48s}    failed: {str(exc).splitlines()[0]}")
        self.cache[(which, key_s)] = ts
        return ts

    def close(self) -> None:
        self.models.close()


def tune(model: str, *, threads: list[int], batches: list[int], ubatches: list[int], flash: list[int],
         kv: list[tuple[str, str]], n_prompt: int = 512, n_gen: int = 128, depth: int = 0, reps: int = 3,
         n_gpu_layers: int = -1, passes: int = 2,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
         ) -> tuple[Setting, dict[str, float]]:
    """Run the coordinate search; return the best setting and its pp/tg throughput."""
    t0 = cpu_get_num_math()
    best = Setting(threads_pp=t0, threads_tg=t0, n_batch=2048, n_ubatch=512, flash_attn=FLASH_ATTN_AUTO,
                   type_k="f16", type_v="f16")
    tuner = Tuner(model, n_prompt=n_prompt, n_gen=n_gen, depth=depth, reps=reps, n_gpu_layers=n_gpu_layers,
                  log=log)
    try:
        for p in range(passes):
            log(f"pass {p + 1}: threads")
            best = replace(best, threads_pp=max(threads, key=lambda t: tuner.measure("pp", replace(best, threads_pp=t))))
            best = replace(best, threads_tg=max(threads, key=lambda t: tuner.measure("tg", replace(best, threads_tg=t))))
            if p == passes - 1 and p > 0:
                break
            log(f"pass {p + 1}: flash attention x KV cache type")
            base_pp, base_tg = tuner.measure("pp", best), tuner.measure("tg", best)

            def score(s: Setting) -> float:
                pp, tg = tuner.measure("pp", s), tuner.measure("tg", s)
                if pp <= 0 or tg <= 0 or base_pp <= 0 or base_tg <= 0:
                    return 0.0
                return math.sqrt(pp / base_pp * tg / base_tg)

            cands = [replace(best, flash_attn=fa, type_k=k, type_v=v) for fa in flash for k, v in kv]
            best = max(cands, key=score) if cands else best
            log(f"pass {p + 1}: batch x micro-batch (prompt processing)")
            pairs = [(b, ub) for b in batches for ub in ubatches if ub <= b]
            if pairs:
                b, ub = max(pairs, key=lambda bu: tuner.measure("pp", replace(best, n_batch=bu[0], n_ubatch=bu[1])))
                best = replace(best, n_batch=b, n_ubatch=ub)
        result = {"pp": tuner.measure("pp", best), "tg": tuner.measure("tg", best)}
    finally:
        tuner.close()
    return best, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyllama bench tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt length of the pp test (default 512)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="tokens of the tg test (default 128)")
    ap.add_argument("-d", "--n-depth", type=int, default=0, help="tokens already in the KV cache (default 0)")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1)
    ap.add_argument("-t", "--threads", default=None, help="candidates, llama-bench syntax (default: 1, powers of 2, "
                    "physical and logical cores)")
    ap.add_argument("-b", "--batch-size", default="512,2048")
    ap.add_argument("-ub", "--ubatch-size", default="128,256,512")
    ap.add_argument("-fa", "--flash-attn", default="on,off")
    ap.add_argument("--kv", default="f16,q8_0", help="KV cache types tried for K and V together (default f16,q8_0)")
    ap.add_argument("--passes", type=int, default=2, help="rounds of the coordinate search (default 2)")
    args = ap.parse_args(argv)
    try:
        threads = parse_int_range(args.threads) if args.threads else _default_threads()
        fa_map = {"on": FLASH_ATTN_ON, "off": FLASH_ATTN_OFF, "auto": FLASH_ATTN_AUTO}
        flash = [fa_map[x] for x in args.flash_attn.split(",")]
        kv_types = args.kv.split(",")
        if any(t not in CACHE_TYPES for t in kv_types):
            raise UsageError(f"--kv: expected types among {', '.join(CACHE_TYPES)}")
        best, res = tune(args.model, threads=threads, batches=parse_int_range(args.batch_size),
                         ubatches=parse_int_range(args.ubatch_size), flash=flash,
                         kv=[(t, t) for t in kv_types], n_prompt=args.n_prompt, n_gen=args.n_gen,
                         depth=args.n_depth, reps=args.repetitions, n_gpu_layers=args.n_gpu_layers,
                         passes=max(1, args.passes))
    except (UsageError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    d = f" @ d{args.n_depth}" if args.n_depth else ""
    print(f"fastest prompt processing (pp{args.n_prompt}{d}): {res['pp']:.2f} t/s with {best.bench_flags('pp')}")
    print(f"fastest generation        (tg{args.n_gen}{d}): {res['tg']:.2f} t/s with {best.bench_flags('tg')}")
    print(f"pyllama: model.context({best.context_kwargs()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
