"""Fill in the middle: ``pyllama.infill_tokens`` lays a prompt out as llama-server does (the repository
pattern, cuts to fit a batch and the context, ``--spm-infill``), and ``POST /infill`` answers with it; the
same greedy tokens and prompt as llama-server built from the vendored tree where that binary is built; a
model without FIM tokens is a 501, malformed inputs 400s. A synthetic model with FIM tokens (tests/synth.py)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import bench_scripts
import pyllama
from server_fixture import RemoteServer, free_port
from synth import write_fim_model


@pytest.fixture(scope="module")
def fim_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fim_model(tmp_path_factory.mktemp("fim") / "fim.gguf")


@pytest.fixture(scope="module")
def fim(fim_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(fim_path) as m:
        yield m


def _text(model: pyllama.Model, s: str) -> list[int]:
    return model.vocab.tokenize(s, add_special=False, parse_special=False).tolist()


def test_layout(fim: pyllama.Model) -> None:
    v = fim.vocab
    extra = [pyllama.InfillFile("hello world\n", "a.txt")]
    toks = pyllama.infill_tokens(fim, "one two", " six", prompt=" four", extra=extra).tolist()
    pre, suf, mid, rep, sep = v.fim_pre, v.fim_suf, v.fim_mid, v.fim_rep, v.fim_sep
    want = ([rep, *_text(fim, "myproject\n"), sep, *_text(fim, "a.txt\n"), *_text(fim, "hello world\n"),
             sep, *_text(fim, "filename\n"), v.bos, pre, *_text(fim, "one two"), *_text(fim, " four"), suf,
             *_text(fim, " six"), mid])
    assert toks == want
    spm = pyllama.infill_tokens(fim, "one two", " six", prompt=" four", extra=extra, spm=True).tolist()
    i = spm.index(v.bos)
    assert spm[:i] == want[:i] and spm[i + 1] == suf and spm[-1] == mid
    assert spm.index(suf) < spm.index(pre)
    # token ids in place of text, and no room for extra files: they are left out
    ids = pyllama.infill_tokens(fim, np.array(_text(fim, "one two")), _text(fim, " six"), n_batch=64, n_ctx=64,
                                n_predict=16)
    assert ids.tolist() == [v.bos, pre, *_text(fim, "one two"), suf, *_text(fim, " six"), mid]


def test_long_inputs_are_cut_as_llama_server_cuts_them(fim: pyllama.Model) -> None:
    v = fim.vocab
    prefix, suffix = "x " * 400, "y " * 400
    toks = pyllama.infill_tokens(fim, prefix, suffix, prompt="z", n_batch=128, n_ctx=512, n_predict=-1).tolist()
    body = toks[toks.index(v.bos):]
    n_prompt = len(_text(fim, "z"))
    n_pre = body.index(v.fim_suf) - 2 - n_prompt  # minus BOS, FIM_PRE and the prompt
    n_suf = len(body) - body.index(v.fim_suf) - 2
    assert n_pre == 3 * (128 // 4)  # the prefix keeps its end
    assert n_suf == 128 // 4 - (2 + n_prompt)  # the suffix its start, less the prompt
    assert body[2:2 + n_pre] == _text(fim, prefix)[-n_pre:]
    assert body[body.index(v.fim_suf) + 1:-1] == _text(fim, suffix)[:n_suf]


def test_a_model_without_fim_tokens(model: Any, synth_model_path: Path) -> None:
    assert pyllama.infill.infill_support(model) is not None
    with pytest.raises(ValueError, match="prefix token is missing"):
        pyllama.infill_tokens(model, "a", "b")
    with RemoteServer(synth_model_path, "-np", "1") as s:
        r = httpx.post(s.url_for("infill"), json={"input_prefix": "a", "input_suffix": "b"}, timeout=30)
        assert r.status_code == 501 and "Infill is not supported by this model" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def srv(fim_path: Path) -> Iterator[RemoteServer]:
    with RemoteServer(fim_path, "-np", "2", "-c", "1024", "-b", "256") as s:
        yield s


REQUESTS = [
    {"input_prefix": "the quick brown fox\n", "prompt": "jumps over", "input_suffix": "the lazy dog\n"},
    {"input_extra": [{"filename": "a.txt", "text": "hello world\n"}, {"text": "more text"}],
     "input_prefix": "one two three", "prompt": " four", "input_suffix": " six seven"},
    {"input_prefix": "x " * 700, "input_suffix": "y " * 400, "prompt": "z",
     "input_extra": [{"filename": "f", "text": "w " * 10}]},
]


def test_infill_answers_as_a_completion_of_its_prompt(srv: RemoteServer, fim: pyllama.Model) -> None:
    for body in REQUESTS:
        r = httpx.post(srv.url_for("infill"), json={**body, "n_predict": 12, "temperature": 0, "return_tokens": True},
                       timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        extra = [pyllama.InfillFile(c["text"], c.get("filename", "tmp")) for c in body.get("input_extra", [])]
        prompt = pyllama.infill_tokens(fim, body["input_prefix"], body["input_suffix"], prompt=body["prompt"],
                                       extra=extra, n_batch=256, n_ctx=512)
        assert got["tokens_evaluated"] == prompt.size
        ref = httpx.post(srv.url_for("completion"), json={"prompt": prompt.tolist(), "n_predict": 12,
                                                          "temperature": 0, "return_tokens": True}, timeout=60).json()
        assert got["tokens"] == ref["tokens"] and got["content"] == ref["content"]
    streamed = httpx.post(srv.url_for("infill"), json={**REQUESTS[0], "n_predict": 4, "stream": True}, timeout=60)
    assert streamed.status_code == 200 and streamed.text.count("data: ") == 4 + 1  # a token each, then the last event


@pytest.mark.parametrize("body", [
    {"input_extra": [{}]}, {"input_extra": [{"filename": "ok"}]}, {"input_extra": [{"filename": 123}]},
    {"input_extra": [{"filename": 123, "text": "abc"}]}, {"input_extra": [{"filename": 123, "text": 456}]},
    {"input_extra": {"text": "not a list"}}, {"prompt": 5}, {"input_prefix": None}, {"input_suffix": None},
    {"input_prefix": [1, {"x": 1}]}, {"input_prefix": [10 ** 9]},
])
def test_bad_inputs_are_400(srv: RemoteServer, body: dict[str, Any]) -> None:
    base = {"input_prefix": "int main() {\n", "prompt": "    int n = ", "input_suffix": "}\n"}
    data = {k: v for k, v in {**base, **body}.items() if v is not None}
    r = httpx.post(srv.url_for("infill"), json=data, timeout=30)
    assert r.status_code == 400 and "error" in r.json(), r.text


@pytest.mark.may_skip  # llama-server is built only on request (python bench/native.py --server)
def test_same_answers_as_llama_server(fim_path: Path) -> None:
    native = bench_scripts.load("native")
    try:
        binary = native.server_tool()
    except native.NativeBuildError as exc:
        pytest.skip(str(exc))
    port = free_port()
    # one slot of 512 tokens both ways (llama-server caps a slot at the model's training context)
    proc = subprocess.Popen([str(binary), "-m", str(fim_path), "--port", str(port), "-np", "1", "-c", "512",
                             "-b", "256", "-t", "2", "--no-webui"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "llama-server did not start"
            time.sleep(0.1)
        ask = {"n_predict": 16, "temperature": 0, "return_tokens": True}
        ref = [httpx.post(f"http://127.0.0.1:{port}/infill", json={**b, **ask}, timeout=60).json() for b in REQUESTS]
    finally:
        proc.kill()
        proc.wait()
    with RemoteServer(fim_path, "-np", "1", "-c", "512", "-b", "256") as s:
        got = [httpx.post(s.url_for("infill"), json={**b, **ask}, timeout=60).json() for b in REQUESTS]
    for a, b in zip(ref, got):
        assert (a["prompt"], a["tokens"], a["content"]) == (b["prompt"], b["tokens"], b["content"])
