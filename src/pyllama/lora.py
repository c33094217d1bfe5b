"""LoRA adapters: loaded per model, applied per context with a scale."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ._ffi import ffi, lib
from ._handle import Handle
from .errors import ModelLoadError

if TYPE_CHECKING:
    from .model import Model


class LoraAdapter(Handle):
    """A LoRA adapter for one model. Apply with ``ctx.set_lora(adapter, scale)``,
    remove with ``ctx.remove_lora(adapter)``; ``close()`` frees it (the model's
    ``close()`` frees its adapters first)."""

    _kind = "LoRA adapter"

    def __init__(self, model: Model, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"adapter file not found: {self.path}")
        ptr = lib.llama_adapter_lora_init(model._p(), os.fsencode(self.path))
        if ptr == ffi.NULL:
            raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {self.path} for this model")
        super().__init__(ptr, lib.llama_adapter_lora_free, model)
        self.model = model
        model._adopt(self)

    def meta(self, key: str) -> str | None:
        buf = ffi.new("char[]", 4096)
        n = lib.llama_adapter_meta_val_str(self._p(), key.encode(), buf, len(buf))
        return ffi.string(buf, n).decode("utf-8", "replace") if n >= 0 else None

    def __repr__(self) -> str:
        return f"<pyllama.LoraAdapter {self.path.name}{' closed' if self.closed else ''}>"


__all__ = ["LoraAdapter"]
