"""pyllama: llama.cpp from Python at native speed.

Quick start::

    import pyllama

    with pyllama.Model("model.gguf") as model, model.context() as ctx:
        for event in pyllama.generate(ctx, "The capital of France is", max_tokens=16):
            print(event.text, end="", flush=True)
"""

import sys as _sys
import types as _types
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import (
    BusyError,
    ClosedError,
    ContextCreationError,
    ContextOverflowError,
    DecodeAbortedError,
    DecodeError,
    InvalidBatchError,
    KVCacheFullError,
    LlamaError,
    ModelLoadError,
    SamplerError,
    StateError,
    TemplateError,
    TokenizationError,
)
from .options import GenerateOptions, SamplingOptions, SubmitOptions

# Every name but the errors and the option types loads on first use (PEP 562), so `import pyllama` costs
# neither llama.cpp's libraries nor numpy until a model is opened: `pyllama --help` and an app that only
# imports the package start fast. Each name -> its module.
_LAZY = {
    "build_info": "_ffi",
    **dict.fromkeys(("Device", "UnavailableBackend", "backends", "devices", "supports_gpu_offload", "system_info",
                     "unavailable_backends"), "devices"),
    "Batch": "batch",
    **dict.fromkeys(("Context", "PerfContext"), "context"),
    "StreamDecoder": "detokenize",
    "embed": "embed",
    "rerank": "rerank",
    **dict.fromkeys(("InfillFile", "infill_tokens"), "infill"),
    **dict.fromkeys(("DeviceMemory", "Fit", "fit_params", "memory_projection"), "fit"),
    **dict.fromkeys(("Generation", "TokenEvent", "agenerate", "generate", "generate_text"), "generate"),
    "KVCache": "kv",
    "Model": "model",
    **dict.fromkeys(("SpeculativeStats", "Speculator"), "speculative"),
    **dict.fromkeys(("DRY", "XTC", "AdaptiveP", "Dist", "Greedy", "Grammar", "Infill", "LogitBias", "MinP",
                     "Mirostat", "MirostatV2", "Penalties", "Sampler", "Temp", "TempExt", "TopK", "TopNSigma",
                     "TopP", "Typical", "default_chain"), "samplers"),
    **dict.fromkeys(("Candidates", "CustomSampler", "SamplerChain"), "sampling"),
    "Vocab": "vocab",
    **dict.fromkeys(("ChatFormat", "ChatPrompt", "ChatSession", "apply_template"), "chat"),
    **dict.fromkeys(("Engine", "EngineStats"), "engine"),
    **dict.fromkeys(("PrefilledGrammar", "json_schema_to_grammar"), "grammar"),
    "LoraAdapter": "lora",
    **dict.fromkeys(("Audio", "Image", "Media", "MediaError", "MediaPrompt", "Projector"), "media"),
    **dict.fromkeys(("SequenceResult", "generate_parallel", "generate_parallel_tokens"), "parallel"),
    **dict.fromkeys(("RpcError", "RpcServer", "rpc_server"), "rpc"),
    **dict.fromkeys(("starter_model_path", "chat_starter_path"), "starter"),
    **dict.fromkeys(("pull", "DownloadProgress", "DownloadError", "ChecksumError", "NotCachedError"), "store"),
    "Threadpool": "threadpool",
    **dict.fromkeys(("Worker", "WorkerGeneration", "WorkerChatSession", "WorkerError", "WorkerCrashedError",
                     "WorkerMemoryError"),
                    "worker"),
}
# Submodules that `import pyllama` loaded before they became lazy: `pyllama.store.pull(...)` still works.
_LAZY_MODULES = frozenset(_LAZY.values())

