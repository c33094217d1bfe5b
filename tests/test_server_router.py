"""Several models in one `pyllama serve` (--models-dir / --models): each in its own worker process, loaded on
its first request, the least recently used idle one unloaded to make room (--models-max, --memory-budget),
never one with a request in flight; concurrent streams to two models; a model's worker killed mid-stream
fails that model's request only and the next request loads it again; keep_alive 0 unloads; a malformed
file is a failed model with its reason; /v1/models, /api/tags, /api/ps and the ollama client see them all.
Real servers as subprocesses on synthetic models; no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

import pyllama

from bounded import join_all
from hfserver import HFServer, server, store_env  # noqa: F401 - fixtures for the store test
from pyllama.server.router import measure
from server_fixture import RemoteServer, router, statuses
from synth import write_llama_model

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for i, name in enumerate(NAMES):
        write_llama_model(d / f"{name}.gguf", seed=100 + i)
    return d


def complete(s: RemoteServer, model: str, **extra: object) -> httpx.Response:
    return httpx.post(s.url_for("completion"), json={"model": model, "prompt": "hello", "n_predict": 8,
                                                     "temperature": 0, **extra}, timeout=120)


def worker_of(s: RemoteServer, model_file: Path) -> int:
    """The pid of the worker process that has ``model_file`` mapped (each model's engine runs in its own)."""
    assert s.proc is not None
    for child in Path(f"/proc/{s.proc.pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            try:
                if str(model_file) in Path(f"/proc/{pid}/maps").read_text():
                    return int(pid)
            except OSError:
                continue
    raise AssertionError(f"no worker maps {model_file}")


def test_models_load_on_demand_and_the_least_recently_used_idle_one_makes_room(models_dir: Path) -> None:
    with router("--models-dir", str(models_dir), "--models-max", "2", "-np", "1", "-c", "256") as s:
        assert statuses(s) == dict.fromkeys(NAMES, "unloaded")
        answers = {}
        t0 = time.monotonic()
        answers["a"] = complete(s, "a").json()["content"]
        cold = time.monotonic() - t0
        answers["b"] = complete(s, "b").json()["content"]
        assert statuses(s) == {"a": "loaded", "b": "loaded", "c": "unloaded"}
        complete(s, "a")  # a is now the more recently used
        answers["c"] = complete(s, "c").json()["content"]
        assert statuses(s) == {"a": "loaded", "b": "unloaded", "c": "loaded"}  # b, the least recent, made room
        assert len(set(answers.values())) == 3  # three different models answered
        assert complete(s, "b").json()["content"] == answers["b"]  # reloaded: the same answer
        assert statuses(s)["a"] == "unloaded"
        print(f"cold load and first answer: {cold:.2f} s")
        for body, status in (({"model": "zzz", "prompt": "x"}, 404), ({"prompt": "x"}, 400)):
            r = httpx.post(s.url_for("completion"), json=body, timeout=30)
            assert r.status_code == status and r.json()["error"]["param"] == "model"
        tags = ollama.Client(host=s.url).list().models
        assert sorted(m.model for m in tags) == list(NAMES)
        assert sorted(m.model for m in ollama.Client(host=s.url).ps().models) == ["b", "c"]
        # the routes that name no model answer for the server: OpenAI's retrieve, Ollama's version
        one = openai.OpenAI(base_url=s.url_for("v1"), api_key="unused").models.retrieve("a")
        assert one.id == "a" and one.model_extra is not None and one.model_extra["status"]["value"] == "unloaded"
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=s.url_for("v1"), api_key="unused").models.retrieve("zzz")
        version = httpx.get(s.url_for("api", "version"), timeout=10)
        assert version.status_code == 200 and version.json()["version"] == pyllama.__version__


def test_a_model_with_a_request_in_flight_is_never_unloaded(models_dir: Path) -> None:
    with router("--models-dir", str(models_dir), "--models-max", "1", "-np", "1", "-c", "4096") as s:
        with httpx.stream("POST", s.url_for("completion"), timeout=120, json={
                "model": "a", "prompt": "hello", "n_predict": -1, "ignore_eos": True, "stream": True}) as long:
            lines = long.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # a is answering now
            busy = complete(s, "b")
            assert busy.status_code == 503 and busy.headers.get("retry-after"), busy.text
            assert "answering requests" in busy.json()["error"]["message"]
            assert statuses(s) == {"a": "loaded", "b": "unloaded", "c": "unloaded"}
            for _ in lines:  # read a's stream to its end
                pass
        assert complete(s, "b").status_code == 200  # a is idle now: it makes room
        assert statuses(s) == {"a": "unloaded", "b": "loaded", "c": "unloaded"}


def test_two_models_stream_at_once_and_a_killed_worker_fails_only_its_model(models_dir: Path) -> None:
    with router("--models-dir", str(models_dir), "--models-max", "3", "-np", "1", "-c", "4096") as s:
        for name in ("a", "b"):
            complete(s, name)
        seen: dict[str, list[float]] = {"a": [], "b": []}
        errors: dict[str, list[str]] = {"a": [], "b": []}
        started = threading.Barrier(3)

        def stream(name: str, n: int) -> None:
            with httpx.stream("POST", s.url_for("completion"), timeout=120, json={
                    "model": name, "prompt": "hello", "n_predict": n, "ignore_eos": True, "stream": True}) as r:
                first = True
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        errors[name].append(ev["error"]["message"])
                    else:
                        seen[name].append(time.monotonic())
                    if first:
                        started.wait(30)
                        first = False

        threads = [threading.Thread(target=stream, args=("a", 3000)), threading.Thread(target=stream, args=("b", 400))]
        for t in threads:
            t.start()
        started.wait(30)
        os.kill(worker_of(s, models_dir / "a.gguf"), signal.SIGKILL)
        join_all(threads, 120)
        assert errors["a"] and not errors["b"]  # a's stream ended with an error event, b's ran to its end
        assert len(seen["b"]) == 401 and seen["a"][0] < seen["b"][-1] and seen["b"][0] < seen["a"][-1]  # overlapped
        again = complete(s, "a")  # a fresh worker for a
        assert again.status_code == 200 and again.json()["content"]


def test_keep_alive_zero_a_malformed_model_and_explicit_loads(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + os.urandom(4000))
    models = ",".join([f"a={models_dir / 'a.gguf'}", f"broken={tmp_path / 'bad.gguf'}"])
    with router("--models", models, "--no-models-autoload", "-np", "1", "-c", "256") as s:
        r = complete(s, "a")
        assert r.status_code == 400 and "POST /models/load" in r.json()["error"]["message"]
        props = httpx.get(s.url_for("props"), timeout=10).json()  # no model named: the router's own
        assert props["role"] == "router" and props["models_autoload"] is False
        r = httpx.get(s.url_for("props"), params={"model": "a"}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_loaded"
        loaded: list[httpx.Response] = []
        loader = threading.Thread(target=lambda: loaded.append(
            httpx.post(s.url_for("models", "load"), json={"model": "a"}, timeout=120)))
        loader.start()
        progress = []  # the card of a loading model carries llama-server's router progress payload
        while loader.is_alive():
            status = {m["id"]: m for m in httpx.get(s.url_for("models"), timeout=10).json()["data"]}["a"]["status"]
            if status["value"] == "loading":
                progress.append(status["progress"])
            time.sleep(0.01)
        join_all([loader], 10)
        assert loaded[0].status_code == 200 and loaded[0].json()["status"] == {"value": "loaded"}
        assert progress and all(p["stages"] == ["text_model"] and p["current"] == "text_model" for p in progress)
        values = [p["value"] for p in progress]
        assert values == sorted(values) and 0.0 <= values[0] and values[-1] <= 1.0
        assert complete(s, "a").status_code == 200
        bad = httpx.post(s.url_for("models", "load"), json={"model": "broken"}, timeout=120)
        assert bad.status_code == 500
        card = {m["id"]: m for m in httpx.get(s.url_for("models"), timeout=10).json()["data"]}["broken"]
        assert card["status"]["value"] == "failed" and card["status"]["failed_reason"]
        assert complete(s, "a").status_code == 200  # the other model is unaffected
        ollama.Client(host=s.url).generate(model="a", prompt="", keep_alive=0)
        deadline = time.monotonic() + 30
        while statuses(s)["a"] != "unloaded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # llama-server's ?autoload=true loads it for this request, the flag notwithstanding
        r = httpx.get(s.url_for("props"), params={"model": "a", "autoload": "true"}, timeout=120)
        assert r.status_code == 200 and r.json()["total_slots"] == 1 and statuses(s)["a"] == "loaded"
        assert httpx.post(s.url_for("models", "unload"), json={"model": "zzz"}, timeout=10).status_code == 404


def test_a_memory_budget(models_dir: Path) -> None:
    need = measure(models_dir / "a.gguf", 256)
    assert set(need) == {"host"} and need["host"] > 0  # the CPU build: everything in RAM
    total = sum(need.values())
    # in all, then for the host alone: two fit, the third made room
    for budget in (str(int(total * 2.5)), f"host={int(need['host'] * 2.5)}"):
        with router("--models-dir", str(models_dir), "--memory-budget", budget, "-np", "1", "-c", "256") as s:
            for name in NAMES:
                assert complete(s, name).status_code == 200
            cards = {m["id"]: m for m in httpx.get(s.url_for("models"), timeout=10).json()["data"]}
            assert sorted(c["status"]["value"] for c in cards.values()) == ["loaded", "loaded", "unloaded"]
            assert all(c["memory"] == need for c in cards.values())  # what each was measured to need
    for budget in (str(total // 2), f"host={need['host'] // 2}"):
        with router("--models-dir", str(models_dir), "--memory-budget", budget, "-np", "1", "-c", "256") as s:
            r = complete(s, "a")
            assert r.status_code == 507 and "can never be loaded" in r.json()["error"]["message"], r.text
            assert "budget" in r.json()["error"]["message"]
    # a device this machine does not have: refused at the start, naming the devices there are
    bad = subprocess.run([sys.executable, "-m", "pyllama", "serve", "--models-dir", str(models_dir),
                          "--memory-budget", "NoSuchGPU0=1G", "--port", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "no device named NoSuchGPU0" in bad.stderr and "host" in bad.stderr, bad.stderr


def test_models_of_the_store_pulled_served_and_deleted(server: HFServer, store_env: Path, models_dir: Path) -> None:
    """--models-store serves the store's models by reference; a model pulled through the server (Ollama's
    /api/pull, llama-server's POST /models) or by another process is served from then on; deleting one
    (/api/delete, DELETE /models) stops serving it and removes it from the store; a file the server was
    started with is never deleted."""
    import pyllama.store

    server.add_repo("org/synth", {"synth-Q4_K_M.gguf": (models_dir / "a.gguf").read_bytes(),
                                  "synth-Q8_0.gguf": (models_dir / "b.gguf").read_bytes()})
    pyllama.store.pull("hf:org/synth:Q8_0")
    q8 = pyllama.store.list_models()[0].ref
    with router("--models-store", "-np", "1", "-c", "256") as s:
        assert statuses(s) == {q8: "unloaded"}
        expected = complete(s, q8).json()["content"]
        assert complete(s, "hf:org/synth:Q8_0").json()["content"] == expected  # the same file, named otherwise
        cards = {m["id"]: m for m in httpx.get(s.url_for("models"), timeout=10).json()["data"]}
        assert list(cards) == [q8] and cards[q8]["aliases"] == ["hf:org/synth:Q8_0"]
        client = ollama.Client(host=s.url)
        steps = list(client.pull("hf:org/synth:Q4_K_M", stream=True))
        assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
        assert [p for p in steps if p.total] and statuses(s)["hf:org/synth:Q4_K_M"] == "unloaded"
        answer = client.generate(model="hf:org/synth:Q4_K_M", prompt="hello", options={"num_predict": 8,
                                                                                      "temperature": 0})
        assert answer.done and answer.response
        pulled = complete(s, "hf:org/synth:Q4_K_M").json()["content"]
        assert pulled != expected  # the other model's answer
        assert sorted(m.model for m in client.list().models) == sorted([q8, "hf:org/synth:Q4_K_M"])
        assert client.delete("hf:org/synth:Q4_K_M").status == "success"
        assert "hf:org/synth:Q4_K_M" not in statuses(s) and not list(store_env.rglob("synth-Q4_K_M.gguf"))
        with pytest.raises(ollama.ResponseError) as err:
            client.delete("hf:org/synth:Q4_K_M")
        assert err.value.status_code == 404
        r = httpx.delete(s.url_for("models"), params={"model": q8}, timeout=60)  # llama-server's
        assert r.status_code == 200 and r.json() == {"success": True} and statuses(s) == {}
        assert not list(store_env.rglob("synth-Q8_0.gguf"))
        r = httpx.post(s.url_for("models"), json={"model": "hf:org/synth:Q8_0"}, timeout=120)  # llama-server's pull
        assert r.status_code == 200 and r.json()["success"] and r.json()["id"] == "hf:org/synth:Q8_0", r.text
        assert complete(s, "hf:org/synth:Q8_0").json()["content"] == expected  # the same file, pulled again
        r = httpx.post(s.url_for("models"), json={"model": "hf:org/synth:Q8_0"}, timeout=60)
        assert r.status_code == 400 and "already" in r.json()["error"]["message"]
        r = httpx.post(s.url_for("models"), json={"model": "hf:org/missing:Q4_K_M"}, timeout=60)
        assert r.status_code == 404, r.text
        pyllama.store.pull("hf:org/synth:Q4_K_M")  # another process pulls while the server runs
        assert complete(s, "hf:org/synth:Q4_K_M").json()["content"] == pulled
    with router("--models-dir", str(models_dir), "-np", "1", "-c", "256") as s:
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=s.url).delete("a")
        assert err.value.status_code == 400 and "started with" in str(err.value)
        assert (models_dir / "a.gguf").is_file() and statuses(s)["a"] == "unloaded"
