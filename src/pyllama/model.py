"""Model: a loaded GGUF file, its metadata, vocabulary and contexts."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence, Union

import numpy.typing as npt

from . import _progress
from ._progress import ProgressArg
from ._ffi import ffi, lib
from ._handle import Handle
from .devices import Device
from .errors import ModelLoadError
from .fit import DEFAULT_MARGIN_MIB, DEFAULT_MIN_CTX, Fit, estimate_gpu_layers, fit_model_params, has_accelerator
from .gguf_check import check_model_file
from .vocab import TokenArray, Vocab

if TYPE_CHECKING:
    from .context import Context
    from .context_params import ContextOptions
    from .lora import LoraAdapter
    from .media import Projector
    from .options import Unpack

GpuLayers = Union[int, Literal["all", "auto"]]

logger = logging.getLogger("pyllama")


@ffi.def_extern()  # type: ignore[untyped-decorator]
def _pyllama_progress(value: float, user_data: Any) -> bool:
    rep: _progress._Reporter = ffi.from_handle(user_data)
    try:
        return rep(value)
    except BaseException as exc:  # noqa: BLE001 - never raise into C; re-raised after the load
        rep.error = exc
        return False

_SPLIT_MODES = {"none": 0, "layer": 1, "row": 2, "tensor": 3}
_KV_TAGS = {int: 0, float: 1, bool: 2, str: 3}
# Load modes that read the weights into allocated buffers instead of mapping the file.
_UNMAPPED_LOAD_MODES = (lib.LLAMA_LOAD_MODE_NONE, lib.LLAMA_LOAD_MODE_MLOCK, lib.LLAMA_LOAD_MODE_DIRECT_IO)


class Metadata(Mapping[str, str]):
    """The model's GGUF key/value metadata, values as llama.cpp renders them."""

    def __init__(self, model: Model) -> None:
        self._model = model
        buf = ffi.new("char[]", 1 << 16)
        ptr = model._p()
        items: dict[str, str] = {}
        for i in range(lib.llama_model_meta_count(ptr)):
            n = lib.llama_model_meta_key_by_index(ptr, i, buf, len(buf))
            key = ffi.string(buf, max(n, 0)).decode("utf-8", "replace")
            n = lib.llama_model_meta_val_str_by_index(ptr, i, buf, len(buf))
            items[key] = ffi.string(buf, max(n, 0)).decode("utf-8", "replace") if n >= 0 else ""
        self._items = items

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Metadata({len(self)} keys)"


