"""`pyllama serve`'s llama-server HTTP surface: /completion, /props, /slots, /tokenize, /apply-template, /metrics,
/embedding, chat with `n` choices, and llama-server's error fields.

Real `pyllama serve` subprocesses on the synthetic model (tests/server_fixture.py), started with llama-server's
flags and driven with httpx, checking the fields and status codes llama.cpp's own server tests
(tools/server/tests/unit) check. The synthetic model never picks an end-of-generation token greedily, so a
greedy reply runs to its limit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_fixture import RemoteServer  # noqa: E402

PROMPT = "Hello world the"


def llama_server(model: Path, *args: str) -> RemoteServer:
    srv = RemoteServer(model, threads=None)
    srv.cmd = [sys.executable, "-m", "pyllama", "serve", "-m", str(model), "--host", srv.host, "--port",
               str(srv.port), "-t", "2", *args]
    return srv


@pytest.fixture(scope="module")
def srv(synth_model_path: Path) -> Iterator[RemoteServer]:
    with llama_server(synth_model_path, "-c", "512", "-np", "2", "-a", "synth", "--seed", "42", "-n", "16",
                      "--metrics", "-b", "32", "-ub", "32") as s:
        yield s


def post(srv: RemoteServer, path: str, body: Any) -> Any:
    return httpx.post(srv.url_for(path), json=body, timeout=60)


def events(srv: RemoteServer, path: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", srv.url_for(path), json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def data(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]


def llamacpp_metrics(srv: RemoteServer) -> dict[str, tuple[str, float]]:
    r = httpx.get(srv.url_for("metrics"), timeout=10)
    assert r.status_code == 200 and "Process-Start-Time-Unix" in r.headers
    types, out = {}, {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("llamacpp:"):
            name, value = line.split(" ", 1)
            out[name] = (types[name], float(value))
    return out


def test_completion_fields(srv: RemoteServer) -> None:
    r = post(srv, "completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["stop"] is True and b["stop_type"] == "limit" and b["stopping_word"] == "" and b["truncated"] is False
    assert b["tokens"] == [] and isinstance(b["has_new_line"], bool) and b["model"] == "synth"
    assert b["tokens_predicted"] == 8 and b["timings"]["predicted_n"] == 8
    t = b["timings"]
    assert t["prompt_n"] + t["cache_n"] == b["tokens_evaluated"] and t["prompt_ms"] > 0
    assert all(v is not None and v >= 0 for v in t.values())
    assert b["generation_settings"]["n_predict"] == 8 and b["generation_settings"]["seed"] == 42
    assert b["prompt"].endswith(PROMPT) and b["prompt"].startswith("<s>")
    assert 0 <= b["id_slot"] < 2 and b["tokens_cached"] == b["tokens_evaluated"] + 8
    # the same text as the OpenAI route, greedy; /completions (no /v1) is the native one too
    oai = post(srv, "v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    assert oai["choices"][0]["text"] == b["content"] and "timings" in oai
    again = post(srv, "completions", {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True})
    assert again.json()["content"] == b["content"] and len(again.json()["tokens"]) == 8
    # the server's -n applies when the request sets no limit
    assert post(srv, "completion", {"prompt": PROMPT, "temperature": 0}).json()["tokens_predicted"] == 16
    picked = post(srv, "completion", {"prompt": PROMPT, "n_predict": 4, "temperature": 0,
                                      "response_fields": ["content", "generation_settings/n_predict"]}).json()
    assert set(picked) == {"content", "generation_settings/n_predict"} and picked["generation_settings/n_predict"] == 4


def test_completion_prompt_forms(srv: RemoteServer) -> None:
    tokens = post(srv, "tokenize", {"content": PROMPT, "add_special": True}).json()["tokens"]
    assert tokens[0] == 1  # BOS
    want = post(srv, "completion", {"prompt": PROMPT, "n_predict": 6, "temperature": 0}).json()["content"]
    body = {"n_predict": 6, "temperature": 0}
    assert post(srv, "completion", {**body, "prompt": tokens}).json()["content"] == want
    both = post(srv, "completion", {**body, "prompt": [tokens, PROMPT]}).json()
    assert isinstance(both, list) and [x["content"] for x in both] == [want, want]
    assert [x["index"] for x in both] == [0, 1]
    wrapped = post(srv, "completion", {**body, "prompt": [tokens, {"prompt_string": PROMPT}]}).json()
    assert [x["content"] for x in wrapped] == [want, want]
    mixed = post(srv, "completion", {**body, "prompt": [1, 261, 262, PROMPT, 263]})
    assert mixed.status_code == 200 and isinstance(mixed.json()["content"], str)
    for bad, code in (([], 400), ({"prompt_string": PROMPT, "multimodal_data": ["AAAA"]}, 400), ([1, 10**6], 400),
                      (5, 400)):
        r = post(srv, "completion", {**body, "prompt": bad})
        assert r.status_code == code and r.json()["error"]["message"], (bad, r.text)
    long = post(srv, "completion", {"prompt": "the " * 400})
    err = long.json()["error"]
    assert long.status_code == 400 and err["type"] == "exceed_context_size_error"
    assert err["n_ctx"] == 256 and err["n_prompt_tokens"] > 256


def test_completion_stream(srv: RemoteServer) -> None:
    body = {"prompt": PROMPT, "n_predict": 8, "temperature": 0}
    want = post(srv, "completion", body).json()["content"]
    lines = events(srv, "completion", {**body, "stream": True, "n_probs": 2})
    assert "data: [DONE]" not in lines  # llama-server's native stream has none
    chunks = data(lines)
    assert [c["stop"] for c in chunks] == [False] * 8 + [True]
    for c in chunks[:-1]:
        assert len(c["tokens"]) == 1 and len(c["completion_probabilities"]) == 1
        assert len(c["completion_probabilities"][0]["top_logprobs"]) == 2
    last = chunks[-1]
    assert last["stop_type"] == "limit" and last["timings"]["predicted_n"] == 8 and last["tokens"] == []
    assert "generation_settings" in last and last["generation_settings"]["seed"] == 42
    assert "".join(c["content"] for c in chunks) == want
    two = data(events(srv, "completion", {**body, "stream": True, "prompt": [PROMPT, PROMPT]}))
    for i in (0, 1):
        mine = [c for c in two if c["index"] == i]
        assert mine[-1]["stop"] and "".join(c["content"] for c in mine) == want


def test_completion_sampling_fields(srv: RemoteServer) -> None:
    body: dict[str, Any] = {"prompt": "We have a", "n_predict": 12}
    hot = {**body, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    a, b, c = (post(srv, "completion", {**hot, "seed": s}).json()["content"] for s in (7, 7, 8))
    assert a == b and a != c
    greedy = post(srv, "completion", {**body, "temperature": 0}).json()["content"]
    # samplers: the order (and choice) of the chain; top_k 1 first leaves the greedy choice
    ordered = post(srv, "completion", {**hot, "top_k": 1, "samplers": ["top_k", "temperature"]}).json()
    assert ordered["content"] == greedy
    assert post(srv, "completion", {**hot, "top_k": 1, "samplers": "kt"}).json()["content"] == greedy
    probs = post(srv, "completion", {**body, "temperature": 0, "n_probs": 3, "n_predict": 5}).json()
    cps = probs["completion_probabilities"]
    assert len(cps) == 5
    for tok in cps:
        assert tok["logprob"] <= 0 and isinstance(tok["bytes"], list) and len(tok["top_logprobs"]) == 3
        assert tok["top_logprobs"][0]["logprob"] == pytest.approx(tok["logprob"])  # greedy: the most likely
    post_probs = post(srv, "completion", {**body, "n_probs": 3, "n_predict": 3, "post_sampling_probs": True}).json()
    assert all(0 < t["prob"] <= 1 and "top_probs" in t for t in post_probs["completion_probabilities"])
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
    cut = post(srv, "completion", {**body, "temperature": 0, "stop": [stop]}).json()
    assert (cut["stop_type"], cut["stopping_word"], cut["content"]) == ("word", stop, greedy[: greedy.index(stop)])
    g = post(srv, "completion", {**body, "grammar": 'root ::= "yes" | "no"'}).json()
    assert g["content"] in ("yes", "no")
    js = post(srv, "completion", {**body, "json_schema": {"type": "boolean"}}).json()
    assert json.loads(js["content"]) in (True, False)
    assert post(srv, "completion", {**body, "grammar": "root ::= (("}).status_code == 400
    one = {**body, "temperature": 0, "n_predict": 1, "return_tokens": True}
    first = post(srv, "completion", one).json()["tokens"][0]
    for bias in ([[first, False]], {str(first): -100}, [[first, -100]]):
        other = post(srv, "completion", {**one, "logit_bias": bias}).json()
        assert other["tokens"][0] != first, bias
    assert post(srv, "completion", {**body, "n_cmpl": 3}).status_code == 400  # more than the slots


def test_props_and_slots(srv: RemoteServer) -> None:
    p = httpx.get(srv.url_for("props")).json()
    assert p["total_slots"] == 2 and p["default_generation_settings"]["n_ctx"] == 256
    assert p["default_generation_settings"]["params"]["seed"] == 42
    assert p["default_generation_settings"]["params"]["n_predict"] == 16
    assert p["model_path"].endswith(".gguf") and p["model_alias"] == "synth"
    assert "im_start" in p["chat_template"] and p["bos_token"] == "<s>" and p["eos_token"] == "</s>"
    assert p["modalities"] == {"vision": False, "video": False, "audio": False} and p["build_info"]
    assert (p["endpoint_slots"], p["endpoint_props"], p["endpoint_metrics"]) == (True, False, True)
    r = httpx.post(srv.url_for("props"), json={})
    assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error" and "--props" in r.text
    done = post(srv, "completion", {"prompt": PROMPT, "n_predict": 4, "seed": 5})
    slots = httpx.get(srv.url_for("slots")).json()
    assert [s["id"] for s in slots] == [0, 1] and all(s["n_ctx"] == 256 for s in slots)
    assert not any(s["is_processing"] for s in slots)
    used = slots[done.json()["id_slot"]]
    assert used["params"]["seed"] == 5 and used["params"]["n_predict"] == 4
    assert used["next_token"][0]["n_remain"] == -1 and used["next_token"][0]["n_decoded"] == 0
    assert used["prompt"].endswith(PROMPT) and used["generated"] == done.json()["content"]
    assert httpx.post(srv.url_for("slots", "0"), params={"action": "save"}, json={}).status_code == 501


def test_slots_and_props_switches(synth_model_path: Path) -> None:
    with llama_server(synth_model_path, "-c", "256", "-np", "1", "--no-slots", "--props") as s:
        r = httpx.get(s.url_for("slots"))
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"
        assert httpx.post(s.url_for("props"), json={}).json() == {"success": True}
        assert httpx.get(s.url_for("props")).json()["endpoint_slots"] is False
        assert httpx.get(s.url_for("metrics")).status_code == 501  # no --metrics


def test_tokenize_detokenize_apply_template(srv: RemoteServer) -> None:
    r = post(srv, "tokenize", {"content": "schön 🤗", "with_pieces": True}).json()["tokens"]
    assert all(set(t) == {"id", "piece"} for t in r)
    assert any(isinstance(t["piece"], list) for t in r)  # a byte token of the emoji: its bytes
    raw = b"".join(t["piece"].encode() if isinstance(t["piece"], str) else bytes(t["piece"]) for t in r)
    assert raw.decode().replace("\u2581", " ").strip() == "schön 🤗"
    assert post(srv, "tokenize", {}).json() == {"tokens": []}
    ids = post(srv, "tokenize", {"content": "the cat"}).json()["tokens"]
    assert post(srv, "tokenize", {"content": [1, "the cat"]}).json()["tokens"] == [1, *ids]
    assert post(srv, "detokenize", {}).json() == {"content": ""}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    prompt = post(srv, "apply-template", {"messages": msgs}).json()["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("<|im_start|>assistant\n")
    chat = post(srv, "v1/chat/completions", {"messages": msgs, "max_tokens": 2}).json()
    n = len(post(srv, "tokenize", {"content": prompt, "add_special": True}).json()["tokens"])
    assert chat["usage"]["prompt_tokens"] in (n, n - 1)  # with or without a BOS of the tokenizer's


def test_metrics_llamacpp_names(srv: RemoteServer) -> None:
    before = llamacpp_metrics(srv)
    n = 0
    for k in (1, 4, 8):
        n += post(srv, "completion", {"prompt": "I believe", "n_predict": k}).json()["timings"]["predicted_n"]
    m = llamacpp_metrics(srv)
    for name in ("prompt_tokens_total", "prompt_tokens_cached_total", "prompt_seconds_total", "tokens_predicted_total",
                 "tokens_predicted_seconds_total", "n_decode_total", "n_tokens_max",
                 "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total",
                 "spec_decode_num_drafts_total"):
        assert m[f"llamacpp:{name}"][0] == "counter", name
    for name in ("prompt_tokens_seconds", "predicted_tokens_seconds", "requests_processing", "requests_deferred",
                 "n_busy_slots_per_decode"):
        assert m[f"llamacpp:{name}"][0] == "gauge", name
    assert m["llamacpp:tokens_predicted_total"][1] - before["llamacpp:tokens_predicted_total"][1] == n
    assert m["llamacpp:n_decode_total"][1] > before["llamacpp:n_decode_total"][1]
    assert m["llamacpp:requests_processing"][1] == 0 and m["llamacpp:n_busy_slots_per_decode"][1] >= 1
    assert "pyllama_slots 2" in httpx.get(srv.url_for("metrics")).text  # pyllama's own names stay


def test_chat_n_choices_seed_and_timings(srv: RemoteServer) -> None:
    msgs = [{"role": "user", "content": "What is the best book"}]
    r = post(srv, "chat/completions", {"messages": msgs, "max_tokens": 8, "n": 2})
    assert r.status_code == 200, r.text
    b = r.json()
    assert [c["index"] for c in b["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" and c["message"]["role"] == "assistant" for c in b["choices"])
    assert b["usage"]["completion_tokens"] == 16 and b["timings"]["predicted_n"] == 8
    hot = {"messages": msgs, "max_tokens": 10, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    a1, a2, a3 = (post(srv, "v1/chat/completions", {**hot, "seed": s}).json()["choices"][0]["message"]["content"]
                  for s in (3, 3, 4))
    assert a1 == a2 and a1 != a3
    chunks = data(events(srv, "v1/chat/completions", {"messages": msgs, "max_tokens": 5, "n": 2, "stream": True,
                                                      "temperature": 0}))
    for i in (0, 1):
        mine = [c for c in chunks if c["choices"][0]["index"] == i]
        assert mine[-1]["choices"][0]["finish_reason"] == "length" and "timings" in mine[-1]
    greedy = post(srv, "v1/chat/completions", {"messages": msgs, "max_tokens": 5, "temperature": 0}).json()
    texts = {i: "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                        if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert texts[0] == texts[1] == greedy["choices"][0]["message"]["content"]
    many = post(srv, "v1/completions", {"prompt": [PROMPT, "the cat"], "max_tokens": 3, "temperature": 0}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1] and many["usage"]["completion_tokens"] == 6


def test_embedding_native_shape(srv: RemoteServer) -> None:
    r = post(srv, "embedding", {"content": "Hello world"})
    assert r.status_code == 200 and r.json()[0]["index"] == 0
    vec = r.json()[0]["embedding"]
    assert len(vec) == 1 and len(vec[0]) == 64
    two = post(srv, "embeddings", {"input": ["Hello world", "the cat"]}).json()
    assert [x["index"] for x in two] == [0, 1] and two[0]["embedding"][0] == pytest.approx(vec[0], abs=1e-5)
    oai = post(srv, "v1/embeddings", {"input": "Hello world"}).json()
    assert oai["data"][0]["embedding"] == pytest.approx(vec[0], abs=1e-5)
    assert post(srv, "embedding", {}).status_code == 400


def test_embedding_input_forms(srv: RemoteServer, synth_model_path: Path) -> None:
    import numpy as np

    import pyllama

    with pyllama.Model(synth_model_path, vocab_only=True) as m:
        ids = m.tokenize("Hello world", parse_special=True).tolist()  # with BOS, as the server tokenizes text
    ref = post(srv, "v1/embeddings", {"input": "Hello world"}).json()["data"][0]["embedding"]
    forms: list[Any] = [ids, [ids[0], "Hello world"], {"prompt_string": "Hello world"},
                        {"content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    for form in forms:  # one input each, the same tokens: the same vector
        r = post(srv, "v1/embeddings", {"input": form})
        assert r.status_code == 200, (form, r.text)
        assert np.allclose(r.json()["data"][0]["embedding"], ref, atol=1e-5), form
    several = post(srv, "v1/embeddings", {"input": ["Hello world", ids, forms[3]]}).json()
    assert [d["index"] for d in several["data"]] == [0, 1, 2]
    assert several["usage"]["prompt_tokens"] == 3 * len(ids)
    assert all(np.allclose(d["embedding"], ref, atol=1e-5) for d in several["data"])
    # "content" instead of "input": llama-server's shape, on either path
    native = post(srv, "v1/embeddings", {"content": "Hello world"}).json()
    assert np.allclose(native[0]["embedding"][0], ref, atol=1e-5)
    raw = post(srv, "embedding", {"content": "Hello world", "embd_normalize": -1}).json()[0]["embedding"][0]
    assert np.allclose(np.asarray(raw) / np.linalg.norm(raw), ref, atol=1e-5)
    for bad in ([], [[]], {"content": "text"}, {"content": [{"type": "unknown"}]},
                {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                [1, 10**7], 3.5):
        r = post(srv, "v1/embeddings", {"input": bad})
        assert r.status_code == 400 and r.json()["error"]["message"], (bad, r.text)


def test_rerank(synth_reranker_path: Path, synth_model_path: Path) -> None:
    docs = ["A machine", "Learning is", "Paris, capitale de la France", "the cat"]
    import pyllama

    with pyllama.Model(synth_reranker_path) as m:
        want = pyllama.rerank(m, "Machine learning is", docs)
    best_first = sorted(range(len(docs)), key=lambda i: -want[i])
    with llama_server(synth_reranker_path, "--reranking", "-c", "1024", "-np", "1") as rr:
        for path in ("rerank", "v1/rerank", "reranking", "v1/reranking"):
            body = post(rr, path, {"query": "Machine learning is", "documents": docs, "model": "jina"}).json()
            assert body["object"] == "list" and body["model"] == "jina"
            assert [x["index"] for x in body["results"]] == best_first
            assert [x["relevance_score"] for x in body["results"]] == pytest.approx([want[i] for i in best_first],
                                                                                   abs=1e-4)
            assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 4 * 4
        top = post(rr, "rerank", {"query": "Machine learning is", "documents": docs, "top_n": 2}).json()
        assert [x["index"] for x in top["results"]] == best_first[:2]
        tei = post(rr, "rerank", {"query": "Machine learning is", "texts": docs, "return_text": True}).json()
        assert [x["index"] for x in tei] == best_first and tei[0]["text"] == docs[best_first[0]]
        assert set(tei[0]) == {"index", "score", "text"}
        for bad in ({"query": "q", "documents": []}, {"query": "q"}, {"query": 3, "documents": ["a"]},
                    {"documents": ["a"]}, {"query": "q", "documents": [1, 2]},
                    {"query": "q", "documents": ["a"], "top_n": "2"}):
            r = post(rr, "rerank", bad)
            assert r.status_code == 400 and "error" in r.json(), (bad, r.text)
    # a server that is no reranker: llama-server's 501
    with llama_server(synth_model_path, "-c", "256", "-np", "1") as plain:
        r = post(plain, "rerank", {"query": "q", "documents": ["a"]})
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"


def test_template_switches(synth_model_path: Path) -> None:
    """llama-server's --reasoning and the request's add_generation_prompt, continue_final_message,
    chat_template_kwargs and reasoning_effort, on a template that can think (Qwen3's, from the vendored tree)."""
    template = Path(__file__).resolve().parent.parent / "vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja"
    if not template.is_file():
        pytest.skip("vendor/llama.cpp is missing: python tools/vendor.py")
    user = [{"role": "user", "content": "What is today?"}]

    def prompt(s: RemoteServer, **body: Any) -> str:
        r = post(s, "apply-template", {"messages": user, **body})
        assert r.status_code == 200, r.text
        return str(r.json()["prompt"])

    with llama_server(synth_model_path, "-c", "512", "-np", "1", "--chat-template-file", str(template)) as on, \
            llama_server(synth_model_path, "-c", "512", "-np", "1", "--chat-template-file", str(template),
                         "--reasoning", "off") as off:
        closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # thinking turned off: an empty block
        assert prompt(on).endswith("<|im_start|>assistant\n") and not prompt(on).endswith(closed)
        assert prompt(off).endswith(closed)
        assert prompt(off, chat_template_kwargs={"enable_thinking": True}) == prompt(on)
        assert prompt(on, chat_template_kwargs={"enable_thinking": False}) == prompt(off)
        assert prompt(on, reasoning_effort="none") == prompt(off)
        assert prompt(on, add_generation_prompt=False).endswith("What is today?<|im_end|>\n")
        # an assistant message at the end is continued (its prefill); vLLM's explicit spelling is the same
        prefill = [*user, {"role": "assistant", "content": "Whill"}]
        implicit = post(on, "apply-template", {"messages": prefill}).json()["prompt"]
        explicit = post(on, "apply-template", {"messages": prefill, "continue_final_message": True,
                                               "add_generation_prompt": False}).json()["prompt"]
        assert implicit == explicit and implicit.endswith("Whill")
        for bad in ({"continue_final_message": True, "add_generation_prompt": True},
                    {"messages": [*prefill, {"role": "assistant", "content": "again"}]},
                    {"chat_template_kwargs": {"enable_thinking": "no"}}):
            r = post(on, "v1/chat/completions", {"messages": prefill, "max_tokens": 2, **bad})
            assert r.status_code == 400, (bad, r.text)


def test_return_progress(srv: RemoteServer) -> None:
    """llama-server's return_progress (the server runs -b 32): chat chunks without choices, native events
    with timings, Responses' response.in_progress events; each stream's last report is the whole prompt."""
    long = "Hello world the cat " * 12
    chat = data(events(srv, "v1/chat/completions", {"messages": [{"role": "user", "content": long}], "stream": True,
                                                    "max_tokens": 2, "return_progress": True}))
    progress = [c["prompt_progress"] for c in chat if "prompt_progress" in c]
    assert all(c["choices"] == [] for c in chat if "prompt_progress" in c)
    assert len(progress) >= 3 and progress[0]["processed"] == progress[0]["cache"]
    assert progress[-1]["processed"] == progress[-1]["total"] and [p["processed"] for p in progress] == sorted(
        p["processed"] for p in progress)
    native = data(events(srv, "completion", {"prompt": long, "n_predict": 2, "stream": True,
                                             "return_progress": True, "cache_prompt": True}))
    reports = [c for c in native if "prompt_progress" in c]
    assert reports and reports[0]["timings"]["prompt_n"] == 0 and reports[-1]["timings"]["prompt_ms"] > 0
    assert all(v is not None and v >= 0 for c in reports for v in c["timings"].values())
    resp = data(events(srv, "v1/responses", {"input": long, "max_output_tokens": 2, "stream": True,
                                             "return_progress": True, "timings_per_token": True}))
    assert any(e["type"] == "response.in_progress" and "prompt_progress" in e for e in resp)
    assert "timings" in resp[-1] and resp[-1]["type"] == "response.completed"
    plain = data(events(srv, "v1/chat/completions", {"messages": [{"role": "user", "content": long}],
                                                     "stream": True, "max_tokens": 2}))
    assert not any("prompt_progress" in c for c in plain)  # only when asked


def test_header_names_as_llama_server_sends_them(srv: RemoteServer) -> None:
    import http.client

    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("OPTIONS", "/completions", headers={"Origin": "http://example.org",
                                                    "Access-Control-Request-Method": "POST"})
    r = conn.getresponse()
    r.read()
    names = [name for name, _ in r.getheaders()]  # as written on the wire
    assert r.status == 200 and "Access-Control-Allow-Origin" in names and "Access-Control-Allow-Methods" in names
    conn.request("GET", "/health")
    r = conn.getresponse()
    r.read()
    assert "Content-Type" in [name for name, _ in r.getheaders()]
    conn.close()


def test_chat_grammar_and_json_schema_fields(srv: RemoteServer) -> None:
    msgs = [{"role": "user", "content": "Does not matter what I say, does it?"}]
    r = post(srv, "chat/completions", {"messages": msgs, "max_tokens": 6, "grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("yes", "no"), r.text
    # json_schema is response_format's json_schema (whatever the chat path answers to that)
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    body = {"messages": msgs, "max_tokens": 20, "temperature": 0}
    r1, r2 = post(srv, "chat/completions", {**body, "json_schema": schema}), post(srv, "chat/completions",
                                                                                   {**body, "response_format": fmt})
    assert r1.status_code == r2.status_code
    if r1.status_code == 200:
        assert r1.json()["choices"][0]["message"] == r2.json()["choices"][0]["message"]
    bad = post(srv, "chat/completions", {"messages": msgs, "max_tokens": 6, "grammar": "root ::= this is (not"})
    assert bad.status_code == 400 and "error" in bad.json()
    tpt = data(events(srv, "chat/completions", {"messages": msgs, "max_tokens": 4, "stream": True,
                                                "timings_per_token": True}))
    assert "timings" not in tpt[0] and all("timings" in c for c in tpt[1:])
    assert tpt[-1]["timings"]["predicted_n"] == 4
    chat = post(srv, "v1/chat/completions", {"messages": msgs, "max_tokens": 1}).json()
    counted = post(srv, "chat/completions/input_tokens", {"messages": msgs}).json()
    assert counted["input_tokens"] == chat["usage"]["prompt_tokens"]
