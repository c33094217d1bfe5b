"""LoRA adapters in the server, as llama-server has them: ``--lora``/``--lora-scaled``/``--lora-init-without-apply``,
``GET``/``POST /lora-adapters``, a request's own ``lora`` scales; requests under different scales run at once
and each answers as the library does on a context with that adapter at that scale (one decode per set of
scales). In process and with ``--isolate``; the synthetic model and adapter of tests/synth.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import pyllama
from server_fixture import RemoteServer

PROMPT = "the quick brown fox jumps over the lazy dog and"
N = 12


@pytest.fixture(scope="module")
def reference(synth_model_path: Path, synth_lora_path: Path) -> dict[float, list[int]]:
    """Greedy tokens by adapter scale, through the library (a context with the adapter set)."""
    out: dict[float, list[int]] = {}
    with pyllama.Model(synth_model_path) as model:
        prompt = model.vocab.tokenize(PROMPT, add_special=True, parse_special=True)
        for scale in (0.0, 0.5, 1.0):
            with model.context(n_ctx=256) as ctx:
                if scale:
                    ctx.set_lora(model.lora(synth_lora_path), scale)
                out[scale] = [ev.token for ev in pyllama.generate(ctx, prompt, max_tokens=N, ignore_eos=True)]
    assert len({tuple(v) for v in out.values()}) == 3  # the adapter moves the answer at each scale
    return out


@pytest.fixture(scope="module", params=["in-process", "isolate"])
def srv(request: pytest.FixtureRequest, synth_model_path: Path, synth_lora_path: Path) -> Iterator[RemoteServer]:
    extra = ["--isolate"] if request.param == "isolate" else []
    with RemoteServer(synth_model_path, "-np", "4", "-c", "1024", "--lora-scaled", f"{synth_lora_path}:0.5",
                      *extra) as s:
        yield s


def _tokens(s: RemoteServer, **extra: object) -> list[int]:
    r = httpx.post(s.url_for("completion"), json={"prompt": PROMPT, "n_predict": N, "temperature": 0,
                                                  "ignore_eos": True, "return_tokens": True, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    tokens: list[int] = r.json()["tokens"]
    return tokens


def test_adapters_and_their_scales(srv: RemoteServer, synth_lora_path: Path, reference: dict[float, list[int]]) -> None:
    r = httpx.get(srv.url_for("lora-adapters"), timeout=10)
    assert r.status_code == 200
    assert [(a["id"], a["path"], a["scale"]) for a in r.json()] == [(0, str(synth_lora_path), 0.5)]
    assert _tokens(srv) == reference[0.5]
    try:
        assert httpx.post(srv.url_for("lora-adapters"), json=[{"id": 0, "scale": 1.0}], timeout=10).json() == \
            {"success": True}
        assert httpx.get(srv.url_for("lora-adapters"), timeout=10).json()[0]["scale"] == 1.0
        assert _tokens(srv) == reference[1.0]
        assert httpx.post(srv.url_for("lora-adapters"), json=[], timeout=10).status_code == 200  # unlisted: 0
        assert _tokens(srv) == reference[0.0]
    finally:
        httpx.post(srv.url_for("lora-adapters"), json=[{"id": 0, "scale": 0.5}], timeout=10)


def test_requests_under_different_scales_at_once(srv: RemoteServer, reference: dict[float, list[int]]) -> None:
    scales = [0.0, 1.0, 0.5, 0.0, 1.0, 0.5]
    with ThreadPoolExecutor(len(scales)) as pool:
        got = list(pool.map(lambda sc: _tokens(srv, lora=[{"id": 0, "scale": sc}]), scales))
    assert got == [reference[sc] for sc in scales]
    assert _tokens(srv, lora=[]) == reference[0.0]  # a request's list: adapters it does not name get 0
    chat = httpx.post(srv.url_for("v1", "chat", "completions"), timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "lora": [{"id": 0, "scale": 1.0}]})
    assert chat.status_code == 200, chat.text


@pytest.mark.parametrize("lora", [[{"id": 1, "scale": 1.0}], [{"id": -1, "scale": 1.0}], "x", [{"id": 0, "scale": "big"}],
                                  [{"id": True, "scale": 1.0}], [{"id": 0, "scale": None}], [5]])
def test_bad_lora_lists_are_400(srv: RemoteServer, lora: object) -> None:
    r = httpx.post(srv.url_for("completion"), json={"prompt": PROMPT, "n_predict": 2, "lora": lora}, timeout=30)
    assert r.status_code == 400, r.text
    r = httpx.post(srv.url_for("lora-adapters"), json=lora if isinstance(lora, list) else [lora], timeout=30)
    assert r.status_code == 400, r.text
    assert httpx.post(srv.url_for("lora-adapters"), json={"id": 0, "scale": 1}, timeout=30).status_code == 400
    infinite = b'[{"id": 0, "scale": 1e400}]'
    assert httpx.post(srv.url_for("lora-adapters"), content=infinite, timeout=30).status_code == 400
    assert httpx.post(srv.url_for("completion"), content=b'{"prompt": "a", "lora": ' + infinite + b"}",
                      timeout=30).status_code == 400


def test_init_without_apply_and_a_missing_file(synth_model_path: Path, synth_lora_path: Path,
                                               reference: dict[float, list[int]]) -> None:
    with RemoteServer(synth_model_path, "-np", "1", "--lora", str(synth_lora_path), "--lora-init-without-apply") as s:
        assert httpx.get(s.url_for("lora-adapters"), timeout=10).json()[0]["scale"] == 0.0
        assert _tokens(s) == reference[0.0]
    bad = subprocess.run([sys.executable, "-m", "pyllama", "serve", str(synth_model_path), "--lora",
                          str(synth_lora_path.with_name("missing.gguf"))], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no LoRA adapter file" in bad.stderr
