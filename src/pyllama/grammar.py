"""Grammars made by llama.cpp's own code: JSON schema -> GBNF, and chat-template grammars; what a GBNF
grammar costs llama.cpp (:func:`gbnf_cost`), and the bounds every grammar is checked against.

Both come from libpyllama-common (``common/json-schema-to-grammar.cpp`` and
``common/chat.cpp`` of the vendored tree, behind ``src/native/chat.cpp``).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Mapping

from ._ffi import ffi, lib
from .errors import SamplerError, TemplateError
from .samplers import GRAMMAR_MAX_STACKS, Grammar, _vocab

if TYPE_CHECKING:
    from .model import Model


def _call(result: Any) -> Any:
    """Decode the JSON a libpyllama-common entry point returned, raising its error."""
    if result == ffi.NULL:
        raise MemoryError("libpyllama-common returned no result")
    try:
        text = ffi.string(result).decode("utf-8", "replace")
    finally:
        lib.pyllama_free_string(result)
    out = json.loads(text)
    if isinstance(out, dict) and "error" in out:
        message = str(out["error"])
        if out.get("kind") == "template":
            raise TemplateError(message)
        raise ValueError(message)
    return out


def json_schema_to_grammar(schema: Mapping[str, Any] | str) -> str:
    """The GBNF grammar llama.cpp derives from a JSON schema (a dict or JSON text).

    Use it as ``pyllama.Grammar(json_schema_to_grammar(schema))``. A malformed
    schema (not JSON, not an object, an unsupported construct or a dangling
    ``$ref``) raises ValueError with llama.cpp's message.
    """
    if isinstance(schema, str):
        text = schema
    elif isinstance(schema, Mapping):
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the schema is not JSON-serialisable: {exc}") from None
    else:
        raise ValueError(f"a JSON schema must be a dict or JSON text, not {type(schema).__name__}")
    out = _call(lib.pyllama_json_schema_to_grammar(text.encode("utf-8")))
    return str(out["grammar"])


# --- what a grammar costs llama.cpp ----------------------------------------------------------------

# llama.cpp's grammar sampler keeps one parse stack per way the text so far may go on; a step (the start,
# or accepting a character) expands each until it ends at a character: a rule to every alternative, and
# one that can match nothing also to what follows it. Nothing bounds their number, and its duplicate
# check over new stacks is quadratic: creating the grammar of a 70-character JSON schema (the pattern
# (x?){2} nested 12 times: 4097 stacks) took 30 s, of an enum of 100,000 values 24 s. Sampling pays
# for the stacks at every token, times the vocabulary: on a 262k one, 1.2 ms a token without a grammar,
# 90 ms with a tool's JSON schema (6 stacks), 0.2 s with an enum of 100 values, 1.7 s with 1023, 29 s
# with the nested pattern at 513 (bench/grammar.py). 256 leaves room for a call to one of 128 tools.
# The bound (samplers.GRAMMAR_MAX_STACKS, defined beside the sampler that holds to it while it generates)
# is checked here before the grammar is built, over what one step may expand to.
# llama.cpp rewrites a repetition S{m,n} into m copies of S and n-m rules, and creating the grammar grows
# faster than its rules: 50,000 took 30 ms, 100,000 74 ms, 200,000 0.23 s, 800,000 9.6 s (from 5 KB of text).
#: most rules a grammar may have, repetitions rewritten
GRAMMAR_MAX_RULES = 100_000
#: most elements (characters, character ranges, rule references) a grammar may have, repetitions rewritten
GRAMMAR_MAX_ELEMENTS = 1_000_000
#: llama.cpp parses nested groups recursively: about 20,000 levels overflow an 8 MiB stack (SIGSEGV)
GRAMMAR_MAX_NESTING = 1000
_MAX_REPETITION = 2000  # llama-grammar.cpp's MAX_REPETITION_THRESHOLD: it refuses more
_SAT = 1 << 40  # counts stop growing here, far past every limit (and the arithmetic stays small)


@dataclass(frozen=True)
class GrammarCost:
    """What llama.cpp makes of a GBNF grammar (:func:`gbnf_cost`).

    ``rules`` and ``elements`` are its size once repetitions are rewritten into rules, as
    llama.cpp's parser rewrites them. ``stacks`` bounds the parse stacks one step (the
    start, or accepting a character) can expand to: the characters that may come next
    reached through different rules, every way through rules that can match nothing
    counted; llama.cpp's step costs about its square, and each token's sampling about
    it times the vocabulary.
    """

    rules: int
    elements: int
    stacks: int


@dataclass(frozen=True, slots=True)
class _Term:
    n: int  # elements: characters of a literal (0: ""), ranges of a class, 1 for a token or "."


@dataclass(frozen=True, slots=True)
class _Ref:
    name: str


@dataclass(frozen=True, slots=True)
class _Rep:
    item: _Term | _Ref
    lo: int
    hi: int | None  # None: no maximum


_Item = _Term | _Ref | _Rep

_SPACE = re.compile(r"(?:[ \t]|#[^\r\n]*)*")
_SPACE_NL = re.compile(r"(?:[ \t\r\n]|#[^\r\n]*)*")
_NAME = re.compile(r"[a-zA-Z0-9-]+")
_INT = re.compile(r"[0-9]+")
_ESCAPE = r'\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[trn\\"\[\]-])'  # parse_char's
_CHAR = r"(?:[^\\]|" + _ESCAPE + ")"
_LITERAL = re.compile(r'"((?:[^"\\]|' + _ESCAPE + ')*)"')
_CLASS = re.compile(r"\[\^?((?:(?!\])" + _CHAR + r")*)\]")
_ONE_CHAR = re.compile(_CHAR)
_CLASS_ITEM = re.compile(_CHAR + r"(-(?!\])" + _CHAR + ")?")  # a character, or a range: two elements
_TOKEN = re.compile(r"!?<(?:\[[0-9]+\]|(?!\[)[^>]*)>")  # <[id]> or a token's text


def _sat(v: int) -> int:
    return min(v, _SAT)


def _power(b: int, x: int) -> int:
    if x == 0 or b == 1:
        return 1
    if b == 0:
        return 0
    return _SAT if x * b.bit_length() > 41 else _sat(b ** x)


def _geometric(b: int, x: int) -> int:
    """1 + b + ... + b**(x-1)."""
    if x <= 0:
        return 0
    if b <= 1:
        return 1 if b == 0 else _sat(x)
    return _SAT if x * b.bit_length() > 41 else _sat((b ** x - 1) // (b - 1))


def _repeat(a: int, b: int, lo: int, hi: int | None) -> tuple[int, int]:
    """A repetition of a symbol that expands to ``a`` stacks and matches nothing in ``b`` ways, in the same
    terms, as llama.cpp rewrites it: lo copies, then hi - lo nested optional rules (or one looping rule)."""
    if hi is None:
        # S' ::= S S' | "": coming back to S' through an S that matched nothing meets a stack already
        # expanded in this step, which llama.cpp's step skips
        chain_a, chain_b = a, 1
    else:
        chain_a, chain_b = _sat(a * _geometric(b, hi - lo)), _geometric(b, hi - lo + 1)
    copies_a, copies_b = _sat(a * _geometric(b, lo)), _power(b, lo)
    return _sat(copies_a + copies_b * chain_a), _sat(copies_b * chain_b)


class _Open:
    """A rule or group being parsed: its alternatives so far, and llama.cpp's state for repetitions."""

    __slots__ = ("alts", "elements", "last", "nested", "prev_rules", "seq", "symbols_before")

    def __init__(self, nested: bool, symbols_before: int = 0) -> None:
        self.alts: list[list[_Item]] = []
        self.seq: list[_Item] = []
        self.nested = nested
        self.elements = 0
        self.last = 0  # elements of the last symbol (0: none, a repetition has nothing to repeat)
        self.prev_rules = 1
        self.symbols_before = symbols_before

    def add(self, item: _Item, n: int, prev_rules: int = 1) -> None:
        self.seq.append(item)
        self.elements += n
        self.last = n
        self.prev_rules = prev_rules


