"""pyllama.Worker: the model in a child process; crashes there never reach the host.

Every test runs real child processes on the synthetic models (the starter
model for one end-to-end comparison); crashes are real: SIGKILL, and an abort
inside llama.cpp (a GGML_ASSERT reached through the child's debug hook).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

import pyllama
from pyllama.worker import Worker, WorkerCrashedError, WorkerError, WorkerMemoryError

T = TypeVar("T")
CTX = {"n_ctx": 256, "n_threads": 1, "n_threads_batch": 1}
POSIX = sys.platform != "win32"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    if sys.platform.startswith("linux"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    return _until(seconds, lambda: not _alive(pid))


def _until(seconds: float, condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread and fail (rather than hang the suite) if it takes longer than ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"the call did not return within {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def _endless(worker: Worker) -> pyllama.WorkerGeneration:
    """A generation that never ends by itself: end-of-generation ignored, the context shifts when full."""
    return worker.generate("Hello", max_tokens=None, ignore_eos=True, context_shift=True, n_keep=1)


def _in_process_tokens(path: Path, prompt: str, n: int, **ctx: Any) -> tuple[np.ndarray, str]:
    with pyllama.Model(path, n_gpu_layers=0) as model, model.context(**ctx) as c:
        with pyllama.generate(c, prompt, max_tokens=n) as gen:
            for _ in gen:
                pass
            return gen.tokens.copy(), gen.text


@pytest.fixture(scope="module")
def worker(synth_model_path: Path) -> Iterator[Worker]:
    """One worker with the synthetic model for the tests that do not crash it."""
    with Worker() as w:
        w.load(synth_model_path, n_gpu_layers=0, **CTX)
        yield w


# --- same answers as in process -------------------------------------------------------------

def test_greedy_tokens_equal_in_process(worker: Worker, synth_model_path: Path) -> None:
    expected, text = _in_process_tokens(synth_model_path, "Hello world", 40, **CTX)
    with worker.generate("Hello world", max_tokens=40) as gen:
        events = list(gen)
    assert np.array_equal(gen.tokens, expected)
    assert gen.text == text == "".join(ev.text for ev in events)
    assert gen.finish_reason in ("length", "eog")
    assert gen.n_prompt_tokens > 0 and 0 < gen.n_prompt_evaluated <= gen.n_prompt_tokens
    assert all(isinstance(ev, pyllama.TokenEvent) for ev in events)
    assert [ev.index for ev in events if ev.token >= 0] == list(range(len(expected)))


def test_speculative_generation_in_the_worker(worker: Worker, synth_model_path: Path) -> None:
    prompt = "the cat and the dog and the cat and the dog"
    expected, _ = _in_process_tokens(synth_model_path, prompt, 80, **CTX)
    with worker.generate(prompt, max_tokens=80, draft="ngram") as gen:
        assert gen.speculative is None  # known once the generation ends
        list(gen)
    assert np.array_equal(gen.tokens, expected)
    st = gen.speculative
    assert st is not None and 0 < st.n_accepted <= st.n_drafted and st.n_drafts > 0, st
    with worker.generate(prompt, max_tokens=4) as plain:
        list(plain)
    assert plain.speculative is None
    with pytest.raises(ValueError, match="draft"):
        list(worker.generate(prompt, max_tokens=4, draft="lookahead"))
    with pytest.raises(TypeError):
        worker.generate(prompt, draft=object())  # type: ignore[arg-type]


def test_tokens_and_template_equal_in_process(worker: Worker, model: pyllama.Model) -> None:
    text = "Hello world, le café"
    toks = worker.tokenize(text)
    assert toks.dtype == np.int32 and np.array_equal(toks, model.tokenize(text))
    assert worker.detokenize(toks) == model.detokenize(model.tokenize(text))
    msgs = [{"role": "user", "content": "Hi"}]
    assert worker.apply_template(msgs) == pyllama.apply_template(model, msgs)
    info = worker.info()
    assert info["n_vocab"] == model.vocab.n_tokens and info["n_ctx"] == CTX["n_ctx"]


@pytest.mark.starter
def test_greedy_tokens_equal_in_process_starter(starter_model_path: Path) -> None:
    ctx = {"n_ctx": 512, "n_threads": 2, "n_threads_batch": 2}
    expected, text = _in_process_tokens(starter_model_path, "The capital of France is", 12, **ctx)
    with Worker() as w:
        w.load(starter_model_path, n_gpu_layers=0, **ctx)
        with w.generate("The capital of France is", max_tokens=12) as gen:
            for _ in gen:
                pass
    assert np.array_equal(gen.tokens, expected) and gen.text == text


def test_embeddings_equal_in_process(synth_embedding_model_path: Path) -> None:
    texts = ["Hello world", "Le café", "Hello world"]
    with pyllama.Model(synth_embedding_model_path, n_gpu_layers=0) as m:
        expected = pyllama.embed(m, texts, n_threads=1)
        one = pyllama.embed(m, "Le café", normalize=False, n_threads=1)
    with Worker() as w:
        w.load(synth_embedding_model_path, n_gpu_layers=0, n_ctx=128, n_threads=1)
        got = w.embed(texts)
        got_one = w.embed("Le café", normalize=False)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.allclose(got, expected, atol=1e-6)
    assert got_one.shape == one.shape and np.allclose(got_one, one, atol=1e-6)


def test_chat_session_keeps_the_conversation_in_the_kv_cache(worker: Worker, model: pyllama.Model) -> None:
    worker.unload()  # a fresh context, as the in-process comparison below has
    assert worker.status()["loaded"] is False
    session = worker.chat(system="Be brief.", max_tokens=8)
    first = session.ask("Hello")
    assert session.messages[-1] == {"role": "assistant", "content": first}
    with session.stream("And then?") as gen:
        second = "".join(ev.text for ev in gen)
    # Only the new turn was evaluated: the earlier turns were still in the child's KV cache.
    assert 0 < gen.n_prompt_evaluated < gen.n_prompt_tokens
    assert session.messages[-1]["content"] == second == gen.text
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    # The same conversation in process gives the same replies (greedy).
    with model.context(**CTX) as ctx:
        local = pyllama.ChatSession(ctx, system="Be brief.", max_tokens=8)
        assert local.ask("Hello") == first
        assert local.ask("And then?") == second
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


# --- async, cancellation, threads -------------------------------------------------------------

def test_async_iteration_matches_sync(worker: Worker) -> None:
    with worker.generate("Once upon", max_tokens=24, reuse_prefix=False) as gen:
        sync_tokens = [ev.token for ev in gen]

    async def main() -> tuple[list[int], str | None]:
        async with worker.generate("Once upon", max_tokens=24, reuse_prefix=False) as agen:
            tokens = [ev.token async for ev in agen]
        session = worker.chat(max_tokens=4)
        reply = await session.aask("Hi")
        assert session.messages[-1]["content"] == reply
        return tokens, agen.finish_reason

    tokens, reason = asyncio.run(main())
    assert tokens == sync_tokens and reason in ("length", "eog")


def test_cancel_stops_generation_in_the_child(worker: Worker) -> None:
    gen = _endless(worker)
    got = [next(gen) for _ in range(5)]
    assert len(got) == 5
    gen.close()
    with pytest.raises(pyllama.ClosedError):
        iter(gen)
    # The child serves requests in order: it answers only because the endless generation stopped.
    assert _within(20, lambda: worker.status()["loaded"]) is True

    async def cancel_async() -> int:
        n = 0
        async with _endless(worker) as agen:
            async for _ in agen:
                n += 1
                if n == 5:
                    break
        return n

    assert asyncio.run(cancel_async()) == 5
    assert _within(20, lambda: worker.tokenize("Hello").size) > 0
    # Dropping an unfinished stream cancels it too.
    dropped = _endless(worker)
    next(dropped)
    del dropped
    gc.collect()
    assert _within(20, lambda: worker.tokenize("Hello").size) > 0


def test_calls_from_many_threads(worker: Worker, model: pyllama.Model) -> None:
    texts = [f"Hello {i} world" for i in range(16)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = worker.tokenize(texts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(np.array_equal(results[i], model.tokenize(texts[i])) for i in range(len(texts)))


def test_errors_cross_the_boundary(worker: Worker, tmp_path: Path) -> None:
    with pytest.raises(pyllama.ContextOverflowError):
        list(worker.generate(np.ones(300, dtype=np.int32), max_tokens=4))
    with pytest.raises(ValueError):
        worker.generate("")
    with pytest.raises(TypeError):
        worker.generate("Hi", sampler=pyllama.SamplerChain([pyllama.Greedy()], None))  # type: ignore[arg-type]
    assert worker.status()["loaded"]  # a failed request leaves the worker serving
    with Worker() as fresh:
        with pytest.raises(WorkerError, match="no model is loaded"):
            fresh.tokenize("x")
        with pytest.raises(pyllama.ModelLoadError):
            fresh.load(tmp_path / "missing.gguf")
    with pytest.raises(pyllama.ClosedError):
        fresh.tokenize("x")


# --- crashes ----------------------------------------------------------------------------------

@pytest.mark.skipif(not POSIX, reason="SIGKILL is POSIX")
def test_sigkill_mid_stream(synth_model_path: Path) -> None:
    expected, _ = _in_process_tokens(synth_model_path, "Hello world", 16, **CTX)
    with Worker() as w:
        w.load(synth_model_path, n_gpu_layers=0, **CTX)
        pid = w.pid
        assert pid is not None
        gen = _endless(w)
        assert next(gen).index == 0
        queued: dict[str, BaseException] = {}

        def another_call() -> None:  # in flight behind the generation when the child dies
            try:
                w.tokenize("Hello")
            except BaseException as exc:  # noqa: BLE001
                queued["error"] = exc

        t = threading.Thread(target=another_call)
        t.start()
        # the kill comes once the call is sent (the child answers it only after the endless generation)
        assert _until(10, lambda: len(w._slot.proc._pending) >= 2), "the second call was never sent"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError) as info:
            _within(20, lambda: [ev for ev in gen])
        err = info.value
        assert err.signal == signal.SIGKILL and err.exit_code is None and err.pid == pid
        assert "SIGKILL" in str(err)
        t.join(20)
        assert isinstance(queued.get("error"), WorkerCrashedError)
        assert _wait_gone(pid)
        # The host is fine and the next call runs on a fresh worker, model reloaded.
        with w.generate("Hello world", max_tokens=16) as again:
            for _ in again:
                pass
        assert np.array_equal(again.tokens, expected)
        assert w.pid is not None and w.pid != pid
        assert w.status()["n_loads"] == 1


def test_abort_inside_llama_cpp(synth_model_path: Path) -> None:
    with Worker() as w:
        w.load(synth_model_path, n_gpu_layers=0, **CTX)
        pid = w.pid
        with pytest.raises(WorkerCrashedError) as info:
            w._debug("abort")
        err = info.value
        if POSIX:
            assert err.signal == signal.SIGABRT
        else:  # pragma: no cover - Windows: abort() exits with code 3
            assert err.exit_code == 3
        # llama.cpp's own words: the assertion ggml_abort printed to stderr, and its log line before it.
        assert any("GGML_ASSERT" in line for line in err.log_tail)
        assert "GGML_ASSERT" in str(err) and "invalid logits" in str(err)
        assert w.tokenize("Hello").size > 0
        assert w.pid != pid


def test_restart_disabled(synth_model_path: Path) -> None:
    with Worker(restart=False) as w:
        w.load(synth_model_path, n_gpu_layers=0, **CTX)
        with pytest.raises(WorkerCrashedError):
            w._debug("exit", 7)
        with pytest.raises(WorkerCrashedError) as info:
            w.tokenize("Hello")
        assert info.value.exit_code == 7 and info.value.signal is None
        w.restart()
        assert w.tokenize("Hello").size > 0


# --- lifetime -----------------------------------------------------------------------------------

def test_the_childs_load_progress_reaches_the_caller(synth_model_path: Path) -> None:
    """The weights' load in the child is reported to ``progress`` in the caller's thread, as a Model's is."""
    in_process: list[float] = []
    pyllama.Model(synth_model_path, n_gpu_layers=0, progress=in_process.append).close()
    seen: list[tuple[float, str]] = []
    with Worker() as w:
        w.load(synth_model_path, n_gpu_layers=0, progress=lambda v: seen.append((v, threading.current_thread().name)),
               **CTX)
        values = [v for v, _ in seen]
        assert values and values[0] == in_process[0] and values[-1] == 1.0 == in_process[-1]
        assert values == sorted(values) and {name for _, name in seen} == {threading.current_thread().name}
        w.unload()
        seen.clear()
        assert len(list(w.generate("Hello", max_tokens=2))) == 2  # a load on first use reports to nobody
        assert seen == []


