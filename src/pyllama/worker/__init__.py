"""pyllama in a child process: crashes, aborts and OOM kills stay there.

See :class:`Worker`. The child is ``python -m pyllama.worker.child``; the
channel is a pair of pipes carrying length-prefixed pickle frames
(:mod:`pyllama.worker.protocol`). :class:`IsolatedEngine` runs the serving
engine there (``pyllama serve --isolate``).
"""

from .client import Worker, WorkerChatSession, WorkerGeneration
from .engine import IsolatedEngine, IsolatedRequest
from .errors import WorkerCrashedError, WorkerError, WorkerMemoryError

__all__ = ["Worker", "WorkerGeneration", "WorkerChatSession", "WorkerError", "WorkerCrashedError", "WorkerMemoryError",
           "IsolatedEngine", "IsolatedRequest"]