class _Gbnf:
    """A GBNF text parsed as llama-grammar.cpp parses it (its syntax, errors and repetition rewrites), into
    rules of items; group nesting is kept on a list, not on the call stack."""

    def __init__(self, text: str) -> None:
        self.src = text.split("\0", 1)[0]  # what the C string llama.cpp gets holds
        self.rules: dict[str, list[list[_Item]]] = {}
        self.symbols = 0  # llama.cpp's symbol ids: names seen, groups and repetition rules
        self.names: set[str] = set()
        self.n_rules = 0
        self.elements = 0
        self._anon = 0
        pos = self._space(0, True)
        while pos < len(self.src):
            pos = self._rule(pos)

    def _error(self, what: str, pos: int) -> SamplerError:
        return SamplerError(f"grammar: {what} at {self.src[pos:pos + 30]!r}")

    def _space(self, pos: int, newline_ok: bool) -> int:
        m = (_SPACE_NL if newline_ok else _SPACE).match(self.src, pos)
        return m.end() if m is not None else pos

    def _symbol(self, name: str) -> None:
        if name not in self.names:
            self.names.add(name)
            self.symbols += 1

    def _rule(self, pos: int) -> int:
        src = self.src
        m = _NAME.match(src, pos)
        if m is None:
            raise self._error("expecting name", pos)
        name = m.group()
        self._symbol(name)
        pos = self._space(m.end(), False)
        if not src.startswith("::=", pos):
            raise self._error("expecting ::=", pos)
        pos = self._alternates(self._space(pos + 3, True), name)
        if src.startswith("\r\n", pos):
            pos += 2
        elif pos < len(src) and src[pos] in "\r\n":
            pos += 1
        elif pos < len(src):
            raise self._error("expecting newline or end", pos)
        return self._space(pos, True)

    def _define(self, name: str, rule: _Open) -> None:
        rule.alts.append(rule.seq)
        self.rules[name] = rule.alts  # a second definition replaces the first, as in llama.cpp
        self.n_rules += 1
        self.elements += rule.elements + len(rule.alts)  # and an ALT or END after each alternative

    def _alternates(self, pos: int, name: str) -> int:
        src, n = self.src, len(self.src)
        frames = [_Open(False)]
        groups: list[str] = []
        while True:
            f = frames[-1]
            c = src[pos] if pos < n else ""
            if c == '"':
                m = _LITERAL.match(src, pos)
                if m is None:
                    raise self._error("malformed string literal", pos)
                k = len(_ONE_CHAR.findall(m.group(1)))
                f.add(_Term(k), k)
                end = m.end()
            elif c == "[":
                m = _CLASS.match(src, pos)
                if m is None:
                    raise self._error("malformed character class", pos)
                k = sum(2 if r.group(1) else 1 for r in _CLASS_ITEM.finditer(m.group(1)))
                f.add(_Term(k), k)
                end = m.end()
            elif c in ("<", "!"):
                m = _TOKEN.match(src, pos)
                if m is None:
                    raise self._error("malformed token", pos)
                f.add(_Term(1), 1)
                end = m.end()
            elif c == ".":
                f.add(_Term(1), 1)
                end = pos + 1
            elif c and (c.isascii() and (c.isalnum() or c == "-")):
                m = _NAME.match(src, pos)
                assert m is not None
                self._symbol(m.group())
                f.add(_Ref(m.group()), 1)
                end = m.end()
            elif c == "(":
                if len(frames) > GRAMMAR_MAX_NESTING:
                    raise SamplerError(f"grammar nests groups deeper than {GRAMMAR_MAX_NESTING} levels")
                frames.append(_Open(True, self.symbols))
                self.symbols += 1
                groups.append(f"{name}_{self.symbols}")
                pos = self._space(pos + 1, True)
                continue
            elif c == ")" and f.nested:
                group = groups.pop()
                frames.pop()
                self._define(group, f)
                frames[-1].add(_Ref(group), 1, max(1, self.symbols - f.symbols_before))
                end = pos + 1
            elif c in ("*", "+", "?"):
                self._repeat(f, pos, {"*": 0, "+": 1, "?": 0}[c], 1 if c == "?" else None)
                end = pos + 1
            elif c == "{":
                end = self._braces(f, pos)
            elif c == "|":
                f.alts.append(f.seq)
                f.seq, f.last = [], 0
                pos = self._space(pos + 1, True)
                continue
            else:
                if f.nested:
                    raise self._error("expecting ')'", pos)
                self._define(name, f)
                return pos
            pos = self._space(end, f.nested if c != ")" else frames[-1].nested)

    def _braces(self, f: _Open, pos: int) -> int:
        src = self.src
        p = self._space(pos + 1, f.nested)
        m = _INT.match(src, p)
        if m is None:
            raise self._error("expecting an int", p)
        lo, hi = int(m.group()), None
        p = self._space(m.end(), f.nested)
        if src.startswith("}", p):
            hi = lo
        elif src.startswith(",", p):
            p = self._space(p + 1, f.nested)
            m = _INT.match(src, p)
            if m is not None:
                hi = int(m.group())
                p = self._space(m.end(), f.nested)
            if not src.startswith("}", p):
                raise self._error("expecting '}'", p)
        else:
            raise self._error("expecting ','", p)
        if hi is not None and hi < lo:  # llama.cpp's rewrite would loop for ever (hi - lo wraps around)
            raise SamplerError(f"grammar repetition {src[pos:p + 1]}: the maximum is below the minimum")
        if lo > _MAX_REPETITION:
            raise self._error(f"more than {_MAX_REPETITION} repetitions (llama.cpp's limit)", pos)
        if hi is not None and hi > _MAX_REPETITION:
            hi = None  # as llama.cpp reads it
        self._repeat(f, pos, lo, hi)
        return p + 1

    def _repeat(self, f: _Open, pos: int, lo: int, hi: int | None) -> None:
        if f.last == 0:
            raise self._error("expecting preceding item to */+/?/{", pos)
        total = hi if hi else (lo or 1)
        if f.prev_rules * total > _MAX_REPETITION:
            raise self._error(f"repeating {f.prev_rules} rules {total} times: more than {_MAX_REPETITION} "
                              "(llama.cpp's limit)", pos)
        item = f.seq[-1]
        if isinstance(item, _Rep):  # a repetition of a repetition: the inner one as a rule of its own
            self._anon += 1
            inner = f" rep{self._anon}"  # (a name no GBNF text can spell)
            self.rules[inner] = [[item]]
            item = _Ref(inner)
        n_opt = 1 if hi is None else hi - lo
        size = lo * f.last + (1 if n_opt else 0)
        self.n_rules += n_opt
        self.symbols += n_opt
        self.elements += n_opt * (f.last + 3)  # S, a reference to the next one, ALT, END
        f.seq[-1] = _Rep(item, lo, hi)
        f.elements += size - f.last
        f.last = size
        f.prev_rules *= total

    # --- the expansion bound ------------------------------------------------------------------------
    def _first(self, name: str) -> Generator[str, tuple[int, int], tuple[int, int]]:
        """(stacks, ways to match nothing) of expanding rule ``name``: what comes before its first character.
        Yields the names of the rules it needs (the driver answers with theirs)."""
        stacks = empty = 0
        for alt in self.rules[name]:
            a, ways = 0, 1
            for item in alt:
                if isinstance(item, _Term):
                    if item.n == 0:
                        continue
                    ia, ib = 1, 0
                elif isinstance(item, _Ref):
                    ia, ib = yield item.name
                else:
                    inner = item.item
                    sa, sb = (1, 0) if isinstance(inner, _Term) else (yield inner.name)
                    ia, ib = _repeat(sa, sb, item.lo, item.hi)
                a, ways = _sat(a + ways * ia), _sat(ways * ib)
                if ways == 0:
                    break
            stacks, empty = _sat(stacks + a), _sat(empty + ways)
        return stacks, empty

    def _firsts(self) -> dict[str, tuple[int, int]]:
        """Every rule's (stacks, ways to match nothing), the rules it needs first, on a list of generators."""
        done: dict[str, tuple[int, int]] = {}
        for start in self.rules:
            if start in done:
                continue
            stack = [(start, self._first(start))]
            busy = {start}
            reply: tuple[int, int] | None = None
            while stack:
                name, gen = stack[-1]
                try:
                    need = gen.send(reply)  # type: ignore[arg-type]  # None starts a generator
                except StopIteration as stop:
                    done[name] = reply = stop.value
                    busy.discard(name)
                    stack.pop()
                    continue
                if need in done:
                    reply = done[need]
                elif need in busy:
                    # reached again before any character: left recursion, which llama.cpp refuses
                    reply = (0, 0)
                elif need not in self.rules:
                    raise SamplerError(f"grammar: undefined rule identifier '{need}'")
                else:
                    busy.add(need)
                    stack.append((need, self._first(need)))
                    reply = None
        return done

    @staticmethod
    def _known(firsts: dict[str, tuple[int, int]], name: str) -> tuple[int, int]:
        try:
            return firsts[name]
        except KeyError:
            raise SamplerError(f"grammar: undefined rule identifier '{name}'") from None

    def stacks(self) -> int:
        """The most stacks any step expands to: at every position of every rule, the stacks of what may
        follow (within the rule) and the ways to reach its end, which continue in the rule below."""
        firsts = self._firsts()
        worst = sum(firsts.get("root", (1, 0)))
        for alts in self.rules.values():
            for alt in alts:
                e, w = 0, 1  # after the last item: the end of the rule
                for item in reversed(alt):
                    if isinstance(item, _Term):
                        if item.n:
                            e, w = 1, 0
                        continue
                    if isinstance(item, _Ref):
                        a, b = self._known(firsts, item.name)
                        e, w = _sat(a + b * e), _sat(b * w)
                    else:
                        inner = item.item
                        a, b = (1, 0) if isinstance(inner, _Term) else self._known(firsts, inner.name)
                        # the copies' starts: the first copy is the largest unless a copy cannot be empty
                        ca, cb = _repeat(a, b, 0, item.hi if item.hi is None else item.hi - item.lo)
                        e1, w1 = _sat(ca + cb * e), _sat(cb * w)
                        worst = max(worst, e1 + w1, _sat(a + b * e1) + _sat(b * w1))
                        ra, rb = _repeat(a, b, item.lo, item.hi)
                        e, w = _sat(ra + rb * e), _sat(rb * w)
                    worst = max(worst, e + w)
        return _sat(worst)


