"""The worker process: ``python -m pyllama.worker.child``, serving one host over its stdin and stdout.

Two threads: the reader takes frames off stdin, answers cancellations at once
and queues everything else; the main thread serves the queue in order, with
the model and its context. The process exits as soon as its host is gone: end
of stdin, a parent-pid watchdog, and on Linux ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from . import protocol as p
from .errors import WorkerError

if TYPE_CHECKING:
    from ..context import Context
    from ..engine import Engine, EngineRequest
    from ..generate import Generation
    from ..model import Model


def _exit_now(code: int = 0) -> NoReturn:
    # The host is gone or asked us to stop: nothing left is worth a clean shutdown,
    # and the OS frees the model's memory at once.
    try:
        sys.stderr.flush()
    finally:
        os._exit(code)


def _watch_parent(parent_pid: int, pdeathsig: bool) -> None:
    """Exit when the host process dies, even if something else still holds our stdin open."""
    if sys.platform.startswith("linux") and pdeathsig:
        import ctypes

        try:  # PR_SET_PDEATHSIG = 1: the kernel sends SIGKILL when the spawning thread exits
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if sys.platform == "win32":  # pragma: no cover - Windows only
        import ctypes

        synchronize, infinite = 0x00100000, 0xFFFFFFFF
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
        handle = kernel32.OpenProcess(synchronize, False, parent_pid)
        if not handle:
            _exit_now(0)

        def wait_windows() -> None:
            kernel32.WaitForSingleObject(handle, infinite)
            _exit_now(0)

        threading.Thread(target=wait_windows, name="pyllama-parent-watch", daemon=True).start()
        return

    if os.getppid() != parent_pid:  # the host died before we got here
        _exit_now(0)

    def poll_posix() -> None:
        while True:  # when the parent dies we are re-parented and getppid() changes
            time.sleep(0.2)
            if os.getppid() != parent_pid:
                _exit_now(0)

    threading.Thread(target=poll_posix, name="pyllama-parent-watch", daemon=True).start()


class Server:
    """Serves the requests of one host, in order, on one model and context."""

    def __init__(self, out: p.FrameWriter, keep_alive: float | None) -> None:
        self._out = out
        self.keep_alive = keep_alive
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.spec: dict[str, Any] | None = None
        self.model: Model | None = None
        self.ctx: Context | None = None
        self.n_loads = 0
        self._last_used = time.monotonic()
        self._lock = threading.Lock()
        self._current = 0  # the request id being served (0: none)
        self._cancel_current = False
        self._in_prompt = False  # a generation is evaluating its prompt (cancel may abort the decode)
        self._cancelled: set[int] = set()
        self.engine: Engine | None = None  # the serving engine, when the spec has "engine_options"
        self._engine_requests: dict[int, EngineRequest] = {}
        self._load_rid = 0  # the LOAD being answered: its model's load progress goes back to it
        self._handlers: dict[int, Callable[[int, tuple[Any, ...]], None]] = {
            p.LOAD: self._load, p.SPEC: self._spec, p.UNLOAD: self._unload, p.TOKENIZE: self._tokenize,
            p.DETOKENIZE: self._detokenize, p.GENERATE: self._generate, p.CHAT: self._chat,
            p.EMBED: self._embed, p.TEMPLATE: self._template, p.STATUS: self._status, p.DEBUG: self._debug,
            p.INFO: lambda rid, msg: self.send((p.OK, rid, self._info())),
            p.ENGINE_SUBMIT: self._engine_submit, p.ENGINE_EMBED: self._engine_embed,
            p.ENGINE_CALL: self._engine_call,
        }

    # --- the channel --------------------------------------------------------------------
    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self._out.send(msg)
        except OSError:  # the host closed its end: it is gone
            _exit_now(0)

    def read_loop(self, stream: IO[bytes]) -> None:
        """The reader thread: cancellations now, everything else to the queue; EOF ends the process."""
        try:
            while True:
                msg = p.read_frame(stream)
                if msg is None or msg[0] == p.SHUTDOWN:
                    _exit_now(0)
                if msg[0] == p.CANCEL:
                    self.cancel(msg[1])
                elif msg[0] == p.ENGINE_STATS:  # answered even while the main thread loads the model
                    engine = self.engine
                    self.send((p.OK, msg[1], None if engine is None else engine.stats()))
                else:
                    self.queue.put(msg)
        except BaseException:  # noqa: BLE001 - a corrupt channel: say why on stderr and stop
            import traceback

            traceback.print_exc()
            _exit_now(3)

    def cancel(self, rid: int) -> None:
        with self._lock:
            er = self._engine_requests.get(rid)
            if er is not None:
                er.cancel()
            elif rid == self._current:
                self._cancel_current = True
                if self._in_prompt and self.ctx is not None:
                    # Stop a long prompt evaluation at the next graph node. Once tokens flow, the
                    # loop stops between tokens instead, which keeps the KV cache reusable.
                    self.ctx.abort()
            else:
                self._cancelled.add(rid)

    # --- the main loop ---------------------------------------------------------------------
    def run(self) -> NoReturn:
        while True:
            idle = None
            if self.model is not None and self.keep_alive is not None:
                idle = max(0.0, self._last_used + self.keep_alive - time.monotonic())
            try:
                msg = self.queue.get(timeout=idle)
            except queue.Empty:  # idle for keep_alive seconds: free the model, keep serving
                self.unload()
                continue
            kind, rid = msg[0], msg[1]
            with self._lock:
                if rid in self._cancelled:
                    self._cancelled.discard(rid)
                    continue
                if self._cancelled:  # ids only grow: older cancellations can no longer match
                    self._cancelled = {r for r in self._cancelled if r > rid}
                self._current, self._cancel_current = rid, False
            try:
                self._handlers[kind](rid, msg)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
                if rid:
                    self.send((p.ERR, rid, p.encode_error(exc)))
            finally:
                with self._lock:
                    self._current = 0
                if kind != p.STATUS:  # asking whether the model is loaded does not keep it loaded
                    self._last_used = time.monotonic()

    # --- the model ---------------------------------------------------------------------------
    def _progress(self) -> Callable[[float], None] | None:
        """What reports the model's load to the host: only for LOAD (a load on first use has nobody to tell)."""
        rid = self._load_rid
        if not rid:
            return None
        last = [-1.0, 0.0]  # fraction, time of the last report

        def report(value: float) -> None:
            # llama.cpp calls this per tensor: at most every 0.1 s, and the first and the last always
            now = time.monotonic()
            if last[0] < 0 or value >= 1.0 or now - last[1] >= 0.1:
                last[0], last[1] = value, now
                self.send((p.PROGRESS, rid, float(value)))

        return report

    def ensure_loaded(self) -> tuple[Model, Context]:
        if self.model is None or self.ctx is None:
            if self.spec is None:
                raise WorkerError("no model is loaded: call Worker.load(path) first")
            if "engine_options" in self.spec:
                raise WorkerError("this worker serves an engine: only engine requests apply")
            from ..model import Model

            model = Model(self.spec["model"], **self.spec["model_options"], progress=self._progress())
            try:
                ctx = model.context(**self.spec["context_options"])
            except BaseException:
                model.close()
                raise
            self.model, self.ctx = model, ctx
            self.n_loads += 1
        return self.model, self.ctx

    def ensure_engine(self) -> Engine:
        if self.engine is None:
            if self.spec is None or "engine_options" not in self.spec:
                raise WorkerError("no engine is loaded")
            from ..engine import Engine
            from ..model import Model

            model = Model(self.spec["model"], **self.spec["model_options"], progress=self._progress())
            try:
                if self.spec.get("projector"):
                    model.projector(**self.spec["projector"])
                engine = Engine(model, **self.spec["engine_options"])
            except BaseException:
                model.close()
                raise
            self.model, self.engine = model, engine
            self.n_loads += 1
        return self.engine

    def unload(self) -> None:
        ctx, model, engine = self.ctx, self.model, self.engine
        with self._lock:
            self.ctx = self.model = self.engine = None
        if engine is not None:
            engine.close()
        if ctx is not None:
            ctx.close()
        if model is not None:
            model.close()

    def _info(self) -> dict[str, Any]:
        if self.spec is not None and "engine_options" in self.spec:
            engine = self.ensure_engine()
            return {"pid": os.getpid(), "path": str(engine.model.path), "n_slots": engine.n_slots,
                    "n_ctx_slot": engine.n_ctx_slot, "n_batch": engine.n_batch, "embeddings": engine.embeddings,
                    "pooling": engine.pooling, "modalities": engine.modalities,
                    "model_facts": {"n_embd": engine.model.n_embd, "n_ctx_train": engine.model.n_ctx_train,
                                    "n_params": engine.model.n_params, "size": engine.model.size}}
        model, ctx = self.ensure_loaded()
        return {"path": str(model.path), "description": model.description, "architecture": model.architecture,
                "modalities": model.mmproj.modalities if model.mmproj is not None else (),
                "n_params": model.n_params, "size": model.size, "n_ctx_train": model.n_ctx_train,
                "n_embd": model.n_embd, "n_vocab": model.vocab.n_tokens, "n_ctx": ctx.n_ctx,
                "n_ctx_seq": ctx.n_ctx_seq, "n_seq_max": ctx.n_seq_max, "n_gpu_layers": model.n_gpu_layers,
                "chat_template": model.chat_template(), "bos": model.vocab.bos, "eos": model.vocab.eos}

    # --- handlers ------------------------------------------------------------------------------
    def _load(self, rid: int, msg: tuple[Any, ...]) -> None:
        self.unload()
        self.spec = msg[2]
        self._load_rid = rid
        try:
            info = self._info()
        except BaseException:
            self.spec = None
            raise
        finally:
            self._load_rid = 0
        self.send((p.OK, rid, info))

    def _spec(self, rid: int, msg: tuple[Any, ...]) -> None:
        self.unload()
        self.spec = msg[2]

    def _unload(self, rid: int, msg: tuple[Any, ...]) -> None:
        self.unload()
        self.send((p.OK, rid, None))

    def _tokenize(self, rid: int, msg: tuple[Any, ...]) -> None:
        model, _ = self.ensure_loaded()
        self.send((p.OK, rid, model.tokenize(msg[2], add_special=msg[3], parse_special=msg[4])))

    def _detokenize(self, rid: int, msg: tuple[Any, ...]) -> None:
        model, _ = self.ensure_loaded()
        self.send((p.OK, rid, model.detokenize(msg[2], remove_special=msg[3], unparse_special=msg[4])))

    def _stream(self, rid: int, gen: Generation) -> None:
        send, token_kind = self.send, p.TOKEN
        self._in_prompt = True
        try:
            with gen:
                for ev in gen:
                    self._in_prompt = False
                    if self._cancel_current:
                        return
                    send((token_kind, rid, ev.token, ev.text, ev.index, ev.logprob, ev.top_logprobs))
                send((p.END, rid, gen.finish_reason, int(gen.prompt_tokens.size), gen.n_prompt_evaluated,
                      gen.speculative))
        finally:
            self._in_prompt = False

    def _generate(self, rid: int, msg: tuple[Any, ...]) -> None:
        from ..generate import Generation

        _, ctx = self.ensure_loaded()
        self._stream(rid, Generation(ctx, msg[2], **msg[3]))

    def _chat(self, rid: int, msg: tuple[Any, ...]) -> None:
        from ..chat import ChatSession
        from ..generate import Generation

        _, ctx = self.ensure_loaded()
        messages, template, seq_id, options = msg[2], msg[3], msg[4], msg[5]
        session = ChatSession(ctx, template=template, seq_id=seq_id)
        session.messages = [dict(m) for m in messages]
        # The whole conversation is rendered; the context's prefix reuse evaluates only
        # what its KV cache does not already hold from the previous turns.
        from ..media import MediaPrompt

        prompt = session._prompt_tokens()
        if isinstance(prompt, MediaPrompt):  # made here: the generation closes it
            prompt.disposable = True
        self._stream(rid, Generation(ctx, prompt, seq_id=seq_id, **options))

    def _embed(self, rid: int, msg: tuple[Any, ...]) -> None:
        from ..embed import embed

        model, _ = self.ensure_loaded()
        threads = self.spec["context_options"].get("n_threads") if self.spec else None
        self.send((p.OK, rid, embed(model, msg[2], normalize=msg[3], pooling=msg[4], n_threads=threads)))

    def _template(self, rid: int, msg: tuple[Any, ...]) -> None:
        from ..chat import apply_template

        model, _ = self.ensure_loaded()
        self.send((p.OK, rid, apply_template(model, msg[2], add_generation_prompt=msg[3], template=msg[4])))

    # --- the serving engine: requests run concurrently, each forwarded by a thread of its own ------
    def _engine_submit(self, rid: int, msg: tuple[Any, ...]) -> None:
        er = self.ensure_engine().submit(msg[2], **msg[3])
        with self._lock:
            self._engine_requests[rid] = er
            if self._cancel_current:  # cancelled while the engine was loading or taking it
                er.cancel()
        threading.Thread(target=self._engine_forward, args=(rid, er), name=f"pyllama-engine-fwd-{rid}",
                         daemon=True).start()

    def _engine_forward(self, rid: int, er: EngineRequest) -> None:
        from ..engine.request import PromptProgress

        send, token_kind = self.send, p.TOKEN
        try:
            for ev in er:
                if isinstance(ev, PromptProgress):  # its numbers ride in the top_logprobs slot
                    send((token_kind, rid, ev.token, "", ev.index, None, (ev.total, ev.cache, ev.processed,
                                                                          ev.time_ms)))
                    continue
                send((token_kind, rid, ev.token, ev.text, ev.index, ev.logprob, ev.top_logprobs))
        except Exception as exc:  # noqa: BLE001 - the request's own failure goes back to its caller
            send((p.ERR, rid, p.encode_error(exc)))
        else:
            send((p.END, rid, er.finish_reason, er.n_prompt, er.n_cached, er.speculative))
        finally:
            with self._lock:
                self._engine_requests.pop(rid, None)

    def _engine_embed(self, rid: int, msg: tuple[Any, ...]) -> None:
        engine = self.ensure_engine()

        def run() -> None:  # off the main thread: submissions keep flowing meanwhile
            try:
                self.send((p.OK, rid, engine.embed(msg[2], normalize=msg[3])))
            except Exception as exc:  # noqa: BLE001
                self.send((p.ERR, rid, p.encode_error(exc)))

        threading.Thread(target=run, name=f"pyllama-engine-embed-{rid}", daemon=True).start()

    def _engine_call(self, rid: int, msg: tuple[Any, ...]) -> None:
        engine = self.ensure_engine()
        method, args = msg[2], msg[3]

        def run() -> None:  # off the main thread: a slot action waits for its slot to be idle
            try:
                if method not in p.ENGINE_METHODS:
                    raise ValueError(f"not an engine method the worker runs: {method!r}")
                self.send((p.OK, rid, getattr(engine, method)(*args)))
            except Exception as exc:  # noqa: BLE001
                self.send((p.ERR, rid, p.encode_error(exc)))

        threading.Thread(target=run, name=f"pyllama-engine-call-{rid}", daemon=True).start()

    def _status(self, rid: int, msg: tuple[Any, ...]) -> None:
        self.send((p.OK, rid, {"pid": os.getpid(), "loaded": self.model is not None, "n_loads": self.n_loads,
                               "model": None if self.spec is None else self.spec["model"],
                               "keep_alive": self.keep_alive}))

    def _debug(self, rid: int, msg: tuple[Any, ...]) -> None:
        """Crash hooks for tests: a real abort inside llama.cpp, a segfault, an exit, a stall."""
        what, arg = msg[2], msg[3]
        if what == "abort":
            _llama_abort(self.ensure_loaded()[0])
        elif what == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif what == "exit":
            _exit_now(int(arg))
        elif what == "sleep":
            time.sleep(float(arg))
        else:
            raise ValueError(f"unknown debug action {what!r}")
        self.send((p.OK, rid, None))


