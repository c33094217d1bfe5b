"""Hugging Face references against a real local Hub-like server: quantisation choice, split sets,
revisions, offline resolution, and Model("hf:...") loading a real (synthetic) model."""

from __future__ import annotations

from pathlib import Path

import pytest

import pyllama
from hfserver import HFServer, fake_gguf, server, store_env  # noqa: F401 - fixtures
from pyllama import store
from pyllama.store import ChecksumError, DownloadProgress, ModelNotFoundError, NotCachedError

QUANTS = {"tiny-Q4_K_M.gguf": fake_gguf(40_000, seed=1), "tiny-Q8_0.gguf": fake_gguf(60_000, seed=2),
          "tiny-IQ4_XS.gguf": fake_gguf(30_000, seed=3), "mmproj-tiny-Q8_0.gguf": fake_gguf(5_000, seed=4),
          "README.md": b"# tiny\n"}


def test_pull_picks_the_requested_quantisation(server: HFServer, store_env: Path) -> None:
    commit = server.add_repo("org/tiny", QUANTS)
    path = store.pull("hf:org/tiny:Q8_0")
    assert path.name == "tiny-Q8_0.gguf" and path.read_bytes() == QUANTS["tiny-Q8_0.gguf"]
    assert path == store_env / "hf" / "org" / "tiny" / commit / "tiny-Q8_0.gguf"
    assert server.served("/tiny-Q8_0.gguf") == 60_000
    assert server.served() == 60_000 + 5_000  # the model and its projector (mmproj-tiny-Q8_0), not other quants
    assert store.pull("hf:org/tiny").name == "tiny-Q4_K_M.gguf"  # the default quantisation
    assert store.pull("hf:org/tiny:iq4_xs").name == "tiny-IQ4_XS.gguf"
    with pytest.raises(ModelNotFoundError, match=r"quantisation Q5_K_M; available: IQ4_XS, Q4_K_M, Q8_0"):
        store.pull("hf:org/tiny:Q5_K_M")
    with pytest.raises(ModelNotFoundError, match="not found"):
        store.pull("hf:org/missing:Q8_0")
    with pytest.raises(ModelNotFoundError, match="not found"):
        store.pull("hf:org/tiny:Q8_0@no-such-branch")
    # pinned to the commit; the second pull asks the API only
    served = server.served()
    assert store.pull(f"hf:org/tiny/tiny-Q8_0.gguf@{commit}") == path
    assert server.served() == served


def test_split_gguf_is_fetched_as_a_set(server: HFServer, store_env: Path) -> None:
    parts = {f"Q4_K_M/big-Q4_K_M-0000{i}-of-00003.gguf": fake_gguf(50_000 + i, seed=10 + i) for i in (1, 2, 3)}
    server.add_repo("org/big", {**parts, "big-Q8_0.gguf": fake_gguf(1000, seed=9)})
    events: list[DownloadProgress] = []
    path = store.pull("hf:org/big:Q4_K_M", progress=events.append)
    assert path.name == "big-Q4_K_M-00001-of-00003.gguf"
    for name, data in parts.items():
        assert (path.parent / Path(name).name).read_bytes() == data
    total = sum(len(d) for d in parts.values())
    assert events[-1].done == events[-1].total == total  # one progress over the whole set
    (entry,) = [m for m in store.list_models() if "big" in m.ref]
    assert entry.size == total and len(entry.files) == 3 and entry.path == path and entry.revisions == ("main",)
    # one part missing: the set is no longer cached, and a resolve fetches only that part
    (path.parent / "big-Q4_K_M-00002-of-00003.gguf").unlink()
    served = server.served()
    assert store.resolve("hf:org/big:Q4_K_M") == path
    assert server.served() - served == len(parts["Q4_K_M/big-Q4_K_M-00002-of-00003.gguf"])