def gbnf_cost(grammar: str) -> GrammarCost:
    """What llama.cpp's grammar sampler makes of a GBNF text (:class:`GrammarCost`), found without building it.

    The text is parsed as llama.cpp parses it; a syntax error raises :class:`~pyllama.SamplerError`
    naming the place, as do an undefined rule, groups nested deeper than :data:`GRAMMAR_MAX_NESTING`
    and a repetition llama.cpp cannot take.
    """
    g = _Gbnf(grammar)
    return GrammarCost(rules=g.n_rules, elements=g.elements, stacks=g.stacks())


@functools.lru_cache(maxsize=64)  # every Grammar sampler is checked: a repeated one costs a lookup
def check_gbnf(grammar: str) -> GrammarCost:
    """:func:`gbnf_cost`, raising :class:`~pyllama.SamplerError` naming the limit when the grammar is past
    :data:`GRAMMAR_MAX_RULES`, :data:`GRAMMAR_MAX_ELEMENTS` or :data:`GRAMMAR_MAX_STACKS`: building it, or
    sampling with it, would take llama.cpp seconds to hours."""
    g = _Gbnf(grammar)
    if g.n_rules > GRAMMAR_MAX_RULES:
        raise SamplerError(f"the grammar has {g.n_rules} rules once its repetitions are rewritten; at most "
                           f"{GRAMMAR_MAX_RULES} are taken")
    if g.elements > GRAMMAR_MAX_ELEMENTS:
        raise SamplerError(f"the grammar has {g.elements} elements once its repetitions are rewritten; at most "
                           f"{GRAMMAR_MAX_ELEMENTS} are taken")
    stacks = g.stacks()
    if stacks > GRAMMAR_MAX_STACKS:
        shown = f"more than {_SAT}" if stacks >= _SAT else str(stacks)
        raise SamplerError(f"the grammar may have {shown} parse stacks at one step (alternatives that "
                           f"start alike, rules that can match nothing, nested); at most {GRAMMAR_MAX_STACKS} "
                           "are taken")
    return GrammarCost(rules=g.n_rules, elements=g.elements, stacks=stacks)


@dataclass(frozen=True)
class PrefilledGrammar(Grammar):
    """A :class:`Grammar` advanced over ``prefill`` before the first sampled token.

    The grammars llama.cpp builds from a chat template for tool calls or a
    response schema start with the template's generation prompt (say
    ``<start_of_turn>model\\n``), which is already at the end of the prompt;
    llama-server feeds those tokens to the grammar, and so does this sampler.
    Resetting the chain returns the grammar to its start, before the prefill.
    """

    prefill: str = ""

    def _create(self, model: Model | None) -> Any:
        vp = _vocab(model, "grammar")
        p = super()._create(model)
        if self.prefill:
            try:
                _call(lib.pyllama_grammar_accept_text(p, vp, self.prefill.encode("utf-8")))
            except ValueError as exc:
                lib.llama_sampler_free(p)
                raise SamplerError(str(exc)) from None
        return p


__all__ = ["json_schema_to_grammar", "PrefilledGrammar", "GrammarCost", "gbnf_cost", "check_gbnf", "GRAMMAR_MAX_STACKS",
           "GRAMMAR_MAX_RULES", "GRAMMAR_MAX_ELEMENTS", "GRAMMAR_MAX_NESTING"]
