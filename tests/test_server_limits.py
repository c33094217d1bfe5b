"""The server's limits, checked before any work: request bodies (413) and token counts (400 naming the limit).

A real `pyllama serve` subprocess on the synthetic model (tests/server_fixture.py), with a small
``--max-body-size`` so the bodies stay small too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_fixture import RemoteServer  # noqa: E402

from pyllama._units import byte_size as _byte_size
from pyllama.server.params import MAX_PREDICT, MAX_SCHEMA_CHARS, MAX_TOOLS
from bounded import join_all

LIMIT = 1 << 20
CTX = 256


@pytest.fixture(scope="module")
def srv(synth_model_path: Path) -> Iterator[RemoteServer]:
    with RemoteServer(synth_model_path, "--slots", "2", "--ctx-slot", str(CTX), "--max-body-size", "1M") as s:
        yield s


def _ok_after(srv: RemoteServer) -> None:
    """Nothing was lost: the server still answers and generates."""
    assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
    r = httpx.post(srv.url + "/completion", json={"prompt": "The quick", "n_predict": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 4, r.text


HUGE = 10**12
TOO_MANY = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": HUGE}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": HUGE},
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": HUGE}, "max_tokens"),
    ("/completion", {"prompt": "hi", "n_predict": HUGE}, "n_predict"),
    ("/v1/messages", {"model": "x", "max_tokens": HUGE, "messages": [{"role": "user", "content": "hi"}]},
     "max_tokens"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": HUGE}, "max_tokens"),
]


@pytest.mark.parametrize("path,body,param", TOO_MANY, ids=[f"{p}:{k}" for p, _, k in TOO_MANY])
def test_max_tokens_past_int32_is_a_400_naming_the_limit(srv: RemoteServer, path: str, body: dict[str, Any],
                                                          param: str) -> None:
    r = httpx.post(srv.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert str(MAX_PREDICT) in r.text and param in r.text, r.text


def test_largest_max_tokens_stops_at_the_context(srv: RemoteServer) -> None:
    """MAX_PREDICT is allowed: nothing is sized by it, generation ends when the slot is full."""
    r = httpx.post(srv.url + "/v1/completions",
                   json={"prompt": "The quick brown fox", "max_tokens": MAX_PREDICT, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    assert 0 < out["usage"]["completion_tokens"] <= CTX
    _ok_after(srv)


def _body(n: int) -> bytes:
    return b'{"prompt": "' + b"a" * n + b'", "n_predict": 1}'


def test_body_past_the_limit_is_refused_before_reading(srv: RemoteServer) -> None:
    r = httpx.post(srv.url + "/completion", content=_body(LIMIT + 1), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"], err
    _ok_after(srv)


def test_chunked_body_past_the_limit_is_refused(srv: RemoteServer) -> None:
    """Without a declared length the body is counted as it arrives."""
    def chunks() -> Iterator[bytes]:
        body = _body(LIMIT + 10)
        for i in range(0, len(body), 64 << 10):
            yield body[i:i + (64 << 10)]

    r = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    _ok_after(srv)


def test_body_within_the_limit_is_served(srv: RemoteServer) -> None:
    r = httpx.post(srv.url + "/tokenize", content=b'{"content": "' + b"a b " * 1000 + b'"}', timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["tokens"]) > 100, r.text


def test_max_body_size_spellings() -> None:
    assert _byte_size("1048576") == 1 << 20
    assert _byte_size("512K") == 512 << 10
    assert _byte_size("32M") == 32 << 20
    assert _byte_size("1GiB") == 1 << 30
    for bad in ("", "ten", "-1", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            _byte_size(bad)


# The large request's client: builds a 20 MB chat body, says "ready", waits for SIGUSR1, then sends it while
# polling /health every 20 ms; prints the times (CLOCK_MONOTONIC, shared with the test), the answer, the polls.
_LARGE_SENDER = """
import json, signal, sys, threading, time
import httpx
url = sys.argv[1]
big = json.dumps({"messages": [{"role": "user", "content": "word " * 4_000_000}], "max_tokens": 4}).encode()
assert len(big) > 20_000_000
go = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: go.set())
print("ready", flush=True)
assert go.wait(120)
done, health = {}, []
def poll():
    with httpx.Client(timeout=60) as c:
        while "t1" not in done:
            t = time.monotonic()
            assert c.get(url + "/health").status_code == 200
            health.append(time.monotonic() - t)
            time.sleep(0.02)
