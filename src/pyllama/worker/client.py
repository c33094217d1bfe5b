"""The host side of the worker: :class:`Worker`, its streams and its chat sessions.

The child is a plain ``python -m pyllama.worker.child`` started with
:class:`subprocess.Popen`, talking over its stdin/stdout pipes (see
:mod:`pyllama.worker.protocol`); its stderr is read line by line so the last
llama.cpp log lines (and anything ``GGML_ASSERT`` prints before aborting) are
at hand when it dies. A reader thread routes each reply to the request that
asked for it, so calls from several threads share one child.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import os
import queue
import subprocess
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np
import numpy.typing as npt

from ..errors import ClosedError
from ..generate import TokenEvent
from ..sampling import Sampler, SamplerChain
from . import protocol as p
from .errors import WorkerCrashedError, WorkerError

logger = logging.getLogger("pyllama.worker")

Prompt = Union[str, bytes, Sequence[int], npt.NDArray[np.int32]]
Message = Mapping[str, str]
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "CRITICAL": logging.CRITICAL}


class _Inbox:
    """Replies to one request, taken by a blocking thread or awaited from an event loop."""

    __slots__ = ("_q", "_waker", "_event", "_loop")

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._waker: Callable[[], object] | None = None
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def put(self, msg: tuple[Any, ...]) -> None:  # from the reader thread
        self._q.put(msg)
        waker = self._waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:  # the consumer's loop is closed: nobody awaits this any more
                pass

    def get(self) -> tuple[Any, ...]:
        return self._q.get()

    async def aget(self) -> tuple[Any, ...]:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            pass
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._event is None:
            event = asyncio.Event()
            self._loop, self._event = loop, event
        event = self._event
        event.clear()
        self._waker = lambda: loop.call_soon_threadsafe(event.set)
        try:
            while True:  # a reply that arrived before the waker was set is found here
                try:
                    return self._q.get_nowait()
                except queue.Empty:
                    pass
                await event.wait()
                event.clear()
        finally:
            self._waker = None


class _Process:
    """One child process: its pipes, the reader threads, the requests awaiting replies."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_lines: int) -> None:
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":  # pragma: no cover - Windows only
            # Its own process group (a console Ctrl-C is the host's), and no console window.
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | 0x08000000  # CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # the terminal's Ctrl-C and SIGHUP are the host's
        self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=env, close_fds=True, **kwargs)
        self.pid = self.popen.pid
        assert self.popen.stdin is not None and self.popen.stdout is not None and self.popen.stderr is not None
        self._writer = p.FrameWriter(self.popen.stdin.fileno())
        self._lock = threading.Lock()
        self._pending: dict[int, _Inbox] = {}
        self._next_id = 1
        self.tail: collections.deque[str] = collections.deque(maxlen=max(1, log_lines))
        self.crash: WorkerCrashedError | None = None
        self.closing = False
        self._ended = threading.Event()
        # Streams dropped without close() are cancelled from their finalizer, which may run inside
        # any allocation (also while this thread holds a lock here): it only queues the id, and
        # this thread sends the CANCEL.
        self._to_cancel: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._cancel_thread = threading.Thread(target=self._cancel_loop, name=f"pyllama-worker-{self.pid}-cancel",
                                               daemon=True)
        self._stderr_thread = threading.Thread(target=self._read_stderr, name=f"pyllama-worker-{self.pid}-stderr",
                                               daemon=True)
        self._stdout_thread = threading.Thread(target=self._read_stdout, name=f"pyllama-worker-{self.pid}-reader",
                                               daemon=True)
        self._stderr_thread.start()
        self._stdout_thread.start()
        self._cancel_thread.start()

    # --- requests ------------------------------------------------------------------------
    def request(self, kind: int, *args: Any, inbox: _Inbox | None = None) -> tuple[int, _Inbox]:
        """Send a request; its replies arrive in the returned inbox (``inbox`` if given: a subclass may
        handle each reply on the reader thread). Raises the crash if the child is dead."""
        inbox = inbox if inbox is not None else _Inbox()
        with self._lock:
            self._check()
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = inbox
            try:
                # Under the lock: ids reach the child in increasing order (it relies on that).
                self._writer.send((kind, rid, *args))
            except OSError:
                del self._pending[rid]
                broken = True
            except BaseException:  # an argument that cannot be pickled: nothing was sent
                del self._pending[rid]
                raise
            else:
                broken = False
        if broken:  # the child is gone: wait for the reader to say how it died
            self._ended.wait(10)
            with self._lock:
                self._check()
            raise WorkerCrashedError.from_exit(self.pid, self.popen.poll(), list(self.tail))
        return rid, inbox

    def post(self, kind: int, *args: Any) -> None:
        """Send a message that gets no reply."""
        with self._lock:
            self._check()
            self._writer.send((kind, 0, *args))

    def _check(self) -> None:
        if self.crash is not None:
            raise copy.copy(self.crash)  # a fresh instance per caller: threads do not share a traceback
        if self.closing:
            raise ClosedError("the worker is closed")

    def done(self, rid: int) -> None:
        self._pending.pop(rid, None)

    def cancel(self, rid: int) -> None:
        """Stop request ``rid`` in the child and drop whatever it still sends."""
        if self._pending.pop(rid, None) is None:
            return
        try:
            with self._lock:
                if self.crash is None and not self.closing:
                    self._writer.send((p.CANCEL, rid))
        except OSError:  # the child is gone: nothing to stop
            pass

    def cancel_later(self, rid: int) -> None:
        """:meth:`cancel` from a finalizer: never blocks, never takes a lock."""
        self._to_cancel.put(rid)

    def _cancel_loop(self) -> None:
        while True:
            rid = self._to_cancel.get()
            if rid is None:
                return
            self.cancel(rid)

    # --- reader threads ----------------------------------------------------------------------
    def _read_stdout(self) -> None:
        stream = self.popen.stdout
        assert stream is not None
        pending = self._pending
        try:
            while True:
                msg = p.read_frame(stream)
                if msg is None:
                    break
                inbox = pending.get(msg[1])
                if inbox is not None:  # else: the request was cancelled; drop its leftovers
                    inbox.put(msg)
        except Exception:  # noqa: BLE001 - a corrupt channel counts as a dead worker
            logger.exception("pyllama worker %s: unreadable reply; stopping the worker", self.pid)
        self._ended_child()

    def _read_stderr(self) -> None:
        stream = self.popen.stderr
        assert stream is not None
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            head = line.split(" ", 1)[0]
            logger.log(_LEVELS.get(head, logging.WARNING), "[worker %s] %s", self.pid, line)

    def _ended_child(self) -> None:
        """Our end of the channel closed: the child exited (or is about to). Fail what waits on it."""
        try:
            rc = self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it closed stdout but lives on: stop it
            self.popen.kill()
            rc = self.popen.wait()
        self._stderr_thread.join(timeout=5)  # the lines written just before dying
        with self._lock:
            if self.closing:
                err: Exception = ClosedError("the worker was closed")
            else:
                self.crash = WorkerCrashedError.from_exit(self.pid, rc, list(self.tail))
                err = self.crash
            pending = list(self._pending.values())
            self._pending.clear()
        for inbox in pending:
            inbox.put((p.CRASH, 0, copy.copy(err)))
        self._ended.set()
        if self.crash is not None:
            logger.warning("%s", self.crash)

    # --- shutdown ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the child to exit, and kill it if it does not within ``timeout`` seconds."""
        with self._lock:
            self.closing = True
            try:
                self._writer.send((p.SHUTDOWN, 0))
            except OSError:
                pass
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        except OSError:
            pass
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._to_cancel.put(None)
        current = threading.current_thread()
        for t in (self._stdout_thread, self._stderr_thread, self._cancel_thread):
            if t is not current:
                t.join(timeout=5)


