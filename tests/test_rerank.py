"""Reranking equals llama.cpp's, on a cross-encoder of the "bert" architecture (tests/synth.py's
``write_bert_reranker``: WordPiece vocabulary, rank pooling, a ``cls``/``cls.output`` classification head).

``pyllama.rerank`` lays each (query, document) pair out as llama-server's ``format_prompt_rerank`` does and
reads the rank-pooled score as it does (``embd[0]``: the head's raw logit, no sigmoid, no normalisation). The
references are llama.cpp's own programs built from the vendored tree, run as subprocesses: ``llama-embedding
--pooling rank`` and ``llama-server --reranking``'s ``/rerank``; ``pyllama serve``'s ``/v1/rerank`` answers as
the latter does (same order, scores and usage). Measured on CPU: no difference at all from llama-server, and
none beyond its 7 printed decimals from llama-embedding run on one pair at a time.

Where llama-embedding's sequence differs from llama-server's, pyllama follows llama-server, and the test pins the
difference: llama-embedding tokenizes ``query [EOS] [SEP] document`` (the specials as text) *with* the
vocabulary's own special tokens, and a WordPiece vocabulary always adds [CLS] ... [SEP] then, whatever its
add_bos/add_eos flags; and it tokenizes a ``rerank`` template with them too. llama-server adds BOS/EOS/SEP as the
flags say and tokenizes a template without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import bench_scripts
import pyllama
from pyllama.rerank import rerank_tokens
from synth import BERT_CLS_ID, BERT_SEP_ID, write_bert_reranker

httpx = pytest.importorskip("httpx")

QUERY = "Machine learning is fun"
# lower-case, upper-case and accented text, punctuation, words the vocabulary lacks (pieces and [UNK]-free letters)
DOCS = ["Paris is the capital of France.", "A machine", "the cat sat on the mat", "Learning",
        "Café au lait, très bon!", "machines learn from data; people learn from machines"]
TEMPLATE = "[CLS]query: {query}[SEP]document: {document}[SEP]"
# "converted": as convert_hf_to_gguf.py writes a BERT cross-encoder (EOS = [SEP], add BOS and EOS, no extra SEP);
# "defaults": llama.cpp's WordPiece defaults (add BOS and SEP, no EOS); "template": a `rerank` chat template
VARIANTS: dict[str, dict[str, Any]] = {"converted": {}, "defaults": {"special_tokens": "defaults"},
                                      "template": {"rerank_template": TEMPLATE}}
ATOL = 1e-5  # all three run the same ggml graph in f32 on one sequence at a time


@pytest.fixture(scope="module")
def bert_rerankers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bert-reranker")
    return {name: write_bert_reranker(d / f"{name}.gguf", **kw) for name, kw in VARIANTS.items()}


def test_bert_reranker_file(tmp_path: Path, bert_rerankers: dict[str, Path]) -> None:
    a, b = write_bert_reranker(tmp_path / "a.gguf"), write_bert_reranker(tmp_path / "b.gguf")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert a.read_bytes() != write_bert_reranker(tmp_path / "c.gguf", seed=1).read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    with pyllama.Model(bert_rerankers["converted"]) as m:
        v = m.vocab
        assert m.architecture == "bert" and v.type == "wpm" and m.n_embd == 64
        assert (v.bos, v.eos, v.sep, v.add_bos, v.add_eos, v.add_sep) == (BERT_CLS_ID, BERT_SEP_ID, BERT_SEP_ID,
                                                                          True, True, False)
        q, d = (v.tokenize(t, add_special=False).tolist() for t in (QUERY, DOCS[0]))
        assert BERT_CLS_ID not in q + d and len(q) > 4  # plain text: no specials, word pieces
        # HF's pair: [CLS] query [SEP] document [SEP]
        assert rerank_tokens(m, QUERY, DOCS[0]).tolist() == [BERT_CLS_ID, *q, BERT_SEP_ID, *d, BERT_SEP_ID]
        scores = pyllama.rerank(m, QUERY, DOCS)
        assert scores.shape == (len(DOCS),) and len(set(scores.tolist())) == len(DOCS)  # they vary with the document
        # the context form and a one-document call give the same scores
        with m.context(embeddings=True, pooling="rank", n_ctx=512) as ctx:
            np.testing.assert_allclose(pyllama.rerank(ctx, QUERY, DOCS), scores, atol=ATOL)
        assert pyllama.rerank(m, QUERY, DOCS[2:3])[0] == pytest.approx(scores[2], abs=ATOL)
    with pyllama.Model(bert_rerankers["defaults"]) as m:
        v = m.vocab
        assert (v.eos, v.add_bos, v.add_eos, v.add_sep) == (None, True, False, True)
        q, d = (v.tokenize(t, add_special=False).tolist() for t in (QUERY, DOCS[0]))
        assert rerank_tokens(m, QUERY, DOCS[0]).tolist() == [BERT_CLS_ID, *q, BERT_SEP_ID, *d]
    with pyllama.Model(bert_rerankers["template"]) as m:
        assert m.chat_template("rerank") == TEMPLATE
        want = m.vocab.tokenize(TEMPLATE.format(query=QUERY, document=DOCS[0]), add_special=False, parse_special=True)
        assert rerank_tokens(m, QUERY, DOCS[0]).tolist() == want.tolist()
        assert want[0] == BERT_CLS_ID and want[-1] == BERT_SEP_ID and want.tolist().count(BERT_SEP_ID) == 2


def _llama_embedding_tokens(m: pyllama.Model, query: str, doc: str) -> list[int]:
    """The sequence llama-embedding scores for ``query<TAB>doc`` under rank pooling (examples/embedding)."""
    v = m.vocab
    template = m.chat_template("rerank")
    if template is not None:
        text = template.replace("{query}", query).replace("{document}", doc)
    else:
        eos = v.text(v.eos) if v.add_eos and v.eos is not None else ""  # llama_vocab_get_text, as it does
        sep = v.text(v.sep) if v.add_sep and v.sep is not None else ""
        text = query + eos + sep + doc
    return [int(t) for t in v.tokenize(text, add_special=True, parse_special=True)]


def _llama_embedding(tool: Path, model: Path, docs: list[str]) -> npt.NDArray[np.float32]:
    """llama-embedding's rank-pooled scores of (QUERY, doc) pairs: one line per pair, the two split by a tab
    (its --cls-separator). Its default --embd-normalize 2 divides a score by the norm of n_embd floats read past
    the n_cls_out (1) it has, and its json format prints those too: -1 and the raw format print the score alone."""
    cmd = [str(tool), "-m", str(model), "--pooling", "rank", "-p", "\n".join(f"{QUERY}\t{d}" for d in docs),
           "--embd-output-format", "raw", "--embd-normalize", "-1", "-c", "512", "-t", "1"]
    out = bench_scripts.load("native").run_logged(cmd, lambda o: len(o.stdout.split()) == len(docs))
    return np.array([float(line) for line in out.stdout.split()], dtype=np.float32)


@pytest.mark.timeout(1800)  # the first use of the native tools builds them (bench/native.py)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rerank_equals_llama_embedding(bert_rerankers: dict[str, Path], variant: str) -> None:
    """llama.cpp's llama-embedding --pooling rank, one pair per run: a run decodes its pairs together, and once a
    micro-batch holds 64 tokens or more of several sequences ggml's CPU kernels sum in another order, which its
    fp16 GELU table turns into score changes of up to ~1e-3 (llama-server with one slot, and pyllama, decode one
    pair at a time). All pairs in one run agree to that noise only."""
    native = bench_scripts.load("native")
    tool = native.native_tool("llama-embedding")
    model = bert_rerankers[variant]
    want = np.array([_llama_embedding(tool, model, [d])[0] for d in DOCS])
    together = _llama_embedding(tool, model, DOCS)
    with pyllama.Model(model) as m:
        got = pyllama.rerank(m, QUERY, DOCS, n_threads=1)
        # llama-embedding's own sequences, scored by pyllama: the same numbers in every variant
        theirs = [_llama_embedding_tokens(m, QUERY, d) for d in DOCS]
        ours = [rerank_tokens(m, QUERY, d).tolist() for d in DOCS]
        scored = pyllama.embed(m, theirs, normalize=False, pooling="rank", n_threads=1)[:, 0]
    assert got.shape == (len(DOCS),)
    np.testing.assert_allclose(scored, want, atol=ATOL)
    np.testing.assert_allclose(together, want, atol=3e-3)
    if variant == "converted":  # HF's [CLS] q [SEP] d [SEP] both ways
        assert theirs == ours
        np.testing.assert_allclose(got, want, atol=ATOL)
    elif variant == "defaults":  # llama-server leaves the trailing [SEP] out (add_eos is false, no EOS)
        assert theirs == [[*o, BERT_SEP_ID] for o in ours]
        assert not np.allclose(got, want, atol=1e-3)
    else:  # llama-embedding tokenizes the template with specials: [CLS] and [SEP] around it again
        assert theirs == [[BERT_CLS_ID, *o, BERT_SEP_ID] for o in ours]
        assert not np.allclose(got, want, atol=1e-3)


@contextlib.contextmanager
def _llama_server(binary: Path, model: Path) -> Iterator[str]:
    from server_fixture import free_port

    port = free_port()
    proc = subprocess.Popen([str(binary), "--reranking", "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                             "-c", "512", "-np", "1", "-t", "2", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "llama-server did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait()


# a document with BERT's specials as text: the server tokenizes a document without parsing them
SERVER_DOCS = [*DOCS, "[SEP] [CLS] not special here"]


def _ask(url: str) -> Any:
    r = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": SERVER_DOCS}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.may_skip  # llama-server is built only on request (python bench/native.py --server)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rerank_equals_llama_server(bert_rerankers: dict[str, Path], variant: str) -> None:
    """llama-server's /rerank, then pyllama serve's /v1/rerank, on the same model: the same order, scores and
    prompt token count (the sequences' total length) as each other and as ``pyllama.rerank``."""
    from server_fixture import RemoteServer

    native = bench_scripts.load("native")
    try:
        binary = native.server_tool()
    except native.NativeBuildError as exc:
        pytest.skip(str(exc))
    model = bert_rerankers[variant]
    with _llama_server(binary, model) as url:
        ref = _ask(url)
    with pyllama.Model(model) as m:
        got = pyllama.rerank(m, QUERY, SERVER_DOCS)
        n_tokens = sum(rerank_tokens(m, QUERY, d).size for d in SERVER_DOCS)
    want = np.array([x["relevance_score"] for x in sorted(ref["results"], key=lambda x: x["index"])])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert ref["usage"]["prompt_tokens"] == n_tokens
    with RemoteServer(model, "--reranking", "-c", "512", "-np", "1") as srv:
        ours = _ask(srv.url_for("v1"))
    assert [x["index"] for x in ours["results"]] == [x["index"] for x in ref["results"]]
    np.testing.assert_allclose([x["relevance_score"] for x in ours["results"]],
                               [x["relevance_score"] for x in ref["results"]], atol=ATOL)
    assert ours["usage"] == ref["usage"] and ours["object"] == ref["object"] == "list"


def test_pyllama_serve_rerank_equals_library(bert_rerankers: dict[str, Path]) -> None:
    """Without llama-server: pyllama serve's /rerank gives the library's scores on the BERT cross-encoder."""
    from server_fixture import RemoteServer

    model = bert_rerankers["converted"]
    with pyllama.Model(model) as m:
        want = pyllama.rerank(m, QUERY, SERVER_DOCS)
    with RemoteServer(model, "--reranking", "-c", "512", "-np", "1") as srv:
        body = _ask(srv.url)
    assert [x["index"] for x in body["results"]] == sorted(range(len(SERVER_DOCS)), key=lambda i: -want[i])
    got = np.array([x["relevance_score"] for x in sorted(body["results"], key=lambda x: x["index"])])
    np.testing.assert_allclose(got, want, atol=ATOL)
