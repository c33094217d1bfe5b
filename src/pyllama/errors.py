"""pyllama's exceptions: one root, small families, one line each."""

from __future__ import annotations


class LlamaError(Exception):
    """Base class of every error pyllama raises."""


class ClosedError(LlamaError, ValueError):
    """The model, context or sampler was closed and can no longer be used."""


class ModelLoadError(LlamaError, OSError):
    """llama.cpp could not load the model file (missing, unreadable or unsupported)."""


class ContextCreationError(LlamaError):
    """llama.cpp could not create a context with these parameters (often: out of memory)."""


class TokenizationError(LlamaError, ValueError):
    """Text could not be tokenized, or token ids are outside the vocabulary."""


class DecodeError(LlamaError):
    """llama_decode or llama_encode failed; ``code`` holds llama.cpp's return code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class KVCacheFullError(DecodeError):
    """No KV-cache slot for the batch (return code 1): free space or shrink the batch."""


class DecodeAbortedError(DecodeError):
    """The decode was aborted by the abort callback (return code 2); the context stays usable."""


class InvalidBatchError(DecodeError, ValueError):
    """The batch was rejected as invalid (return code -1)."""


class ContextOverflowError(LlamaError):
    """The tokens do not fit in the context window (``n_tokens`` and ``n_ctx`` where the raiser knew them)."""

    def __init__(self, message: str, *, n_tokens: int | None = None, n_ctx: int | None = None) -> None:
        super().__init__(message)
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx


class StateError(LlamaError):
    """A saved state could not be written or restored."""


class SamplerError(LlamaError):
    """A sampler could not be created or a custom sampler raised."""


class TemplateError(LlamaError, ValueError):
    """A chat template could not be applied."""


class BusyError(LlamaError, RuntimeError):
    """The object is in use by another thread and does not allow concurrent use."""


def check_decode(rc: int, what: str = "llama_decode") -> None:
    """Map llama_decode/llama_encode return codes to exceptions (0 is success)."""
    if rc == 0:
        return
    if rc == 1:
        raise KVCacheFullError(f"{what}: no KV-cache slot for the batch (code 1)", rc)
    if rc == 2:
        raise DecodeAbortedError(f"{what}: aborted (code 2)", rc)
    if rc == -1:
        raise InvalidBatchError(f"{what}: invalid batch (code -1)", rc)
    raise DecodeError(f"{what}: failed with code {rc}", rc)


__all__ = [
    "LlamaError", "ClosedError", "ModelLoadError", "ContextCreationError", "TokenizationError",
    "DecodeError", "KVCacheFullError", "DecodeAbortedError", "InvalidBatchError",
    "ContextOverflowError", "StateError", "SamplerError", "TemplateError", "BusyError",
    "check_decode",
]
