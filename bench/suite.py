"""The standard suite, for adding a machine to bench/results/.

    python bench/suite.py [--native] [--label NAME] [-m EXTRA.gguf ...] [-r 5] [-t THREADS]

Runs, through pyllama (and with ``--native`` also through llama.cpp's own
llama-bench, interleaved), on the starter model and on every model given:

    pp512, tg128 and pp512+tg128, each at depth 0 and at depth 4096

with every layer offloaded (``-ngl -1``, llama-bench's default) on whatever
accelerator this pyllama was built for, prints llama-bench's Markdown table and
appends every record to ``bench/results/<label>.jsonl`` (``<label>``: the host
name unless ``--label`` is given). Then ``python bench/render.py`` refreshes the
merged table. Any other llama-bench option is passed through (e.g. ``-fa on``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("-m", "--model", action="append", default=[], help="another model (repeatable)")
    ap.add_argument("--no-starter", action="store_true", help="leave the starter model out")
    ap.add_argument("--label", default=None, help="machine label and results file name (default: host name)")
    ap.add_argument("--native", action="store_true", help="also run llama.cpp's llama-bench, interleaved")
    ap.add_argument("-r", "--repetitions", default="5")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args, passthrough = ap.parse_known_args(argv)

    from pyllama.benchmark import env
    from pyllama.benchmark import main as bench_main

    models = list(args.model)
    if not args.no_starter:
        import pyllama

        models.insert(0, str(pyllama.starter_model_path()))
    if not models:
        ap.error("no model: give -m or drop --no-starter")
    label = args.label or env.default_label()
    out = args.results / f"{label}.jsonl"
    bench_args = ["-m", ",".join(models), "-p", "512", "-n", "128", "-pg", "512,128", "-d", "0,4096",
                  "-r", args.repetitions, "--label", label, "--save", str(out), "--progress", *passthrough]
    if args.native:
        bench_args.append("--native")
    print("pyllama bench " + " ".join(bench_args), file=sys.stderr, flush=True)
    rc = bench_main(bench_args)
    if rc == 0:
        print(f"\nrecords appended to {out}; refresh the table with: python bench/render.py", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