class Model(Handle):
    """A GGUF model loaded by llama.cpp.

    Every ``llama_model_params`` knob is a keyword argument::

        with pyllama.Model("model.gguf", n_gpu_layers="all") as model:
            with model.context(n_ctx=4096) as ctx:
                ...

    ``n_gpu_layers="auto"`` (the default) asks llama.cpp's own parameter
    fitting how many layers to offload so each accelerator keeps
    ``fit_margin_mib`` free with a context of at least ``fit_min_ctx`` (see
    :mod:`pyllama.fit`); ``fit_context`` names the context to fit for
    (``n_ctx``, ``n_ubatch``, ``type_k``, ...: what :func:`pyllama.memory_projection`
    takes). ``model.fit`` records what it chose. Without an accelerator the
    model stays on the CPU.

    ``path`` may also be a model reference (``hf:org/repo:Q4_K_M``, ``hf:org/repo/file.gguf``,
    an ``https://`` URL): it is loaded from pyllama's model cache, pulled there first when absent
    (see :mod:`pyllama.store`).

    ``rpc=["host:port", ...]`` adds ggml RPC servers' devices first (once per
    process; see :mod:`pyllama.rpc`): with the default ``devices`` the model is
    split over them and the local accelerators.

    ``close()`` (or leaving the ``with`` block) frees the weights at once,
    closing the model's contexts and adapters first.
    """

    _kind = "model"
    fit: Fit  #: what ``n_gpu_layers`` resolution chose (status "skipped" when given explicitly)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_gpu_layers: GpuLayers = "auto",
        split_mode: Literal["none", "layer", "row", "tensor"] = "layer",
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        devices: Sequence[Device | str] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        load_mode: Literal["auto", "none", "mmap", "mlock", "mmap_mlock", "direct_io"] | None = None,
        lazy_mode: Literal["off", "auto", "on"] = "auto",
        no_host: bool = False,
        vocab_only: bool = False,
        check_tensors: bool = False,
        use_extra_bufts: bool = True,
        kv_overrides: Mapping[str, int | float | bool | str] | None = None,
        fit_margin_mib: int = DEFAULT_MARGIN_MIB,
        fit_min_ctx: int = DEFAULT_MIN_CTX,
        fit_context: Mapping[str, Any] | None = None,
        progress: ProgressArg = None,
        rpc: Sequence[str] | str = (),
        mmproj: str | os.PathLike[str] | Literal["auto"] | None = None,
    ) -> None:
        # a store reference (hf:org/repo:Q4_K_M, https://...) loads from the cache, pulled there if absent
        from .store import resolve  # here: the store (its HTTP client) is not loaded with pyllama

        # mmproj="auto": the projector the store pulls with a Hugging Face reference (as llama.cpp's -hf)
        self.path = resolve(path, progress=progress is True, mmproj=mmproj == "auto")
        if mmproj == "auto":
            from .store import projector_for

            mmproj = projector_for(self.path)
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}")
        # Before the device list is built: the servers' devices join it. Every
        # server the load may touch is checked first (ggml aborts on one it cannot reach).
        from .rpc import note_model, prepare_model

        prepare_model(rpc, None if devices is None else [d.name if isinstance(d, Device) else d for d in devices])
        params = lib.llama_model_default_params()
        keep: list[Any] = []  # C memory the params point to, alive during the load
        if split_mode not in _SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {sorted(_SPLIT_MODES)}, not {split_mode!r}")
        params.split_mode = _SPLIT_MODES[split_mode]
        params.main_gpu = main_gpu
        if tensor_split is not None:
            n_max = lib.llama_max_devices()
            if len(tensor_split) > n_max:
                raise ValueError(f"tensor_split has {len(tensor_split)} entries; this build supports {n_max} devices")
            arr = ffi.new("float[]", n_max)
            for i, v in enumerate(tensor_split):
                arr[i] = v
            keep.append(arr)
            params.tensor_split = arr
        if devices is not None:
            devs = _device_handles(devices)
            keep.append(devs)
            params.devices = devs
        params.load_mode = {(False, False): lib.LLAMA_LOAD_MODE_NONE, (True, False): lib.LLAMA_LOAD_MODE_MMAP,
                            (False, True): lib.LLAMA_LOAD_MODE_MLOCK,
                            (True, True): lib.LLAMA_LOAD_MODE_MMAP_MLOCK}[(bool(use_mmap), bool(use_mlock))]
        if load_mode is not None:  # llama.cpp's own switch; overrides use_mmap/use_mlock
            attr = "LLAMA_LOAD_MODE_" + load_mode.upper()
            if not hasattr(lib, attr):
                raise ValueError(f"load_mode must be auto, none, mmap, mlock, mmap_mlock or direct_io, not {load_mode!r}")
            params.load_mode = getattr(lib, attr)
        if lazy_mode not in ("off", "auto", "on"):
            raise ValueError(f"lazy_mode must be 'off', 'auto' or 'on', not {lazy_mode!r}")
        params.lazy_mode = getattr(lib, "LLAMA_LAZY_MODE_" + lazy_mode.upper())
        params.no_host = no_host
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        params.use_extra_bufts = use_extra_bufts
        if kv_overrides:
            ov = _kv_overrides(kv_overrides)
            keep.append(ov)
            params.kv_overrides = ov
        # Metadata llama.cpp would assert on (abort the process) instead of refusing: see gguf_check.
        byte_guard = check_model_file(self.path, vocab_only=vocab_only, overrides=kv_overrides,
                                      mapped=int(params.load_mode) not in _UNMAPPED_LOAD_MODES)
        # Last, so the fit sees every other setting (devices, split mode, overrides).
        self.fit = _resolve_gpu_layers(n_gpu_layers, self.path, params, keep, fit_margin_mib, fit_min_ctx,
                                       fit_context)
        reporter = _progress.reporter(progress, f"loading {self.path.name}")
        if reporter is not None:
            handle = ffi.new_handle(reporter)
            keep.append(handle)
            params.progress_callback = lib._pyllama_progress
            params.progress_callback_user_data = handle
        try:
            ptr = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        finally:
            if reporter is not None:
                reporter.close()
        if reporter is not None and reporter.error is not None:
            if ptr != ffi.NULL:
                lib.llama_model_free(ptr)
            raise reporter.error
        if ptr == ffi.NULL:
            if reporter is not None and reporter.cancelled:
                raise ModelLoadError(f"loading {self.path} was cancelled by the progress callback")
            raise ModelLoadError(
                f"llama.cpp could not load {self.path} (unsupported or corrupt GGUF, or out of memory); "
                "enable logging for 'pyllama.llama' for its reason"
            )
        super().__init__(ptr, lib.llama_model_free)
        note_model(self)  # the load opened ggml's connections to the servers it uses
        self.n_gpu_layers = int(params.n_gpu_layers)
        self._children: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self.vocab = Vocab(self)
        self.vocab._byte_guard = byte_guard
        self._metadata: Metadata | None = None
        self.mmproj: Projector | None = None
        if mmproj is not None:
            try:
                self.projector(mmproj)
            except BaseException:
                self.close()
                raise

    # --- lifetime ------------------------------------------------------------
    def _adopt(self, child: Context | LoraAdapter | Projector) -> None:
        with self._lock:
            self._children.add(child)

    def close(self) -> None:
        """Free the model now, closing its contexts and LoRA adapters first."""
        if self._ptr is None:
            return
        with self._lock:
            children = list(self._children)
        for child in children:
            child.close()
        super().close()

    def __enter__(self) -> Model:
        self._p()
        return self

    # --- facts -----------------------------------------------------------------
    @property
    def metadata(self) -> Metadata:
        if self._metadata is None:
            self._metadata = Metadata(self)
        return self._metadata

    def meta(self, key: str, default: str | None = None) -> str | None:
        """One metadata value, read straight from llama.cpp."""
        buf = ffi.new("char[]", 1 << 16)
        n = lib.llama_model_meta_val_str(self._p(), key.encode(), buf, len(buf))
        return ffi.string(buf, n).decode("utf-8", "replace") if n >= 0 else default

    @property
    def fully_offloaded(self) -> bool:
        """Whether every layer (and the output) was offloaded to a GPU device."""
        if self.n_gpu_layers >= 0 and self.n_gpu_layers <= self.n_layer:
            return False
        from .devices import devices

        return any(d.type in ("gpu", "igpu") for d in devices())

    @property
    def architecture(self) -> str:
        return self.meta("general.architecture") or ""

    @property
    def description(self) -> str:
        buf = ffi.new("char[]", 512)
        n = lib.llama_model_desc(self._p(), buf, len(buf))
        return str(ffi.string(buf, max(n, 0)).decode("utf-8", "replace"))

    @property
    def n_params(self) -> int:
        return int(lib.llama_model_n_params(self._p()))

    @property
    def size(self) -> int:
        """Bytes of all tensors."""
        return int(lib.llama_model_size(self._p()))

    @property
    def n_ctx_train(self) -> int:
        return int(lib.llama_model_n_ctx_train(self._p()))

    @property
    def n_embd(self) -> int:
        return int(lib.llama_model_n_embd(self._p()))

    @property
    def n_layer(self) -> int:
        return int(lib.llama_model_n_layer(self._p()))

    @property
    def n_head(self) -> int:
        return int(lib.llama_model_n_head(self._p()))

    @property
    def n_head_kv(self) -> int:
        return int(lib.llama_model_n_head_kv(self._p()))

    @property
    def n_swa(self) -> int:
        return int(lib.llama_model_n_swa(self._p()))

    @property
    def has_encoder(self) -> bool:
        return bool(lib.llama_model_has_encoder(self._p()))

    @property
    def has_decoder(self) -> bool:
        return bool(lib.llama_model_has_decoder(self._p()))

    @property
    def is_recurrent(self) -> bool:
        return bool(lib.llama_model_is_recurrent(self._p()))

    def chat_template(self, name: str | None = None) -> str | None:
        """The model's chat template (the default one, or a named one), or None."""
        ptr = lib.llama_model_chat_template(self._p(), name.encode() if name else ffi.NULL)
        return None if ptr == ffi.NULL else ffi.string(ptr).decode("utf-8", "replace")

    # --- tokens (shortcuts to the vocabulary) ------------------------------------
    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> TokenArray:
        return self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: npt.ArrayLike, *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        return self.vocab.detokenize(tokens, remove_special=remove_special, unparse_special=unparse_special)

    # --- children ------------------------------------------------------------------
    def context(self, **params: Unpack[ContextOptions]) -> Context:
        """A new inference context on this model; see :class:`pyllama.Context` for the knobs."""
        from .context import Context

        return Context(self, **params)

    def lora(self, path: str | os.PathLike[str]) -> LoraAdapter:
        """Load a LoRA adapter for this model (apply it with ``ctx.set_lora(adapter, scale)``)."""
        from .lora import LoraAdapter

        return LoraAdapter(self, path)

    def projector(self, path: str | os.PathLike[str], *, use_gpu: bool | None = None, n_threads: int | None = None,
                  image_min_tokens: int | None = None, image_max_tokens: int | None = None,
                  warmup: bool = False) -> Projector:
        """Load a multimodal projector (``mmproj-*.gguf``) for this model; it becomes :attr:`mmproj`, the
        projector prompts with images or audio use. See :class:`pyllama.Projector` for the knobs."""
        from .media import Projector

        proj = Projector(self, path, use_gpu=use_gpu, n_threads=n_threads, image_min_tokens=image_min_tokens,
                         image_max_tokens=image_max_tokens, warmup=warmup)
        self.mmproj = proj
        return proj

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.description!r}"
        return f"<pyllama.Model {self.path.name} {state}>"