class _Slot:
    """The worker's current process, shared with its finalizer (which must not hold the worker)."""

    def __init__(self) -> None:
        self.proc: _Process | None = None

    def shutdown(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.shutdown(timeout)


class WorkerGeneration:
    """A generation running in the worker: an iterator and an async iterator of
    :class:`pyllama.TokenEvent`, and a (sync or async) context manager.

    Tokens arrive as the child produces them. After the stream ends,
    ``finish_reason``, ``tokens``, ``text``, ``n_prompt_tokens`` and
    ``n_prompt_evaluated`` are set as for :class:`pyllama.Generation`.
    ``close()`` (or leaving the ``with`` block, or dropping the object) stops
    the generation in the child. If the worker dies, iteration raises
    :class:`WorkerCrashedError`.
    """

    def __init__(self, worker: Worker, proc: _Process, rid: int, inbox: _Inbox,
                 on_end: Callable[[WorkerGeneration], None] | None = None) -> None:
        self._worker = worker  # keeps the worker (and its process) alive while the stream is
        self._proc = proc
        self._rid = rid
        self._inbox = inbox
        self._on_end = on_end
        self._tokens: list[int] = []
        self._texts: list[str] = []
        self.finish_reason: str | None = None
        self.n_prompt_tokens = 0
        self.n_prompt_evaluated = 0
        self._done = False
        self._closed = False
        self._cancel = weakref.finalize(self, proc.cancel_later, rid)

    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        """The generated token ids so far."""
        return np.array(self._tokens, dtype=np.int32)

    @property
    def n_generated(self) -> int:
        return len(self._tokens)

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._texts)

    def _take(self, msg: tuple[Any, ...]) -> TokenEvent:
        kind = msg[0]
        if kind == p.TOKEN:
            _, _, token, text, index, logprob, top = msg
            if token >= 0:
                self._tokens.append(token)
            if text:
                self._texts.append(text)
            return TokenEvent(token, text, index, logprob, top)
        self._end()
        if kind == p.END:
            self.finish_reason, self.n_prompt_tokens, self.n_prompt_evaluated = msg[2], msg[3], msg[4]
            raise StopIteration
        if kind == p.ERR:
            raise p.decode_error(msg[2], WorkerError)
        raise msg[2]  # CRASH: WorkerCrashedError (or ClosedError when the worker was closed)

    def _end(self) -> None:
        self._done = True
        self._cancel.detach()
        self._proc.done(self._rid)
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)

    # --- sync ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        if self._closed:
            raise ClosedError("this generation is closed")
        return self

    def __next__(self) -> TokenEvent:
        if self._done or self._closed:
            raise StopIteration
        return self._take(self._inbox.get())

    def __enter__(self) -> WorkerGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the generation (in the child too). Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._done = True
            self._cancel.detach()
            self._proc.cancel(self._rid)  # CANCEL to the child; later tokens of this request are dropped
            if self._on_end is not None:
                on_end, self._on_end = self._on_end, None
                on_end(self)

    # --- async ---------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._closed:
            raise ClosedError("this generation is closed")
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done or self._closed:
            raise StopAsyncIteration
        msg = await self._inbox.aget()
        try:
            return self._take(msg)
        except StopIteration:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> WorkerGeneration:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("done" if self._done else "running")
        return f"<pyllama.WorkerGeneration {state} tokens={len(self._tokens)} finish={self.finish_reason}>"


