"""Context: an inference context (KV cache, threads, logits) on a model."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import numpy.typing as npt

from ._ffi import ffi, lib
from ._handle import Handle
from ._seqtokens import SeqTokens
from .batch import Batch
from .context_params import FlashAttn, check_threads, default_threads, set_memory_params
from .errors import (
    ContextCreationError,
    ContextOverflowError,
    DecodeAbortedError,
    DecodeError,
    InvalidBatchError,
    check_decode,
)
from .kv import KVCache
from .state import State
from .vocab import as_tokens

if TYPE_CHECKING:
    from .lora import LoraAdapter
    from .model import Model

AUTO_CTX_CAP = 4096
_POOLING = {None: -1, "unspecified": -1, "none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
_ROPE_SCALING = {None: -1, "none": 0, "linear": 1, "yarn": 2, "longrope": 3}
_ATTENTION = {None: -1, "causal": 0, "non_causal": 1}


@dataclass(frozen=True)
class PerfContext:
    """llama_perf_context timings: load, prompt evaluation and generation."""

    t_start_ms: float
    t_load_ms: float
    t_p_eval_ms: float  # prompt processing (batches of more than one token)
    t_eval_ms: float  # generation (one token per sequence per decode)
    n_p_eval: int
    n_eval: int
    n_reused: int

    @property
    def prompt_tokens_per_second(self) -> float:
        return 1e3 * self.n_p_eval / self.t_p_eval_ms if self.t_p_eval_ms > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return 1e3 * self.n_eval / self.t_eval_ms if self.t_eval_ms > 0 else 0.0


class Context(Handle):
    """An inference context: every ``llama_context_params`` knob is a keyword argument.

    ``n_ctx="auto"`` takes the model's training context capped at 4096 tokens
    (so a 128k-context model does not reserve its whole KV cache by default),
    or less where the model's parameter fit (``model.fit.n_ctx``) found less room.

    Logits and embeddings are returned as read-only numpy views on llama.cpp's
    own buffers: no copy, and **valid only until the next decode, encode or
    close** of this context (copy them with ``np.array(view)`` to keep them).

    ``n_threads`` and ``n_threads_batch`` default to the CPUs this process may
    use; explicit counts must lie in [1, 512] (ggml's limit, :func:`check_threads`).

    One context serialises its own use across threads, and serves one generation
    at a time: :func:`pyllama.generate` from a second thread raises
    :class:`~pyllama.BusyError` while another thread generates on it. Separate
    contexts on one model decode in parallel (the GIL is released inside llama.cpp).
    """

    _kind = "context"

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int | Literal["auto"] = "auto",
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        flash_attn: FlashAttn = "auto",
        type_k: str | int = "f16",
        type_v: str | int = "f16",
        offload_kqv: bool = True,
        op_offload: bool = True,
        embeddings: bool = False,
        pooling: str | None = None,
        attention: str | None = None,
        rope_scaling: str | None = None,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = -1.0,
        yarn_beta_fast: float = -1.0,
        yarn_beta_slow: float = -1.0,
        yarn_orig_ctx: int = 0,
        swa_full: bool = True,
        kv_unified: bool = False,
        no_perf: bool = False,
    ) -> None:
        mp = model._p()
        p = lib.llama_context_default_params()
        if n_ctx == "auto":
            n_ctx = min(int(lib.llama_model_n_ctx_train(mp)), AUTO_CTX_CAP)
            if model.fit.n_ctx > 0:  # the fit lowered the context to make the layers fit
                n_ctx = min(n_ctx, model.fit.n_ctx)
        set_memory_params(p, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max,
                          flash_attn=flash_attn, type_k=type_k, type_v=type_v, kv_unified=kv_unified,
                          offload_kqv=offload_kqv, swa_full=swa_full)
        for name, table, value in (("pooling", _POOLING, pooling), ("attention", _ATTENTION, attention),
                                   ("rope_scaling", _ROPE_SCALING, rope_scaling)):
            if value not in table:
                raise ValueError(f"{name} must be one of {[k for k in table if k]}, not {value!r}")
        threads = default_threads(model) if n_threads is None else check_threads("n_threads", n_threads)
        p.n_threads = threads
        p.n_threads_batch = threads if n_threads_batch is None else check_threads("n_threads_batch", n_threads_batch)
        p.op_offload = op_offload
        p.embeddings = embeddings
        p.pooling_type = _POOLING[pooling]
        p.attention_type = _ATTENTION[attention]
        p.rope_scaling_type = _ROPE_SCALING[rope_scaling]
        p.rope_freq_base = rope_freq_base
        p.rope_freq_scale = rope_freq_scale
        p.yarn_ext_factor = yarn_ext_factor
        p.yarn_attn_factor = yarn_attn_factor
        p.yarn_beta_fast = yarn_beta_fast
        p.yarn_beta_slow = yarn_beta_slow
        p.yarn_orig_ctx = yarn_orig_ctx
        p.no_perf = no_perf
        # The abort flag lives in C memory owned by this object; ggml polls it.
        self._abort = ffi.new("pyllama_abort_state *")
        p.abort_callback = lib.pyllama_abort_callback
        p.abort_callback_data = self._abort
        ptr = lib.llama_init_from_model(mp, p)
        if ptr == ffi.NULL:
            raise ContextCreationError(
                f"llama.cpp could not create a context (n_ctx={n_ctx}, type_k={type_k}, type_v={type_v}, "
                f"flash_attn={flash_attn}); see the 'pyllama.llama' log for the reason"
            )
        super().__init__(ptr, lib.llama_free, model, self._abort)
        self.model = model
        self._vocab = model.vocab
        self._lock = threading.RLock()
        # (thread id, depth) of the generation running on this context (pyllama.generate).
        self._gen_owner: tuple[int, int] | None = None
        self.n_ctx = int(lib.llama_n_ctx(ptr))
        # Cells one sequence may use: n_ctx / n_seq_max unless the KV cache is unified.
        self.n_ctx_seq = int(lib.llama_n_ctx_seq(ptr))
        self.n_batch = int(lib.llama_n_batch(ptr))
        self.n_ubatch = int(lib.llama_n_ubatch(ptr))
        self.n_seq_max = int(lib.llama_n_seq_max(ptr))
        self.n_vocab = model.vocab.n_tokens
        self.n_embd = model.n_embd
        self.type_k = type_k
        self.type_v = type_v
        self.flash_attn = flash_attn
        self.embeddings_enabled = embeddings
        self._recurrent = model.is_recurrent
        self.kv = KVCache(self)
        self.state = State(self)
        self._loras: dict[Any, float] = {}
        # Tokens each sequence holds in the KV cache, for prefix reuse (absent = unknown).
        self._seq_tokens = SeqTokens(self.n_ctx)
        self._eval_batch: Batch | None = None  # evaluate()'s, reused under the lock
        # Sampler chains attached for backend sampling, by sequence: held here so none is freed while attached.
        self._backend_samplers: dict[int, Any] = {}
        model._adopt(self)

    # --- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Free the context (its KV cache and compute buffers) now."""
        if self._ptr is None:
            return
        self._abort.flag = 1  # a decode running in another thread stops at the next node
        with self._lock:
            super().close()

    def __enter__(self) -> Context:
        self._p()
        return self

    # --- threads -------------------------------------------------------------------
    @property
    def n_threads(self) -> int:
        return int(lib.llama_n_threads(self._p()))

    @property
    def n_threads_batch(self) -> int:
        return int(lib.llama_n_threads_batch(self._p()))

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Threads for generation and for prompt batches: each in [1, MAX_THREADS] (see :func:`check_threads`)
        and at most the attached Threadpool's size."""
        check_threads("n_threads", n_threads)
        n_batch = n_threads if n_threads_batch is None else check_threads("n_threads_batch", n_threads_batch)
        from .threadpool import _pool_sizes

        sizes = _pool_sizes(self)
        # ggml indexes an attached pool's threads by these counts: more would overrun it.
        if sizes is not None and (n_threads > sizes[0] or n_batch > sizes[1]):
            raise ValueError(f"the attached Threadpool has {sizes[0]} (batch: {sizes[1]}) threads; "
                             "detach it or attach a larger one first")
        lib.llama_set_n_threads(self._p(), n_threads, n_batch)

    # --- evaluation --------------------------------------------------------------------
    def _validate(self, batch: Batch) -> None:
        n = batch.n_tokens
        if n == 1:  # the per-token case: scalar checks, no numpy reductions
            t0, s0, p0 = int(batch.token[0]), int(batch.seq_id[0, 0]), int(batch.pos[0])
            if not 0 <= t0 < self.n_vocab:
                raise InvalidBatchError(f"token id {t0} is outside the vocabulary [0, {self.n_vocab})", -1)
            if not 0 <= s0 < self.n_seq_max:
                raise InvalidBatchError(f"sequence ids must lie in [0, {self.n_seq_max}) (n_seq_max)", -1)
            if p0 < 0:
                raise InvalidBatchError("negative position in batch", -1)
            if p0 >= self.n_ctx_seq and not self._recurrent:
                raise ContextOverflowError(
                    f"position {p0} is past the context window of a sequence (n_ctx_seq={self.n_ctx_seq})")
            return
        if n == 0:
            raise InvalidBatchError("empty batch", -1)
        if n > self.n_batch:
            raise InvalidBatchError(f"batch of {n} tokens exceeds n_batch={self.n_batch}", -1)
        toks = batch.token[:n]
        if int(toks.min()) < 0 or int(toks.max()) >= self.n_vocab:
            bad = int(toks[(toks < 0) | (toks >= self.n_vocab)][0])
            raise InvalidBatchError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})", -1)
        seqs = batch.seq_id[:n]
        if int(seqs.min()) < 0 or int(seqs.max()) >= self.n_seq_max:
            raise InvalidBatchError(f"sequence ids must lie in [0, {self.n_seq_max}) (n_seq_max)", -1)
        pos = batch.pos[:n]
        if int(pos.min()) < 0:
            raise InvalidBatchError("negative position in batch", -1)
        if int(pos.max()) >= self.n_ctx_seq and not self._recurrent:
            raise ContextOverflowError(
                f"position {int(pos.max())} is past the context window of a sequence (n_ctx_seq={self.n_ctx_seq})")

    def decode(self, batch: Batch) -> None:
        """Evaluate a batch. Raises a :class:`DecodeError` subclass on failure.

        An aborted decode (``ctx.abort()`` from another thread, or Ctrl-C on the
        main thread) removes the batch's partial work from the KV cache, so the
        context stays usable; Ctrl-C is re-raised as KeyboardInterrupt.
        """
        self._validate(batch)
        self._invalidate_tracking(batch)
        self._decode(batch)

    def _output_gpus(self) -> list[Any]:
        """The GPU devices the graph's sampler would run on: none unless every layer is offloaded."""
        found = self.__dict__.get("_out_gpus")
        if found is None:
            from .devices import devices

            found = self.__dict__["_out_gpus"] = (
                [d for d in devices() if d.type in ("gpu", "igpu")] if self.model.fully_offloaded else [])
        return list(found)

    @functools.cached_property
    def _backend_sampling_pays(self) -> bool:
        """Whether sampling="auto" runs a greedy chain in the graph here (see pyllama.backend_sampling)."""
        from .backend_sampling import backend_sampling_pays

        gpus = [d.backend for d in self._output_gpus()]
        return backend_sampling_pays(gpus, bool(gpus))

    @functools.cached_property
    def _backend_sampling_refusal(self) -> str | None:
        """Why chains must not run inside the graph here, or None: a Vulkan driver known to break, or
        logits rows that ggml-vulkan cannot take views of (several sequences, rows off its alignment)."""
        from .devices import drivers_of
        from .backend_sampling import LAVAPIPE_DRIVER_ID, driver_blocks_backend_sampling

        row_bytes = 4 * self.n_vocab
        for dev in self._output_gpus():
            if dev.backend != "Vulkan":
                continue
            drivers = drivers_of(dev)
            if not drivers and "llvmpipe" in dev.description:  # lavapipe whose version the loader did not tell
                blocked = driver_blocks_backend_sampling(LAVAPIPE_DRIVER_ID, None)
            else:
                blocked = next(filter(None, (driver_blocks_backend_sampling(d.driver_id, d.driver_info)
                                             for d in drivers)), None)
            if blocked is None and self.n_seq_max > 1:
                # the sampler of batch row k reads the logits at k * row_bytes: an op of ggml-vulkan
                # asserts (GGML_ASSERT, an abort) on a view that starts off the device's alignment
                align = max((d.min_storage_buffer_offset_alignment for d in drivers), default=256)
                if row_bytes % align:
                    blocked = (f"a row of {self.n_vocab} logits ({row_bytes} bytes) is not a multiple of the "
                               f"device's storage-buffer alignment ({align} bytes), so ggml-vulkan aborts on the "
                               f"sampler of any row but the first (a context with n_seq_max=1 is fine)")
            if blocked is not None:
                return f"backend sampling is disabled on {dev.name}: {blocked}; use sampling='argmax' or 'host'"
        return None

    def _attach_sampler(self, seq_id: int, chain: Any) -> None:
        """Run ``chain`` (a SamplerChain) inside the graph for ``seq_id`` (llama_set_sampler); None detaches."""
        with self._lock:
            current = self._backend_samplers.get(seq_id)
            if current is chain:
                return
            ptr = self._p()
            if chain is None:
                lib.llama_set_sampler(ptr, seq_id, ffi.NULL)
                del self._backend_samplers[seq_id]
                return
            if getattr(chain, "_backend_bound", False):
                # llama.cpp initialises a chain's graph part once (GGML_ASSERT on a second time)
                raise ValueError("this SamplerChain was already attached for backend sampling once: pass sampler "
                                 "specs (a list) so that each generation builds its own chain")
            refusal = self._backend_sampling_refusal
            if refusal is not None:
                raise ValueError(refusal)
            chain._backend_bound = True
            if not lib.llama_set_sampler(ptr, seq_id, chain._p()):
                self._backend_samplers.pop(seq_id, None)
                raise ValueError("llama.cpp cannot run this sampler chain inside the graph here "
                                 "(see the 'pyllama.llama' log): use sampling='host'")
            self._backend_samplers[seq_id] = chain

    def _detach_sampler(self, seq_id: int, chain: Any) -> None:
        """Detach ``chain`` from ``seq_id`` if it is the one attached (a closed context has none)."""
        with self._lock:
            if self._ptr is not None and self._backend_samplers.get(seq_id) is chain:
                self._attach_sampler(seq_id, None)

    def _decode(self, batch: Batch) -> None:
        with self._lock:
            ptr = self._ptr
            if ptr is None:
                self._p()  # raises ClosedError
            st = self._arm_abort()
            rc = lib.llama_decode(ptr, batch._struct[0])
            # A Ctrl-C seen by the abort callback at the graph's last node still
            # returns 0: it must not be lost, so it counts as an interruption too.
            if rc != 0 or st.interrupted:
                self._decode_failed(batch, rc)

    def _arm_abort(self) -> Any:
        st = self._abort
        st.flag = 0
        st.interrupted = 0
        st.check_signals = threading.get_ident() == _MAIN_THREAD_ID
        return st

    def _decode_failed(self, batch: Batch, rc: int) -> None:
        n = batch.n_tokens
        seqs = batch.seq_id[:n, 0]
        interrupted = bool(self._abort.interrupted)
        if rc in (2, -2) or rc < -1 or interrupted:
            # Processed ubatches stay in memory: drop them so the context is consistent.
            mem = lib.llama_get_memory(self._ptr)
            for s in np.unique(seqs):
                p0 = int(batch.pos[:n][seqs == s].min())
                lib.llama_memory_seq_rm(mem, int(s), p0, -1)
                self._seq_tokens.forget(int(s))
        if interrupted:
            raise KeyboardInterrupt
        if rc == 2:
            raise DecodeAbortedError("llama_decode aborted; the batch's partial work was removed", rc)
        check_decode(rc)

    def encode(self, batch: Batch) -> None:
        """Run the encoder (encoder-decoder and embedding models)."""
        self._validate(batch)
        with self._lock:
            st = self._arm_abort()
            rc = lib.llama_encode(self._p(), batch._native())
            if st.interrupted:
                raise KeyboardInterrupt
            check_decode(rc, "llama_encode")

    def abort(self) -> None:
        """Ask a decode running in another thread to stop at the next graph node."""
        self._abort.flag = 1

    def synchronize(self) -> None:
        """Wait for queued device work (for timing asynchronous backends)."""
        lib.llama_synchronize(self._p())

    # --- outputs (zero-copy views) -------------------------------------------------------
    def logits(self, i: int = -1) -> npt.NDArray[np.float32]:
        """Read-only view of the logits of output row ``i`` (``-1``: the last one).

        ``i`` indexes the batch's tokens (as llama_get_logits_ith does). The view
        is llama.cpp's buffer itself: valid until the next decode or close.
        """
        if not _INT32_MIN <= i <= _INT32_MAX:
            raise IndexError(f"no logits for batch row {i}: only rows marked for logits have them")
        ptr = lib.llama_get_logits_ith(self._p(), i)
        if ptr == ffi.NULL:
            raise IndexError(f"no logits for batch row {i}: only rows marked for logits have them")
        return _view(ptr, self.n_vocab)

    def logits_all(self) -> npt.NDArray[np.float32]:
        """Read-only (n_outputs, n_vocab) view of every output row of the last decode."""
        ptr = lib.llama_get_logits(self._p())
        if ptr == ffi.NULL:
            raise IndexError("no logits: the last batch requested none")
        n_out = self._n_outputs()
        return _view(ptr, n_out * self.n_vocab).reshape(n_out, self.n_vocab)

    def _n_outputs(self) -> int:
        # llama.cpp does not export n_outputs; count the rows that have logits.
        n = 0
        while lib.llama_get_logits_ith(self._ptr, n) != ffi.NULL:
            n += 1
        return n

    def embedding(self, i: int = -1) -> npt.NDArray[np.float32]:
        """Read-only view of the embedding of batch row ``i`` (needs ``embeddings=True``)."""
        if not _INT32_MIN <= i <= _INT32_MAX:
            raise IndexError(f"no embedding for batch row {i}")
        ptr = lib.llama_get_embeddings_ith(self._p(), i)
        if ptr == ffi.NULL:
            raise IndexError(f"no embedding for batch row {i} (context created with embeddings=True?)")
        return _view(ptr, self.n_embd)

    def sequence_embedding(self, seq_id: int = 0) -> npt.NDArray[np.float32]:
        """Read-only view of the pooled embedding of a sequence (pooling other than 'none')."""
        ptr = lib.llama_get_embeddings_seq(self._p(), seq_id)
        if ptr == ffi.NULL:
            raise IndexError(f"no pooled embedding for sequence {seq_id} (pooling is 'none'?)")
        n = 1 if lib.llama_pooling_type(self._ptr) == lib.LLAMA_POOLING_TYPE_RANK else self.n_embd
        return _view(ptr, n)

    @property
    def pooling(self) -> int:
        return int(lib.llama_pooling_type(self._p()))

    # --- performance counters ------------------------------------------------------------
    def perf(self) -> PerfContext:
        d = lib.llama_perf_context(self._p())
        return PerfContext(d.t_start_ms, d.t_load_ms, d.t_p_eval_ms, d.t_eval_ms, d.n_p_eval, d.n_eval, d.n_reused)

    def reset_perf(self) -> None:
        lib.llama_perf_context_reset(self._p())

    # --- LoRA ------------------------------------------------------------------------------
    def set_lora(self, adapter: LoraAdapter, scale: float = 1.0) -> None:
        """Apply a LoRA adapter with a scale (replacing its previous scale)."""
        if adapter.model is not self.model:
            raise ValueError("the adapter was loaded for another model")
        adapter._p()
        self._loras[adapter] = float(scale)
        self._apply_loras()

    def remove_lora(self, adapter: LoraAdapter | None = None) -> None:
        """Remove one adapter, or all of them."""
        if adapter is None:
            self._loras.clear()
        else:
            self._loras.pop(adapter, None)
        self._apply_loras()

    def _apply_loras(self) -> None:
        self._set_adapters([(a, s) for a, s in self._loras.items() if not a.closed])
        self._seq_tokens.clear()  # cached prefixes were computed with other weights

    def _set_adapters(self, items: Sequence[tuple[LoraAdapter, float]]) -> None:
        """The adapters the next decodes use (the engine's per-step choice; it keeps its slots' caches
        apart itself)."""
        n = len(items)
        ptrs = ffi.new("struct llama_adapter_lora *[]", max(n, 1))
        scales = ffi.new("float[]", max(n, 1))
        for i, (a, s) in enumerate(items):
            ptrs[i] = a._p()
            scales[i] = s
        with self._lock:
            rc = lib.llama_set_adapters_lora(self._p(), ptrs, n, scales)
        if rc != 0:
            raise DecodeError(f"llama_set_adapters_lora failed ({rc})", rc)

    # --- prefix reuse --------------------------------------------------------------------
    def _invalidate_tracking(self, batch: Batch) -> None:
        if self._seq_tokens:
            for s in np.unique(batch.seq_id[: batch.n_tokens, 0]):
                self._seq_tokens.forget(int(s))

    def cached_tokens(self, seq_id: int = 0) -> npt.NDArray[np.int32] | None:
        """The tokens pyllama knows sequence ``seq_id`` holds in the KV cache (None: unknown).

        Known after :meth:`evaluate` and generation; a raw :meth:`decode` or a KV
        edit that moves positions makes it unknown, and the next evaluate starts over.
        """
        known = self._seq_tokens.get(seq_id)
        if known is not None:
            return known
        return np.empty(0, dtype=np.int32) if self.kv.pos_range(seq_id) is None else None

    def evaluate(self, tokens: npt.ArrayLike, *, seq_id: int = 0, logits: str = "last",
                 reuse_prefix: bool = True) -> int:
        """Make sequence ``seq_id`` hold exactly ``tokens``, evaluating only what it lacks.

        The longest common prefix with what the sequence already holds is kept
        (its KV entries are reused); the rest is removed and the new suffix is
        decoded in ``n_batch`` chunks. At least the last token is always
        evaluated so that fresh logits exist. Returns the number of tokens decoded.
        """
        from .decoder import Cursor, Decoder

        seq_id = self.kv._seq(seq_id)
        toks = as_tokens(tokens)
        if toks.size == 0:
            raise ValueError("nothing to evaluate: empty token sequence")
        if toks.size > self.n_ctx_seq:
            raise ContextOverflowError(
                f"{toks.size} tokens do not fit in the context (n_ctx_seq={self.n_ctx_seq})")
        if logits not in ("last", "none", "all"):
            raise ValueError(f"logits must be 'last', 'none' or 'all', not {logits!r}")
        self._vocab.check_tokens(toks)
        with self._lock:
            decoder = Decoder(self)
            cursor = Cursor(seq_id, None, toks, limit=self.n_ctx_seq, reuse_prefix=reuse_prefix, logits=logits)
            decoder.start(cursor)
            decoder.prefill([cursor])
            return cursor.n_evaluated

    def _shared_batch(self) -> Batch:
        """The batch prompt evaluation and single-sequence steps reuse (under the lock): n_batch rows."""
        batch = self._eval_batch
        if batch is None:
            batch = self._eval_batch = Batch(self.n_batch)
        return batch

    def __repr__(self) -> str:
        return "<pyllama.Context closed>" if self.closed else f"<pyllama.Context n_ctx={self.n_ctx}>"


_MAIN_THREAD_ID = threading.main_thread().ident
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _view(ptr: Any, n: int) -> npt.NDArray[np.float32]:
    arr = np.frombuffer(ffi.buffer(ptr, n * 4), dtype=np.float32)
    arr.flags.writeable = False
    return arr


__all__ = ["Context", "PerfContext"]
