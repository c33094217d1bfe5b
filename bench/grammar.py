"""Grammar-constrained sampling: what a grammar costs to create and per sampled token, against none.

For each grammar (JSON schemas turned into GBNF by llama.cpp's json-schema-to-grammar, and
the widest ones the limits of ``pyllama.grammar`` let through), on one model:

    check    pyllama's bound on the grammar (``pyllama.grammar.check_gbnf``: rules, elements and
             parse stacks, computed from the text; every Grammar sampler runs it)
    create   building the sampler chain: the check, llama.cpp's parse, and pyllama's one pass of the
             grammar over the vocabulary (does it allow a first token?)
    sample   per generated token, ``SamplerChain.sample`` alone (the grammar's apply and accept,
             then the greedy choice): median and the slowest, over the tokens of one greedy
             generation until the grammar ends or ``-n`` tokens

"none" is the same chain without the grammar (greedy over the whole vocabulary); "x none" is
the grammar's sample time over none's, taken in the same run; "refused" how many of the tokens
drawn without the grammar it refused (pyllama samples a chain without its grammar first and
asks the grammar about the token drawn only, running the chain again grammar first when it
refuses it, as llama.cpp's common_sampler does). Decoding is not timed: the model only
supplies realistic logits.

Then whole generations with llama.cpp's default chain (temperature 0.8, seeded), through
``pyllama.generate``: milliseconds per generated token, decoding included, with a JSON
grammar and without, interleaved over ``-r`` rounds (medians and ranges, and their ratio).

    python bench/grammar.py [-m MODEL] [-t 2] [-n 48] [-r 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import pyllama
from pyllama.grammar import GRAMMAR_MAX_STACKS, check_gbnf, json_schema_to_grammar

TOOL = {  # a function's parameters, as a chat request's tool gives them
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "details": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
    },
    "required": ["location", "unit"],
}


def _nested(levels: int) -> dict[str, Any]:
    """A string pattern whose groups may each be empty: 2**levels + 1 stacks at its start."""
    return {"type": "string", "pattern": "^" + "(" * levels + "x?" + "){2}" * levels + "$"}


def _tools(n: int) -> dict[str, Any]:
    """One of ``n`` tool calls, each an object naming its tool: what a tools list of ``n`` constrains."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": f"tool_{i}"}, "arguments": TOOL},
                       "required": ["name", "arguments"]} for i in range(n)]}


def grammars() -> dict[str, str | None]:
    widest = GRAMMAR_MAX_STACKS - 1  # an enum of this many values: the most the stack bound lets through
    schemas: dict[str, Any] = {
        "tool call (1 function)": TOOL,
        "128 tools (anyOf)": _tools(128),
        "enum of 100": {"enum": [f"value {i}" for i in range(100)]},
        f"enum of {widest}": {"enum": [f"value {i}" for i in range(widest)]},
        "nested empty groups (7)": _nested(7),  # 129 stacks, each step expanding many
    }
    out: dict[str, str | None] = {"none": None}
    out.update({name: json_schema_to_grammar(s) for name, s in schemas.items()})
    return out


def measure(model: pyllama.Model, ctx: pyllama.Context, prompt: Any, grammar: str | None,
            n: int) -> dict[str, Any]:
    row: dict[str, Any] = {"chars": len(grammar or "")}
    if grammar is not None:
        t = time.perf_counter()
        cost = check_gbnf(grammar)
        row["check_ms"] = (time.perf_counter() - t) * 1e3
        row.update(rules=cost.rules, elements=cost.elements, stacks=cost.stacks)
    specs: list[pyllama.Sampler] = [pyllama.Greedy()] if grammar is None else [pyllama.Grammar(grammar),
                                                                                 pyllama.Greedy()]
    t = time.perf_counter()
    chain = pyllama.SamplerChain(specs, model)
    row["create_ms"] = (time.perf_counter() - t) * 1e3
    refused0 = grammar_counts()[1]
    ctx.kv.clear()
    ctx.evaluate(prompt, reuse_prefix=False)
    pos = int(prompt.size)
    times: list[float] = []
    with chain:
        for _ in range(n):
            t = time.perf_counter()
            tok = chain.sample(ctx)
            times.append(time.perf_counter() - t)
            if model.vocab.is_eog(tok):
                break
            ctx.decode(pyllama.Batch.from_tokens([tok], pos))
            pos += 1
    row.update(tokens=len(times), sample_ms=statistics.median(times) * 1e3, slowest_ms=max(times) * 1e3,
               refused=grammar_counts()[1] - refused0)
    return row


