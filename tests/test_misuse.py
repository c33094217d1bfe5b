"""API misuse gives a clear Python exception before any C call, never an abort.

Each case here is something llama.cpp itself asserts, throws or misbehaves on
(issue 11). The crash regressions run in a child process first, so that a
regression fails its test instead of killing the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import pyllama
from pyllama.context_params import MAX_THREADS
from bounded import join_all

PROMPT = "Hello world, the people of the world"


def _in_child(model_path: Path, body: str) -> None:
    """Run ``body`` (with ``m`` the model) in a fresh interpreter; it must exit normally."""
    code = ("import sys\nsys.path.insert(0, %r)\nimport pyllama\nm = pyllama.Model(%r, n_gpu_layers=0)\n"
            % (str(Path(__file__).parent), str(model_path)) + textwrap.dedent(body))
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"


# --- threads ---------------------------------------------------------------------------------------------
def test_set_threads_100000_no_longer_kills_the_process(synth_model_path: Path) -> None:
    # Before the fix: accepted, and the next decode died (std::bad_alloc / SIGSEGV).
    _in_child(synth_model_path, """
        ctx = m.context(n_ctx=64, n_threads=1)
        try:
            ctx.set_threads(100000)
        except ValueError:
            pass
        ctx.evaluate(m.tokenize("hello"))
        assert ctx.n_threads == 1
    """)


@pytest.mark.parametrize("bad", [0, -3, MAX_THREADS + 1, 100000, -(2**40)])
def test_thread_counts_out_of_range_are_refused(model: pyllama.Model, bad: int) -> None:
    with pytest.raises(ValueError, match=r"n_threads must be in \[1, 512\]"):
        model.context(n_ctx=64, n_threads=bad)
    with pytest.raises(ValueError, match="n_threads_batch"):
        model.context(n_ctx=64, n_threads=1, n_threads_batch=bad)
    with model.context(n_ctx=64, n_threads=1) as ctx:
        with pytest.raises(ValueError, match="n_threads"):
            ctx.set_threads(bad)
        with pytest.raises(ValueError, match="n_threads_batch"):
            ctx.set_threads(1, bad)
        assert (ctx.n_threads, ctx.n_threads_batch) == (1, 1)  # nothing reached llama.cpp
        ctx.evaluate(model.tokenize(PROMPT))


@pytest.mark.parametrize("bad", [2.0, "4", True, None])
def test_thread_counts_of_the_wrong_type_are_refused(model: pyllama.Model, bad: Any) -> None:
    with model.context(n_ctx=64, n_threads=1) as ctx:
        with pytest.raises(TypeError, match="n_threads must be an int"):
            ctx.set_threads(bad)
    if bad is not None:  # None means "the default" in the constructor
        with pytest.raises(TypeError):
            model.context(n_ctx=64, n_threads=bad)


def test_thread_counts_in_range_work_even_above_the_cpu_count(model: pyllama.Model) -> None:
    n = len(os.sched_getaffinity(0)) + 2 if hasattr(os, "sched_getaffinity") else 64  # allowed, only slower
    with model.context(n_ctx=64, n_threads=n, n_threads_batch=1) as ctx:
        assert (ctx.n_threads, ctx.n_threads_batch) == (n, 1)
        ctx.evaluate(model.tokenize(PROMPT))
        ctx.set_threads(1)
        ctx.evaluate(model.tokenize(PROMPT + " again"))


# --- batches, sequences, tokens, positions ------------------------------------------------------------------
def test_batch_larger_than_n_batch_is_refused(model: pyllama.Model) -> None:
    with model.context(n_ctx=256, n_batch=32, n_ubatch=32, n_threads=1) as ctx:
        toks = (np.arange(100) % 50 + 300).astype(np.int32)
        with pytest.raises(pyllama.InvalidBatchError, match="exceeds n_batch=32"):
            ctx.decode(pyllama.Batch.from_tokens(toks))
        assert ctx.evaluate(toks) == 100  # evaluate splits into n_batch chunks itself


@pytest.mark.parametrize("seq_id", [1, 5, 255, 256, 10**6, -1, -7])
def test_sequence_ids_outside_n_seq_max_are_refused(model: pyllama.Model, seq_id: int) -> None:
    toks = model.tokenize(PROMPT)
    with model.context(n_ctx=64, n_threads=1) as ctx:
        ctx.evaluate(toks)
        for call in (lambda: ctx.evaluate(toks, seq_id=seq_id, reuse_prefix=False),
                     lambda: ctx.kv.copy(0, seq_id), lambda: ctx.kv.keep(seq_id),
                     lambda: ctx.kv.pos_range(seq_id), lambda: ctx.state.save_seq(seq_id),
                     lambda: pyllama.generate_text(ctx, toks, seq_id=seq_id, reuse_prefix=False)):
            with pytest.raises(ValueError, match="n_seq_max"):
                call()
        if seq_id >= 0:
            with pytest.raises(pyllama.InvalidBatchError, match="sequence ids"):
                ctx.decode(pyllama.Batch.from_tokens(toks, 0, seq_id))
        assert pyllama.generate_text(ctx, toks, max_tokens=2)  # still usable


@pytest.mark.parametrize("token", [-1, -(2**31), 590, 10**6, 2**31 - 1])
def test_token_ids_outside_the_vocabulary_are_refused(model: pyllama.Model, token: int) -> None:
    v = model.vocab
    for call in (lambda: v.detokenize([1, token]), lambda: v.token_to_piece(token), lambda: v.text(token),
                 lambda: v.is_eog(token), lambda: v.attr(token), lambda: v.score(token)):
        with pytest.raises(pyllama.TokenizationError, match="outside the vocabulary"):
            call()
    with model.context(n_ctx=64, n_threads=1) as ctx:
        with pytest.raises(pyllama.TokenizationError):
            ctx.evaluate([1, token])
        with pytest.raises(pyllama.InvalidBatchError, match="outside the vocabulary"):
            ctx.decode(pyllama.Batch.from_tokens([1, token]))
        with pytest.raises(pyllama.TokenizationError):
            pyllama.generate_text(ctx, [1, token])


def test_stream_decoder_and_sampler_accept_check_their_tokens(synth_model_path: Path) -> None:
    # Before: std::out_of_range / a grammar's runtime_error escaped llama.cpp's C API (std::terminate),
    # and a decoder outliving its model read freed memory.
    _in_child(synth_model_path, """
        import synth
        for call in (lambda: pyllama.StreamDecoder(m.vocab).push(10**6),
                     lambda: pyllama.SamplerChain([pyllama.Grammar('root ::= "a"'), pyllama.Greedy()], m).accept(10**6),
                     lambda: pyllama.SamplerChain([pyllama.Grammar('root ::= "a"'), pyllama.Greedy()], m).accept(5)):
            try:
                call()
            except (pyllama.TokenizationError, pyllama.SamplerError):
                pass
    """)
    import synth

    v = synth.build_vocab()
    with pyllama.Model(synth_model_path, n_gpu_layers=0) as m:
        dec = pyllama.StreamDecoder(m.vocab)
        for bad in (-1, 10**6, 2**31):
            with pytest.raises(pyllama.TokenizationError):
                dec.push(bad)
        assert dec.push(v.id_of("a")) == "a"
        with pyllama.SamplerChain([pyllama.Grammar('root ::= "a" "b"'), pyllama.Greedy()], m) as chain:
            with pytest.raises(pyllama.TokenizationError):
                chain.accept(10**6)
            with pytest.raises(pyllama.SamplerError, match="not allowed by the grammar"):
                chain.accept(v.id_of("b"))
            chain.accept(v.id_of("a"))
            with pytest.raises(pyllama.SamplerError, match="not allowed by the grammar"):
                chain.accept(v.id_of("a"))
            chain.accept(v.id_of("b"))
            chain.accept(synth.EOS_ID)  # the grammar is complete: end of generation is allowed
    with pytest.raises(pyllama.ClosedError):
        dec.push(v.id_of("a"))


BAD_GRAMMARS = [  # each killed the process before (std::terminate, SIGSEGV, or a parser that never returns)
    ({"grammar": "root ::= [z-a]"}, "allows no token"),
    ({"grammar": "root ::= <[999999]>"}, "allows no token"),
    ({"grammar": 'root ::= "a"{5,2}'}, "maximum is below the minimum"),
    ({"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}, "deeper than"),
    # (and these took llama.cpp minutes to hours: 2**16 parse stacks; 2 million rules from 12 KB)
    ({"grammar": "root ::= a0\n" + "".join(f"a{i} ::= a{i + 1} a{i + 1}\n" for i in range(16)) + 'a16 ::= "x" | ""'},
     "parse stacks"),
    ({"grammar": "root ::= " + '"a"{0,1999} ' * 1000}, "rules"),
    ({"grammar": 'root ::= "a"', "trigger_patterns": ["(("]}, "not a valid regular expression"),
    ({"grammar": 'root ::= "a"', "trigger_patterns": ["(?P<x>a)"]}, "not ECMAScript"),
]


def test_grammars_llama_cpp_cannot_survive_are_refused(synth_model_path: Path) -> None:
    _in_child(synth_model_path, """
        import sys
        sys.path.insert(0, %r)
        from test_misuse import BAD_GRAMMARS
        ctx = m.context(n_ctx=64, n_threads=1)
        for kw, _ in BAD_GRAMMARS:
            try:
                pyllama.generate_text(ctx, "hello", sampler=[pyllama.Grammar(**kw), pyllama.Greedy()], max_tokens=4)
            except pyllama.SamplerError:
                pass
    """ % str(Path(__file__).parent))
    with pyllama.Model(synth_model_path, n_gpu_layers=0) as m, m.context(n_ctx=64, n_threads=1) as ctx:
        for kw, message in BAD_GRAMMARS:
            with pytest.raises(pyllama.SamplerError, match=message):
                pyllama.SamplerChain([pyllama.Grammar(**kw), pyllama.Greedy()], m)
        # Literal text that looks like the refused constructs is fine, and so are ECMAScript triggers.
        ok = pyllama.Grammar('root ::= "{5,2}" | "(((" [a-z]? | "x"{2,5}  # ((( in a comment', trigger_patterns=["(?:a|b)+"])
        with pyllama.SamplerChain([ok, pyllama.Greedy()], m) as chain:
            ctx.evaluate(m.tokenize("hello"))
            chain.sample(ctx)


@pytest.mark.parametrize("tokens", [[1.5, 2.7], np.array([1.0]), [True, False], np.array([2**32 + 1], dtype=np.int64),
                                    np.array([2**31], dtype=np.uint32), [2**70], ["1"]])
def test_token_arrays_are_never_cast_silently(model: pyllama.Model, tokens: Any) -> None:
    # Before: 1.5 became token 1 and 2**32 + 1 token 1, and the generation went on with them.
    with pytest.raises(pyllama.TokenizationError):
        model.detokenize(tokens)
    with model.context(n_ctx=64, n_threads=1) as ctx:
        with pytest.raises(pyllama.TokenizationError):
            pyllama.generate_text(ctx, tokens, max_tokens=2)


def test_a_grammar_that_dead_ends_mid_generation_raises(synth_model_path: Path) -> None:
    # llama.cpp's grammar sampler throws through llama_sampler_sample; pyllama samples through
    # libpyllama-common's pyllama_sampler_sample, which catches it (src/native/sampling.cpp).
    _in_child(synth_model_path, """
        from pyllama.engine import Engine
        ctx = m.context(n_ctx=64, n_threads=1)
        g = 'root ::= "a" [z-a]'
        for kw in ({}, {"logprobs": True}, {"ignore_eos": True}):  # fused step, Python loop, EOG masking
            try:
                pyllama.generate_text(ctx, "Hello", grammar=g, max_tokens=8, **kw)
                raise SystemExit(f"no SamplerError with {kw}")
            except pyllama.SamplerError:
                pass
        with Engine(m, n_slots=1, n_ctx=64, n_threads=1) as engine:
            try:
                engine.submit("Hello", grammar=g, max_tokens=8).result()
                raise SystemExit("no SamplerError from the engine")
            except pyllama.SamplerError:
                pass
            assert engine.submit("Hello", max_tokens=2).result() is not None  # still serving
    """)


def test_positions_and_output_rows_are_checked(model: pyllama.Model) -> None:
    with model.context(n_ctx=64, n_threads=1) as ctx:
        with pytest.raises(pyllama.InvalidBatchError, match="negative position"):
            ctx.decode(pyllama.Batch.from_tokens([1, 2], -1))
        with pytest.raises(pyllama.ContextOverflowError):
            ctx.decode(pyllama.Batch.from_tokens([1], 2**31 - 1))
        ctx.evaluate(model.tokenize(PROMPT))
        for row in (10**6, -(10**6), 2**31, -(2**40)):
            with pytest.raises(IndexError):
                ctx.logits(row)
            with pytest.raises(IndexError):
                ctx.embedding(row)
        with pytest.raises(IndexError):  # a row without logits is never sampled
            pyllama.SamplerChain([pyllama.Greedy()], model).sample(ctx, 0)


@pytest.mark.parametrize("call", ["batch", "max_tokens", "divide", "empty"])
def test_negative_and_empty_sizes_are_refused(model: pyllama.Model, call: str) -> None:
    with model.context(n_ctx=64, n_threads=1) as ctx:
        f: Callable[[], object] = {
            "batch": lambda: pyllama.Batch(-1),
            "max_tokens": lambda: pyllama.generate_text(ctx, PROMPT, max_tokens=-5),
            "divide": lambda: ctx.kv.divide(0, 0, -1, 0),
            "empty": lambda: ctx.evaluate([]),
        }[call]
        with pytest.raises(ValueError):
            f()


def test_context_size_and_batch_knobs_are_checked(model: pyllama.Model) -> None:
    for kw in ({"n_ctx": -1}, {"n_batch": 0}, {"n_ubatch": -5}, {"n_seq_max": 0}, {"n_seq_max": 10**6},
               {"flash_attn": "sometimes"}, {"type_k": "q9_9"}, {"pooling": "max"}):
        with pytest.raises(ValueError):
            model.context(n_threads=1, **kw)


# --- chat messages ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, message", [
    ([{"role": "user"}], r"messages\[0\]: missing 'content'"),
    ([{"content": "hi"}], r"messages\[0\]: missing 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}],
     r"messages\[1\]\['content'\]: must be a str, not int"),
    ([{"role": None, "content": "a"}], r"messages\[0\]\['role'\]: must be a str"),
    ([{"role": "user", "content": "a\0b"}], r"messages\[0\]\['content'\]: contains a NUL"),
    (["hello"], r"messages\[0\]: must be a dict"),
    ("hello", "messages must be a list"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
])
def test_chat_messages_are_validated_with_the_bad_field_named(model: pyllama.Model, messages: Any,
                                                              message: str) -> None:
    # Before: a bare KeyError: 'content' from deep inside the renderer.
    with pytest.raises(pyllama.TemplateError, match=message):
        pyllama.apply_template(model, messages)


# --- one context, several threads -------------------------------------------------------------------------
def test_concurrent_generations_on_one_context_raise_busy_or_match_serial(model: pyllama.Model) -> None:
    with model.context(n_ctx=256, n_threads=1) as ctx:
        serial = pyllama.generate_text(ctx, PROMPT, max_tokens=16)
        results: list[object] = []

        def worker() -> None:
            try:
                results.append(pyllama.generate_text(ctx, PROMPT, max_tokens=16))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                results.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        join_all(threads)
        for r in results:
            if isinstance(r, Exception):
                assert isinstance(r, pyllama.BusyError) and "one generation at a time" in str(r), repr(r)
            else:
                assert r == serial
        assert any(isinstance(r, pyllama.BusyError) for r in results) or all(r == serial for r in results)


# --- one model, many threads (issue 11, item 5) -------------------------------------------------------------
def test_threads_with_their_own_contexts_match_the_serial_run(synth_model_path: Path) -> None:
    prompts = [f"{w} world, the people" for w in ("Hello", "Bonjour", "Hallo", "the", "a", "we", "people", "café")]
    with pyllama.Model(synth_model_path, n_gpu_layers=0) as model:
        def run(prompt: str, ctx: pyllama.Context) -> list[int]:
            with pyllama.generate(ctx, prompt, max_tokens=12) as gen:
                for _ in gen:
                    pass
                return gen.tokens.tolist()

        with model.context(n_ctx=128, n_threads=1) as ctx:
            serial = [run(p, ctx) for p in prompts]
        got: dict[int, list[list[int]]] = {}
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                with model.context(n_ctx=128, n_threads=1) as c:
                    got[k] = [run(prompts[k], c) for _ in range(5)]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(prompts))]
        for t in threads:
            t.start()
        join_all(threads)
        assert not errors
        for k in range(len(prompts)):
            assert got[k] == [serial[k]] * 5


def test_closing_the_model_while_threads_generate_gives_clean_errors(synth_model_path: Path) -> None:
    _in_child(synth_model_path, """
        import threading, time
        from pyllama.errors import LlamaError
        outcomes = []
        started = threading.Barrier(5)

        def worker():
            try:
                ctx = m.context(n_ctx=512, n_threads=1)
                started.wait()
                for _ in range(50):
                    ctx.kv.clear()
                    pyllama.generate_text(ctx, "Hello world", max_tokens=200)
                outcomes.append("done")
            except (LlamaError, ValueError) as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.2)
        m.close()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a generation did not stop after the model closed"
        assert len(outcomes) == 4 and "done" not in outcomes, outcomes
        print(outcomes)
    """)
