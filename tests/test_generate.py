"""Generation: events, stop strings, limits, async, parallel sequences, threads."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import pyllama
from bounded import join_all



def test_events_and_whole_text(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        with pyllama.generate(ctx, "Hello world", max_tokens=10, logprobs=True) as gen:
            events = list(gen)
        assert gen.finish_reason == "length" and gen.n_generated == 10
        assert "".join(e.text for e in events) == gen.text == pyllama.generate_text(ctx, "Hello world", max_tokens=10)
        # The pieces continue the prompt: no leading-space removal as in one-shot detokenize().
        assert gen.text == b"".join(model.vocab.token_to_piece(int(t)) for t in gen.tokens).decode()
        lp = [e.logprob for e in events if e.token >= 0]
        assert all(p is not None and p <= 0 for p in lp)
        with pytest.raises(pyllama.ClosedError):
            iter(gen)


@pytest.mark.parametrize("max_tokens", [30, 3])
@pytest.mark.parametrize("logprobs", [False, True])
def test_characters_split_across_tokens_are_held_back(model: pyllama.Model, max_tokens: int, logprobs: bool) -> None:
    """A character made of byte-fallback tokens is emitted whole by the token that completes it, in
    the fused step's C hold-back as in the stream decoder; one cut off by max_tokens ends as U+FFFD."""
    with model.context(n_ctx=256) as ctx:
        with pyllama.generate(ctx, "Hello", max_tokens=max_tokens, grammar='root ::= "é🙂aé"',
                              logprobs=logprobs) as gen:
            events = list(gen)
    dec = pyllama.StreamDecoder(model.vocab, lstrip_first=False)
    expected = [dec.push(int(t)) for t in gen.tokens]
    assert [e.text for e in events if e.token >= 0] == expected
    assert "" in expected  # the emoji's first bytes were held back
    assert gen.text == "".join(expected) + dec.flush() == "".join(e.text for e in events)
    assert gen.text.endswith("\ufffd") == (max_tokens == 3)