def test_keep_alive_unloads_the_idle_model(synth_model_path: Path) -> None:
    with Worker(keep_alive=0.3) as w:
        w.load(synth_model_path, n_gpu_layers=0, **CTX)
        first = list(w.generate("Hello", max_tokens=8))
        deadline = time.monotonic() + 10
        while w.status()["loaded"] and time.monotonic() < deadline:
            time.sleep(0.1)
        status = w.status()
        assert status["loaded"] is False and status["n_loads"] == 1
        again = list(w.generate("Hello", max_tokens=8))  # loads it again
        assert [e.token for e in again] == [e.token for e in first]
        assert w.status()["n_loads"] == 2


def test_no_child_outlives_close_or_gc(synth_model_path: Path) -> None:
    w = Worker()
    pid = w.pid
    assert pid is not None and _alive(pid)
    w.close()
    assert _wait_gone(pid, 5)
    w.close()  # idempotent
    with pytest.raises(pyllama.ClosedError):
        w.generate("Hello")

    def make() -> int:
        dropped = Worker()
        dropped.load(synth_model_path, n_gpu_layers=0, **CTX)
        assert dropped.pid is not None
        return dropped.pid

    pid = make()
    gc.collect()
    assert _wait_gone(pid, 10)


_HOST = textwrap.dedent("""
    import os, sys, threading, time
    import pyllama

    made = {}

    def make():
        made["w"] = w = pyllama.Worker()
        w.load(sys.argv[1], n_gpu_layers=0, n_ctx=128, n_threads=1)

    if sys.argv[2] == "thread":  # no PR_SET_PDEATHSIG: started from a thread that then exits
        t = threading.Thread(target=make)
        t.start()
        t.join()
    else:
        make()
    extra = 0
    if sys.argv[3] == "fork":  # a fork that inherits the host's end of the pipe: EOF never comes
        extra = os.fork()
        if extra == 0:
            time.sleep(60)
            os._exit(0)
    print(made["w"].pid, extra, flush=True)
    if sys.argv[3] != "exit":  # "exit": leave without closing the worker; interpreter exit must stop it
        time.sleep(60)
""")


