"""Running llama-bench's tests through pyllama's public API.

The measured loops are llama-bench's ``test_prompt`` and ``test_gen`` written
with :class:`pyllama.Model`, :class:`pyllama.Context` and :class:`pyllama.Batch`:

* prompt processing of N tokens: batches of ``n_batch`` random tokens (the first
  one BOS when the vocabulary adds it), logits for the last token of each
  batch, one synchronize at the end;
* generation of N tokens: one token per decode, a synchronize after each;
* depth: the KV cache is filled with ``n_depth`` tokens (untimed) before each
  repetition; the sequence state is saved once and restored afterwards, as
  llama-bench does;
* threads: each test's context runs on its own :class:`pyllama.Threadpool`
  built from ``-t``, ``-C``, ``--cpu-strict``, ``--poll`` and ``--prio`` and
  freed after the context, and a non-default ``--prio`` also sets the process
  priority, as llama-bench does.

Warm-up is llama-bench's: one full prompt run and one generated token per test
before the timed repetitions. The timer covers exactly what llama-bench's does,
so the time spent in Python (batch filling, argument checks, the cffi calls)
is what separates the two results. Random token ids are drawn before the timer
starts (llama-bench's ``std::rand()`` costs nanoseconds; numpy's per-call cost
would otherwise be charged to the binding).
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

import pyllama
from pyllama._context_access import native
from pyllama._ffi import ffi, lib
from pyllama.decoder import Decoder
from pyllama.errors import StateError
from pyllama.rpc import servers as rpc_servers

from .params import FLASH_ATTN_NAMES, Instance
from .record import Record


class BenchError(RuntimeError):
    """A test could not be set up or run."""


def _kwargs_of(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


_MODEL_KWARGS = _kwargs_of(pyllama.Model.__init__)


def _auto_uses_mmap(inst: Instance) -> bool:
    """What ``LLAMA_LOAD_MODE_AUTO`` resolves to: mmap unless a device the model uses cannot map memory."""
    try:
        from pyllama._ffi import ffi, lib
    except ImportError:  # pragma: no cover
        return True
    if inst.devices == "none":
        return True
    wanted = None if inst.devices == "auto" else set(inst.devices.split("/"))
    props = ffi.new("struct ggml_backend_dev_props *")
    gpu_like = (lib.GGML_BACKEND_DEVICE_TYPE_GPU, lib.GGML_BACKEND_DEVICE_TYPE_IGPU)
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) not in gpu_like:
            continue
        lib.ggml_backend_dev_get_props(dev, props)
        name = ffi.string(props.name).decode() if props.name != ffi.NULL else ""
        if wanted is not None and name not in wanted:
            continue
        if not props.caps.mmap_support:
            return False
    return True


def model_kwargs(inst: Instance) -> dict[str, Any]:
    """``pyllama.Model`` keyword arguments equivalent to llama-bench's ``to_llama_mparams``."""
    kw: dict[str, Any] = {
        "n_gpu_layers": inst.n_gpu_layers,
        "split_mode": inst.split_mode,
        "main_gpu": inst.main_gpu,
        "use_extra_bufts": inst.repack,
        "tensor_split": list(inst.tensor_split) if any(inst.tensor_split) else None,
        "devices": None if inst.devices == "auto" else [] if inst.devices == "none" else inst.devices.split("/"),
    }
    if "load_mode" in _MODEL_KWARGS:
        kw["load_mode"] = inst.load_mode
    else:
        mmap, mlock = {
            "auto": (_auto_uses_mmap(inst), False), "none": (False, False), "mmap": (True, False),
            "mlock": (False, True), "mmap+mlock": (True, True),
        }[inst.load_mode]
        kw["use_mmap"], kw["use_mlock"] = mmap, mlock
    if inst.lazy_mode != "auto":
        if "lazy_mode" not in _MODEL_KWARGS:
            raise BenchError(f"lazy_mode={inst.lazy_mode!r}: pyllama.Model does not take lazy_mode (only 'auto')")
        kw["lazy_mode"] = inst.lazy_mode
    if inst.no_host:
        if "no_host" not in _MODEL_KWARGS:
            raise BenchError("no_host=1: pyllama.Model does not take no_host")
        kw["no_host"] = True
    return kw


