"""Run pyllama's llama-bench-compatible benchmark from a checkout.

    python bench/run.py -m model.gguf -p 512 -n 128 -r 5 [--native] [-o json]

The same as ``pyllama bench ARGS`` and ``python -m pyllama.benchmark ARGS``
(pyllama must be installed, e.g. ``pip install -e .``); see bench/README.md.
"""

from __future__ import annotations

import sys

try:
    from pyllama.benchmark import main
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"bench/run.py needs pyllama installed (pip install -e .): {exc}")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
