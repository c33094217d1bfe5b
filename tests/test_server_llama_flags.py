"""`pyllama serve` as a drop-in for llama-server: its command line, its paths without /v1, any model name, CORS.

Real `pyllama serve` subprocesses on the synthetic model (tests/server_fixture.py), started with
llama-server's flags, driven by the real ``openai`` client and httpx; the flag folding itself is
checked on the parser, without a server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from hfserver import HFServer, server, store_env  # noqa: E402,F401 - fixtures for -hf
from server_fixture import RemoteServer  # noqa: E402

from pyllama.cli import build_parser  # noqa: E402
from pyllama.server.cli import _llama_server_args  # noqa: E402

PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "Authorization"}


def llama_server(model: str, *args: str) -> RemoteServer:
    """A `pyllama serve` started as a script starts llama-server: the model by -m, every setting a flag."""
    srv = RemoteServer(model, threads=None)
    srv.cmd = [sys.executable, "-m", "pyllama", "serve", "-m", model, "--host", srv.host, "--port", str(srv.port),
               "-t", "2", *args]
    return srv


def serve_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", "serve", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def srv(synth_model_path: Path) -> Iterator[RemoteServer]:
    with llama_server(str(synth_model_path), "-c", "512", "-np", "2", "-a", "mymodel", "--temp", "0", "-n", "8",
                      "--metrics") as s:
        yield s


def test_llama_server_command_line(srv: RemoteServer) -> None:
    models = httpx.get(srv.url_for("v1", "models")).json()["data"]
    assert [m["id"] for m in models] == ["mymodel"]
    meta = models[0]["meta"]
    assert (meta["n_slots"], meta["n_ctx_slot"], meta["n_ctx"]) == (2, 256, 256)  # -c is shared by the slots
    r = httpx.get(srv.url_for("metrics"))
    assert r.status_code == 200 and "pyllama_slots 2" in r.text


def test_any_model_name_and_server_defaults(srv: RemoteServer) -> None:
    client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=msgs)  # no max_tokens, no temperature
    assert chat.model == "mymodel"
    assert chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length"  # -n 8
    again = client.chat.completions.create(model="anything", messages=msgs)
    assert again.choices[0].message.content == chat.choices[0].message.content  # --temp 0: greedy
    explicit = client.chat.completions.create(model="mymodel", messages=msgs, max_tokens=3, temperature=0)
    assert explicit.usage.completion_tokens == 3  # a request's own value wins
    assert chat.choices[0].message.content.startswith(explicit.choices[0].message.content)
    with pytest.raises(openai.NotFoundError):  # a lookup by name stays a lookup
        client.models.retrieve("gpt-4o-mini")


def test_paths_without_v1(srv: RemoteServer) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(srv.url_for("chat", "completions"), json={"model": "gpt-4o-mini", "messages": msgs}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
    no_v1 = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)  # as llama.cpp's tests do
    assert no_v1.chat.completions.create(model="x", messages=msgs, max_tokens=2).usage.completion_tokens == 2
    assert [m.id for m in no_v1.models.list().data] == ["mymodel"]
    # /completions and /embeddings without /v1 are llama-server's native ones
    r = httpx.post(srv.url_for("completions"), json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 2 and r.json()["stop_type"] == "limit"
    r = httpx.post(srv.url_for("embeddings"), json={"input": "Hello"}, timeout=60)
    assert r.status_code == 200 and r.json()[0]["index"] == 0 and len(r.json()[0]["embedding"][0]) > 0
    assert httpx.get(srv.url_for("v1", "health")).json() == {"status": "ok"}


def test_cors_as_llama_server(srv: RemoteServer) -> None:
    # the defaults: any origin, echoed because credentials are allowed; llama-server's methods and headers
    r = httpx.options(srv.url_for("v1", "chat", "completions"), headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
    assert r.headers["Access-Control-Allow-Headers"] == "*"
    r = httpx.get(srv.url_for("v1", "models"), headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_second_server_without_metrics_with_keys_and_notes(synth_model_path: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\nk3\n\n")
    srv = llama_server(str(synth_model_path), "-c", "256", "-np", "1", "--api-key", "k1,k2", "--api-key-file",
                       str(key_file), "--cors-origins", "localhost", "--no-webui", "-cb", "--cache-reuse", "256",
                       "--slot-save-path", str(tmp_path), "-fa", "off", "-ngl", "0")
    with srv:
        for key in ("k1", "k2", "k3"):
            r = httpx.get(srv.url_for("v1", "models"), headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, (key, r.text)
        assert httpx.get(srv.url_for("v1", "models")).status_code == 401
        # /metrics is off without --metrics: llama-server's 501
        r = httpx.get(srv.url_for("metrics"), headers={"Authorization": "Bearer k1"})
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error", r.text
        assert "--metrics" in r.json()["error"]["message"]
        # a preflight needs no key; `localhost` echoes loopback origins only
        local = httpx.options(srv.url_for("completions"), headers={**PREFLIGHT, "Origin": "http://localhost:3000"})
        assert local.status_code == 200 and local.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        evil = httpx.options(srv.url_for("completions"), headers={**PREFLIGHT, "Origin": "http://localhost.evil.com"})
        assert evil.status_code == 200 and "Access-Control-Allow-Origin" not in evil.headers
        # a refusal still carries the origin, so the page can read why
        refused = httpx.get(srv.url_for("v1", "models"), headers={"Origin": "http://127.0.0.1:8000"})
        assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8000"
        log = srv.log_tail(20000)  # the log file goes when the server stops cleanly
    assert "--no-webui ignored: pyllama serves no web UI" in log, log
    assert "-cb ignored" in log
    assert "--cache-reuse 256 is not supported yet" in log and "Traceback" not in log


def test_unknown_and_bad_flags_name_the_flag(synth_model_path: Path) -> None:
    for flag in (["--no-such-flag"], ["-cram", "0"], ["--ctx", "256"], ["-ng", "9"]):
        out = serve_cli("-m", str(synth_model_path), *flag)
        assert out.returncode == 2 and f"unrecognized arguments: {flag[0]}" in out.stderr, out.stderr
    out = serve_cli("-m", str(synth_model_path), "-fa", "maybe")
    assert out.returncode == 2 and "-fa/--flash-attn" in out.stderr
    out = serve_cli(str(synth_model_path), "-m", str(synth_model_path))
    assert out.returncode == 2 and "name the model once" in out.stderr
    out = serve_cli("-m", str(synth_model_path), "-c", "32", "-np", "8")
    assert out.returncode == 2 and "leaves 4 tokens a slot" in out.stderr


def test_hf_repo_through_the_model_store(server: HFServer, store_env: Path, synth_model_path: Path) -> None:
    server.add_repo("org/synth", {"synth-Q4_K_M.gguf": synth_model_path.read_bytes()})
    missing = serve_cli("-hf", "org/other", "--offline")
    assert missing.returncode == 1 and "offline" in missing.stderr, missing.stderr
    srv = RemoteServer("unused", threads=None)
    srv.cmd = [sys.executable, "-m", "pyllama", "serve", "-hf", "org/synth", "--port", str(srv.port), "-c", "256",
               "-np", "1", "-t", "1"]
    with srv:  # llama-server's default quant, Q4_K_M, pulled into the store's cache
        assert [m["id"] for m in httpx.get(srv.url_for("models")).json()["data"]] == ["synth-Q4_K_M.gguf"]
    assert list(store_env.rglob("synth-Q4_K_M.gguf"))


def parse(*argv: str) -> tuple[str | None, object]:
    args = build_parser().parse_args(["serve", *argv])
    return _llama_server_args(args), args


def test_flag_folding() -> None:
    err, a = parse("-m", "m.gguf", "-c", "4096", "-np", "4")
    assert err is None and (a.model, a.slots, a.slot_ctx) == ("m.gguf", 4, 1024)
    err, a = parse("m.gguf", "--slots", "2", "--ctx-slot", "300", "-c", "100")  # pyllama's spellings
    assert err is None and (a.slots, a.slot_ctx) == (2, 300) and a.llama_notes[0][0] == "-c"
    err, a = parse("--slots", "-m", "m.gguf", "-np", "-1", "-c", "0")  # llama-server's /slots switch; -np auto
    assert err is None and (a.slots, a.slot_ctx, a.slots_endpoint) == (4, "auto", True) and not a.llama_notes
    assert parse("m.gguf", "--no-slots")[1].slots_endpoint is False
    err, a = parse("-hf", "org/repo:Q8_0")
    assert a.model == "hf:org/repo:Q8_0"
    err, a = parse("-hf", "org/repo", "-hff", "sub/f.gguf")
    assert a.model == "hf:org/repo/sub/f.gguf"
    err, a = parse("m.gguf", "-fa", "1", "-ngl", "-1", "-t", "-1", "--spec-type", "ngram-mod,draft-simple",
                   "--spec-draft-n-max", "6", "--sse-ping-interval", "30", "-a", "one, two")
    assert (a.flash_attn, a.ngl, a.threads, a.draft, a.draft_max, a.keepalive) == ("on", "auto", None, "ngram-mod",
                                                                                    6, 30.0)
    assert (a.model_name, a.aliases) == ("one", ["two"])
    assert [(flag, value, later) for flag, value, _, later in a.llama_notes] == [("--spec-type", "draft-simple", True)]
    assert parse("m.gguf", "-n", "0")[0] is not None


def test_aliases_tags_verbose_backend_sampling_and_two_addresses(synth_model_path: Path) -> None:
    """-a with several names and --tags (llama-server's /models card), -v (its "__verbose" answers),
    --backend-sampling, --no-jinja, and --host with a list of addresses: each one serves."""
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        hosts = "127.0.0.1,::1"
    except OSError:
        hosts = "127.0.0.1"  # no IPv6 loopback here: one address, the rest still checked
    srv = llama_server(str(synth_model_path), "-c", "256", "-np", "1", "-a", "tiny,fim,code", "--tags", "chat,small",
                       "-v", "--backend-sampling", "--temp", "0", "--no-jinja")
    srv.cmd[srv.cmd.index("--host") + 1] = hosts
    with srv:
        card = httpx.get(srv.url_for("models")).json()["data"][0]
        assert card["id"] == "code" and card["aliases"] == ["code", "fim", "tiny"]  # llama-server's order
        assert card["tags"] == ["chat", "small"]
        body = {"messages": [{"role": "system", "content": "Book"}, {"role": "user", "content": "hi"}],
                "max_tokens": 2}
        verbose = httpx.post(srv.url_for("chat", "completions"), json=body, timeout=60).json()
        assert "Book" in verbose["__verbose"]["prompt"] and verbose["__verbose"]["tokens_predicted"] == 2
        assert verbose["__verbose"]["content"] == verbose["choices"][0]["message"]["content"]
        quiet = httpx.post(srv.url_for("chat", "completions"), json={**body, "verbose": False}, timeout=60).json()
        assert "__verbose" not in quiet and quiet["choices"][0]["message"] == verbose["choices"][0]["message"]
        eog = httpx.post(srv.url_for("completion"), json={"prompt": "x", "n_predict": 2, "ignore_eos": True},
                         timeout=60).json()
        assert eog["generation_settings"]["logit_bias"] and all(
            b["bias"] is None for b in eog["generation_settings"]["logit_bias"])  # EOG at -inf, as llama-server
        # --no-jinja: llama.cpp's legacy renderer alone (the synthetic model has no template: ChatML)
        parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
        rendered = httpx.post(srv.url_for("apply-template"), json={"messages": parts}, timeout=60).json()["prompt"]
        assert rendered == "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
        if "," in hosts:
            assert httpx.get(f"http://[::1]:{srv.port}/health", timeout=10).json() == {"status": "ok"}