def context_kwargs(inst: Instance) -> dict[str, Any]:
    """``Model.context`` keyword arguments equivalent to llama-bench's ``to_llama_cparams``."""
    return {
        "n_ctx": inst.n_prompt + inst.n_gen + inst.n_depth,
        "n_batch": inst.n_batch,
        "n_ubatch": inst.n_ubatch,
        "n_threads": inst.n_threads,
        "n_threads_batch": inst.n_threads,
        "flash_attn": FLASH_ATTN_NAMES[inst.flash_attn],
        "type_k": inst.type_k,
        "type_v": inst.type_v,
        "offload_kqv": not inst.no_kv_offload,
        "op_offload": not inst.no_op_offload,
        "embeddings": inst.embeddings,
        "swa_full": False,  # llama-bench sets it; pyllama's default is llama.cpp's (True)
        "no_perf": True,  # llama_context_default_params()
    }


def fit_context(inst: Instance) -> dict[str, Any]:
    """The context llama-bench fits for: ``to_llama_cparams`` with n_ctx = prompt + generation + depth."""
    kw = context_kwargs(inst)
    return {k: kw[k] for k in ("n_ctx", "n_batch", "n_ubatch", "flash_attn", "type_k", "type_v", "swa_full")} | {
        "offload_kqv": not inst.no_kv_offload}


class ModelCache:
    """Keeps one model loaded while consecutive tests share its parameters (llama-bench's ``equal_mparams``)."""

    def __init__(self) -> None:
        self.key: tuple[object, ...] | None = None
        self.model: pyllama.Model | None = None

    def get(self, inst: Instance) -> pyllama.Model:
        key = inst.model_key()
        # With a fit llama-bench reloads for every test: the fit depends on the test's context.
        if self.model is None or key != self.key or inst.fits:
            self.close()  # before a fit, too: it must see the devices' whole free memory
            kwargs = model_kwargs(inst)
            if inst.fits:  # llama-bench's do_fit: llama.cpp's fit chooses layers and split
                kwargs.update(n_gpu_layers="auto", tensor_split=None, fit_margin_mib=inst.fit_target,
                              fit_min_ctx=inst.fit_min_ctx, fit_context=fit_context(inst))
            try:
                self.model = pyllama.Model(inst.model, **kwargs)
            except pyllama.LlamaError as exc:
                raise BenchError(f"failed to load model '{inst.model}': {exc}") from None
            self.key = key
        return self.model

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
        self.model, self.key = None, None


@dataclass
class DepthCache:
    """llama-bench's ``ctx_state``: the KV state of sequence 0 at the last depth computed."""

    depth: int = 0
    data: bytes = b""


# common's set_process_priority on POSIX: ggml_sched_priority -> nice value
_NICE = {-1: 5, 0: 0, 1: -5, 2: -10, 3: -20}
_process_prio = 0


def set_process_priority(prio: int) -> None:
    """llama-bench's ``set_process_priority``: renice the whole process (normal leaves it alone)."""
    global _process_prio
    if prio == 0 or prio == _process_prio:  # normal: llama-bench leaves the process alone
        return
    if not hasattr(os, "setpriority"):  # llama-bench uses SetPriorityClass on Windows
        raise BenchError(f"--prio {prio}: setting the process priority is not supported on this platform")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, _NICE[prio])
    except OSError as exc:
        raise BenchError(f"failed to set process priority {prio}: {exc}") from None
    _process_prio = prio


def threadpool_kwargs(inst: Instance) -> dict[str, Any]:
    """``pyllama.Threadpool`` arguments equivalent to llama-bench's per-test ``ggml_threadpool_params``."""
    return {"n_threads": inst.n_threads, "cpu_mask": inst.cpu_mask, "strict_cpu": inst.cpu_strict,
            "poll": inst.poll, "prio": inst.prio}