poller = threading.Thread(target=poll)
poller.start()
t0 = time.monotonic()
r = httpx.post(url + "/v1/chat/completions", content=big, timeout=300, headers={"content-type": "application/json"})
done["t1"] = time.monotonic()
poller.join(60)
print(json.dumps({"t0": t0, "t1": done["t1"], "status": r.status_code, "message": r.json()["error"]["message"],
                  "health": health}))
"""


def _stream_during_a_large_request(url: str) -> tuple[list[float], dict[str, Any]]:
    """One stream's token arrival times, with the large request sent at its 60th token (from a process of its
    own: in this one it would hold the GIL the stream's reader needs, and this clock would measure the
    client, not the server); and the sender's report (times, answer, /health latencies)."""
    sender = subprocess.Popen([sys.executable, "-c", _LARGE_SENDER, url], stdout=subprocess.PIPE, text=True)
    arrivals: list[float] = []
    body = {"prompt": "The quick brown fox", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                arrivals.append(time.monotonic())
                if len(arrivals) == 60:  # the stream's normal pace is measured: now the large request goes
                    os.kill(sender.pid, signal.SIGUSR1)
                if len(arrivals) > 60 and sender.poll() is not None:
                    break
        out, _ = sender.communicate(timeout=120)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    assert sender.returncode == 0, out
    report: dict[str, Any] = json.loads(out)
    return arrivals, report


def test_a_large_request_stalls_no_other(chat_starter_path: Path) -> None:
    """A 20 MB body (a 400: it cannot fit a slot) is prepared off the event loop — parsed, validated,
    templated, then refused by its length before any tokenizing (which took 8 more seconds of a core):
    meanwhile another client's stream keeps its inter-token gap within twice its normal value and /health
    answers. On the event loop, both stalled for the whole preparation (5.9 s for 12 MB, measured). The
    chat starter with one decoding thread: on this 2-core machine any second busy thread, even a spin
    loop in another process, doubles a 2-thread decode's gap, whatever the server does. Measured here
    the ratio is 1.2-1.4x; a second try is taken when the first passes 2x, since one second of another
    process's work on the machine (once in a CI run: 2.01x) is enough for that, while a stall of the kind
    this test is for (the preparation on the event loop, or one holding the GIL) fails both by far."""
    import statistics

    with RemoteServer(chat_starter_path, "--slots", "2", "--ctx-slot", "4096", "--max-body-size", "32M",
                      threads=1) as s:
        for attempt in (1, 2):
            arrivals, done = _stream_during_a_large_request(s.url)
            health = done["health"]
            assert done["status"] == 400, done  # the prompt does not fit a slot: refused by its length
            t0, t1 = done["t0"], done["t1"]
            assert t1 - t0 > 0.5, f"the big request took only {t1 - t0:.2f} s: nothing to overlap"
            assert "at least" in done["message"], done  # refused by its length, not by counting its tokens
            gaps = [(b, b - a) for a, b in zip(arrivals, arrivals[1:])]
            normal = statistics.median(g for t, g in gaps[10:59])  # after the first tokens' warm-up
            during = [g for t, g in gaps if t0 <= t <= t1]
            assert len(during) >= 20, f"{len(during)} tokens while the big request ran {t1 - t0:.1f} s"
            print(f"try {attempt}: inter-token gap {normal * 1e3:.1f} ms before, {statistics.median(during) * 1e3:.1f} "
                  f"ms (median) and {max(during) * 1e3:.0f} ms (max) during {t1 - t0:.1f} s of the large request")
            assert max(during) < 1.0, f"the stream stalled {max(during):.2f} s"
            assert health and max(health) < 1.0, f"/health took {max(health):.2f} s"
            if statistics.median(during) <= 2 * normal:
                break
        assert statistics.median(during) <= 2 * normal, (
            f"inter-token gap {statistics.median(during) * 1e3:.1f} ms during the big request, "
            f"{normal * 1e3:.1f} ms before (twice)")


OUT_OF_RANGE = [  # found by schemathesis (tests/test_server_openapi.py): each was an OverflowError, a 500
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": 2**62}, "top_k"),
    ("/v1/responses", {"input": "hi", "top_k": 4611686018427387904}, "top_k"),
    ("/completion", {"prompt": "hi", "min_keep": 2**40}, "min_keep"),
    ("/v1/completions", {"prompt": [[1, 2, 2**70]]}, "token id"),
    ("/v1/completions", {"prompt": [1, -2**65]}, "token id"),
    ("/tokenize", {"content": [1, 2**80]}, "token id"),
]


@pytest.mark.parametrize("path,body,named", OUT_OF_RANGE, ids=[f"{p}:{n}" for p, _, n in OUT_OF_RANGE])
def test_numbers_past_int32_are_a_400_naming_them(srv: RemoteServer, path: str, body: dict[str, Any],
                                                   named: str) -> None:
    r = httpx.post(srv.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert named in r.text, r.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/completion", "/v1/embeddings", "/tokenize",
                                  "/v1/messages", "/v1/responses"])
