"""``python -m pyllama.benchmark ARGS``: the same as ``pyllama bench ARGS``."""

import sys

from .cli import main

sys.exit(main())