def _llama_abort(model: Model) -> None:
    """Make llama.cpp abort: sampling from a context that has computed no logits trips a
    ``GGML_ASSERT`` inside ``llama_sampler_sample`` (ggml_abort prints the assertion to stderr)."""
    from .._context_access import native
    from .._ffi import lib

    if hasattr(lib, "ggml_abort"):  # bound in builds whose cdef exports it
        lib.ggml_abort(b"pyllama/worker/child.py", 0, b"deliberate abort requested by the host")
    ctx = model.context(n_ctx=32, n_batch=32, n_ubatch=32)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    lib.llama_sampler_sample(chain, native(ctx), -1)
    os.abort()  # not reached: llama.cpp aborted above


def _configure_logging(level: str) -> None:
    # One line per record on stderr; the host keeps the last ones for crash reports
    # and re-logs them, level first.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("pyllama")
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> NoReturn:
    ap = argparse.ArgumentParser(prog="python -m pyllama.worker.child")
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--pdeathsig", action="store_true")
    ap.add_argument("--keep-alive", type=float, default=-1.0, help="idle seconds before unloading (<0: never)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)

    # The channel: fd 0 in, a private copy of fd 1 out. fd 1 then points at stderr, so a
    # library that prints to stdout cannot corrupt the frames.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if sys.platform == "win32":  # pragma: no cover - Windows only
        import msvcrt

        msvcrt.setmode(0, os.O_BINARY)  # type: ignore[attr-defined,unused-ignore]
        msvcrt.setmode(out_fd, os.O_BINARY)  # type: ignore[attr-defined,unused-ignore]
    # Ctrl-C in the host's terminal is the host's business (it cancels streams itself).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(args.parent_pid, args.pdeathsig)
    _configure_logging(args.log_level)

    from .. import _ffi  # noqa: F401 - load llama.cpp now: a broken install fails here, visibly

    server = Server(p.FrameWriter(out_fd), args.keep_alive if args.keep_alive >= 0 else None)
    stdin = os.fdopen(0, "rb", buffering=1 << 16)
    threading.Thread(target=server.read_loop, args=(stdin,), name="pyllama-worker-reader", daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
