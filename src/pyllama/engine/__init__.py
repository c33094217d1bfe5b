"""The serving engine: continuous batching of concurrent requests over one model (no HTTP here).

::

    with pyllama.Model(path) as model, Engine(model, n_slots=4) as engine:
        req = engine.submit("Once upon a time", max_tokens=64)
        for ev in req:               # or: async for ev in req
            print(ev.text, end="")
"""

from .core import ContextFull, Engine, EngineStats
from .request import EngineBusyError, EngineRequest, PromptProgress
from .slots import Slot, SlotFile

__all__ = ["Engine", "EngineStats", "EngineRequest", "EngineBusyError", "ContextFull", "PromptProgress", "Slot", "SlotFile"]
