"""pyllama in a child process: crashes, aborts and OOM kills stay there.

See :class:`Worker`. The child is ``python -m pyllama.worker.child``; the
channel is a pair of pipes carrying length-prefixed pickle frames
(:mod:`pyllama.worker.protocol`).
"""

from .client import Worker, WorkerChatSession, WorkerGeneration
from .errors import WorkerCrashedError, WorkerError

__all__ = ["Worker", "WorkerGeneration", "WorkerChatSession", "WorkerError", "WorkerCrashedError"]
