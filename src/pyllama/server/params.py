"""OpenAI sampling parameters -> pyllama sampler specs.

Unset parameters take llama-server's defaults (top_k 40, top_p 0.95, min_p
0.05, temperature 0.8), so the same request behaves alike on both servers.
Temperature 0 is greedy decoding. Every value is validated here, before the
engine sees it, so a bad one is a 400 naming the parameter.
"""

from __future__ import annotations

import math

from ..sampling import (
    DEFAULT_SEED,
    Dist,
    Greedy,
    LogitBias,
    MinP,
    Penalties,
    Sampler,
    Temp,
    TopK,
    TopP,
)
from .protocol import APIError, SamplingRequest

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_LAST_N = 64


def logit_bias(raw: dict[str, float], n_vocab: int) -> dict[int, float]:
    """OpenAI's ``{"token id": bias}`` checked against the vocabulary (out of range: 400)."""
    out: dict[int, float] = {}
    for key, value in raw.items():
        try:
            tok = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias",
                           code="invalid_logit_bias") from None
        if not 0 <= tok < n_vocab:
            raise APIError(400, f"logit_bias token id {tok} is outside the vocabulary [0, {n_vocab})",
                           param="logit_bias", code="invalid_logit_bias")
        if not -100 <= value <= 100 or math.isnan(value):
            raise APIError(400, f"logit_bias value {value} for token {tok} is outside [-100, 100]",
                           param="logit_bias", code="invalid_logit_bias")
        # Kept finite, -100 still bans in practice; an infinite bias could leave a grammar
        # no token it allows, and llama.cpp's grammar sampler then aborts the process.
        out[tok] = float(value)
    return out


def max_tokens(*values: int | None) -> int | None:
    """The first value that is set; None (no limit but the context) when none is. Must be >= 1."""
    for v in values:
        if v is not None:
            if v < 1:
                raise APIError(400, f"max_tokens must be at least 1, not {v}", param="max_tokens",
                               code="invalid_value")
            return v
    return None


def sampler_specs(req: SamplingRequest, n_vocab: int, *, grammar: Sampler | None = None) -> list[Sampler]:
    """The sampler chain for a request: bias, penalties, grammar, then truncation and the draw."""
    if req.n is not None and req.n != 1:
        raise APIError(400, f"n={req.n} is not supported: this server returns one choice per request (n=1)",
                       param="n", code="invalid_value")
    specs: list[Sampler] = []
    if req.logit_bias:
        specs.append(LogitBias(logit_bias(req.logit_bias, n_vocab)))
    presence = req.presence_penalty or 0.0
    frequency = req.frequency_penalty or 0.0
    repeat = req.repeat_penalty if req.repeat_penalty is not None else 1.0
    if presence or frequency or repeat != 1.0:
        last_n = req.repeat_last_n if req.repeat_last_n is not None else DEFAULT_REPEAT_LAST_N
        specs.append(Penalties(last_n=last_n, repeat=repeat, frequency=frequency, presence=presence))
    if grammar is not None:
        if req.ignore_eos:
            # The grammar's last allowed token is the end of generation: banning it leaves the
            # grammar nothing to accept, which llama.cpp answers by aborting the process.
            raise APIError(400, "ignore_eos cannot be combined with response_format or tools", param="ignore_eos",
                           code="invalid_value")
        specs.append(grammar)
    temperature = req.temperature if req.temperature is not None else DEFAULT_TEMPERATURE
    if temperature <= 0:
        specs.append(Greedy())
        return specs
    top_k = req.top_k if req.top_k is not None else DEFAULT_TOP_K
    top_p = req.top_p if req.top_p is not None else DEFAULT_TOP_P
    min_p = req.min_p if req.min_p is not None else DEFAULT_MIN_P
    if top_k > 0:
        specs.append(TopK(top_k))
    if top_p < 1.0:
        specs.append(TopP(top_p))
    if min_p > 0.0:
        specs.append(MinP(min_p))
    specs.append(Temp(temperature))
    specs.append(Dist(req.seed if req.seed is not None else DEFAULT_SEED))
    return specs


__all__ = ["sampler_specs", "logit_bias", "max_tokens", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_K", "DEFAULT_TOP_P",
           "DEFAULT_MIN_P"]
