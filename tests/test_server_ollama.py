"""Ollama's API on `pyllama serve`, through the real ``ollama`` Python client (sync and async): list, show,
chat plain and streamed (with the chat starter answering sensibly), generate (templated, raw, and
``suffix`` on a model with FIM tokens), a JSON-schema ``format``, embed, ps, pull with its progress from a
loopback Hub, delete, ``keep_alive=0`` freeing the model and the next request loading it again, errors in
Ollama's shape. Real servers as subprocesses; no mocks."""

from __future__ import annotations

import asyncio
import json
import sys
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


def test_copy_names_the_model_again(client: ollama.Client, chat_starter_path: Path) -> None:
    name = chat_starter_path.name
    question = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    try:
        assert client.copy(name, "my-copy").status == "success"
        cards = {m.model: m for m in client.list().models}
        assert set(cards) == {name, "my-copy"}
        copy = cards["my-copy"]
        assert copy.size == cards[name].size and copy.digest == cards[name].digest
        assert copy.details is not None and copy.details.parent_model == name
        assert client.show("my-copy").template == client.show(name).template
        assert client.chat(model="my-copy", messages=question, options=GREEDY).message.content == \
            client.chat(model=name, messages=question, options=GREEDY).message.content
        assert client.copy("my-copy", "my-copy-2").status == "success"  # a copy of a copy
        with pytest.raises(ollama.ResponseError) as err:
            client.copy("no-such-model", "x")
        assert err.value.status_code == 404 and "not found" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            client.copy("my-copy", name)  # the served model's own name
        assert err.value.status_code == 400
    finally:
        for made in ("my-copy", "my-copy-2"):
            client.delete(made)
    assert [m.model for m in client.list().models] == [name]
    with pytest.raises(ollama.ResponseError) as err:
        client.show("my-copy")
    assert err.value.status_code == 404


def test_create_a_model_with_a_system_prompt_and_parameters(client: ollama.Client, srv: RemoteServer,
                                                             chat_starter_path: Path) -> None:
    name = chat_starter_path.name
    system = "You are a pirate. Answer every question like a pirate."
    question = [{"role": "user", "content": "What is the capital of France?"}]
    params = {"temperature": 0, "num_predict": 12}
    try:
        assert client.create(model="pirate", from_=name, system=system, parameters=params).status == "success"
        got = client.chat(model="pirate", messages=question)  # its system prompt and its parameters
        want = client.chat(model=name, messages=[{"role": "system", "content": system}, *question], options=params)
        assert got.message.content == want.message.content and got.eval_count == want.eval_count
        assert client.chat(model="pirate", messages=question, options={"num_predict": 3}).eval_count == 3
        plain = client.chat(model="pirate", messages=[SYSTEM, *question])  # a chat's own system prompt wins
        own = client.chat(model=name, messages=[SYSTEM, *question], options=params)
        assert plain.message.content == own.message.content
        prompt = "What is 2+2? Answer briefly."
        assert client.generate(model="pirate", prompt=prompt).response == \
            client.generate(model=name, prompt=prompt, system=system, options=params).response
        shown = client.show("pirate")
        assert shown.parameters is not None
        assert "temperature 0" in shown.parameters and "num_predict 12" in shown.parameters
        assert shown.modelfile is not None and f"FROM {name}" in shown.modelfile and system in shown.modelfile
        assert shown.details is not None and shown.details.parent_model == name
        assert httpx.post(srv.url_for("api", "show"), json={"model": "pirate"}, timeout=60).json()["system"] == system
        assert "pirate" in {m.model for m in client.list().models}
        # created from a created model: its fields over the parent's; streamed as Ollama's status lines
        statuses = list(client.create(model="pirate-brief", from_="pirate", parameters={"num_predict": 4}, stream=True))
        assert statuses and statuses[-1].status == "success"
        brief = client.chat(model="pirate-brief", messages=question)
        assert brief.eval_count == 4 and want.message.content.startswith(brief.message.content)
        for field, value in (("files", {"model.gguf": "sha256:" + "0" * 64}), ("adapters", {"a.gguf": "sha256:0"}),
                             ("quantize", "q4_K_M"), ("template", "{{ .Prompt }}")):
            with pytest.raises(ollama.ResponseError) as err:
                client.create(model="bad", from_=name, **{field: value})  # type: ignore[arg-type]
            assert err.value.status_code == 400 and err.value.error.startswith(f"{field}:"), err.value.error
        for bad in ({"num_ctx": 8192}, {"mirostat_tau": 1.0}, {"temperature": "hot"}):
            with pytest.raises(ollama.ResponseError) as err:
                client.create(model="bad", from_=name, parameters=bad)
            assert err.value.status_code == 400 and "parameters" in err.value.error, err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            client.create(model="bad", from_="no-such-model")
        assert err.value.status_code == 404
        assert "bad" not in {m.model for m in client.list().models}
    finally:
        for made in ("pirate", "pirate-brief"):
            client.delete(made)


def test_push_is_not_supported(client: ollama.Client, chat_starter_path: Path) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.push(chat_starter_path.name)
    assert err.value.status_code == 501 and "not supported" in err.value.error


def test_copy_and_create_in_the_router(tmp_path: Path) -> None:
    from synth import write_llama_model

    for i, name in enumerate(("a", "b")):
        write_llama_model(tmp_path / f"{name}.gguf", seed=500 + i)
    s = RemoteServer("unused", threads=None)
    s.cmd = [sys.executable, "-m", "pyllama", "serve", "--port", str(s.port), "-t", "1", "--models-dir", str(tmp_path),
             "-np", "1", "-c", "256"]
    raw = {"temperature": 0, "num_predict": 6}
    with s:
        client = ollama.Client(host=s.url)
        assert client.copy("a", "a-copy").status == "success"
        assert sorted(m.model for m in client.list().models) == ["a", "a-copy", "b"]
        assert client.generate(model="a-copy", prompt="hello", raw=True, options=raw).response == \
            client.generate(model="a", prompt="hello", raw=True, options=raw).response
        card = {m["id"]: m for m in httpx.get(s.url_for("v1", "models"), timeout=10).json()["data"]}["a"]
        assert card["aliases"] == ["a-copy"]
        assert client.create(model="a-short", from_="a-copy", parameters={"num_predict": 3}).status == "success"
        assert client.generate(model="a-short", prompt="hello", raw=True).eval_count == 3
        assert "num_predict 3" in (client.show("a-short").parameters or "")
        with pytest.raises(ollama.ResponseError) as err:
            client.copy("a", "b")  # another model's name
        assert err.value.status_code == 400
        with pytest.raises(ollama.ResponseError) as err:
            client.create(model="x", from_="a", files={"x.gguf": "sha256:0"})
        assert err.value.status_code == 400 and err.value.error.startswith("files:")
        with pytest.raises(ollama.ResponseError) as err:
            client.push("a")
        assert err.value.status_code == 501
        assert client.delete("a-copy").status == "success"
        assert sorted(m.model for m in client.list().models) == ["a", "a-short", "b"]
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="a-copy", prompt="hello", raw=True)
        assert err.value.status_code == 404