def _resolve_gpu_layers(n: GpuLayers, path: Path, params: Any, keep: list[Any], margin_mib: int,
                        min_ctx: int, context: Mapping[str, Any] | None) -> Fit:
    """Set ``params.n_gpu_layers`` (and, when fitted, tensor split and overrides)."""
    if n == "auto":
        if not has_accelerator():
            params.n_gpu_layers = 0
            return Fit("skipped", 0, 0, (), (), margin_mib, 0.0, "no accelerator device")
        result = fit_model_params(path, params, keep, margin_mib=margin_mib, min_ctx=min_ctx, context=context)
        if result.status == "fitted":
            logger.info("n_gpu_layers=auto: llama.cpp's fit offloads %s layers%s (context %s, margin %d MiB, %.2fs)",
                        "all" if result.n_gpu_layers < 0 else result.n_gpu_layers,
                        f", split {list(result.tensor_split)}" if result.tensor_split else "",
                        result.n_ctx or "as trained", margin_mib, result.seconds)
            return result
        fallback = estimate_gpu_layers(path)
        params.n_gpu_layers = fallback
        logger.warning("n_gpu_layers=auto: %s; offloading %s layers by pyllama's size estimate instead",
                       result.reason, "all" if fallback < 0 else fallback)
        return Fit(result.status, fallback, 0, (), (), margin_mib, result.seconds, result.reason)
    if n == "all":
        n = -1
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n_gpu_layers must be an int, 'all' or 'auto', not {n!r}")
    params.n_gpu_layers = n
    return Fit("skipped", n, 0, (), (), margin_mib, 0.0, "n_gpu_layers given")


