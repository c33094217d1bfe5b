"""`pyllama serve` on the synthetic model: protocol, errors, auth, shutdown and continuous batching.

One real server subprocess per module (tests/server_fixture.py), driven by the
real ``openai`` client and httpx. The synthetic model's greedy choices have wide
logit margins, so a stream decoded in a batch with others must equal the same
prompt decoded alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import pyllama  # noqa: E402
from server_fixture import RemoteServer, stream_in_background  # noqa: E402

ALIAS = "synth"
PROMPTS = ["Hello world the", "Le café est très", "the cat and the dog", "you can have it",
           "schön Straße", "We have a", "a b c", "Straße ist"]


@pytest.fixture(scope="module")
def server(synth_model_path: Path) -> Iterator[RemoteServer]:
    # small batches: prompts are prefilled in chunks; a tiny keep-alive interval: every stream that waits
    # for its first token gets SSE comments, which the clients of every other test must ignore
    with RemoteServer(synth_model_path, "--slots", "4", "--ctx-slot", "256", "--alias", ALIAS, "--max-queue", "16",
                      "-b", "32", "-ub", "32", "--keepalive", "0.001", "--metrics") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url_for("v1"), api_key="unused", max_retries=0, timeout=60)


def metrics(server: RemoteServer) -> dict[str, float]:
    text = httpx.get(server.url_for("metrics"), timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, message: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    if message is not None:
        assert re.search(message, err["message"]), err


def test_health_models_metrics(server: RemoteServer, client: openai.OpenAI) -> None:
    r = httpx.get(server.url_for("health"))
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    models = client.models.list()
    assert [m.id for m in models.data] == [ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    m = metrics(server)
    assert m["pyllama_slots"] == 4
    assert 'pyllama_http_requests_total{endpoint="/health",status="200"}' in m


def test_tokenize_detokenize_shapes(server: RemoteServer) -> None:
    with pyllama.Model(server.cmd[4]) as model:
        expected = model.tokenize("Hello world", add_special=False, parse_special=True).tolist()
    r = httpx.post(server.url_for("tokenize"), json={"content": "Hello world"})
    assert r.json() == {"tokens": expected}
    r = httpx.post(server.url_for("tokenize"), json={"content": "Hello world", "with_pieces": True})
    pieces = r.json()["tokens"]
    assert [p["id"] for p in pieces] == expected and "".join(p["piece"] for p in pieces).strip() == "Hello world"
    r = httpx.post(server.url_for("detokenize"), json={"tokens": expected})
    assert r.json()["content"].strip() == "Hello world"
    assert_error(httpx.post(server.url_for("detokenize"), json={"tokens": [10**6]}), 400, code="invalid_token")


def test_completion_and_chat(client: openai.OpenAI) -> None:
    c = client.completions.create(model=ALIAS, prompt="Hello world the", max_tokens=12, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 12
    assert c.choices[0].text
    chat = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.completion_tokens == 6 and chat.usage.prompt_tokens > 3
    # the same conversation streamed gives the same text, and the usage chunk at the end
    stream = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == chat.choices[0].message.content
    # the prompt is now cached in a slot: a repeat reuses it
    again = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_stop_string_and_seeded_sampling(client: openai.OpenAI) -> None:
    full = client.completions.create(model=ALIAS, prompt="the cat and the dog", max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(model=ALIAS, prompt="the cat and the dog", max_tokens=24, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    a, b, c = (client.completions.create(model=ALIAS, prompt="We have a", max_tokens=16, temperature=1.5, seed=s,
                                         top_p=1.0, extra_body={"top_k": 0, "min_p": 0.0}) for s in (7, 7, 8))
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text


def test_logprobs(client: openai.OpenAI) -> None:
    c = client.completions.create(model=ALIAS, prompt="Hello world the", max_tokens=5, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and val <= 0
        assert max(top.values()) == pytest.approx(val)  # greedy picked the most likely token
    assert "".join(lp.tokens) == c.choices[0].text
    chat = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    assert all(bytes(e.bytes).decode() == e.token for e in content)


def test_bad_requests_are_4xx_and_server_keeps_serving(server: RemoteServer) -> None:
    chat, comp = server.url_for("v1", "chat", "completions"), server.url_for("v1", "completions")
    msgs = [{"role": "user", "content": "hi"}]
    post = httpx.Client(timeout=30).post
    assert_error(post(chat, content=b"{not json"), 400, code="invalid_json")
    assert_error(post(chat, content=b"[1, 2]"), 400)
    assert_error(post(chat, json={"messages": msgs, "max_tokens": "ten"}), 400, message="max_tokens")
    assert_error(post(chat, json={"messages": "hi"}), 400, message="messages")
    assert_error(post(chat, json={"messages": msgs, "temperature": "hot"}), 400, message="temperature")
    assert post(chat, json={"model": "gpt-4", "messages": msgs, "max_tokens": 1}).status_code == 200  # any name
    assert_error(post(chat, json={"messages": []}), 400, message="messages must not be empty")
    assert_error(post(chat, json={"messages": [{"role": "wizard", "content": "x"}]}), 400, message="role")
    assert_error(post(chat, json={"messages": msgs, "max_tokens": -1}), 400, message="max_tokens")
    assert_error(post(chat, json={"messages": msgs, "max_completion_tokens": 0}), 400, message="max_completion_tokens")
    assert_error(post(chat, json={"messages": msgs, "n": 5}), 400, message="n must be between 1 and 4")
    assert_error(post(chat, json={"messages": msgs, "logit_bias": {"999999": 5}}), 400, code="invalid_logit_bias")
    assert_error(post(chat, json={"messages": msgs, "logit_bias": {"-3": 5}}), 400, code="invalid_logit_bias")
    assert_error(post(chat, json={"messages": msgs, "logit_bias": {"word": 5}}), 400, code="invalid_logit_bias")
    assert_error(post(chat, json={"messages": msgs, "top_logprobs": 50, "logprobs": True}), 400)
    assert_error(post(comp, json={"prompt": [1, 2, 590]}), 400, code="invalid_token")
    assert_error(post(comp, json={"prompt": [5, -1]}), 400, code="invalid_token")
    assert_error(post(comp, json={"prompt": ""}), 400)
    assert_error(post(comp, json={"prompt": "the " * 400}), 400, code="context_length_exceeded")
    assert_error(post(comp, json={"prompt": "the " * 400, "stream": True}), 400, code="context_length_exceeded")
    assert_error(post(comp, json={"prompt": "x", "max_tokens": -5}), 400, message="max_tokens")
    assert_error(post(server.url_for("v1", "embeddings"), json={"input": []}), 400)
    assert_error(httpx.get(server.url_for("v1", "nothing")), 404)
    assert_error(httpx.get(chat), 405)
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False}}}
    assert_error(post(comp, json={"prompt": "x", "response_format": fmt, "ignore_eos": True}), 400,
                 message="ignore_eos")
    # a ban of the end-of-generation tokens stays finite: the finished grammar can still end the reply
    done = post(comp, json={"prompt": "x", "max_tokens": 40, "temperature": 0, "response_format": fmt,
                            "logit_bias": {"2": -100, "260": -100}})
    assert done.status_code == 200 and json.loads(done.json()["choices"][0]["text"]) in ({"a": True}, {"a": False})
    # nothing above reached the engine as a failure: the server still serves
    ok = post(comp, json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    m = metrics(server)
    # (/health answers 503 while the model loads, as llama-server: the fixture may have polled it then)
    fives = [k for k in m if k.startswith("pyllama_http_requests_total") and 'status="5' in k
             and 'endpoint="/health"' not in k]
    assert not fives, fives


def test_embeddings(client: openai.OpenAI, server: RemoteServer) -> None:
    e = client.embeddings.create(model=ALIAS, input=["Hello world", "the cat"])  # the client asks for base64
    assert [d.index for d in e.data] == [0, 1] and len(e.data[0].embedding) == 64
    assert sum(x * x for x in e.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    f = client.embeddings.create(model=ALIAS, input="Hello world", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(e.data[0].embedding, abs=1e-5)
    assert e.data[0].embedding != pytest.approx(e.data[1].embedding, abs=1e-3)
    assert e.usage.prompt_tokens > 2


def test_concurrent_streams_batch_and_match_alone(server: RemoteServer, synth_model_path: Path) -> None:
    """8 greedy streams on 4 slots: all complete, steps decoded several requests, each equals its run alone."""
    n_tokens = 48
    with pyllama.Model(synth_model_path) as model, model.context(n_ctx=256) as ctx:
        alone = [pyllama.generate_text(ctx, p, max_tokens=n_tokens) for p in PROMPTS]
    before = metrics(server)
    aclient = openai.AsyncOpenAI(base_url=server.url_for("v1"), api_key="unused", max_retries=0, timeout=60)

    async def one(prompt: str) -> tuple[str, str | None]:
        stream = await aclient.completions.create(model=ALIAS, prompt=prompt, max_tokens=n_tokens, temperature=0,
                                                  stream=True)
        parts, finish = [], None
        async for ch in stream:
            parts.append(ch.choices[0].text)
            finish = ch.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def run() -> list[tuple[str, str | None]]:
        try:
            return list(await asyncio.gather(*(one(p) for p in PROMPTS)))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert [f for _, f in results] == ["length"] * len(PROMPTS)
    assert [t for t, _ in results] == alone
    after = metrics(server)
    assert after["pyllama_engine_batched_steps_total"] > before["pyllama_engine_batched_steps_total"]
    assert after["pyllama_engine_max_requests_in_step"] >= 2
    assert after["pyllama_slots_busy"] == 0 and after["pyllama_queue_length"] == 0


def test_client_disconnect_cancels(server: RemoteServer) -> None:
    before = metrics(server)["pyllama_engine_requests_cancelled_total"]
    body = {"prompt": "the cat", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True,
            "logprobs": 5}  # logprobs slow each step a little, so the stream outlives the disconnect
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url_for("v1", "completions"), json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.monotonic() + 10
    while True:
        m = metrics(server)
        if m["pyllama_slots_busy"] == 0:
            break
        assert time.monotonic() < deadline, "the slot was not freed after the client left"
        time.sleep(0.05)
    assert m["pyllama_engine_requests_cancelled_total"] == before + 1
    r2 = httpx.post(server.url_for("v1", "completions"), json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r2.status_code == 200


def test_api_key_keepalive_busy_and_graceful_shutdown(synth_model_path: Path) -> None:
    srv = RemoteServer(synth_model_path, "--slots", "1", "-c", "32768", "--max-queue", "1", "--keepalive", "0.001",
                       "--metrics", api_key="sekrit")
    with srv:
        assert httpx.get(srv.url_for("health")).status_code == 200  # /health needs no key
        for path in ("v1/models", "metrics"):
            r = httpx.get(srv.url_for(path))
            assert_error(r, 401, code="invalid_api_key")
            assert r.json()["error"]["type"] == "authentication_error"  # llama-server's type
            assert httpx.get(srv.url_for(path), headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(srv.url_for(path), headers=srv.headers()).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url_for("v1"), api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url_for("v1"), api_key="sekrit", max_retries=0)
        assert good.completions.create(model=srv.cmd[4], prompt="hi", max_tokens=2).usage.completion_tokens == 2

        # one slot held by a long stream, a queue of one: the next request waits, with SSE keep-alive
        # comments until its first token; the one after it is turned away with 503 + Retry-After
        url = srv.url_for("v1", "completions")
        hold = {"prompt": "a", "max_tokens": 30000, "stream": True, "temperature": 0, "ignore_eos": True}
        body = {"prompt": "the cat and the dog", "max_tokens": 3, "stream": True, "temperature": 0}
        with httpx.Client(timeout=30, headers=srv.headers()) as http, contextlib.ExitStack() as stack:
            blocker = stack.enter_context(http.stream("POST", url, json=hold))
            assert blocker.status_code == 200
            held = blocker.iter_lines()  # kept: a dropped line iterator closes the stream
            assert any(line.startswith("data: {") for line in held)  # it holds the slot
            waiting = stack.enter_context(http.stream("POST", url, json=body))
            assert waiting.status_code == 200, waiting.read()
            lines = waiting.iter_lines()
            assert next(line for line in lines if line) == ": keep-alive"
            busy = http.post(url, json={**body, "stream": False})
            assert_error(busy, 503, code="server_busy")
            assert int(busy.headers["Retry-After"]) >= 1
            blocker.close()  # the client goes away: its request is cancelled and the waiting one runs
            rest = [line for line in lines if line]
        first_data = next(i for i, line in enumerate(rest) if line.startswith("data: {"))
        assert all(line == ": keep-alive" for line in rest[:first_data]), rest[:5]
        assert rest[-1] == "data: [DONE]"
        assert sum(line.startswith("data: {") for line in rest) == 4  # 3 tokens and the finish chunk
    assert srv.stop() is None  # already stopped by the with block
    log = srv.log_tail()
    assert "Traceback" not in log, log


def test_sigterm_exits_cleanly_with_a_stream_in_flight(synth_model_path: Path) -> None:
    # --shutdown-timeout 0: requests in flight are cut at once (a long one is sure to be running)
    # 30,000 tokens: seconds of work, so the stream is still running when SIGTERM comes on a loaded machine
    srv = RemoteServer(synth_model_path, "-c", "32768", "--slots", "1", "--shutdown-timeout", "0").start()
    body = {"prompt": "the cat", "max_tokens": 30000, "ignore_eos": True, "stream": True, "logprobs": 20}
    with stream_in_background(srv.url_for("v1", "completions"), body) as got:
        t0 = time.monotonic()
        code = srv.stop()
    log = srv.log_tail()
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is "terminated by SIGTERM"
    assert code in (0, -15), log
    assert time.monotonic() - t0 < 15
    assert "Application shutdown complete" in log and "Traceback" not in log, log
    # the cut stream ended with an OpenAI error event, then [DONE]
    lines = [line for line in got if line]
    assert lines[-1] == "data: [DONE]" and "shutting down" in lines[-2], lines[-3:]


def test_health_is_503_while_loading(synth_model_path: Path) -> None:
    """With a loader, the app answers /health 503 {"status": "loading"} until the engine exists."""
    import threading

    from starlette.testclient import TestClient

    from pyllama.engine import Engine
    from pyllama.server import create_app

    release = threading.Event()

    def loader() -> Engine:
        release.wait(30)
        return Engine(pyllama.Model(synth_model_path), n_slots=1, n_ctx=64)

    app = create_app(loader, model_name="m")
    with TestClient(app) as http:
        r = http.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        r = http.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["Retry-After"]
        release.set()
        deadline = time.monotonic() + 30
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
        engine = app.state.server.engine
    assert engine.closed  # the app owned what its loader built: closed at shutdown


def test_loading_model_failure_exits(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    srv = RemoteServer(bad, start_timeout=60)
    with pytest.raises(RuntimeError, match="exited with 1"):
        srv.start()
    srv.stop()
    assert "could not load" in srv.log_tail()
    srv.log_path.unlink()


def test_stream_error_frame_shape() -> None:
    """A failure after the status line is sent reaches the client as an OpenAI error event."""
    from pyllama.server import sse
    from pyllama.server.app import api_error

    frame = sse.frame(api_error(pyllama.DecodeError("llama_decode: failed with code -3", -3)).body())
    payload = json.loads(frame.decode().removeprefix("data: "))
    assert payload["error"]["type"] == "server_error" and "code -3" in payload["error"]["message"]


def test_mountable_in_another_app(synth_model_path: Path) -> None:
    """create_app over an engine the caller owns, mounted under a prefix of another ASGI app."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from pyllama.engine import Engine
    from pyllama.server import create_app

    with pyllama.Model(synth_model_path) as model, Engine(model, n_slots=2, n_ctx=128) as engine:
        parent = Starlette(routes=[Mount("/llm", app=create_app(engine, model_name="m", api_key="k"))])
        auth = {"Authorization": "Bearer k"}
        with TestClient(parent) as http:
            assert http.get("/llm/health").json() == {"status": "ok"}
            assert http.get("/llm/v1/models").status_code == 401
            r = http.post("/llm/v1/completions", json={"model": "m", "prompt": "Hello", "max_tokens": 4}, headers=auth)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            text = http.get("/llm/metrics", headers=auth).text
            assert 'pyllama_http_requests_total{endpoint="/v1/completions",status="200"} 1' in text
        assert not engine.closed  # the caller's engine outlives the app


def test_speculative_server_answers_as_the_plain_one(server: RemoteServer, synth_model_path: Path) -> None:
    body = {"prompt": "the cat and the dog and the cat and the dog", "max_tokens": 60, "temperature": 0,
            "ignore_eos": True}
    want = httpx.post(server.url_for("v1", "completions"), json=body, timeout=60).json()["choices"][0]["text"]
    with RemoteServer(synth_model_path, "--slots", "2", "--ctx-slot", "256", "--draft", "ngram", "--draft-max", "8",
                      "--metrics") as spec:
        got = httpx.post(spec.url_for("v1", "completions"), json=body, timeout=60).json()["choices"][0]["text"]
        m = metrics(spec)
    assert got == want
    assert m["pyllama_draft_tokens_total"] > 0 and 0 < m["pyllama_draft_tokens_accepted_total"] <= m[
        "pyllama_draft_tokens_total"]
