"""The generation options: declared once, taken by every API that generates.

:class:`SamplingOptions` says how tokens are chosen and when a generation stops;
:class:`GenerateOptions` adds where a single-sequence generation runs (its
sequence, prompt handling, context shift, drafting). ``generate``,
``agenerate``, ``generate_text``, ``ChatSession``, ``Worker.generate``,
``Engine.submit``, ``IsolatedEngine.submit``, the server and the CLI all take
their options from these two types, so a signature shows every option, a
misspelled one is a type error under ``mypy --strict`` (``Unpack``), and at run
time a :class:`TypeError` names the closest valid option (:func:`check`).

Plain sampling knobs (``temperature``, ``top_k``, ``top_p``, ``min_p``,
``repeat_penalty``, ...) build llama.cpp's usual chain (:func:`sampler_from`),
as llama-server builds it from a request; ``sampler`` gives a chain outright.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence, TypedDict, Union

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

if TYPE_CHECKING:
    from .samplers import Sampler
    from .sampling import SamplerChain
    from .speculative import DraftArg

#: Where the next token is chosen: "host" (llama.cpp's samplers on the CPU, as llama-simple does),
#: "argmax" (greedy only: the first largest logit, over the zero-copy logits view, without llama.cpp's
#: vocabulary-sized candidate array), "backend" (the chain runs inside the compute graph:
#: llama_set_sampler) or "auto": for a plain greedy chain, backend sampling where it measured faster
#: (:data:`pyllama.backend_sampling.BACKEND_SAMPLING_FASTER`, every layer on such a GPU), else argmax;
#: host for other chains.
Sampling = Literal["auto", "host", "argmax", "backend"]
SAMPLING_MODES: tuple[Sampling, ...] = ("auto", "host", "argmax", "backend")

#: What happens when a sequence fills its context: finish with reason "context", raise
#: ContextOverflowError, or drop the older half after the first ``n_keep`` tokens and go on.
ContextFull = Literal["stop", "error", "shift"]
CONTEXT_FULL: tuple[ContextFull, ...] = ("stop", "error", "shift")

SamplerArg = Union["SamplerChain", Sequence["Sampler"], None]

# llama.cpp's defaults (common/common.h, common_params_sampling), which llama-server applies to a request
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_LAST_N = 64


class SamplingOptions(TypedDict, total=False):
    """How tokens are chosen and when generation stops (every key optional).

    ``sampler``: a :class:`~pyllama.SamplerChain` or a list of sampler specs
    (None: greedy, or with ``seed`` alone llama.cpp's default chain). The plain
    knobs ``temperature`` (0: greedy), ``top_k``, ``top_p``, ``min_p``,
    ``typical_p``, ``repeat_penalty``, ``repeat_last_n``, ``presence_penalty``,
    ``frequency_penalty`` and ``logit_bias`` build llama.cpp's chain instead
    (defaults as llama.cpp's: temperature 0.8, top_k 40, top_p 0.95, min_p
    0.05). ``max_tokens`` (None: until end of generation or a full context),
    ``stop`` strings (matched across tokens, never emitted), ``logprobs`` /
    ``top_logprobs``, ``ignore_eos``, ``grammar`` (GBNF) or ``json_schema``,
    and ``sampling``: where tokens are chosen (:data:`Sampling`).
    """

    sampler: SamplerArg
    seed: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float]
    max_tokens: int | None
    stop: Sequence[str]
    logprobs: bool
    top_logprobs: int
    ignore_eos: bool
    grammar: str | None
    json_schema: Mapping[str, Any] | str | None
    sampling: Sampling


class GenerateOptions(SamplingOptions, total=False):
    """:class:`SamplingOptions` plus where one generation runs on its context.

    ``seq_id`` (the KV sequence), ``add_special`` / ``parse_special`` (how a
    text prompt is tokenized), ``reuse_prefix`` (evaluate only what the
    sequence does not already hold), ``context_shift`` (drop old tokens instead
    of stopping when the context is full, keeping the first ``n_keep``),
    ``draft`` (speculative decoding: a draft model, an n-gram drafter name or a
    :class:`~pyllama.Speculator`).
    """

    seq_id: int
    add_special: bool
    parse_special: bool
    reuse_prefix: bool
    context_shift: bool
    n_keep: int
    draft: DraftArg


class SubmitOptions(SamplingOptions, total=False):
    """:class:`SamplingOptions` plus a serving request's own: tokenization, what a full slot does,
    ``progress`` (:class:`pyllama.engine.PromptProgress` events while the prompt is evaluated) and ``slot``
    (run in this slot, waiting for it if busy, as llama-server's ``id_slot``; None: any free slot), ``lora``
    (the scale of each of the engine's LoRA adapters, by index; those not named: 0; None: the engine's)."""

    add_special: bool
    parse_special: bool
    context_full: ContextFull
    progress: bool
    slot: int | None
    lora: Mapping[int, float] | None


SAMPLING_KEYS = frozenset(SamplingOptions.__annotations__)
GENERATE_KEYS = frozenset(GenerateOptions.__annotations__)
SUBMIT_KEYS = frozenset(SubmitOptions.__annotations__)
#: the knobs that build a chain (sampler_from); the rest of SamplingOptions go to the stream
KNOBS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
         "presence_penalty", "frequency_penalty", "logit_bias")


def check(where: str, options: Mapping[str, object], valid: frozenset[str]) -> None:
    """Raise TypeError for a key of ``options`` that is not an option, naming the closest valid one."""
    for key in options:
        if key not in valid:
            import difflib

            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{where}() got an unexpected option {key!r}{hint} "
                            f"(options: {', '.join(sorted(valid))})")


def sampler_from(options: Mapping[str, Any]) -> SamplerArg:
    """The chain the options ask for: ``sampler`` as given, or llama.cpp's chain built from the knobs
    (None when neither is set: the stream's default, greedy)."""
    sampler: SamplerArg = options.get("sampler")
    knobs = {k: options[k] for k in KNOBS if options.get(k) is not None}
    if not knobs:
        return sampler
    if sampler is not None:
        raise ValueError(f"pass sampler or the sampling knobs ({', '.join(sorted(knobs))}), not both")
    return chain_specs(**knobs, seed=options.get("seed"))


def chain_specs(*, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                min_p: float | None = None, typical_p: float | None = None, repeat_penalty: float | None = None,
                repeat_last_n: int | None = None, presence_penalty: float | None = None,
                frequency_penalty: float | None = None, logit_bias: Mapping[int, float] | None = None,
                seed: int | None = None, grammar: Sampler | None = None) -> list[Sampler]:
    """llama.cpp's sampler chain (common/sampling.cpp's order): bias, penalties, grammar, then top-k,
    typical, top-p, min-p, temperature and the draw; ``temperature <= 0`` is greedy. Unset knobs take
    llama.cpp's defaults. The one home of this policy: the server builds requests' chains here too."""
    from .samplers import DEFAULT_SEED, Dist, Greedy, LogitBias, MinP, Penalties, Temp, TopK, TopP, Typical

    specs: list[Sampler] = []
    if logit_bias:
        specs.append(LogitBias(dict(logit_bias)))
    presence = presence_penalty or 0.0
    frequency = frequency_penalty or 0.0
    repeat = repeat_penalty if repeat_penalty is not None else 1.0
    if presence or frequency or repeat != 1.0:
        last_n = repeat_last_n if repeat_last_n is not None else DEFAULT_REPEAT_LAST_N
        specs.append(Penalties(last_n=last_n, repeat=repeat, frequency=frequency, presence=presence))
    if grammar is not None:
        specs.append(grammar)
    temp = temperature if temperature is not None else DEFAULT_TEMPERATURE
    if temp <= 0:
        specs.append(Greedy())
        return specs
    k = top_k if top_k is not None else DEFAULT_TOP_K
    p = top_p if top_p is not None else DEFAULT_TOP_P
    m = min_p if min_p is not None else DEFAULT_MIN_P
    if k > 0:
        specs.append(TopK(k))
    if typical_p is not None and typical_p < 1.0:
        specs.append(Typical(typical_p))
    if p < 1.0:
        specs.append(TopP(p))
    if m > 0.0:
        specs.append(MinP(m))
    specs.append(Temp(temp))
    specs.append(Dist(seed if seed is not None else DEFAULT_SEED))
    return specs


def stream_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :class:`~pyllama.stream.SequenceStream` for ``options`` (the knobs made
    into a chain)."""
    out = {k: v for k, v in options.items() if k in SAMPLING_KEYS and k not in KNOBS}
    out["sampler"] = sampler_from(options)
    return out


__all__ = ["SamplingOptions", "GenerateOptions", "SubmitOptions", "Sampling", "SAMPLING_MODES", "ContextFull",
           "CONTEXT_FULL", "SamplerArg", "Unpack", "check", "sampler_from", "chain_specs", "stream_options"]