if TYPE_CHECKING:
    from ._ffi import build_info
    from .batch import Batch
    from .context import Context, PerfContext
    from .detokenize import StreamDecoder
    from .devices import (Device, UnavailableBackend, backends, devices, supports_gpu_offload, system_info,
                          unavailable_backends)
    from .embed import embed
    from .fit import DeviceMemory, Fit, fit_params, memory_projection
    from .generate import Generation, TokenEvent, agenerate, generate, generate_text
    from .kv import KVCache
    from .model import Model
    from .rerank import rerank
    from .infill import InfillFile, infill_tokens
    from .samplers import (DRY, XTC, AdaptiveP, Dist, Greedy, Grammar, Infill, LogitBias, MinP, Mirostat, MirostatV2,
                           Penalties, Sampler, Temp, TempExt, TopK, TopNSigma, TopP, Typical, default_chain)
    from .sampling import Candidates, CustomSampler, SamplerChain
    from .speculative import SpeculativeStats, Speculator
    from .vocab import Vocab
    from .chat import ChatFormat, ChatPrompt, ChatSession, apply_template
    from .engine import Engine, EngineStats
    from .grammar import PrefilledGrammar, json_schema_to_grammar
    from .lora import LoraAdapter
    from .media import Audio, Image, Media, MediaError, MediaPrompt, Projector
    from .parallel import SequenceResult, generate_parallel, generate_parallel_tokens
    from .rpc import RpcError, RpcServer, rpc_server
    from .starter import chat_starter_path, starter_model_path
    from .store import ChecksumError, DownloadError, DownloadProgress, NotCachedError, pull
    from .threadpool import Threadpool
    from .worker import Worker, WorkerChatSession, WorkerCrashedError, WorkerError, WorkerGeneration, WorkerMemoryError
else:  # hidden from type checkers, so that a misspelt pyllama.X stays an error there

    def __getattr__(name: str) -> object:
        import importlib
        import importlib.util

        module = _LAZY.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
            globals()[name] = value  # once: later lookups do not come here
            return value
        if name in _LAZY_MODULES or (not name.startswith("__")
                                     and importlib.util.find_spec(f"{__name__}.{name}") is not None):
            return importlib.import_module(f"{__name__}.{name}")  # pyllama.fit, pyllama.store, ...
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(_types.ModuleType):
    """pyllama's module type: ``generate``, ``devices``, ``embed`` and ``rerank`` are functions named like the
    modules that hold them. Python binds a submodule to its package's attribute when it is imported (by
    the engine, say), which would put the module where the function belongs; this keeps the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, _types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "__version__", "build_info", "devices", "backends", "system_info", "supports_gpu_offload", "Device",
    "unavailable_backends", "UnavailableBackend",
    "Model", "Vocab", "Context", "PerfContext", "Batch", "KVCache", "LoraAdapter", "StreamDecoder",
    "Projector", "Image", "Audio", "Media", "MediaPrompt", "MediaError",
    "generate", "generate_text", "agenerate", "Generation", "TokenEvent",
    "SamplingOptions", "GenerateOptions", "SubmitOptions",
    "generate_parallel", "generate_parallel_tokens", "SequenceResult", "Speculator", "SpeculativeStats",
    "ChatSession", "ChatFormat", "ChatPrompt", "json_schema_to_grammar", "PrefilledGrammar", "apply_template", "embed", "rerank", "infill_tokens", "InfillFile", "starter_model_path", "chat_starter_path", "Threadpool",
    "Fit", "DeviceMemory", "fit_params", "memory_projection",
    "SamplerChain", "Sampler", "CustomSampler", "Candidates", "default_chain",
    "Greedy", "Dist", "TopK", "TopP", "MinP", "Typical", "Temp", "TempExt", "XTC", "TopNSigma",
    "Mirostat", "MirostatV2", "AdaptiveP", "Grammar", "Penalties", "DRY", "LogitBias", "Infill",
    "LlamaError", "ClosedError", "ModelLoadError", "ContextCreationError", "TokenizationError",
    "DecodeError", "KVCacheFullError", "DecodeAbortedError", "InvalidBatchError", "ContextOverflowError",
    "StateError", "SamplerError", "TemplateError", "BusyError",
    "pull", "DownloadProgress", "DownloadError", "ChecksumError", "NotCachedError",
    "rpc_server", "RpcServer", "RpcError",
    "Worker", "WorkerGeneration", "WorkerChatSession", "WorkerError", "WorkerCrashedError", "WorkerMemoryError",
    "Engine", "EngineStats",
]
