"""The host side of the worker: :class:`Worker`, pyllama's API served by a child process.

The child process and its channel are :mod:`pyllama.worker.process`; streams are
:mod:`pyllama.worker.generation`, chat sessions :mod:`pyllama.worker.session`.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import numpy.typing as npt

from .. import _progress
from .._progress import ProgressArg
from ..errors import ClosedError
from . import protocol as p
from .errors import WorkerCrashedError, WorkerError
from ..options import GENERATE_KEYS, SAMPLING_KEYS, GenerateOptions, SamplingOptions, Unpack
from .generation import WorkerGeneration, portable_options
from .process import _LEVELS, _Inbox, _Process, _Slot
from .session import WorkerChatSession

if TYPE_CHECKING:
    from ..media import Media

#: text, token ids, or text and media (strings and pyllama.Image / pyllama.Audio, tokenized in the child)
Prompt = Union[str, bytes, Sequence[int], npt.NDArray[np.int32], "Sequence[str | Media]"]
Message = Mapping[str, str]


class Worker:
    """pyllama in a child process: a crash, an abort or an OOM kill there never takes this process down.

    ::

        with pyllama.Worker(keep_alive=300) as worker:
            worker.load("model.gguf", n_ctx=4096)
            for ev in worker.generate("Once upon a time", max_tokens=64):
                print(ev.text, end="", flush=True)

    The child is ``python -m pyllama.worker.child`` run by the same interpreter
    (``python=`` to choose another), started the same way on Linux, macOS and
    Windows. Calls may come from several threads. If the child dies, every call
    in flight raises :class:`WorkerCrashedError` (exit code or signal, and the
    child's last log lines); the next call starts a fresh child and reloads the
    model, unless ``restart=False``. ``keep_alive`` seconds without a request
    unload the model (the next request loads it again). The child exits when
    the worker is closed or garbage-collected, and when this process exits or
    is killed.

    ``log_level`` is the level of llama.cpp's log lines the child reports (they
    go to the ``pyllama.worker`` logger and the last ``log_lines`` are kept for
    crash reports); ``backtrace=True`` lets ggml print a debugger backtrace when
    llama.cpp aborts (slow: it attaches gdb or lldb where installed).

    ``memory_limit`` (bytes, Linux) caps the child's address space (RLIMIT_AS)
    from its start: what it maps counts, the model file included, and GPU
    drivers reserve much address space (use it for CPU work). A load, a context
    or a request that needs more raises :class:`WorkerMemoryError` naming the
    limit (a :class:`WorkerCrashedError` and a :class:`MemoryError`); the child
    lives on, or where it died of it, the next call starts a fresh one.
    """

    def __init__(self, *, keep_alive: float | None = None, restart: bool = True, log_level: str = "INFO",
                 log_lines: int = 100, backtrace: bool = False, env: Mapping[str, str] | None = None,
                 python: str | os.PathLike[str] | None = None, memory_limit: int | None = None,
                 start: bool = True) -> None:
        if keep_alive is not None and keep_alive < 0:
            raise ValueError("keep_alive must be >= 0 seconds or None (never unload)")
        if memory_limit is not None:
            if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0:
                raise ValueError(f"memory_limit must be a number of bytes > 0 or None, not {memory_limit!r}")
            if sys.platform != "linux":
                raise ValueError("memory_limit needs Linux (it sets the child's RLIMIT_AS with prlimit)")
        if log_level.upper() not in _LEVELS:
            raise ValueError(f"log_level must be one of {sorted(_LEVELS)}, not {log_level!r}")
        self._keep_alive = keep_alive
        self.restart_on_crash = restart
        self._log_level = log_level.upper()
        self._log_lines = log_lines
        self._backtrace = backtrace
        self._env = dict(env) if env is not None else None
        self._python = os.fspath(python) if python is not None else sys.executable
        self._memory_limit = memory_limit
        self._spec: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._slot = _Slot()
        self._finalizer = weakref.finalize(self, self._slot.shutdown, 2.0)
        if start:
            with self._lock:
                self._slot.proc = self._spawn()

    # --- the process ----------------------------------------------------------------------------
    def _spawn(self) -> _Process:
        cmd = [self._python, "-m", "pyllama.worker.child", "--parent-pid", str(os.getpid()),
               "--keep-alive", str(-1.0 if self._keep_alive is None else self._keep_alive),
               "--log-level", self._log_level]
        # Linux delivers PR_SET_PDEATHSIG when the *thread* that started the child exits, so
        # only ask for it from the main thread; the child's parent-pid watchdog covers the rest.
        if threading.current_thread() is threading.main_thread():
            cmd.append("--pdeathsig")
        env = dict(os.environ)
        if self._env:
            env.update(self._env)
        if not self._backtrace:
            env.setdefault("GGML_NO_BACKTRACE", "1")
        proc = _Process(cmd, env, self._log_lines, self._memory_limit)
        if self._spec is not None:  # a restart: the fresh child loads the model on its first request
            proc.post(p.SPEC, self._spec)
        return proc

    def _process(self) -> _Process:
        with self._lock:
            if self._closed:
                raise ClosedError("the worker is closed")
            proc = self._slot.proc
            if proc is None or proc.crash is not None:
                if proc is not None and proc.crash is not None and not self.restart_on_crash:
                    raise copy.copy(proc.crash)
                if proc is not None:
                    proc.shutdown(1.0)  # reap it (it is dead already)
                proc = self._slot.proc = self._spawn()
            return proc

    def _submit(self, kind: int, *args: Any, inbox: _Inbox | None = None) -> tuple[_Process, int, _Inbox]:
        for attempt in (0, 1):
            proc = self._process()
            try:
                rid, inbox = proc.request(kind, *args, inbox=inbox)
                return proc, rid, inbox
            except WorkerCrashedError:
                # The request never reached the child (it was dead already): a fresh one may take it.
                if attempt or not self.restart_on_crash:
                    raise
        raise AssertionError("unreachable")

    def _call(self, kind: int, *args: Any, on_progress: Callable[[float], Any] | None = None) -> Any:
        proc, rid, inbox = self._submit(kind, *args)
        try:
            msg = inbox.get()
            while msg[0] == p.PROGRESS:  # a load's progress, then its answer
                if on_progress is not None:
                    on_progress(msg[2])
                msg = inbox.get()
        finally:
            proc.done(rid)
        if msg[0] == p.OK:
            return msg[2]
        if msg[0] == p.ERR:
            raise proc.failure(p.decode_error(msg[2], WorkerError), inbox)
        raise msg[2]

    def _stream(self, kind: int, args: tuple[Any, ...],
                on_end: Callable[[WorkerGeneration], None] | None = None) -> WorkerGeneration:
        proc, rid, inbox = self._submit(kind, *args)
        return WorkerGeneration(self, proc, rid, inbox, on_end)

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it starts or after close)."""
        proc = self._slot.proc
        return proc.pid if proc is not None and proc.alive else None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def memory_limit(self) -> int | None:
        """The child's address-space limit in bytes (None: none)."""
        return self._memory_limit

    @property
    def keep_alive(self) -> float | None:
        """Seconds without a request after which the child unloads the model (None: never)."""
        return self._keep_alive

    def restart(self) -> None:
        """Stop the child (killing it if it does not exit at once) and start a fresh one."""
        with self._lock:
            if self._closed:
                raise ClosedError("the worker is closed")
            old, self._slot.proc = self._slot.proc, None
        if old is not None:
            old.shutdown(1.0)
        self._process()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child: it exits at once (killed after ``timeout`` seconds). Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer.detach()
        self._slot.shutdown(timeout)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid={self.pid}"
        model = self._spec["model"] if self._spec else None
        return f"<pyllama.Worker {state} model={model!r}>"

    # --- the model ------------------------------------------------------------------------------
    def load(
        self,
        model: str | os.PathLike[str],
        *,
        n_gpu_layers: int | Literal["all", "auto"] = "auto",
        split_mode: Literal["none", "layer", "row", "tensor"] = "layer",
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        devices: Sequence[str] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        use_extra_bufts: bool = True,
        check_tensors: bool = False,
        kv_overrides: Mapping[str, int | float | bool | str] | None = None,
        rpc: Sequence[str] | str = (),
        n_ctx: int | Literal["auto"] = "auto",
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        flash_attn: Literal["auto", "on", "off"] | bool = "auto",
        type_k: str = "f16",
        type_v: str = "f16",
        offload_kqv: bool = True,
        swa_full: bool = True,
        kv_unified: bool = False,
        embeddings: bool = False,
        pooling: str | None = None,
        mmproj: str | os.PathLike[str] | None = None,
        progress: ProgressArg = None,
    ) -> dict[str, Any]:
        """Load a model in the child (replacing the current one) with one context; returns facts about both.

        ``model`` is anything :class:`pyllama.Model` accepts; ``rpc`` servers (see
        :mod:`pyllama.rpc`) are best used from a worker, since ggml aborts the process
        that loses one mid-generation: here that is the child. The model keywords
        are :class:`pyllama.Model`'s, the context keywords
        :class:`pyllama.Context`'s (``mmproj``: the model's projector, for prompts with images or audio). The
        worker remembers them: a restarted child
        or an idle-unloaded model is loaded again with the same settings. ``progress``: the child's load of
        the weights, as :class:`pyllama.Model`'s (True: a bar; a callable gets 0.0..1.0 in this thread).
        """
        spec = {
            "model": os.fspath(model),
            "model_options": {"n_gpu_layers": n_gpu_layers, "split_mode": split_mode, "main_gpu": main_gpu,
                              "tensor_split": None if tensor_split is None else list(tensor_split),
                              "devices": None if devices is None else list(devices), "use_mmap": use_mmap,
                              "use_mlock": use_mlock, "use_extra_bufts": use_extra_bufts,
                              "check_tensors": check_tensors,
                              "kv_overrides": None if kv_overrides is None else dict(kv_overrides),
                              "rpc": [r for r in rpc.split(",") if r] if isinstance(rpc, str) else list(rpc),
                              "mmproj": None if mmproj is None else os.fspath(mmproj)},
            "context_options": {"n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "n_seq_max": n_seq_max,
                                "n_threads": n_threads, "n_threads_batch": n_threads_batch,
                                "flash_attn": flash_attn, "type_k": type_k, "type_v": type_v,
                                "offload_kqv": offload_kqv, "swa_full": swa_full, "kv_unified": kv_unified,
                                "embeddings": embeddings, "pooling": pooling},
        }
        return self._load_spec(spec, progress)

    def _load_spec(self, spec: dict[str, Any], progress: ProgressArg = None) -> dict[str, Any]:
        """Load ``spec`` in the child now and remember it for restarts; ``progress`` as :class:`pyllama.Model`'s
        (a callable gets the child's load as 0.0..1.0, called in this thread; its result is ignored: a load in
        the child is not cancelled)."""
        reporter = _progress.reporter(progress, f"loading {Path(spec['model']).name}")
        try:
            info: dict[str, Any] = self._call(p.LOAD, spec, on_progress=reporter)
        finally:
            if reporter is not None:
                reporter.close()
        self._spec = spec
        return info

    def unload(self) -> None:
        """Free the model in the child now; the next request loads it again."""
        self._call(p.UNLOAD)

    def status(self) -> dict[str, Any]:
        """The child's state: ``pid``, ``loaded`` (is the model in memory), ``n_loads``, ``model``."""
        result: dict[str, Any] = self._call(p.STATUS)
        return result

    def info(self) -> dict[str, Any]:
        """Facts about the loaded model and its context (loading the model if it was unloaded)."""
        result: dict[str, Any] = self._call(p.INFO)
        return result

    # --- tokens -----------------------------------------------------------------------------------
    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False
                 ) -> npt.NDArray[np.int32]:
        """Like :meth:`pyllama.Model.tokenize`, in the child."""
        tokens: npt.NDArray[np.int32] = self._call(p.TOKENIZE, text, add_special, parse_special)
        return tokens

    def detokenize(self, tokens: npt.ArrayLike, *, remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        """Like :meth:`pyllama.Model.detokenize`, in the child."""
        arr = np.ascontiguousarray(tokens, dtype=np.int32)
        text: str = self._call(p.DETOKENIZE, arr, remove_special, unparse_special)
        return text

    def apply_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                       template: str | None = None) -> str:
        """Like :func:`pyllama.apply_template` with the worker's model."""
        text: str = self._call(p.TEMPLATE, [dict(m) for m in messages], add_generation_prompt, template)
        return text

    # --- generation -------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> WorkerGeneration:
        """Stream a completion of ``prompt``, as :func:`pyllama.generate` does in process.

        The options are :func:`pyllama.generate`'s; ``sampler`` is a list of
        sampler specs (a :class:`pyllama.SamplerChain` cannot cross processes)
        and ``draft`` names an n-gram drafter (``"ngram"`` or one of
        :data:`pyllama.speculative.NGRAM_TYPES`) for speculative decoding.
        Iterate the result with ``for`` or ``async for``; errors (an empty
        prompt, a prompt longer than the context) are raised by the iteration.
        """
        from ..media import Media, MediaParts

        if isinstance(prompt, (str, bytes)):
            if not prompt:
                raise ValueError("empty prompt: nothing to condition the generation on")
            sent: Any = prompt
        elif isinstance(prompt, (list, tuple)) and any(isinstance(x, Media) for x in prompt):
            # text and media: tokenized by the child's projector
            sent = MediaParts(tuple(prompt), options.get("add_special", True), options.get("parse_special", True))
        else:
            sent = np.ascontiguousarray(prompt, dtype=np.int32)
            if sent.size == 0:
                raise ValueError("empty prompt: nothing to condition the generation on")
        return self._stream(p.GENERATE, (sent, portable_options("generate", options, GENERATE_KEYS)))

    def chat(self, *, system: str | None = None, template: str | None = None, seq_id: int = 0,
             **options: Unpack[SamplingOptions]) -> WorkerChatSession:
        """A chat session on the model's template, as :class:`pyllama.ChatSession` in process
        (``options``: :func:`pyllama.generate`'s sampling options, for every turn).

        Sessions on the same ``seq_id`` share its KV cache: the one used last
        evaluates only its new tokens (give each session its own ``seq_id``,
        with ``load(n_seq_max=...)``, to keep several warm at once).
        """
        return WorkerChatSession(self, system=system, template=template, seq_id=seq_id,
                                 options=portable_options("chat", options, SAMPLING_KEYS))

    def embed(self, texts: str | Sequence[str], *, normalize: bool = True, pooling: str | None = None
              ) -> npt.NDArray[np.float32]:
        """Like :func:`pyllama.embed` on the worker's model: shape (len(texts), n_embd), or (n_embd,) for one string."""
        items: Any = texts if isinstance(texts, str) else list(texts)
        vectors: npt.NDArray[np.float32] = self._call(p.EMBED, items, normalize, pooling)
        return vectors

    # --- tests ------------------------------------------------------------------------------------
    def _debug(self, action: Literal["abort", "segfault", "exit", "sleep"], arg: float = 0) -> None:
        """Private crash hooks: a real abort inside llama.cpp, a segfault, ``os._exit(arg)``, a stall."""
        self._call(p.DEBUG, action, arg)



__all__ = ["Worker", "WorkerGeneration", "WorkerChatSession"]
