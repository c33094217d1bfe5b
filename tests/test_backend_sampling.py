"""Where tokens are chosen: on the host (llama.cpp's samplers), by argmax over the logits view, or inside the
compute graph (llama.cpp's backend sampling) — the same greedy tokens every way."""

from __future__ import annotations

import numpy as np
import pytest

import pyllama

PROMPT = "Hello world the cat"


def tokens(ctx: pyllama.Context, **options: object) -> np.ndarray:
    with pyllama.generate(ctx, PROMPT, reuse_prefix=False, **options) as gen:  # type: ignore[arg-type]
        list(gen)
    return gen.tokens.copy()


@pytest.mark.parametrize("n_seq_max", [1, 3])
def test_greedy_tokens_agree_across_sampling_modes(model: pyllama.Model, n_seq_max: int) -> None:
    with model.context(n_ctx=512, n_seq_max=n_seq_max) as ctx:
        ref = tokens(ctx, max_tokens=60, sampling="host")
        for mode in ("auto", "argmax", "backend", "host"):
            assert np.array_equal(tokens(ctx, max_tokens=60, sampling=mode), ref), mode
            assert not ctx._backend_samplers  # detached when the generation ends
        # a deterministic sampled chain in the graph (top-k 1) and on the host
        chain = [pyllama.TopK(1), pyllama.Dist(3)]
        assert np.array_equal(tokens(ctx, max_tokens=30, sampler=chain, sampling="backend"), ref[:30])
        assert np.array_equal(tokens(ctx, max_tokens=30, sampler=chain, sampling="host"), ref[:30])


def test_a_chain_the_graph_cannot_run_falls_back_to_the_host(model: pyllama.Model) -> None:
    # a grammar sampler has no backend implementation: llama.cpp runs the chain on the host
    grammar = 'root ::= [a-z ]+'
    with model.context(n_ctx=256) as ctx:
        want = tokens(ctx, max_tokens=20, grammar=grammar, sampling="host")
        assert np.array_equal(tokens(ctx, max_tokens=20, grammar=grammar, sampling="backend"), want)


def test_parallel_sequences_sample_in_the_graph(model: pyllama.Model) -> None:
    prompts = ["Hello world", "the cat and", "We have a"]
    with model.context(n_ctx=512, n_seq_max=3) as ctx:
        host = pyllama.generate_parallel_tokens(ctx, prompts, max_tokens=24, sampling="host")
        backend = pyllama.generate_parallel_tokens(ctx, prompts, max_tokens=24, sampling="backend")
        argmax = pyllama.generate_parallel_tokens(ctx, prompts, max_tokens=24, sampling="argmax")
        for h, b, a in zip(host, backend, argmax):
            assert h.tokens == b.tokens == a.tokens and h.finish_reason == b.finish_reason
        assert not ctx._backend_samplers