def test_offline_resolution_hit_and_miss(server: HFServer, store_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.add_repo("org/tiny", QUANTS)
    url = server.add_file("plain/m.gguf", fake_gguf(10_000, seed=5), sha256_file=True)
    pulled = store.pull("hf:org/tiny:Q8_0")
    plain = store.pull(url)
    server.stop()  # nothing is reachable from here on
    for var in ("PYLLAMA_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        assert store.pull("hf:org/tiny:Q8_0") == pulled  # by quantisation, through refs/main
        assert store.resolve("hf:org/tiny/tiny-Q8_0.gguf@main") == pulled
        assert store.resolve(url) == plain
        with pytest.raises(NotCachedError, match=r"hf:org/tiny:Q4_K_M is not in the model cache .* offline"):
            store.resolve("hf:org/tiny:Q4_K_M")
        with pytest.raises(NotCachedError, match="pyllama pull hf:org/other:Q8_0"):
            store.pull("hf:org/other:Q8_0")
        monkeypatch.delenv(var)
    with pytest.raises(NotCachedError):
        store.resolve("hf:org/tiny:IQ4_XS", offline=True)
    # online but without a server, a cached reference still resolves without the network
    assert store.resolve("hf:org/tiny:Q8_0") == pulled


def test_new_commit_reuses_unchanged_files(server: HFServer, store_env: Path) -> None:
    first = server.add_repo("org/tiny", QUANTS)
    a = store.pull("hf:org/tiny:Q8_0")
    second = server.add_repo("org/tiny", {"README.md": b"# tiny, edited\n"})
    assert second != first
    served = server.served()
    b = store.pull("hf:org/tiny:Q8_0")
    assert b != a and second in str(b) and b.read_bytes() == a.read_bytes()
    assert server.served() == served  # hard-linked from the first commit, not downloaded again
    assert store.resolve("hf:org/tiny:Q8_0", offline=True) == b  # refs/main moved to the new commit
    removed = store.remove("hf:org/tiny:Q8_0")  # every cached commit
    assert {m.commit for m in removed} == {first, second}
    assert not a.exists() and not b.exists()
    with pytest.raises(NotCachedError):
        store.remove("hf:org/tiny:Q8_0")


def test_model_loads_a_reference(server: HFServer, store_env: Path, synth_model_path: Path) -> None:
    server.add_repo("org/synth", {"synth-F32.gguf": synth_model_path.read_bytes()})
    with pyllama.Model("hf:org/synth:F32", n_gpu_layers=0) as model:
        assert model.path.is_relative_to(store_env)
        assert model.n_params > 0 and model.tokenize("Hello world").size > 0
    server.stop()
    with pyllama.Model("hf:org/synth:F32", n_gpu_layers=0) as again:  # from the cache, no server
        assert again.path == model.path


def test_hub_sha256_is_checked(server: HFServer, store_env: Path) -> None:
    server.add_repo("org/tiny", QUANTS)
    server.corrupt_offset = 20_000  # the API publishes the real file's sha256; the body differs in one byte
    with pytest.raises(ChecksumError, match="tiny-Q8_0.gguf: sha256 mismatch"):
        store.pull("hf:org/tiny:Q8_0")
    assert not [p for p in store_env.rglob("tiny-Q8_0.gguf*") if not p.name.endswith(".lock")]
    with pytest.raises(ChecksumError, match="not the one org/tiny publishes"):
        store.pull("hf:org/tiny:Q8_0", sha256="0" * 64)
    assert server.served("tiny-Q8_0.gguf") == 60_000  # the second was refused before any byte moved


def test_hub_download_resumes_across_etag_changes(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(500_000, seed=20)
    server.add_repo("org/r", {"r-Q4_K_M.gguf": data})
    server.drop_after, server.drops = 200_000, 1
    with pytest.raises(store.DownloadError, match="kept for a later resume"):
        store.pull("hf:org/r:Q4_K_M", retries=0)
    server.etag_salt = "-other-cdn-node"  # same bytes at the same commit: the sha256 decides, not the ETag
    path = store.pull("hf:org/r:Q4_K_M")
    assert path.read_bytes() == data
    assert server.range_requests("r-Q4_K_M.gguf") == [None, "bytes=200000-"]
    assert server.served("r-Q4_K_M.gguf") == len(data)