@pytest.mark.skipif(not POSIX, reason="SIGKILL and fork are POSIX")
@pytest.mark.parametrize("where,fork", [("main", "nofork"), ("thread", "fork"), ("main", "exit")])
def test_no_child_outlives_a_killed_host(synth_model_path: Path, where: str, fork: str) -> None:
    host = subprocess.Popen([sys.executable, "-c", _HOST, str(synth_model_path), where, fork],
                            stdout=subprocess.PIPE, text=True)
    extra = 0
    try:
        assert host.stdout is not None
        line = host.stdout.readline().split()
        child, extra = int(line[0]), int(line[1])
        if fork != "exit":
            assert _alive(child)
            host.kill()
        assert host.wait(20) in (0, -signal.SIGKILL)
        assert _wait_gone(child, 10), "the worker child outlived its killed host"
    finally:
        if host.poll() is None:
            host.kill()
        if extra:
            try:
                os.kill(extra, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_child_that_cannot_start_reports_why() -> None:
    with Worker(env={"PYTHONHOME": os.devnull}) as w:  # the interpreter cannot even find its stdlib
        with pytest.raises(WorkerCrashedError) as info:
            w.status()
    err = info.value
    assert err.exit_code not in (None, 0) and err.log_tail
    assert any("Python" in line or "encodings" in line for line in err.log_tail)


def test_logprobs_and_stop_strings_match_in_process(worker: Worker, model: pyllama.Model) -> None:
    options: dict[str, Any] = {"max_tokens": 12, "logprobs": True, "top_logprobs": 3, "reuse_prefix": False}
    with model.context(**CTX) as ctx, pyllama.generate(ctx, "Hello world", **options) as local:
        expected = list(local)
    with worker.generate("Hello world", **options) as gen:
        got = list(gen)
    assert [(e.token, e.text) for e in got] == [(e.token, e.text) for e in expected]
    for a, b in zip(got, expected):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top_logprobs or []] == [t for t, _ in b.top_logprobs or []]
    stop = next(e.text.strip() for e in expected[3:] if e.text.strip())
    with worker.generate("Hello world", max_tokens=12, stop=[stop], reuse_prefix=False) as gen:
        list(gen)
    assert gen.finish_reason == "stop" and stop not in gen.text


