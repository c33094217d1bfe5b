"""Greedy decoding with the sampler on the host vs inside the compute graph (llama.cpp's backend sampling).

Three ways to take the greedy token after each ``llama_decode``, in the C loop
of the binding (llama-simple's loop) or its argmax variant, on contexts of
the same model, threads and flash-attention setting, interleaved:

    host     llama_sampler_sample with a greedy chain (a vocabulary-sized candidate array per token)
    argmax   pyllama's SIMD argmax over the logits view (what pyllama.generate does for greedy)
    backend  the greedy chain attached with llama_set_sampler: the graph ends in the sampler's ops
             and llama_sampler_sample returns the token the backend picked

Per token it reports the decode time (llama_perf_context: t_eval / n_eval), the
sampling time (the rest), how many graphs llama.cpp reused, and the tokens
must be identical across the three.

    python bench/backend_sampling.py [-m MODEL] [-t 2] [-n 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

import pyllama
from pyllama._ffi import ffi, lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF path (default: the starter)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-p", "--prompt", default="The history of the printing press begins")
    args = ap.parse_args()
    path = args.model or str(pyllama.starter_model_path())
    n = args.n_predict
    model = pyllama.Model(path)
    cp: dict[str, Any] = dict(n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, flash_attn="auto")
    contexts = {name: model.context(**cp) for name in ("host", "argmax", "backend")}
    chains = {name: pyllama.SamplerChain([pyllama.Greedy()], model) for name in contexts}
    attached = lib.llama_set_sampler(contexts["backend"]._p(), 0, chains["backend"]._p())
    if not attached:
        raise SystemExit("llama_set_sampler refused the greedy chain on this backend")
    prompt = model.tokenize(args.prompt)
    out = np.empty(n, dtype=np.int32)

    def run(name: str) -> tuple[float, float, int, np.ndarray]:
        ctx, chain = contexts[name], chains[name]
        ctx.kv.clear()
        ctx.evaluate(prompt[:-1], reuse_prefix=False, logits="none")
        lib.llama_perf_context_reset(ctx._p())
        batch = pyllama.Batch.from_tokens(prompt[-1:], int(prompt.size) - 1, 0)
        t = time.perf_counter()
        ctx.decode(batch)
        if name == "argmax":
            got = lib.pyllama_c_generate_loop(ctx._p(), ffi.NULL, int(prompt.size), n,
                                              ffi.from_buffer("llama_token[]", out))
        else:
            got = lib.pyllama_c_generate_loop(ctx._p(), chain._p(), int(prompt.size), n,
                                              ffi.from_buffer("llama_token[]", out))
        dt = time.perf_counter() - t
        assert got == n, got
        perf = lib.llama_perf_context(ctx._p())
        t_decode = perf.t_eval_ms / max(perf.n_eval, 1) / 1e3
        return dt / n, t_decode, int(perf.n_reused), out.copy()

    for name in contexts:  # warm-up
        run(name)
    per_token: dict[str, list[float]] = {k: [] for k in contexts}
    decode: dict[str, list[float]] = {k: [] for k in contexts}
    reused: dict[str, int] = {}
    tokens: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name in contexts:
            tok, dec, r, ids = run(name)
            per_token[name].append(tok)
            decode[name].append(dec)
            reused[name] = r
            tokens[name] = ids
    same = all(np.array_equal(tokens["host"], tokens[k]) for k in tokens)
    print(f"{path}: {args.threads} threads, {n} tokens, {args.rounds} interleaved rounds; per token, median [min-max]")
    for name in contexts:
        pt, dc = statistics.median(per_token[name]) * 1e6, statistics.median(decode[name]) * 1e6
        print(f"  {name:8s} total {pt:8.1f} us [{min(per_token[name]) * 1e6:.1f}-{max(per_token[name]) * 1e6:.1f}]"
              f"  decode {dc:8.1f} us  sampling+loop {pt - dc:7.1f} us  graphs reused {reused[name]}/{n}"
              f"  {1e6 / pt:6.2f} t/s")
    print(f"  tokens identical: {same}")
    for c in chains.values():
        c.close()
    for ctx in contexts.values():
        ctx.close()
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
