"""Greedy end-to-end generation: pyllama.generate against llama-simple's loop in C, interleaved.

The C loop is ``pyllama_c_generate_loop`` in the binding: llama-simple's loop
(``llama_sampler_sample`` with a greedy chain, then ``llama_decode`` of the
token) compiled from the same tree, in the same process, on the same context,
threads and flash-attention setting. pyllama.generate takes the fused C step
with argmax on the logits (llama.cpp's greedy choice without its
vocabulary-sized candidate array). Each pair runs both on a cleared KV cache
from the same prompt; the token ids must be identical.

    python bench/greedy.py [-m MODEL] [-t 2] [-n 128] [--pairs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import pyllama
from pyllama._ffi import ffi, lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF path or reference (default: the starter)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("-p", "--prompt", default="The history of the printing press begins")
    args = ap.parse_args()
    path = args.model or str(pyllama.starter_model_path())
    n = args.n_predict
    with pyllama.Model(path) as model, model.context(n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                                                     flash_attn="auto") as ctx:
        prompt = model.tokenize(args.prompt)
        chain = pyllama.SamplerChain([pyllama.Greedy()], model)
        out = np.empty(n, dtype=np.int32)

        # Both timed regions decode the prompt's last token, then generate n tokens.
        head, last = prompt[:-1], prompt[-1:]
        batch = pyllama.Batch.from_tokens(last, int(head.size), 0)

        def native() -> tuple[float, np.ndarray]:
            ctx.kv.clear()
            ctx.evaluate(head, reuse_prefix=False)
            t = time.perf_counter()
            ctx.decode(batch)
            got = lib.pyllama_c_generate_loop(ctx._p(), chain._p(), int(prompt.size), n, ffi.from_buffer("llama_token[]", out))
            dt = time.perf_counter() - t
            assert got == n
            return n / dt, out.copy()

        def ours() -> tuple[float, np.ndarray]:
            ctx.kv.clear()
            ctx.evaluate(head, reuse_prefix=False)
            t = time.perf_counter()
            with pyllama.generate(ctx, prompt, max_tokens=n, ignore_eos=False) as gen:
                for _ in gen:
                    pass
            dt = time.perf_counter() - t
            return gen.n_generated / dt, gen.tokens.copy()

        native(), ours()  # warm-up
        ratios, rn, rp = [], [], []
        for i in range(args.pairs):
            a, ta = native()
            b, tb = ours()
            m = min(len(ta), len(tb))
            assert np.array_equal(ta[:m], tb[:m]), f"pair {i}: token ids differ"
            rn.append(a)
            rp.append(b)
            ratios.append(b / a)
        chain.close()
    print(f"model {path}, {args.threads} threads, {n} tokens, {args.pairs} interleaved pairs (native, pyllama)")
    print(f"native C loop   {statistics.median(rn):7.2f} t/s  [{min(rn):.2f}-{max(rn):.2f}]")
    print(f"pyllama.generate {statistics.median(rp):7.2f} t/s  [{min(rp):.2f}-{max(rp):.2f}]")
    print(f"pyllama/native  {statistics.median(ratios):.3f}  [{min(ratios):.3f}-{max(ratios):.3f}]  (token ids identical)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