# --- a memory limit ---------------------------------------------------------------------------------

LINUX = sys.platform.startswith("linux")


@pytest.mark.skipif(not LINUX, reason="memory_limit sets RLIMIT_AS (Linux)")
def test_a_load_past_the_memory_limit_is_reported_as_such(synth_model_path: Path) -> None:
    """A context the limit cannot hold is WorkerMemoryError naming the limit (not a ContextCreationError
    that blames the arguments); the child lives on and loads what fits; without a limit the same load works."""
    limit = 1 << 30
    big = {**CTX, "n_ctx": 1 << 20}  # its KV cache and compute buffers need more than 1 GiB
    with Worker(memory_limit=limit) as w:
        assert w.memory_limit == limit
        pid = w.pid
        with pytest.raises(WorkerMemoryError) as info:
            w.load(synth_model_path, n_gpu_layers=0, **big)
        err = info.value
        assert err.memory_limit == limit and f"memory_limit={limit}" in str(err) and "1024 MiB" in str(err)
        assert "failed to allocate" in str(err)  # llama.cpp's own words
        assert isinstance(err, MemoryError) and isinstance(err, WorkerCrashedError)
        assert isinstance(err.__cause__, pyllama.ContextCreationError)
        assert err.exit_code is None and err.signal is None and err.pid == pid
        assert w.pid == pid and not w.status()["loaded"]  # the same child, alive
        w.load(synth_model_path, n_gpu_layers=0, **CTX)
        with w.generate("Hello", max_tokens=4) as gen:
            assert len(list(gen)) == 4
        assert w.pid == pid
    with Worker() as w:
        assert w.load(synth_model_path, n_gpu_layers=0, **big)["n_ctx"] == 1 << 20


@pytest.mark.skipif(not LINUX, reason="memory_limit sets RLIMIT_AS (Linux)")
def test_a_child_that_dies_of_its_memory_limit_is_reported_as_such() -> None:
    """100 MiB cannot hold the child's own start (Python, numpy, OpenBLAS): it dies, and the error says why."""
    with Worker(memory_limit=100 << 20, restart=False) as w, pytest.raises(WorkerMemoryError) as info:
        w.status()
    err = info.value
    assert err.exit_code is not None or err.signal is not None
    assert "100 MiB" in str(err) and err.memory_limit == 100 << 20


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1G"])
def test_memory_limit_must_be_bytes(bad: Any) -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        Worker(memory_limit=bad, start=False)