def _device_handles(devices: Sequence[Device | str]) -> Any:
    from .devices import devices as all_devices

    known = {d.name: d for d in all_devices()}
    arr = ffi.new("ggml_backend_dev_t[]", len(devices) + 1)
    for i, d in enumerate(devices):
        name = d.name if isinstance(d, Device) else d
        if name not in known:
            raise ValueError(f"unknown device {name!r}; available: {sorted(known)}")
        arr[i] = lib.ggml_backend_dev_get(known[name].index)
    arr[len(devices)] = ffi.NULL
    return arr


def _kv_overrides(overrides: Mapping[str, int | float | bool | str]) -> Any:
    arr = ffi.new("struct llama_model_kv_override[]", len(overrides) + 1)
    for i, (key, value) in enumerate(overrides.items()):
        kb = key.encode()
        if len(kb) >= 128:
            raise ValueError(f"metadata key too long for an override: {key!r}")
        item = arr[i]
        item.key = kb
        if isinstance(value, bool):
            item.tag, item.val_bool = lib.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):
            item.tag, item.val_i64 = lib.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            item.tag, item.val_f64 = lib.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        elif isinstance(value, str):
            vb = value.encode()
            if len(vb) >= 128:
                raise ValueError(f"string override too long for {key!r}")
            item.tag, item.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, vb
        else:
            raise TypeError(f"override {key!r} must be int, float, bool or str, not {type(value).__name__}")
    return arr


__all__ = ["Model", "Metadata", "GpuLayers"]
