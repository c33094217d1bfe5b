"""Find the fastest threads / batch / micro-batch / flash-attention / KV-type settings for a model.

    python bench/tune.py -m model.gguf [-ngl 99] [-p 512] [-n 128] [-d 0] [-r 3]

The same as ``python -m pyllama.benchmark.tune``; see its docstring and bench/README.md.
"""

from __future__ import annotations

import sys

try:
    from pyllama.benchmark.tune import main
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"bench/tune.py needs pyllama installed (pip install -e .): {exc}")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