class WorkerChatSession:
    """A conversation with the worker's model; see :meth:`Worker.chat`.

    The child keeps the conversation in its KV cache between turns, so each
    turn evaluates only its new tokens. The messages are kept here too, so a
    session survives a restarted worker or an idle unload (the next turn then
    evaluates the whole conversation once). The generation settings are plain
    attributes, changeable between turns.
    """

    def __init__(self, worker: Worker, *, system: str | None, template: str | None, seq_id: int,
                 sampler: Sequence[Sampler] | None, max_tokens: int | None, stop: Sequence[str],
                 seed: int | None) -> None:
        self.worker = worker
        self.template = template
        self.seq_id = seq_id
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.seed = seed
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def stream(self, message: str) -> WorkerGeneration:
        """Send a user message and stream the reply; the reply joins ``messages`` when the stream ends."""
        options = _generation_options(sampler=self.sampler, max_tokens=self.max_tokens, stop=self.stop,
                                      seed=self.seed)
        history = [*self.messages, {"role": "user", "content": message}]
        gen = self.worker._stream(p.CHAT, (history, self.template, self.seq_id, options),
                                  on_end=lambda g: self.messages.append({"role": "assistant", "content": g.text}))
        self.messages.append(history[-1])
        return gen

    def ask(self, message: str) -> str:
        """Send a user message and return the whole reply."""
        with self.stream(message) as gen:
            for _ in gen:
                pass
            return gen.text

    async def aask(self, message: str) -> str:
        """:meth:`ask` for asyncio code."""
        async with self.stream(message) as gen:
            async for _ in gen:
                pass
            return gen.text