def test_stop_string_split_across_tokens_is_not_emitted(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        with pyllama.generate(ctx, "Hello world", max_tokens=12) as gen:
            full_tokens = [e.token for e in gen if e.token >= 0]
        full = gen.text
        # A stop string that starts inside one token's text and ends inside the next.
        pieces = [model.vocab.token_to_piece(t).decode() for t in full_tokens]
        k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
        stop = pieces[k - 1][-2:] + pieces[k][:2]
        with pyllama.generate(ctx, "Hello world", max_tokens=12, stop=[stop]) as gen2:
            text = "".join(e.text for e in gen2)
        assert gen2.finish_reason == "stop"
        assert stop not in text
        assert text == full[: full.index(stop)]


def test_end_of_generation_stops(model: pyllama.Model) -> None:
    eos = model.vocab.eos
    with model.context(n_ctx=256) as ctx:
        sampler = [pyllama.LogitBias({eos: 1e6}), pyllama.Greedy()]
        with pyllama.generate(ctx, "Hello", sampler=sampler, max_tokens=10) as gen:
            assert list(gen) == []
        assert gen.finish_reason == "eog"


def test_full_context_stops_or_shifts(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        with pyllama.generate(ctx, "Hello world", max_tokens=None) as gen:
            n = sum(1 for e in gen if e.token >= 0)
        assert gen.finish_reason == "context" and n == ctx.n_ctx - model.tokenize("Hello world").size + 1
        with pyllama.generate(ctx, "Hello world", max_tokens=400, context_shift=True, n_keep=1) as gen:
            n = sum(1 for e in gen if e.token >= 0)
        assert gen.finish_reason == "length" and n == 400


def test_async_generation_does_not_block_the_loop(model: pyllama.Model) -> None:
    async def main() -> tuple[list[int], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        with model.context(n_ctx=256) as ctx:
            toks = [e.token async for e in pyllama.agenerate(ctx, "Hello world", max_tokens=8) if e.token >= 0]
        stop.set()
        await t
        return toks, ticks

    toks, ticks = asyncio.run(main())
    with model.context(n_ctx=256) as ctx:
        sync = [e.token for e in pyllama.generate(ctx, "Hello world", max_tokens=8) if e.token >= 0]
    assert toks == sync and ticks > len(toks)


@pytest.mark.parametrize("draft, ignore_eos", [(None, False), (None, True), ("ngram", False)])
def test_async_events_arrive_while_generation_runs(model: pyllama.Model, draft: str | None,
                                                   ignore_eos: bool) -> None:
    """Each event reaches the loop as the next decode starts, not at the end: the first one arrives while
    the generation is far from done, and leaving the iteration then stops it."""
    prompt = "the cat and the dog and the cat and the dog and the cat"
    n = 3000

    async def main(ctx: pyllama.Context) -> tuple[int, int]:
        agen = pyllama.agenerate(ctx, prompt, max_tokens=n, ignore_eos=ignore_eos, draft=draft, reuse_prefix=False)
        at_first = -1
        async with contextlib.aclosing(agen):  # closing it joins the producer
            async for _ in agen:
                cached = ctx.cached_tokens(0)
                at_first = 0 if cached is None else int(cached.size)
                break
        cached = ctx.cached_tokens(0)
        return at_first, (0 if cached is None else int(cached.size))

    with model.context(n_ctx=4096) as ctx:
        n_prompt = model.tokenize(prompt, parse_special=True).size
        at_first, at_end = asyncio.run(main(ctx))
    assert n_prompt <= at_first <= at_end < n_prompt + n - 1, (n_prompt, at_first, at_end)


def test_async_delivery_coalesces_without_changing_events(model: pyllama.Model,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Coalesced delivery (events of fast tokens handed over together) and per-token wake-ups give the same
    events; the producer thread is reused by the next generation and ends once idle."""
    from pyllama import _producers

    monkeypatch.setattr(_producers, "IDLE_S", 0.3)

    async def events(ctx: pyllama.Context, max_delay: float) -> list[tuple[int, str]]:
        return [(ev.token, ev.text) async for ev in
                pyllama.agenerate(ctx, "Hello world", max_tokens=40, max_delay=max_delay, reuse_prefix=False)]

    def producers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "pyllama-producer"]

    with model.context(n_ctx=256) as ctx:
        with pyllama.generate(ctx, "Hello world", max_tokens=40, reuse_prefix=False) as gen:
            expected = [(ev.token, ev.text) for ev in gen]
        for delay in (0.0, 0.001, 10.0):
            assert asyncio.run(events(ctx, delay)) == expected, delay
        assert len(producers()) == 1  # one thread served the three generations
        with pytest.raises(ValueError, match="max_delay"):
            asyncio.run(events(ctx, -1.0))
    deadline = time.monotonic() + 10
    while producers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not producers()


def test_parallel_sequences_match_sequential(model: pyllama.Model) -> None:
    prompts = ["Hello world", "Le café est", "Die Größe", "the cat sat on"]
    with model.context(n_ctx=1024, n_seq_max=len(prompts)) as ctx:
        results = pyllama.generate_parallel_tokens(ctx, prompts, max_tokens=10)
        assert ctx.perf().n_eval > 0
    for prompt, res in zip(prompts, results):
        with model.context(n_ctx=256) as ctx:
            seq = [e.token for e in pyllama.generate(ctx, prompt, max_tokens=10) if e.token >= 0]
        assert res.tokens == seq, prompt
        assert res.finish_reason == "length"


def test_parallel_sequences_that_finish_early_leave_the_others_exact(model: pyllama.Model) -> None:
    # stop strings that end sequences 0 and 2 midway: the batch shrinks while 1 and 3 go on
    prompts = ["Hello world", "Le café est", "Die Größe", "the cat sat on"]

    def alone(prompt: str, stop: list[str]) -> tuple[list[int], str, str | None]:
        with model.context(n_ctx=256) as ctx, pyllama.generate(ctx, prompt, max_tokens=16, stop=stop) as gen:
            for _ in gen:
                pass
        return gen.tokens.tolist(), gen.text, gen.finish_reason  # the ids include the stop's last token

    texts = [alone(p, [])[1] for p in prompts]
    stop = []
    for k in (0, 2):
        text = texts[k]
        cuts = [text[i:i + 3] for i in range(len(text) // 3, len(text) - 3)]
        stop.append(next(c for c in cuts if c.strip() and not any(c in t for j, t in enumerate(texts) if j != k)))
    with model.context(n_ctx=1024, n_seq_max=len(prompts)) as ctx:
        results = pyllama.generate_parallel_tokens(ctx, prompts, max_tokens=16, stop=stop)
    reasons = []
    for prompt, res in zip(prompts, results):
        toks, text, reason = alone(prompt, stop)
        assert (res.tokens, res.text, res.finish_reason) == (toks, text, reason), prompt
        reasons.append(reason)
    assert reasons[0] == reasons[2] == "stop" and reasons[1] == reasons[3] == "length"


def test_parallel_prompts_share_batches_across_chunk_boundaries(model: pyllama.Model) -> None:
    # n_batch 8: prompts of 3..20 tokens are prefilled together, split across decodes mid-prompt
    prompts = ["Hello world the cat and the dog and the cat sat", "a b", "Le café est très bon et chaud",
               "We have a"]
    with model.context(n_ctx=1024, n_seq_max=len(prompts), n_batch=8, n_ubatch=8) as ctx:
        results = pyllama.generate_parallel_tokens(ctx, prompts, max_tokens=12, ignore_eos=True)
    for prompt, res in zip(prompts, results):
        with model.context(n_ctx=256) as ctx:
            seq = [e.token for e in pyllama.generate(ctx, prompt, max_tokens=12, ignore_eos=True) if e.token >= 0]
        assert res.tokens == seq and len(seq) == 12, prompt


def test_two_threads_two_contexts_match_sequential(model: pyllama.Model) -> None:
    prompts = ["Hello world the", "Le café est très"]

    def run(p: str) -> list[int]:
        with model.context(n_ctx=256, n_threads=1) as ctx:
            return [e.token for e in pyllama.generate(ctx, p, max_tokens=40) if e.token >= 0]

    sequential = [run(p) for p in prompts]
    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(prompts[i]))) for i in range(2)]
    for t in threads:
        t.start()
    join_all(threads)
    assert [results[0], results[1]] == sequential


def test_one_context_from_two_threads_is_serialized(model: pyllama.Model) -> None:
    with model.context(n_ctx=512) as ctx:
        toks = model.tokenize("Hello world the cat")
        errors: list[BaseException] = []

        def hammer(seq_offset: int) -> None:
            try:
                for _ in range(20):
                    ctx.kv.clear()
                    ctx.decode(pyllama.Batch.from_tokens(toks))
                    assert np.isfinite(ctx.logits(-1)).all()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        ts = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        join_all(ts)
        # Each call is serialized by the context's lock. The threads' clear/decode
        # pairs still interleave, so a decode may find its positions taken: that
        # must surface as a clear pyllama error, never a crash.
        assert all(isinstance(e, pyllama.LlamaError) for e in errors), errors
        ctx.kv.clear()
        assert pyllama.generate_text(ctx, "Hello", max_tokens=2)


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_context_create_close_cycles_do_not_leak(model: pyllama.Model) -> None:
    for _ in range(50):  # warm up allocators
        model.context(n_ctx=256).close()
    before = _rss_kib()
    for _ in range(1000):
        ctx = model.context(n_ctx=256)
        ctx.close()
    after = _rss_kib()
    assert after - before < 8 * 1024, f"RSS grew by {after - before} KiB over 1000 cycles"


def test_c_baseline_loop_matches_generate(model: pyllama.Model) -> None:
    """The C loop that bench/ times against pyllama.generate produces the same tokens."""
    from pyllama._ffi import ffi, lib

    prompt = model.tokenize("Hello world the")
    with model.context(n_ctx=256) as ctx:
        py = [e.token for e in pyllama.generate(ctx, prompt, max_tokens=20) if e.token >= 0]
        ctx.kv.clear()
        ctx.evaluate(prompt, reuse_prefix=False)
        out = np.empty(20, dtype=np.int32)
        with pyllama.SamplerChain([pyllama.Greedy()], model) as chain:
            n = lib.pyllama_c_generate_loop(ctx._p(), chain._p(), prompt.size, 20, ffi.from_buffer("llama_token[]", out))
    assert n == 20 and out.tolist() == py


def _log_softmax_steps(model: pyllama.Model, prompt: str, tokens: list[int]) -> list[np.ndarray]:
    """The reference: each step's log-softmax over the raw logits, in float64 with numpy, the tokens fed back."""
    prompt_ids = [int(t) for t in model.tokenize(prompt)]
    steps = []
    with model.context(n_ctx=256, n_threads=1) as ctx:
        for i in range(len(tokens)):
            ctx.evaluate(prompt_ids + tokens[:i])
            x = ctx.logits().astype(np.float64)
            m = x.max()
            steps.append(x - m - np.log(np.exp(x - m).sum()))
    return steps


@pytest.mark.parametrize("how", ["greedy", "sampled", "engine"])
def test_logprobs_equal_a_numpy_log_softmax_of_the_logits(model: pyllama.Model, how: str) -> None:
    """An independent reference for logprobs and top_logprobs: numpy's log-softmax of the step's logits,
    for the chosen token whether or not the sampler picked the most likely one, on every path."""
    prompt, n, k = "Hello world", 12, 4
    sampler = [pyllama.TopK(40), pyllama.Temp(1.5), pyllama.Dist(seed=11)] if how == "sampled" else None
    if how == "engine":
        with pyllama.Engine(model, n_slots=2, n_ctx=256, n_threads=1) as engine:
            events = [ev for ev in engine.submit(prompt, max_tokens=n, ignore_eos=True, logprobs=True, top_logprobs=k)
                      if ev.token >= 0]
    else:
        with model.context(n_ctx=256, n_threads=1) as ctx:
            with pyllama.generate(ctx, prompt, max_tokens=n, ignore_eos=True, logprobs=True, top_logprobs=k,
                                  sampler=sampler) as gen:
                events = [ev for ev in gen if ev.token >= 0]
    tokens = [ev.token for ev in events]
    assert len(tokens) == n
    if how == "sampled":
        assert any(ev.token != ev.top_logprobs[0][0] for ev in events), "the sampler never left the top token"
    for ev, ref in zip(events, _log_softmax_steps(model, prompt, tokens)):
        assert ev.logprob == pytest.approx(ref[ev.token], abs=1e-4)
        best = np.argsort(-ref, kind="stable")[:k]
        assert [t for t, _ in ev.top_logprobs] == best.tolist()
        assert [lp for _, lp in ev.top_logprobs] == pytest.approx(ref[best].tolist(), abs=1e-4)