def grammar_counts() -> tuple[int, int]:
    """Tokens this process sampled without the grammar first, and of those the ones the grammar refused."""
    from pyllama._ffi import ffi, lib

    checked, refused = ffi.new("int64_t *"), ffi.new("int64_t *")
    lib.pyllama_sampler_grammar_counts(checked, refused)
    return int(checked[0]), int(refused[0])


#: the grammar of the generation rounds: one JSON object with a short answer
ANSWER = r'''root ::= "{" ws "\"answer\"" ws ":" ws string ws "}"
string ::= "\"" [a-zA-Z ,.]* "\""
ws ::= [ \t\n]*'''


def generation_ms(ctx: pyllama.Context, prompt: str, grammar: str | None, n: int) -> tuple[float, int]:
    """Milliseconds per token of one seeded generation at temperature 0.8, and its token count."""
    ctx.kv.clear()
    t = time.perf_counter()
    with pyllama.generate(ctx, prompt, max_tokens=n, temperature=0.8, seed=1, reuse_prefix=False,
                          grammar=grammar) as gen:
        for _ in gen:
            pass
        tokens = int(gen.tokens.size) + (gen.finish_reason == "eog")  # the end token was sampled too
    return (time.perf_counter() - t) * 1e3 / max(tokens, 1), tokens


def generations(ctx: pyllama.Context, prompt: str, n: int, rounds: int) -> dict[str, list[float]]:
    """Per-token milliseconds of generations without and with :data:`ANSWER`, interleaved round by round."""
    out: dict[str, list[float]] = {"plain": [], "grammar": []}
    generation_ms(ctx, prompt, ANSWER, n)  # warm-up: the grammar's first-token check, caches
    for _ in range(rounds):
        out["plain"].append(generation_ms(ctx, prompt, None, n)[0])
        out["grammar"].append(generation_ms(ctx, prompt, ANSWER, n)[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF path (default: the starter)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-predict", type=int, default=48)
    ap.add_argument("-p", "--prompt", default="Answer with one JSON value.\n")
    ap.add_argument("-r", "--rounds", type=int, default=5, help="interleaved generation rounds (0: none)")
    args = ap.parse_args()
    path = args.model or str(pyllama.starter_model_path())
    with pyllama.Model(path) as model, model.context(n_ctx=1024, n_threads=args.threads,
                                                     n_threads_batch=args.threads) as ctx:
        prompt = model.tokenize(args.prompt)
        print(f"model {path} (vocabulary {model.vocab.n_tokens}), {args.threads} threads, "
              f"up to {args.n_predict} tokens")
        print(f"{'grammar':26s} {'chars':>7s} {'rules':>6s} {'stacks':>6s} {'check':>8s} {'create':>9s} "
              f"{'tokens':>6s} {'sample/token':>12s} {'x none':>7s} {'refused':>7s} {'slowest':>9s}")
        none_ms = None
        for name, grammar in grammars().items():
            r = measure(model, ctx, prompt, grammar, args.n_predict)
            none_ms = none_ms or r["sample_ms"]
            check = f"{r['check_ms']:.1f} ms" if "check_ms" in r else "-"
            print(f"{name:26s} {r['chars']:7d} {r.get('rules', 0):6d} {r.get('stacks', 0):6d} {check:>8s} "
                  f"{r['create_ms']:6.1f} ms {r['tokens']:6d} {r['sample_ms']:9.2f} ms "
                  f"{r['sample_ms'] / none_ms:6.1f}x {r['refused']:7d} {r['slowest_ms']:6.1f} ms", flush=True)
        if args.rounds > 0:
            gen_prompt = "Write JSON about the sky:"
            print(f"\ngeneration, temperature 0.8, up to 64 tokens, {args.rounds} interleaved rounds: "
                  f"ms per token, median [min - max]")
            res = generations(ctx, gen_prompt, 64, args.rounds)
            for name, ms in res.items():
                print(f"  {name:8s} {statistics.median(ms):7.2f} [{min(ms):.2f} - {max(ms):.2f}]")
            print(f"  grammar / plain: {statistics.median(res['grammar']) / statistics.median(res['plain']):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
