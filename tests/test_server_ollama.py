"""Ollama's API on `pyllama serve`, through the real ``ollama`` Python client (sync and async): list, show,
chat plain and streamed (with the chat starter answering sensibly), generate (templated, raw, and
``suffix`` on a model with FIM tokens), a JSON-schema ``format``, embed, ps, pull with its progress from a
loopback Hub, delete, ``keep_alive=0`` freeing the model and the next request loading it again, errors in
Ollama's shape. Real servers as subprocesses; no mocks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import ollama
import pyllama
from hfserver import HFServer, server, store_env  # noqa: F401 - fixtures for the pull test
from server_fixture import RemoteServer
from synth import write_fim_model

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def srv(chat_starter_path: Path) -> Iterator[RemoteServer]:
    with RemoteServer(chat_starter_path, "-np", "2", "-c", "4096") as s:
        yield s


@pytest.fixture
def client(srv: RemoteServer) -> ollama.Client:
    return ollama.Client(host=srv.url)


def test_list_show_ps_version(client: ollama.Client, chat_starter_path: Path) -> None:
    models = client.list().models
    assert len(models) == 1
    card = models[0]
    assert card.model == chat_starter_path.name and card.size == chat_starter_path.stat().st_size
    assert card.details is not None and card.details.format == "gguf" and card.details.family == "llama"
    assert card.details.quantization_level == "Q4_1" and card.details.parameter_size.endswith("M")
    assert card.digest is not None and len(card.digest) == 64
    shown = client.show(card.model)
    assert "completion" in (shown.capabilities or []) and shown.template and "<|im_start|>" in shown.template
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    running = client.ps().models
    assert [m.model for m in running] == [card.model] and running[0].context_length == 2048
    assert httpx.get(f"{client._client.base_url}/api/version", timeout=10).json()["version"] == pyllama.__version__
    with pytest.raises(ollama.ResponseError) as err:
        client.show("no-such-model")
    assert err.value.status_code == 404 and "not found" in err.value.error


def test_chat_plain_and_streamed(client: ollama.Client) -> None:
    question = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat(model="any-name", messages=question, options=GREEDY)
    assert "Paris" in whole.message.content
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.eval_count and whole.prompt_eval_count and whole.eval_duration and whole.total_duration
    parts = list(client.chat(model="any-name", messages=question, options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_templated_and_raw(client: ollama.Client) -> None:
    g = client.generate(model="m", prompt="What is 2+2? Answer briefly.", system=SYSTEM["content"], options=GREEDY)
    assert "4" in g.response and g.done
    raw = client.generate(model="m", prompt="The capital of France is", raw=True, options=GREEDY)
    assert "Paris" in raw.response
    streamed = "".join(p.response for p in client.generate(model="m", prompt="The capital of France is", raw=True,
                                                           options=GREEDY, stream=True))
    assert streamed == raw.response
    limited = client.generate(model="m", prompt="Count from one to fifty.", options={"num_predict": 3})
    assert limited.done_reason == "length" and limited.eval_count == 3


def test_json_schema_format(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = client.chat(model="m", messages=[{"role": "user", "content": "A person as JSON: name and age."}],
                    format=schema, options={"temperature": 0, "num_predict": 64})
    value = json.loads(r.message.content)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    r = client.generate(model="m", prompt="A JSON object with a key 'color'.", format="json",
                        options={"temperature": 0, "num_predict": 48})
    assert isinstance(json.loads(r.response), dict)


def test_embed(client: ollama.Client, chat_starter_path: Path) -> None:
    got = client.embed(model="m", input=["hello world", "the weather today"])
    vecs = np.array(got.embeddings)
    assert vecs.shape[0] == 2 and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    with pyllama.Model(chat_starter_path) as model:
        want = pyllama.embed(model, ["hello world", "the weather today"], pooling="mean")  # the engine's default
    np.testing.assert_allclose(vecs, want, atol=1e-4)
    one = client.embeddings(model="m", prompt="hello world")
    assert len(one.embedding) == vecs.shape[1]


def test_errors_have_ollamas_shape(srv: RemoteServer) -> None:
    for path, body in (("api/chat", {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}),
                       ("api/chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": ["AA=="]}]}),
                       ("api/generate", {"model": "m", "prompt": "x", "keep_alive": "forever"}),
                       ("api/generate", {"model": "m", "prompt": "x", "options": {"num_predict": "many"}}),
                       ("api/generate", {"model": "m", "prompt": "x", "suffix": "y"}),  # no FIM tokens
                       ("api/show", {}), ("api/pull", {"model": "llama3.2"}), ("api/embed", {"input": "x"})):
        r = httpx.post(srv.url_for(*path.split("/")), json=body, timeout=30)
        assert r.status_code in (400, 404), (path, body, r.text)
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    r = httpx.post(srv.url_for("api", "chat"), content=b"{not json", timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}


def test_async_client(srv: RemoteServer) -> None:
    async def run() -> tuple[str, list[str]]:
        client = ollama.AsyncClient(host=srv.url)
        question = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
        whole = await client.chat(model="m", messages=question, options=GREEDY)
        parts = [p.message.content async for p in await client.chat(model="m", messages=question, options=GREEDY,
                                                                    stream=True)]
        return whole.message.content, parts

    content, parts = asyncio.run(run())
    assert "Paris" in content and "".join(parts) == content


def _until_unloaded(client: ollama.Client, what: str) -> None:
    deadline = time.monotonic() + 30
    while client.ps().models:  # freed once nothing is being answered
        assert time.monotonic() < deadline, f"{what}: the model was not freed"
        time.sleep(0.05)


def test_keep_alive_zero_unloads_and_the_next_request_loads(synth_model_path: Path) -> None:
    with RemoteServer(synth_model_path, "-np", "1") as s:
        client = ollama.Client(host=s.url)
        first = client.generate(model="m", prompt="hello", raw=True, options={"temperature": 0, "num_predict": 6})
        assert len(client.ps().models) == 1
        gone = client.generate(model="m", prompt="", keep_alive=0)
        assert gone.done_reason == "unload"
        _until_unloaded(client, "keep_alive 0")
        assert httpx.get(s.url_for("health"), timeout=10).json()["status"] == "ok"
        again = client.generate(model="m", prompt="hello", raw=True, options={"temperature": 0, "num_predict": 6})
        assert again.response == first.response and len(client.ps().models) == 1  # loaded again, same answer
        loaded = client.chat(model="m", messages=[])
        assert loaded.done_reason == "load"
        client.generate(model="m", prompt="hi", raw=True, options={"num_predict": 2}, keep_alive=0)
        _until_unloaded(client, "a request's keep_alive 0")  # freed once it is answered
        client.generate(model="m", prompt="hi", raw=True, options={"num_predict": 2}, keep_alive="1s")
        assert len(client.ps().models) == 1
        _until_unloaded(client, "keep_alive 1s")  # freed after one idle second
        # under load: an unload waits for the requests being answered, and none of them fails
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.generate, model="m", prompt=f"hello {i}", raw=True,
                                   options={"num_predict": 16}, keep_alive=0 if i % 2 else -1) for i in range(12)]
            assert all(f.result().done for f in futures)


def test_suffix_fills_in_the_middle(tmp_path: Path) -> None:
    fim = write_fim_model(tmp_path / "fim.gguf")
    with RemoteServer(fim, "-np", "1", "-c", "512", "-b", "256") as s:
        client = ollama.Client(host=s.url)
        got = client.generate(model="m", prompt="def add(a, b):\n", suffix="\n    return c\n",
                              options={"temperature": 0, "num_predict": 8})
        ref = httpx.post(s.url_for("infill"), json={"input_prefix": "def add(a, b):\n",
                                                     "input_suffix": "\n    return c\n", "n_predict": 8,
                                                     "temperature": 0}, timeout=60).json()
        assert got.response == ref["content"] and got.eval_count == 8


def test_pull_with_progress_and_delete(server: HFServer, store_env: Path, synth_model_path: Path) -> None:
    server.add_repo("org/synth", {"synth-Q4_K_M.gguf": synth_model_path.read_bytes(),
                                  "synth-Q8_0.gguf": synth_model_path.read_bytes()})
    with RemoteServer(synth_model_path, "-np", "1") as s:
        client = ollama.Client(host=s.url)
        statuses = list(client.pull("hf:org/synth:Q4_K_M", stream=True))
        assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
        progress = [p for p in statuses if p.total]
        assert progress and progress[-1].completed == progress[-1].total == synth_model_path.stat().st_size
        assert list(store_env.rglob("synth-Q4_K_M.gguf"))
        assert client.pull("hf:org/synth:Q8_0").status == "success"  # not streamed: one answer
        assert client.delete("hf:org/synth:Q4_K_M").status == "success"
        assert not list(store_env.rglob("synth-Q4_K_M.gguf")) and list(store_env.rglob("synth-Q8_0.gguf"))
        with pytest.raises(ollama.ResponseError) as err:
            client.delete("hf:org/synth:Q4_K_M")
        assert err.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as err:
            client.pull("hf:org/missing:Q4_K_M")
        assert err.value.status_code == 404