def _generation_options(*, sampler: Sequence[Sampler] | None, max_tokens: int | None, stop: Sequence[str],
                        seed: int | None, **rest: Any) -> dict[str, Any]:
    if isinstance(sampler, SamplerChain):
        raise TypeError("a SamplerChain lives in this process; pass the list of sampler specs "
                        "(e.g. [pyllama.TopK(40), pyllama.Dist(seed=1)]) and the worker builds the chain")
    if sampler is not None and not all(isinstance(s, Sampler) for s in sampler):
        raise TypeError("sampler must be a list of pyllama sampler specs")
    if max_tokens is not None and max_tokens < 0:
        raise ValueError("max_tokens must be >= 0 or None")
    if isinstance(stop, str):
        raise TypeError("stop must be a list of strings, not a string")
    return {"sampler": None if sampler is None else list(sampler), "max_tokens": max_tokens, "stop": list(stop),
            "seed": seed, **rest}


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
    """

    def __init__(self, *, keep_alive: float | None = None, restart: bool = True, log_level: str = "INFO",
                 log_lines: int = 100, backtrace: bool = False, env: Mapping[str, str] | None = None,
                 python: str | os.PathLike[str] | None = None, start: bool = True) -> None:
        if keep_alive is not None and keep_alive < 0:
            raise ValueError("keep_alive must be >= 0 seconds or None (never unload)")
        if log_level.upper() not in _LEVELS:
            raise ValueError(f"log_level must be one of {sorted(_LEVELS)}, not {log_level!r}")
        self._keep_alive = keep_alive
        self.restart_on_crash = restart
        self._log_level = log_level.upper()
        self._log_lines = log_lines
        self._backtrace = backtrace
        self._env = dict(env) if env is not None else None
        self._python = os.fspath(python) if python is not None else sys.executable
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
        proc = _Process(cmd, env, self._log_lines)
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

    def _call(self, kind: int, *args: Any) -> Any:
        proc, rid, inbox = self._submit(kind, *args)
        try:
            msg = inbox.get()
        finally:
            proc.done(rid)
        if msg[0] == p.OK:
            return msg[2]
        if msg[0] == p.ERR:
            raise p.decode_error(msg[2], WorkerError)
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
    ) -> dict[str, Any]:
        """Load a model in the child (replacing the current one) with one context; returns facts about both.

        ``model`` is anything :class:`pyllama.Model` accepts; ``rpc`` servers (see
        :mod:`pyllama.rpc`) are best used from a worker, since ggml aborts the process
        that loses one mid-generation: here that is the child. The model keywords
        are :class:`pyllama.Model`'s, the context keywords
        :class:`pyllama.Context`'s. The worker remembers them: a restarted child
        or an idle-unloaded model is loaded again with the same settings.
        """
        spec = {
            "model": os.fspath(model),
            "model_options": {"n_gpu_layers": n_gpu_layers, "split_mode": split_mode, "main_gpu": main_gpu,
                              "tensor_split": None if tensor_split is None else list(tensor_split),
                              "devices": None if devices is None else list(devices), "use_mmap": use_mmap,
                              "use_mlock": use_mlock, "use_extra_bufts": use_extra_bufts,
                              "check_tensors": check_tensors,
                              "kv_overrides": None if kv_overrides is None else dict(kv_overrides),
                              "rpc": [r for r in rpc.split(",") if r] if isinstance(rpc, str) else list(rpc)},
            "context_options": {"n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "n_seq_max": n_seq_max,
                                "n_threads": n_threads, "n_threads_batch": n_threads_batch,
                                "flash_attn": flash_attn, "type_k": type_k, "type_v": type_v,
                                "offload_kqv": offload_kqv, "swa_full": swa_full, "kv_unified": kv_unified,
                                "embeddings": embeddings, "pooling": pooling},
        }
        return self._load_spec(spec)

    def _load_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Load ``spec`` in the child now and remember it for restarts."""
        info: dict[str, Any] = self._call(p.LOAD, spec)
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
    def generate(self, prompt: Prompt, *, sampler: Sequence[Sampler] | None = None, max_tokens: int | None = 256,
                 stop: Sequence[str] = (), seed: int | None = None, seq_id: int = 0, logprobs: bool = False,
                 top_logprobs: int = 0, add_special: bool = True, parse_special: bool = True,
                 context_shift: bool = False, n_keep: int = 0, reuse_prefix: bool = True,
                 ignore_eos: bool = False) -> WorkerGeneration:
        """Stream a completion of ``prompt``, as :func:`pyllama.generate` does in process.

        The options are :func:`pyllama.generate`'s; ``sampler`` is a list of
        sampler specs (a :class:`pyllama.SamplerChain` cannot cross processes).
        Iterate the result with ``for`` or ``async for``; errors (an empty
        prompt, a prompt longer than the context) are raised by the iteration.
        """
        if isinstance(prompt, (str, bytes)):
            if not prompt:
                raise ValueError("empty prompt: nothing to condition the generation on")
            sent: Any = prompt
        else:
            sent = np.ascontiguousarray(prompt, dtype=np.int32)
            if sent.size == 0:
                raise ValueError("empty prompt: nothing to condition the generation on")
        options = _generation_options(sampler=sampler, max_tokens=max_tokens, stop=stop, seed=seed, seq_id=seq_id,
                                      logprobs=logprobs, top_logprobs=top_logprobs, add_special=add_special,
                                      parse_special=parse_special, context_shift=context_shift, n_keep=n_keep,
                                      reuse_prefix=reuse_prefix, ignore_eos=ignore_eos)
        return self._stream(p.GENERATE, (sent, options))

    def chat(self, *, system: str | None = None, template: str | None = None, seq_id: int = 0,
             sampler: Sequence[Sampler] | None = None, max_tokens: int | None = 256, stop: Sequence[str] = (),
             seed: int | None = None) -> WorkerChatSession:
        """A chat session on the model's template, as :class:`pyllama.ChatSession` in process.

        Sessions on the same ``seq_id`` share its KV cache: the one used last
        evaluates only its new tokens (give each session its own ``seq_id``,
        with ``load(n_seq_max=...)``, to keep several warm at once).
        """
        return WorkerChatSession(self, system=system, template=template, seq_id=seq_id, sampler=sampler,
                                 max_tokens=max_tokens, stop=stop, seed=seed)

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
