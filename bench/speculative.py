"""Speculative decoding: pyllama against llama.cpp's own programs, interleaved, on a copy-this-text task.

Arms, each run once per round in this order (greedy, the same prompt text,
threads, context size and flash-attention setting everywhere):

    plain      pyllama.generate without a draft (the baseline)
    lookup     pyllama.generate(draft=Speculator(ctx, "ngram", n_max=D))
    llama-lookup                 examples/lookup from the same tree (--spec-draft-n-max D)
and with ``--target`` (a larger model of the starter's vocabulary: ``--make-target f16`` writes
the starter converted to F16 through llama_model_quantize; a Q8_0 copy decodes faster than the
Q4_K_M starter on AVX-512 CPUs, so it gains nothing from a draft), the starter as the draft model:
    target     pyllama.generate on the target, no draft
    draft      pyllama.generate(draft=Speculator(ctx, <starter>, n_max=D))
    llama-speculative-simple     -m TARGET -md STARTER --spec-draft-n-max D

Rates are decode rates as the llama.cpp programs print them: generated tokens
over the time after the prompt's evaluation. pyllama's text must equal what the
native program printed (greedy decoding is deterministic); the table says so.

    python bench/native.py                          # builds llama-lookup, llama-speculative-simple
    python bench/speculative.py [-t 2] [-n 256] [-d 8] [--rounds 5] [--make-target f16]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyllama  # noqa: E402
from pyllama._ffi import ffi, lib  # noqa: E402

from native import native_tool  # noqa: E402

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He carried a small tin of oil, "
    "a clean rag and a notebook in which he wrote the direction of the wind, the height of the waves and the "
    "names of the ships that passed. In forty years he had missed only one evening, the night his daughter was "
    "born, and even then he had asked his neighbour to light the lamp. The ships never knew his name, but every "
    "captain on that coast knew the steady white light that turned above the rocks, and they trusted it more "
    "than any chart. When the lamp was finally replaced by an automatic beacon, the keeper kept his notebook, "
    "and on windy evenings he still walked to the window to see whether the light was turning."
)
INSTRUCTION = "Repeat the following text exactly, word for word, and nothing else:\n\n"

_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
_ACCEPT = re.compile(r"n_accept\s*=\s*(\d+)")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")


def chat_prompt(model: pyllama.Model) -> str:
    fmt = pyllama.ChatFormat(model)
    return fmt.apply([{"role": "user", "content": INSTRUCTION + TEXT}], add_generation_prompt=True).prompt


def quantize(src: Path, dst: Path, ftype: str) -> Path:
    if dst.exists():
        return dst
    p = lib.llama_model_quantize_default_params()
    p.ftype = {"q8_0": lib.LLAMA_FTYPE_MOSTLY_Q8_0, "f16": lib.LLAMA_FTYPE_MOSTLY_F16}[ftype]
    p.allow_requantize = True
    p.nthread = 2
    tmp = dst.with_suffix(".tmp")
    rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ffi.new("llama_model_quantize_params *", p))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    tmp.rename(dst)
    return dst


def _native_args(threads: int, n_ctx: int, n_predict: int, draft_max: int) -> list[str]:
    # pyllama's settings: greedy, the same threads, context and draft size
    t = str(threads)
    return ["-t", t, "-tb", t, "-c", str(n_ctx), "-n", str(n_predict), "--temp", "0", "--seed", "1",
            "--spec-draft-n-max", str(draft_max)]


def lookup_command(model: Path, prompt_file: Path, threads: int, n_ctx: int, n_predict: int,
                   draft_max: int) -> list[str]:
    """llama-lookup on ``prompt_file`` with pyllama's settings."""
    return [str(native_tool("llama-lookup")), "-m", str(model), "-f", str(prompt_file),
            *_native_args(threads, n_ctx, n_predict, draft_max)]


def speculative_simple_command(target: Path, draft: Path, prompt_file: Path, threads: int, n_ctx: int,
                               n_predict: int, draft_max: int) -> list[str]:
    """llama-speculative-simple (``draft`` drafting for ``target``) on ``prompt_file`` with pyllama's settings."""
    t = str(threads)
    return [str(native_tool("llama-speculative-simple")), "-m", str(target), "-md", str(draft),
            "--spec-type", "draft-simple", "-td", t, "-tbd", t, "-f", str(prompt_file),
            *_native_args(threads, n_ctx, n_predict, draft_max)]


def same_text(pyllama_text: str, native_output: str) -> bool:
    """Whether a llama.cpp program printed pyllama's text (it echoes the prompt and may run a token longer)."""
    return pyllama_text.strip()[:200] in native_output


def run_native(cmd: list[str]) -> dict[str, Any]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    log = r.stdout + r.stderr
    m = _DECODED.search(log)
    if m is None:
        raise SystemExit(f"no 'decoded ... t/s' line from {cmd[0]}:\n{log[-3000:]}")
    acc, dra = _ACCEPT.search(log), _DRAFTED.search(log)
    return {"n": int(m.group(1)), "seconds": float(m.group(2)), "tps": float(m.group(3)), "text": r.stdout,
            "drafted": int(dra.group(1)) if dra else None, "accepted": int(acc.group(1)) if acc else None}


