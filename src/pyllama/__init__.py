"""pyllama: llama.cpp from Python at native speed.

Quick start::

    import pyllama

    with pyllama.Model("model.gguf") as model, model.context() as ctx:
        for event in pyllama.generate(ctx, "The capital of France is", max_tokens=16):
            print(event.text, end="", flush=True)
"""

from ._version import __version__
from ._ffi import build_info
from .batch import Batch
from .chat import ChatFormat, ChatPrompt, ChatSession, apply_template
from .context import Context, PerfContext
from .detokenize import StreamDecoder
from .devices import Device, UnavailableBackend, backends, devices, supports_gpu_offload, system_info, unavailable_backends
from .embed import embed
from .fit import DeviceMemory, Fit, fit_params, memory_projection
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
from .generate import Generation, TokenEvent, agenerate, generate, generate_text
from .grammar import PrefilledGrammar, json_schema_to_grammar
from .kv import KVCache
from .lora import LoraAdapter
from .model import Model
from .parallel import SequenceResult, generate_parallel, generate_parallel_tokens
from .speculative import SpeculativeStats, Speculator
from .rpc import RpcError, RpcServer, rpc_server
from .sampling import (
    DRY,
    XTC,
    AdaptiveP,
    Candidates,
    CustomSampler,
    Dist,
    Greedy,
    Grammar,
    Infill,
    LogitBias,
    MinP,
    Mirostat,
    MirostatV2,
    Penalties,
    Sampler,
    SamplerChain,
    Temp,
    TempExt,
    TopK,
    TopNSigma,
    TopP,
    Typical,
    default_chain,
)
from .starter import starter_model_path
from .store import ChecksumError, DownloadError, DownloadProgress, NotCachedError, pull
from .threadpool import Threadpool
from .vocab import Vocab
from .worker import Worker, WorkerChatSession, WorkerCrashedError, WorkerError, WorkerGeneration

__all__ = [
    "__version__", "build_info", "devices", "backends", "system_info", "supports_gpu_offload", "Device",
    "unavailable_backends", "UnavailableBackend",
    "Model", "Vocab", "Context", "PerfContext", "Batch", "KVCache", "LoraAdapter", "StreamDecoder",
    "generate", "generate_text", "agenerate", "Generation", "TokenEvent",
    "generate_parallel", "generate_parallel_tokens", "SequenceResult", "Speculator", "SpeculativeStats",
    "ChatSession", "ChatFormat", "ChatPrompt", "json_schema_to_grammar", "PrefilledGrammar", "apply_template", "embed", "starter_model_path", "Threadpool",
    "Fit", "DeviceMemory", "fit_params", "memory_projection",
    "SamplerChain", "Sampler", "CustomSampler", "Candidates", "default_chain",
    "Greedy", "Dist", "TopK", "TopP", "MinP", "Typical", "Temp", "TempExt", "XTC", "TopNSigma",
    "Mirostat", "MirostatV2", "AdaptiveP", "Grammar", "Penalties", "DRY", "LogitBias", "Infill",
    "LlamaError", "ClosedError", "ModelLoadError", "ContextCreationError", "TokenizationError",
    "DecodeError", "KVCacheFullError", "DecodeAbortedError", "InvalidBatchError", "ContextOverflowError",
    "StateError", "SamplerError", "TemplateError", "BusyError",
    "pull", "DownloadProgress", "DownloadError", "ChecksumError", "NotCachedError",
    "rpc_server", "RpcServer", "RpcError",
    "Worker", "WorkerGeneration", "WorkerChatSession", "WorkerError", "WorkerCrashedError",
]
