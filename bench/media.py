"""Image encode and prefill: pyllama against llama-mtmd-cli, interleaved, on the same synthetic files.

A synthetic LLaVA-style projector (tests/synth.py: a CLIP ViT of ``--layers`` blocks of width ``--width``,
224-pixel images in 14-pixel patches: 256 embeddings) beside the synthetic text model; one image, the
prompt llama-mtmd-cli renders for ``-p describe``. Per round, in this order:

    pyllama        Projector.tokenize (image decode and preprocessing), MediaPrompt.encode (the tower),
                   then the image's decode (the 256 embeddings through libmtmd's decode helper)
    llama-mtmd-cli the same files, its own timings: "mtmd batch encoding done in" and "image decoded in"

Both run the tower with ``-t`` threads. The figures are milliseconds per image (medians over the rounds,
with their spread); the ratio is llama-mtmd-cli's time over pyllama's (above 1: pyllama faster). The
answers must agree: pyllama's greedy text is checked against llama-mtmd-cli's.

    python bench/native.py           # builds llama-mtmd-cli
    python bench/media.py [-t 2] [--rounds 5] [--width 256] [--layers 6]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import pyllama  # noqa: E402
import synth  # noqa: E402

from native import native_tool  # noqa: E402

_ENCODE = re.compile(r"mtmd batch encoding done in (\d+) ms")
_DECODE = re.compile(r"image decoded \(batch 1/1\) in (\d+) ms")
BEFORE, AFTER = "<|im_start|>user\n", "describe<|im_end|>\n<|im_start|>assistant\n"


def native_run(tool: Path, text: Path, proj: Path, image: Path, threads: int, n: int) -> tuple[float, float, str]:
    """(encode ms, decode ms, generated text) of one llama-mtmd-cli run (repeated until its log is whole: its
    log thread is never joined, so a run can exit before printing)."""
    cmd = [str(tool), "-lv", "4", "-m", str(text), "--mmproj", str(proj), "--image", str(image), "-p", "describe",
           "-n", str(n), "--temp", "0", "-c", "2048", "-t", str(threads), "--no-warmup"]
    for _ in range(20):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        enc, dec = _ENCODE.search(out.stderr), _DECODE.search(out.stderr)
        if enc and dec and "total time" in out.stderr:
            return float(enc.group(1)), float(dec.group(1)), out.stdout.strip("\n")
    raise RuntimeError("llama-mtmd-cli never printed a whole run")


def pyllama_run(model: pyllama.Model, ctx: pyllama.Context, image: Path, n: int) -> tuple[float, float, float, str]:
    """(preprocess ms, encode ms, image decode ms, generated text) of one image prompt."""
    proj = model.mmproj
    assert proj is not None
    t0 = time.perf_counter()
    mp = proj.tokenize([BEFORE, pyllama.Image(image), AFTER])
    t1 = time.perf_counter()
    mp.encode()
    t2 = time.perf_counter()
    with mp, pyllama.generate(ctx, mp, max_tokens=n, reuse_prefix=False) as gen:
        text = "".join(ev.text for ev in gen)
        decode = mp.decode_ms
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, decode, text


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--width", type=int, default=256, help="the vision tower's width")
    ap.add_argument("--layers", type=int, default=6, help="the vision tower's blocks")
    ap.add_argument("-n", type=int, default=8, help="tokens generated (the answers are compared)")
    args = ap.parse_args(argv)
    tool = native_tool("llama-mtmd-cli")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        text = synth.write_llama_model(d / "text.gguf")
        proj = synth.write_projector(d / "proj.gguf", image_size=224, patch_size=14, n_embd=args.width,
                                     n_ff=4 * args.width, n_layer=args.layers)
        image = synth.write_image(d / "image.png", width=224, height=224, seed=4)
        enc_n, dec_n, enc_p, pre_p, prep_p = [], [], [], [], []
        with pyllama.Model(text, n_gpu_layers=0) as model:
            model.projector(proj, n_threads=args.threads)
            with model.context(n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads) as ctx:
                pyllama_run(model, ctx, image, 1)  # the first encode allocates the tower's buffers
                for r in range(args.rounds):
                    prep, enc, pre, ours = pyllama_run(model, ctx, image, args.n)
                    e, dd, theirs = native_run(tool, text, proj, image, args.threads, args.n)
                    if ours != theirs:
                        raise SystemExit(f"round {r}: the answers differ: pyllama {ours!r}, llama-mtmd-cli {theirs!r}")
                    prep_p.append(prep)
                    enc_p.append(enc)
                    pre_p.append(pre)
                    enc_n.append(e)
                    dec_n.append(dd)
    n_embd = (224 // 14) ** 2
    print(f"image 224x224 -> {n_embd} embeddings; tower {args.layers} blocks of width {args.width}; "
          f"{args.threads} threads; {args.rounds} rounds interleaved; answers identical")
    print(f"{'ms per image (median, range)':32} {'pyllama':>24} {'llama-mtmd-cli':>24} {'ratio':>7}")
    print(f"{'tower (encode)':32} {spread(enc_p):>24} {spread(enc_n):>24} "
          f"{statistics.median(enc_n) / statistics.median(enc_p):7.2f}")
    print(f"{'image decode (embeddings)':32} {spread(pre_p):>24} {spread(dec_n):>24} "
          f"{statistics.median(dec_n) / statistics.median(pre_p):7.2f}")
    print(f"{'(pyllama: decode + preprocess)':32} {spread(prep_p):>24}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
