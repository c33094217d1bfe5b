"""OpenAI sampling parameters (and llama-server's native ones: :func:`native_settings`) -> pyllama sampler specs.

Unset parameters take the server's defaults (:class:`RequestDefaults`, set by
``pyllama serve --temp/--top-k/.../-n`` as llama-server's flags set them), and
where those are unset llama.cpp's (top_k 40, top_p 0.95, min_p 0.05,
temperature 0.8), so the same request behaves alike on both servers.
Temperature 0 is greedy decoding. Every value is validated here, before the
engine sees it, so a bad one is a 400 naming the parameter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from ..options import DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, chain_specs
from ..samplers import Sampler
from .protocol import APIError, SamplingRequest

_T = TypeVar("_T")


@dataclass(frozen=True)
class RequestDefaults:
    """Server-wide defaults of requests: what a request that leaves a parameter unset gets.

    llama-server's ``--temp``, ``--top-k``, ``--top-p``, ``--min-p``, ``--seed``,
    ``--repeat-penalty``, ``--repeat-last-n``, ``--presence-penalty``,
    ``--frequency-penalty`` and ``-n/--n-predict`` (``max_tokens``). None leaves
    the choice to the sampler chain's policy (:func:`pyllama.options.chain_specs`:
    llama.cpp's defaults) and, for ``max_tokens``, to the context.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None


def _or(value: _T | None, default: _T | None) -> _T | None:
    return value if value is not None else default


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


# llama.cpp counts tokens to predict in an int32 (common_params_sampling.n_predict, the C step's
# limit): a larger request is refused by name rather than wrapped or turned into an allocation.
MAX_PREDICT = 2**31 - 1

# Stop strings are matched on the engine's thread after every token of their request: a request with
# 200,000 of them slowed every request in its batch to its pace. OpenAI takes 4; these bounds leave room.
MAX_STOPS = 256
MAX_STOP_CHARS = 2048