def _devices_info() -> tuple[str, str, str]:
    devs = pyllama.devices()
    cpu = ", ".join(d.description for d in devs if d.type in ("cpu", "accel"))
    gpu = ", ".join(d.description for d in devs if d.type in ("gpu", "igpu"))
    regs = [b for b in pyllama.backends() if b != "CPU" and not b.startswith("RPC")]
    if rpc_servers():  # llama-bench's get_backend: "RPC" last when an RPC server is registered
        regs.append("RPC")
    return cpu, gpu, ",".join(regs) if regs else "CPU"


def rfc3339_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class PyllamaTest:
    """One test on one context: set up, warm up, then one :meth:`rep` per repetition."""

    inst: Instance
    model: pyllama.Model
    depth_cache: DepthCache
    rng: np.random.Generator
    ctx: pyllama.Context = field(init=False)
    decoder: Decoder = field(init=False)
    pool: pyllama.Threadpool = field(init=False)

    def __post_init__(self) -> None:
        set_process_priority(self.inst.prio)
        try:
            self.ctx = self.model.context(**context_kwargs(self.inst))
        except pyllama.LlamaError as exc:
            raise BenchError(f"failed to create context with model '{self.inst.model}': {exc}") from None
        try:
            self.pool = pyllama.Threadpool(**threadpool_kwargs(self.inst))
        except (ValueError, pyllama.LlamaError) as exc:
            self.ctx.close()
            raise BenchError(f"threadpool create failed: n_threads {self.inst.n_threads}: {exc}") from None
        self.pool.attach(self.ctx)
        self.decoder = Decoder(self.ctx)
        vocab = self.model.vocab
        self.n_vocab = vocab.n_tokens
        self.bos = vocab.bos if vocab.add_bos and vocab.bos is not None else None
        self.batch = pyllama.Batch(max(1, min(self.inst.n_batch, max(self.inst.n_prompt, self.inst.n_depth, 1))))
        self.batch1 = pyllama.Batch(1)
        self.ctx.kv.clear(data=False)
        self.chain: pyllama.SamplerChain | None = None
        if self.inst.sampling:
            self.chain = pyllama.SamplerChain([pyllama.Greedy()], self.model)
            if self.inst.sampling == "backend":
                try:
                    self.decoder.attach(0, self.chain)
                except ValueError as exc:
                    self.close()
                    raise BenchError(str(exc)) from None
            step = self._step = ffi.new("pyllama_step *")
            step.smpl = self.chain._p()
            step.vocab = self.model.vocab._v()
            step.n_ctx_seq = self.ctx.n_ctx_seq
            step.greedy = 1 if self.inst.sampling == "argmax" else 0
            step.n_vocab = self.n_vocab

    def record(self, extra: dict[str, Any]) -> Record:
        cpu, gpu, backends = _devices_info()
        info = pyllama.build_info()
        return Record(
            inst=self.inst, build_commit=str(info.get("llama_commit", "unknown"))[:9],
            build_number=int(info.get("llama_build_number", 0)), cpu_info=cpu, gpu_info=gpu, backends=backends,
            model_type=self.model.description, model_size=int(self.model.size),
            model_n_params=int(self.model.n_params), test_time=rfc3339_now(), extra=dict(extra),
        )

    # --- token material, drawn before the timer ---------------------------------------
    def _prompt_chunks(self, n: int) -> list[npt.NDArray[np.int32]]:
        toks = self.rng.integers(0, self.n_vocab, size=n, dtype=np.int32)
        if self.bos is not None and n:
            toks[0] = self.bos
        b = self.inst.n_batch
        return [toks[i:i + b] for i in range(0, n, b)]

    def _gen_tokens(self, n: int) -> npt.NDArray[np.int32]:
        toks = self.rng.integers(0, self.n_vocab, size=n, dtype=np.int32)
        if self.bos is not None and n:
            toks[0] = self.bos
        return toks

    # --- llama-bench's loops -------------------------------------------------------------
    def _prompt(self, chunks: list[npt.NDArray[np.int32]], pos: int) -> int:
        ctx, batch = self.ctx, self.batch
        for toks in chunks:
            batch.clear().add(toks, pos, 0, logits="last")
            ctx.decode(batch)
            pos += toks.size
        ctx.synchronize()
        return pos

    def _gen(self, toks: npt.NDArray[np.int32], pos: int) -> int:
        ctx, batch = self.ctx, self.batch1
        for i in range(toks.size):
            batch.clear().add(toks[i:i + 1], pos, 0, logits="all")
            ctx.decode(batch)
            ctx.synchronize()
            pos += 1
        return pos

    def _gen_sampled(self, first: int, n: int, pos: int) -> int:
        """n tokens as pyllama.generate's fused step takes them: decode the previous token, then choose
        the next (host: llama.cpp's greedy sampler; argmax: over the logits view; backend: read the
        token the graph chose); the chosen token is the next input. End of generation is ignored."""
        try:
            pos = self.decoder.run_steps(self._step, first, pos, n)
        except pyllama.DecodeError as exc:
            raise BenchError(str(exc)) from None
        self.ctx.synchronize()
        return pos

    def _gen_sampled_native(self, first: int, n: int, pos: int) -> int:
        """The same n tokens through llama-simple's loop in C (pyllama_c_generate_loop)."""
        ctx = self.ctx
        assert self.chain is not None
        self.batch1.clear().add(np.array([first], dtype=np.int32), pos, 0, logits="all")
        ctx.decode(self.batch1)
        out = np.empty(n, dtype=np.int32)
        chain_p = ffi.NULL if self.inst.sampling == "argmax" else self.chain._p()
        got = lib.pyllama_c_generate_loop(native(ctx), chain_p, pos + 1, n, ffi.from_buffer("llama_token[]", out))
        if got != n:
            raise BenchError(f"the C loop failed at token {-got}")
        ctx.synchronize()
        return pos + n

    def warmup(self) -> None:
        self.ctx.kv.clear(data=False)
        pos = 0
        if self.inst.n_prompt > 0:
            pos = self._prompt(self._prompt_chunks(self.inst.n_prompt), pos)
        if self.inst.n_gen > 0:
            if self.inst.sampling:
                self._gen_sampled(int(self._gen_tokens(1)[0]), 1, pos)
            else:
                self._gen(self._gen_tokens(1), pos)

    def _fill_depth(self) -> None:
        d, cache = self.inst.n_depth, self.depth_cache
        if cache.depth == d and cache.data:
            try:
                self.ctx.state.load_seq(cache.data, 0)
                return
            except StateError:
                pass  # incompatible with this context: recompute
        self._prompt(self._prompt_chunks(d), 0)
        cache.depth, cache.data = d, self.ctx.state.save_seq(0)

    def rep(self, native: bool = False) -> int:
        """One timed repetition; returns nanoseconds. ``native``: a sampled test's tokens through the C loop."""
        inst = self.inst
        self.ctx.kv.clear(data=False)
        if inst.n_depth > 0:
            self._fill_depth()
        chunks = self._prompt_chunks(inst.n_prompt) if inst.n_prompt > 0 else []
        gen = self._gen_tokens(inst.n_gen) if inst.n_gen > 0 else None
        pos = inst.n_depth
        t0 = time.perf_counter_ns()
        if chunks:
            pos = self._prompt(chunks, pos)
        if gen is not None:
            if not inst.sampling:
                self._gen(gen, pos)
            elif native:
                self._gen_sampled_native(int(gen[0]), inst.n_gen, pos)
            else:
                self._gen_sampled(int(gen[0]), inst.n_gen, pos)
        return time.perf_counter_ns() - t0

    def close(self) -> None:
        # llama-bench's order: the context first, so the pool is freed at once (not kept for the context)
        self.ctx.close()
        self.pool.close()
        if self.chain is not None:
            self.chain.close()


__all__ = ["BenchError", "ModelCache", "DepthCache", "PyllamaTest", "model_kwargs", "context_kwargs",
           "threadpool_kwargs", "set_process_priority"]