def test_json_nested_past_the_parsers_limit_is_a_400(srv: RemoteServer, path: str) -> None:
    """pydantic's JSON parser stops at depth 200: a 100,000-deep body is a 400 in milliseconds."""
    deep = '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(srv.url + path, content=deep, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "recursion limit" in r.text, r.text
    _ok_after(srv)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [f"s{i}" for i in range(257)]}),
    ("/v1/completions", {"prompt": "hi", "stop": ["x" * 2049]}),
    ("/completion", {"prompt": "hi", "stop": [f"s{i}" for i in range(1000)]}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
                      "stop_sequences": [f"s{i}" for i in range(300)]}),
], ids=["chat:count", "completions:length", "native:count", "anthropic:count"])
def test_too_many_or_too_long_stop_strings_are_a_400(srv: RemoteServer, path: str, body: dict[str, Any]) -> None:
    """Stop strings are matched on the engine's thread for every token: 200,000 of them slowed a whole batch."""
    r = httpx.post(srv.url + path, json=body, timeout=30)
    assert r.status_code == 400 and "stop" in r.text, r.text
    ok = {**body, "stop": ["zz"] * 256} if "stop" in body else {**body, "stop_sequences": ["zz"] * 256}
    assert httpx.post(srv.url + path, json={**ok, "max_tokens": 2}, timeout=30).status_code == 200


# --- tools, JSON schemas and grammars ----------------------------------------------------------------

def _tool(i: int, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": f"tool_{i}", "parameters": parameters or {"type": "object"}}}


def _nested_pattern(levels: int) -> dict[str, Any]:
    """70 characters of schema: its grammar has 2**levels + 1 parse stacks at its start (12 levels took
    llama.cpp 30 s to create, 14 over a minute)."""
    return {"type": "string", "pattern": "^" + "(" * levels + "x?" + "){2}" * levels + "$"}


def _nested_gbnf(levels: int) -> str:
    """Each rule twice a rule that may match nothing: 2**levels stacks (12 levels took llama.cpp 24 s)."""
    return ("root ::= a0\n" + "".join(f"a{i} ::= a{i + 1} a{i + 1}\n" for i in range(levels))
            + f'a{levels} ::= "x" | ""\n')


HI = [{"role": "user", "content": "hi"}]
TOO_MANY_TOOLS = [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "tools": [_tool(i) for i in range(MAX_TOOLS + 1)]}),
    ("/v1/messages", {"max_tokens": 2, "messages": HI,
                      "tools": [{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(200)]}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2,
                       "tools": [{"type": "function", "name": f"t{i}", "parameters": {}} for i in range(10_000)]}),
]


