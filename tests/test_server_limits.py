"""The server's limits, checked before any work: request bodies (413) and token counts (400 naming the limit).

A real `pyllama serve` subprocess on the synthetic model (tests/server_fixture.py), with a small
``--max-body-size`` so the bodies stay small too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_fixture import RemoteServer  # noqa: E402

from pyllama.server.cli import _byte_size
from pyllama.server.params import MAX_PREDICT
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


def test_a_large_request_stalls_no_other(synth_model_path: Path) -> None:
    """A body of several MB (seconds of templating and tokenizing, then a 400: it cannot fit a slot) is
    prepared off the event loop: meanwhile another client's stream keeps flowing and /health answers.
    On the event loop, both stalled for the whole preparation (5.9 s for 12 MB, measured)."""
    import json
    import threading
    import time

    with RemoteServer(synth_model_path, "--slots", "2", "--ctx-slot", "2048") as s:
        big = json.dumps({"messages": [{"role": "user", "content": "word " * 1_600_000}], "max_tokens": 4})
        done: dict[str, Any] = {}
        health: list[float] = []

        def send_big() -> None:
            t = time.perf_counter()
            r = httpx.post(s.url + "/v1/chat/completions", content=big.encode(), timeout=300,
                           headers={"content-type": "application/json"})
            done["status"], done["seconds"] = r.status_code, time.perf_counter() - t

        def poll_health() -> None:
            while "status" not in done:
                t = time.perf_counter()
                assert httpx.get(s.url + "/health", timeout=60).status_code == 200
                health.append(time.perf_counter() - t)
                time.sleep(0.02)

        threads = [threading.Thread(target=send_big), threading.Thread(target=poll_health)]
        gaps: list[float] = []
        body = {"prompt": "The quick brown fox", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            last = 0.0
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                if last:
                    gaps.append(now - last)
                else:  # the stream flows: now the large request arrives
                    for th in threads:
                        th.start()
                last = now
                if "status" in done:
                    break
        join_all(threads)
        assert done["status"] == 400, done  # the prompt does not fit a slot: refused, after tokenizing it
        assert done["seconds"] > 1.0, f"the big request took only {done['seconds']:.2f} s: nothing to overlap"
        assert len(gaps) > 100 and max(gaps) < 1.0, f"a stream stalled {max(gaps):.2f} s"
        assert health and max(health) < 1.0, f"/health took {max(health):.2f} s"


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