def run_pyllama(ctx: pyllama.Context, prompt: str, n: int, draft: pyllama.Speculator | None) -> dict[str, Any]:
    ctx.kv.clear()
    t_first = None
    with pyllama.generate(ctx, prompt, max_tokens=n, draft=draft, reuse_prefix=False) as gen:
        for ev in gen:
            if t_first is None:  # the prompt is evaluated and the first token sampled: decoding starts
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    assert t_first is not None
    st = gen.speculative
    return {"n": gen.n_generated, "seconds": t_end - t_first, "tps": (gen.n_generated - 1) / (t_end - t_first),
            "text": gen.text, "drafted": st.n_drafted if st else None, "accepted": st.n_accepted if st else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="the model (default: the starter); the draft with --target")
    ap.add_argument("--target", default=None, help="a larger target model for the draft-model arms")
    ap.add_argument("--make-target", choices=["q8_0", "f16"], default=None,
                    help="write the starter requantised to this type and use it as --target")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=256)
    ap.add_argument("-d", "--draft-max", type=int, default=8)
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the per-round results here")
    args = ap.parse_args()
    small = Path(args.model) if args.model else pyllama.starter_model_path()
    target = Path(args.target) if args.target else None
    if args.make_target:
        target = quantize(small, Path(tempfile.gettempdir()) / f"pyllama-spec-target-{args.make_target}.gguf",
                          args.make_target)
    t, n, d, c = args.threads, args.n_predict, args.draft_max, args.ctx_size
    results: dict[str, list[dict[str, Any]]] = {}
    arms: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    keep: list[Any] = []

    cp = dict(n_ctx=c, n_threads=t, n_threads_batch=t, flash_attn="auto")
    model = pyllama.Model(small)
    ctx = model.context(**cp)
    keep += [model, ctx]
    prompt = chat_prompt(model)
    pfile = Path(tempfile.mkstemp(prefix="pyllama-spec-", suffix=".txt")[1])
    pfile.write_text(prompt)
    lookup = pyllama.Speculator(ctx, "ngram", n_max=d)
    # llama-lookup generates one token past -n: pyllama generates as many
    arms += [("plain", lambda: run_pyllama(ctx, prompt, n + 1, None)),
             ("lookup", lambda: run_pyllama(ctx, prompt, n + 1, lookup)),
             ("llama-lookup", lambda: run_native(lookup_command(small, pfile, t, c, n, d)))]
    if target is not None:
        tmodel = pyllama.Model(target)
        tctx = tmodel.context(**cp)
        keep += [tmodel, tctx]
        dspec = pyllama.Speculator(tctx, model, n_max=d)
        arms += [("target", lambda: run_pyllama(tctx, prompt, n + 1, None)),
                 ("draft", lambda: run_pyllama(tctx, prompt, n + 1, dspec)),
                 ("llama-speculative-simple", lambda: run_native(
                     speculative_simple_command(target, small, pfile, t, c, n, d)))]
    for name, fn in arms:  # warm-up: page cache, first-use allocations
        fn()
    for _ in range(args.rounds):
        for name, fn in arms:
            results.setdefault(name, []).append(fn())

    def med(name: str) -> float:
        return statistics.median(r["tps"] for r in results[name])

    print(f"copy-this-text, {small.name}" + (f" (target {target.name})" if target else "")
          + f", {t} threads, -n {n}, draft max {d}, {args.rounds} interleaved rounds; decode t/s median [min-max]")
    for name, rs in results.items():
        tps = [r["tps"] for r in rs]
        line = f"  {name:26s} {statistics.median(tps):8.2f}  [{min(tps):.2f}-{max(tps):.2f}]  {rs[-1]['n']} tokens"
        if rs[-1]["drafted"]:
            line += f"  accepted {rs[-1]['accepted']}/{rs[-1]['drafted']} ({rs[-1]['accepted'] / rs[-1]['drafted']:.1%})"
        print(line)

    def same(py: str, nat: str) -> bool:
        return same_text(results[py][-1]["text"], results[nat][-1]["text"])

    print(f"  lookup / plain              {med('lookup') / med('plain'):.3f}")
    print(f"  lookup / llama-lookup       {med('lookup') / med('llama-lookup'):.3f}"
          f"  (same text: {'yes' if same('lookup', 'llama-lookup') else 'NO'})")
    if target is not None:
        print(f"  draft / target              {med('draft') / med('target'):.3f}")
        print(f"  draft / llama-speculative-simple {med('draft') / med('llama-speculative-simple'):.3f}"
              f"  (same text: {'yes' if same('draft', 'llama-speculative-simple') else 'NO'})")
    same_plain = results["plain"][-1]["text"] == results["lookup"][-1]["text"]
    print(f"  pyllama lookup text == plain text: {same_plain}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: [{kk: vv for kk, vv in r.items() if kk != "text"} for r in v]
                                               for k, v in results.items()}, indent=1))
    for obj in reversed(keep):
        obj.close()
    pfile.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
