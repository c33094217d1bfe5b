"""Parallel sequences: pyllama.generate_parallel against llama.cpp's llama-batched-bench, interleaved.

llama-batched-bench prefills PL prompts of PP tokens in shared batches, then
decodes TG steps of one token per sequence, never sampling (it feeds random
tokens). pyllama.generate_parallel does the same shape of work and more: it
samples every row (greedy, argmax over the logits view) and detokenizes; the
end of generation is ignored (``ignore_eos``) so every sequence runs TG tokens.
Both on the same model, context size, threads and flash-attention setting.
The figure compared is llama-batched-bench's: generated tokens over the whole
time (prefill included), and the ratio per interleaved pair.

    python bench/native.py     # builds llama-batched-bench
    python bench/parallel.py [-m MODEL] [-t 2] [--pp 32] [--tg 64] [--pl 4,8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyllama  # noqa: E402

from native import native_tool  # noqa: E402


def native(model: str, t: int, c: int, pp: int, tg: int, pl: int) -> float:
    cmd = [str(native_tool("llama-batched-bench")), "-m", model, "-c", str(c), "-t", str(t), "-tb", str(t),
           "-npp", str(pp), "-ntg", str(tg), "-npl", str(pl), "--output-format", "jsonl", "-fa", "auto"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed:\n{r.stderr[-3000:]}")
    for line in (r.stdout + r.stderr).splitlines():
        line = line[line.find("{"):] if "{" in line else ""
        if line.startswith('{"n_kv_max"'):
            row = json.loads(line)
            return float(row["pl"] * row["tg"] / row["t"])
    raise SystemExit(f"no jsonl row from llama-batched-bench:\n{r.stdout[-2000:]}")


def ours(ctx: pyllama.Context, prompts: list[np.ndarray], tg: int) -> float:
    t0 = time.perf_counter()
    res = pyllama.generate_parallel_tokens(ctx, prompts, max_tokens=tg, ignore_eos=True)
    dt = time.perf_counter() - t0
    assert all(len(r.tokens) == tg for r in res)
    return len(prompts) * tg / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF path (default: the starter)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("--pp", type=int, default=32)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--pl", default="4,8")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    path = args.model or str(pyllama.starter_model_path())
    pls = [int(x) for x in args.pl.split(",")]
    rng = np.random.default_rng(0)
    print(f"{path}: {args.threads} threads, -c {args.ctx_size}, pp {args.pp}, tg {args.tg}, {args.rounds} interleaved "
          "pairs; generated tokens / total time, median [min-max]")
    with pyllama.Model(path) as model:
        n_vocab = model.vocab.n_tokens
        for pl in pls:
            with model.context(n_ctx=args.ctx_size, n_seq_max=pl, n_threads=args.threads,
                               n_threads_batch=args.threads, flash_attn="auto") as ctx:
                prompts = [rng.integers(0, n_vocab, size=args.pp, dtype=np.int32) for _ in range(pl)]
                ours(ctx, prompts, 4)
                native(path, args.threads, args.ctx_size, args.pp, 4, pl)  # warm-up
                a: list[float] = []
                b: list[float] = []
                for _ in range(args.rounds):
                    a.append(native(path, args.threads, args.ctx_size, args.pp, args.tg, pl))
                    b.append(ours(ctx, prompts, args.tg))
                ratios = [y / x for x, y in zip(a, b)]
                print(f"  pl {pl}: llama-batched-bench {statistics.median(a):7.2f} [{min(a):.2f}-{max(a):.2f}]  "
                      f"generate_parallel {statistics.median(b):7.2f} [{min(b):.2f}-{max(b):.2f}]  "
                      f"ratio {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