def test_an_abandoned_backend_generation_does_not_sample_for_the_next(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        seeded = [pyllama.TopK(40), pyllama.Temp(1.5), pyllama.Dist(11)]
        want = tokens(ctx, max_tokens=20, sampler=seeded, sampling="host")
        gen = pyllama.generate(ctx, PROMPT, max_tokens=50, sampling="backend")
        it = iter(gen)
        next(it), next(it)  # greedy chain attached in the graph, generation left open
        assert ctx._backend_samplers
        # the next generation on this sequence samples with its own chain, on the host
        assert np.array_equal(tokens(ctx, max_tokens=20, sampler=seeded, sampling="host"), want)
        assert not ctx._backend_samplers
        gen.close()


def test_a_chain_is_attached_to_the_graph_once(model: pyllama.Model) -> None:
    # llama.cpp initialises a chain's graph part once and asserts on a second time: refused before that
    with model.context(n_ctx=256) as ctx, pyllama.SamplerChain([pyllama.Greedy()], model) as chain:
        first = tokens(ctx, max_tokens=8, sampler=chain, sampling="backend")
        with pytest.raises(ValueError, match="backend sampling once"):
            tokens(ctx, max_tokens=8, sampler=chain, sampling="backend")
        # llama.cpp's chain, initialised for the graph, would assert sampling on the host: refused too
        with pytest.raises(ValueError, match="backend sampling once"):
            tokens(ctx, max_tokens=8, sampler=chain, sampling="host")
        with pytest.raises(ValueError, match="already attached"):
            ctx._attach_sampler(0, chain)
        with pytest.raises(ValueError, match="backend sampling"):
            chain.sample(ctx)
        assert np.array_equal(tokens(ctx, max_tokens=8), first)  # the context is fine
        assert not ctx._backend_samplers and ctx._backend_sampling_refusal is None


def test_bad_sampling_requests_are_refused(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        with pytest.raises(ValueError, match="sampling must be"):
            pyllama.generate(ctx, PROMPT, sampling="gpu")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="logprobs"):
            pyllama.generate(ctx, PROMPT, sampling="backend", logprobs=True)
        with pytest.raises(ValueError, match="ignore_eos"):
            pyllama.generate(ctx, PROMPT, sampling="backend", ignore_eos=True)
        with pytest.raises(ValueError, match="Greedy"):
            pyllama.generate(ctx, PROMPT, sampling="argmax", sampler=[pyllama.TopK(5), pyllama.Dist(1)])
        with pytest.raises(ValueError, match="draft"):
            pyllama.generate(ctx, PROMPT, sampling="backend", draft="ngram")
        assert tokens(ctx, max_tokens=5).size == 5


def test_lavapipe_before_mesa_25_is_refused_backend_sampling() -> None:
    from pyllama.backend_sampling import LAVAPIPE_DRIVER_ID, driver_blocks_backend_sampling

    for info in ("Mesa 22.3.6", "Mesa 24.3.4 (LLVM 19.1.7)", "Mesa 24.99.0-devel", None, "", "lavapipe"):
        reason = driver_blocks_backend_sampling(LAVAPIPE_DRIVER_ID, info)
        assert reason is not None and "Mesa 25.0" in reason, info
    for info in ("Mesa 25.0.7-2~bpo12+1 (LLVM 15.0.6)", "Mesa 25.1.0", "Mesa 26.0.0-devel (git-1234)"):
        assert driver_blocks_backend_sampling(LAVAPIPE_DRIVER_ID, info) is None, info
    # other drivers (RADV = 3, NVIDIA = 4) are not known to break, whatever their version text
    assert driver_blocks_backend_sampling(3, "Mesa 22.3.6") is None
    assert driver_blocks_backend_sampling(4, "580.95.05") is None
    assert driver_blocks_backend_sampling(None, None) is None


def test_auto_samples_in_the_graph_only_where_it_measured_faster(model: pyllama.Model) -> None:
    from pyllama.backend_sampling import backend_sampling_pays
    from pyllama.stream import SequenceStream

    assert backend_sampling_pays(["CUDA"], True)
    assert not backend_sampling_pays(["CUDA"], False)  # layers on the CPU: the CPU's scalar argmax
    assert not backend_sampling_pays(["Vulkan"], True) and not backend_sampling_pays(["CUDA", "Vulkan"], True)
    assert not backend_sampling_pays([], True)
    with model.context(n_ctx=64) as ctx:
        assert not ctx._backend_sampling_pays  # this build's CPU
    # where it pays, "auto" takes it for the streams it can serve, and only for those
    greedy = SequenceStream(model, None)
    greedy.prefer_backend()
    assert greedy.sampling == "backend"
    for stream in (SequenceStream(model, None, logprobs=True), SequenceStream(model, None, ignore_eos=True),
                   SequenceStream(model, [pyllama.TopK(5), pyllama.Dist(1)]), SequenceStream(model, None,
                                                                                               sampling="argmax")):
        stream.prefer_backend()
        assert stream.sampling != "backend"
        stream.close()
    greedy.close()