def check_stops(stops: Sequence[str]) -> None:
    """A 400 naming the limit when a request's stop strings are too many or too long."""
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings are taken ({len(stops)} given)", param="stop")
    long = next((s for s in stops if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise APIError(400, f"stop: a stop string may be at most {MAX_STOP_CHARS} characters ({len(long)} given)",
                       param="stop")


# Tools, JSON schemas and grammars become a grammar (llama.cpp's json-schema-to-grammar, its chat
# templates' tool grammars, its GBNF parser) and the tools part of the prompt, before the first token:
# their size is checked first. OpenAI takes 128 tools. 128 K characters of schema take llama.cpp
# about 0.1 s to turn into a grammar; what the grammar then costs is bounded by pyllama.grammar's
# limits (GRAMMAR_MAX_STACKS, ...), checked on every grammar however it was made.
MAX_TOOLS = 128
#: characters of compact JSON: a request's tools together, or its JSON schema; and of a GBNF grammar
MAX_SCHEMA_CHARS = 128 * 1024


def check_tool_count(n: int) -> None:
    """A 400 naming the limit when a request has more than MAX_TOOLS tools."""
    if n > MAX_TOOLS:
        raise APIError(400, f"tools: at most {MAX_TOOLS} tools are taken ({n} given)", param="tools")


def check_json_size(value: Any, param: str) -> None:
    """A 400 naming the limit and ``param`` when ``value`` (tools, a JSON schema) is more than
    MAX_SCHEMA_CHARS characters of compact JSON."""
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    if size > MAX_SCHEMA_CHARS:
        what = "the tools together" if param == "tools" else "a JSON schema"
        raise APIError(400, f"{param}: {what} may be at most {MAX_SCHEMA_CHARS} characters of JSON ({size} given)",
                       param=param)


def check_grammar(grammar: str, param: str = "grammar") -> None:
    """A 400 naming the limit when a GBNF grammar is more than MAX_SCHEMA_CHARS characters."""
    if len(grammar) > MAX_SCHEMA_CHARS:
        raise APIError(400, f"{param}: a grammar may be at most {MAX_SCHEMA_CHARS} characters ({len(grammar)} given)",
                       param=param)


def _predict_bound(v: int, name: str) -> int:
    if v > MAX_PREDICT:
        raise APIError(400, f"{name} must be at most {MAX_PREDICT}, not {v} (generation also stops when the "
                       "slot's context is full)", param=name, code="invalid_value")
    return v


def max_tokens(req: Any, *names: str, default: int | None = None) -> int | None:
    """The first of the request's fields ``names`` that is set, else ``default`` (the server's ``-n``);
    None: no limit but the context. Must be >= 1 and fit llama.cpp's int32; an error names the field."""
    for name in names or ("max_tokens",):
        v = getattr(req, name, None)
        if v is not None:
            if v < 1:
                raise APIError(400, f"{name} must be at least 1, not {v}", param=name, code="invalid_value")
            return _predict_bound(v, name)
    return default


def choices(n: int | None, n_slots: int) -> int:
    """The number of choices a request asks for (``n``): 1 to the number of slots, as llama-server allows."""
    if n is None:
        return 1
    if not 1 <= n <= n_slots:
        raise APIError(400, f"n must be between 1 and {n_slots} (the server's slots), not {n}", param="n",
                       code="invalid_value")
    return n


def sampler_specs(req: SamplingRequest, n_vocab: int, *, grammar: Sampler | None = None,
                  defaults: RequestDefaults = RequestDefaults()) -> list[Sampler]:
    """The sampler chain for a request: bias, penalties, grammar, then truncation and the draw.

    A parameter the request leaves unset takes ``defaults`` (the server's)."""
    if grammar is not None and req.ignore_eos:
        # The grammar's last allowed token is the end of generation: banning it leaves the
        # grammar nothing to accept, which llama.cpp answers by aborting the process.
        raise APIError(400, "ignore_eos cannot be combined with response_format or tools", param="ignore_eos",
                       code="invalid_value")
    d = defaults
    return chain_specs(temperature=_or(req.temperature, d.temperature), top_k=_or(req.top_k, d.top_k),
                       top_p=_or(req.top_p, d.top_p), min_p=_or(req.min_p, d.min_p),
                       repeat_penalty=_or(req.repeat_penalty, d.repeat_penalty),
                       repeat_last_n=_or(req.repeat_last_n, d.repeat_last_n),
                       presence_penalty=_or(req.presence_penalty, d.presence_penalty),
                       frequency_penalty=_or(req.frequency_penalty, d.frequency_penalty),
                       logit_bias=logit_bias(req.logit_bias, n_vocab) if req.logit_bias else None,
                       seed=_or(req.seed, d.seed), grammar=grammar)


# --- llama-server's native requests -------------------------------------------------------------

#: llama.cpp's sampler names (common_sampler_types_from_names / _from_chars) -> the canonical name
SAMPLER_NAMES = {"dry": "dry", "top_k": "top_k", "top_p": "top_p", "top_n_sigma": "top_n_sigma", "typ_p": "typ_p",
                 "min_p": "min_p", "temperature": "temperature", "xtc": "xtc", "infill": "infill",
                 "penalties": "penalties", "adaptive_p": "adaptive_p", "nucleus": "top_p", "temp": "temperature",
                 "typ": "typ_p", "typical_p": "typ_p", "typical": "typ_p"}
for _name in list(SAMPLER_NAMES):
    if "_" in _name:
        SAMPLER_NAMES.setdefault(_name.replace("_", "-"), SAMPLER_NAMES[_name])
        SAMPLER_NAMES.setdefault(_name.replace("_", ""), SAMPLER_NAMES[_name])
SAMPLER_CHARS = {"d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma", "m": "min_p",
                 "t": "temperature", "x": "xtc", "i": "infill", "e": "penalties", "a": "adaptive_p"}
#: common_params_sampling's order
DEFAULT_SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED


def samplers_order(value: list[str] | str | None) -> list[str]:
    """llama-server's ``samplers``: names (any of llama.cpp's spellings) or a string of letters; unknown
    ones are skipped, as llama.cpp does."""
    if value is None:
        return list(DEFAULT_SAMPLERS)
    if isinstance(value, str):
        return [SAMPLER_CHARS[c] for c in value if c in SAMPLER_CHARS]
    return [SAMPLER_NAMES[n.lower()] for n in value if n.lower() in SAMPLER_NAMES]


def native_settings(req: Any, defaults: RequestDefaults) -> dict[str, Any]:
    """The generation settings of a llama-server request (its ``generation_settings``): the request's
    values, else the server's defaults, else llama.cpp's (common_params_sampling)."""
    d = defaults

    def get(name: str) -> Any:
        return getattr(req, name, None) if req is not None else None

    n_predict = next((_predict_bound(v, name) for name in ("n_predict", "max_completion_tokens", "max_tokens")
                      if (v := get(name)) is not None), None)
    n_probs = get("n_probs")
    if n_probs is None:  # llama-server's alias; a chat request's logprobs is a switch, its top_logprobs the count
        lp = get("logprobs")
        n_probs = lp if isinstance(lp, int) and not isinstance(lp, bool) else (get("top_logprobs") or 0)
    if n_predict is None or n_predict == -1:  # -1: the server's -n, as llama-server
        n_predict = d.max_tokens if d.max_tokens is not None else -1
    seed = _or(get("seed"), d.seed)
    return {
        "seed": RANDOM_SEED if seed is None or seed < 0 else seed,
        "temperature": _or(get("temperature"), _or(d.temperature, DEFAULT_TEMPERATURE)),
        "dynatemp_range": _or(get("dynatemp_range"), 0.0),
        "dynatemp_exponent": _or(get("dynatemp_exponent"), 1.0),
        "top_k": _or(get("top_k"), _or(d.top_k, DEFAULT_TOP_K)),
        "top_p": _or(get("top_p"), _or(d.top_p, DEFAULT_TOP_P)),
        "min_p": _or(get("min_p"), _or(d.min_p, DEFAULT_MIN_P)),
        "top_n_sigma": _or(get("top_n_sigma"), -1.0),
        "xtc_probability": _or(get("xtc_probability"), 0.0),
        "xtc_threshold": _or(get("xtc_threshold"), 0.1),
        "typical_p": _or(get("typical_p"), 1.0),
        "repeat_last_n": _or(get("repeat_last_n"), _or(d.repeat_last_n, 64)),
        "repeat_penalty": _or(get("repeat_penalty"), _or(d.repeat_penalty, 1.0)),
        "presence_penalty": _or(get("presence_penalty"), _or(d.presence_penalty, 0.0)),
        "frequency_penalty": _or(get("frequency_penalty"), _or(d.frequency_penalty, 0.0)),
        "dry_multiplier": _or(get("dry_multiplier"), 0.0),
        "dry_base": _or(get("dry_base"), 1.75),
        "dry_allowed_length": _or(get("dry_allowed_length"), 2),
        "dry_penalty_last_n": _or(get("dry_penalty_last_n"), 64),
        "dry_sequence_breakers": _or(get("dry_sequence_breakers"), ["\n", ":", "\"", "*"]),
        "mirostat": _or(get("mirostat"), 0),
        "mirostat_tau": _or(get("mirostat_tau"), 5.0),
        "mirostat_eta": _or(get("mirostat_eta"), 0.1),
        "adaptive_target": -1.0,
        "adaptive_decay": 0.9,
        "stop": req.stops() if req is not None else [],
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": _or(get("n_keep"), 0),
        "n_discard": 0,
        "ignore_eos": bool(get("ignore_eos")),
        "stream": bool(get("stream")),
        "logit_bias": [],
        "n_probs": n_probs,
        "min_keep": _or(get("min_keep"), 0),
        "samplers": samplers_order(get("samplers")),
        "timings_per_token": bool(get("timings_per_token")),
        "post_sampling_probs": bool(get("post_sampling_probs")),
        "backend_sampling": False,
        "lora": [],
    }


def native_logit_bias(raw: list[Any] | dict[str, Any] | None, n_vocab: int,
                      tokenize: Callable[[str], list[int]]) -> dict[int, float]:
    """llama-server's ``logit_bias``: ``[[token or text, bias], ...]`` or ``{"token id or text": bias}``;
    text stands for its tokens, ``false`` bans. Token ids are checked against the vocabulary (a 400, where
    llama-server skips them)."""
    pairs: list[tuple[Any, Any]] = []
    if isinstance(raw, list):
        pairs = [(el[0], el[1]) for el in raw if isinstance(el, list) and len(el) == 2]
    elif isinstance(raw, dict):
        pairs = list(raw.items())
    out: dict[str, float] = {}
    for key, value in pairs:
        if value is False:
            bias = -100.0  # a ban, kept finite (see logit_bias)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            bias = max(-100.0, min(100.0, float(value)))
        else:
            continue
        if isinstance(key, int) and not isinstance(key, bool):
            out[str(key)] = bias
        elif isinstance(key, str):
            try:
                int(key)
                out[key] = bias
            except ValueError:
                for tok in tokenize(key):
                    out[str(tok)] = bias
    return logit_bias(out, n_vocab) if out else {}


def native_sampler_specs(settings: dict[str, Any], bias: dict[int, float], *, grammar: Sampler | None = None,
                         dry: bool = True) -> list[Sampler]:
    """The chain of a llama-server request from its resolved ``settings`` (:func:`native_settings`), as
    llama.cpp's common_sampler builds it: bias, grammar, then ``samplers`` in order, then the draw (or
    mirostat). With llama.cpp's default order and knobs it is :func:`pyllama.options.chain_specs`'s chain."""
    from ..samplers import (DRY, XTC, Dist, Greedy, LogitBias, MinP, Mirostat, MirostatV2, Penalties, Temp,
                            TempExt, TopK, TopNSigma, TopP, Typical)

    s = settings
    temp = float(s["temperature"])
    seed = int(s["seed"])
    specs: list[Sampler] = []
    if bias:
        specs.append(LogitBias(dict(bias)))
    penalties = (s["repeat_penalty"] != 1.0 or s["presence_penalty"] or s["frequency_penalty"]) and s["repeat_last_n"]
    if s["mirostat"]:
        if penalties:
            specs.append(Penalties(last_n=s["repeat_last_n"], repeat=s["repeat_penalty"],
                                   frequency=s["frequency_penalty"], presence=s["presence_penalty"]))
        if grammar is not None:
            specs.append(grammar)
        specs.append(Temp(temp))
        specs.append(Mirostat(seed, s["mirostat_tau"], s["mirostat_eta"]) if s["mirostat"] == 1
                     else MirostatV2(seed, s["mirostat_tau"], s["mirostat_eta"]))
        return specs
    keep = max(1, int(s["min_keep"]))
    for name in s["samplers"]:
        if name == "penalties" and penalties:
            specs.append(Penalties(last_n=s["repeat_last_n"], repeat=s["repeat_penalty"],
                                   frequency=s["frequency_penalty"], presence=s["presence_penalty"]))
            if grammar is not None:  # llama.cpp applies the grammar first; after the penalties as chain_specs
                specs.append(grammar)
                grammar = None
        elif grammar is not None:
            specs.append(grammar)
            grammar = None
        if temp <= 0:
            continue  # greedy: truncation changes nothing
        if name == "dry" and dry and s["dry_multiplier"] > 0:
            specs.append(DRY(s["dry_multiplier"], s["dry_base"], s["dry_allowed_length"], s["dry_penalty_last_n"],
                             tuple(s["dry_sequence_breakers"])))
        elif name == "top_n_sigma" and s["top_n_sigma"] > 0:
            specs.append(TopNSigma(s["top_n_sigma"]))
        elif name == "top_k" and s["top_k"] > 0:
            specs.append(TopK(s["top_k"]))
        elif name == "typ_p" and s["typical_p"] < 1.0:
            specs.append(Typical(s["typical_p"], keep))
        elif name == "top_p" and s["top_p"] < 1.0:
            specs.append(TopP(s["top_p"], keep))
        elif name == "min_p" and s["min_p"] > 0.0:
            specs.append(MinP(s["min_p"], keep))
        elif name == "xtc" and s["xtc_probability"] > 0.0:
            specs.append(XTC(s["xtc_probability"], s["xtc_threshold"], keep, seed))
        elif name == "temperature":
            specs.append(TempExt(temp, s["dynatemp_range"], s["dynatemp_exponent"]) if s["dynatemp_range"] > 0
                         else Temp(temp))
    if grammar is not None:
        specs.append(grammar)
    specs.append(Greedy() if temp <= 0 else Dist(seed))
    return specs


def lora_scales(value: Any, n_adapters: int, param: str = "lora") -> dict[int, float] | None:
    """llama-server's LoRA list (``[{"id": i, "scale": s}, ...]``, of a request or of ``POST /lora-adapters``)
    as scales by adapter index; None when absent. An adapter not listed gets scale 0, as there."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise APIError(400, f"Error: '{param}' must be an array of objects with 'id' and 'scale' fields", param=param)
    out: dict[int, float] = {}
    for entry in value:
        i = entry.get("id", -1) if isinstance(entry, dict) else None
        scale = entry.get("scale", 0.0) if isinstance(entry, dict) else None
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_adapters:
            raise APIError(400, f"{param}: no LoRA adapter with id {i!r} (this server has {n_adapters})",
                           param=param, code="invalid_value")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise APIError(400, f"{param}: the scale of adapter {i} must be a finite number", param=param,
                           code="invalid_value")
        out[i] = float(scale)
    return out


__all__ = ["lora_scales", "sampler_specs", "choices", "native_settings", "native_logit_bias", "native_sampler_specs", "logit_bias",
           "max_tokens", "RequestDefaults", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_K",
           "DEFAULT_TOP_P", "DEFAULT_MIN_P", "MAX_PREDICT", "MAX_STOPS", "MAX_STOP_CHARS", "MAX_TOOLS",
           "MAX_SCHEMA_CHARS", "check_stops", "check_tool_count", "check_json_size", "check_grammar"]