@pytest.mark.parametrize("path,body", TOO_MANY_TOOLS, ids=[p for p, _ in TOO_MANY_TOOLS])
def test_too_many_tools_are_a_400_naming_the_limit(srv: RemoteServer, path: str, body: dict[str, Any]) -> None:
    r = httpx.post(srv.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert f"at most {MAX_TOOLS} tools" in r.text and "tools" in r.text, r.text


BIG_ENUM = {"enum": [f"value {i}" for i in range(20_000)]}  # 250 K characters of JSON
TOO_LARGE = [
    ("/v1/chat/completions", {"messages": HI, "tools": [_tool(0, {"type": "object", "description": "x" * MAX_SCHEMA_CHARS})]},
     "tools"),
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema",
                                                                   "json_schema": {"schema": BIG_ENUM}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": HI, "json_schema": BIG_ENUM}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object", "schema": BIG_ENUM}},
     "response_format"),
    ("/v1/chat/completions", {"messages": HI, "grammar": 'root ::= "a"' + ' | "a"' * 30_000}, "grammar"),
]


@pytest.mark.parametrize("path,body,param", TOO_LARGE, ids=[f"{p}:{k}:{i}" for i, (p, _, k) in enumerate(TOO_LARGE)])
def test_tools_schemas_and_grammars_past_the_size_limit_are_a_400(srv: RemoteServer, path: str,
                                                                  body: dict[str, Any], param: str) -> None:
    r = httpx.post(srv.url + path, json={**body, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and str(MAX_SCHEMA_CHARS) in err["message"], err


COSTLY = [  # each took llama.cpp from 30 s to hours to build, on the event loop or the engine's thread
    ("/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_schema",
                                                                   "json_schema": {"schema": _nested_pattern(14)}}}),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object", "schema": _nested_pattern(14)}}),
    ("/completion", {"prompt": "hi", "json_schema": _nested_pattern(14)}),
    ("/completion", {"prompt": "hi", "grammar": _nested_gbnf(14)}),
    ("/v1/chat/completions", {"messages": HI, "grammar": _nested_gbnf(14)}),
    ("/v1/chat/completions", {"messages": HI, "json_schema": {"enum": list(range(5000))}}),  # 1.7 s a token at 1023
    ("/v1/chat/completions", {"messages": HI, "grammar": "root ::= " + '"a"{0,1999} ' * 1000}),  # 2 M rules
]


@pytest.mark.parametrize("path,body", COSTLY, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COSTLY)])
def test_a_grammar_too_costly_for_llama_cpp_is_a_400_at_once(srv: RemoteServer, path: str,
                                                             body: dict[str, Any]) -> None:
    t = time.perf_counter()
    r = httpx.post(srv.url + path, json={**body, "max_tokens": 2, "n_predict": 2}, timeout=120)
    took = time.perf_counter() - t
    assert r.status_code == 400 and "at most" in r.text, r.text
    assert took < 10, f"refused after {took:.1f} s"


def test_health_answers_while_grammars_are_checked(srv: RemoteServer) -> None:
    """Schemas become grammars, and grammars are checked and built, off the event loop: meanwhile /health
    answers at once. (Building the costly ones on it stalled the server for minutes.)"""
    names = [f"p{i}" for i in range(300)]
    allowed = {"type": "object", "properties": {p: {"type": "string", "maxLength": 200} for p in names},
               "required": names}  # 75,000 rules once llama.cpp rewrites the repetitions
    bodies = [*(b for _, b in COSTLY), {"prompt": "hi", "response_format": {"type": "json_object", "schema": allowed}}]
    paths = [*(p for p, _ in COSTLY), "/v1/completions"]
    done: list[int] = []
    health: list[float] = []

    def send(path: str, body: dict[str, Any]) -> None:
        r = httpx.post(srv.url + path, json={**body, "max_tokens": 2, "n_predict": 2}, timeout=120)
        done.append(r.status_code)

    threads = [threading.Thread(target=send, args=pb) for pb in zip(paths, bodies) for _ in range(2)]
    for th in threads:
        th.start()
    while len(done) < len(threads):
        t = time.perf_counter()
        assert httpx.get(srv.url + "/health", timeout=60).status_code == 200
        health.append(time.perf_counter() - t)
        time.sleep(0.01)
    join_all(threads)
    assert sorted(set(done)) == [200, 400], done
    assert max(health) < 1.0, f"/health took {max(health):.2f} s"
    _ok_after(srv)
