"""A model's multimodal projector pulled with it from a Hugging Face repository (llama.cpp's ``-hf`` choice),
verified and resumable like the model, recorded in the cache, listed and removed with it, and taken by
``pyllama run / chat / serve`` for an ``hf:`` model; against the loopback Hub (tests/hfserver.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import pyllama
import synth
from hfserver import HFServer, fake_gguf, server, store_env  # noqa: F401 - fixtures
from pyllama import store
from pyllama.store import DownloadError, NotCachedError
from pyllama.store.refs import pick_mmproj, quant_bits
from server_fixture import RemoteServer

PARTS_BEFORE = "<|im_start|>user\n"
PARTS_AFTER = "hi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A vision repository's files (two quantisations of a real synthetic model, two real projectors) and an
    image."""
    d = tmp_path_factory.mktemp("vl")
    return {
        "vl-F16.gguf": synth.write_llama_model(d / "vl-F16.gguf", dtype="f16"),
        "vl-Q4_0.gguf": synth.write_llama_model(d / "vl-Q4_0.gguf", dtype="q4_0"),
        "mmproj-vl-F16.gguf": synth.write_projector(d / "mmproj-vl-F16.gguf", seed=11),
        "mmproj-vl-Q8_0.gguf": synth.write_projector(d / "mmproj-vl-Q8_0.gguf", seed=12),
        "png": synth.write_image(d / "a.png", seed=1),
    }


def _add_vl(server: HFServer, vl: dict[str, Path]) -> str:
    files = {name: p.read_bytes() for name, p in vl.items() if name.endswith(".gguf")}
    return server.add_repo("org/vl", {**files, "README.md": b"# vl\n"})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- llama.cpp's choice -------------------------------------------------------------------------------------
def test_pick_mmproj_follows_llama_cpp() -> None:
    """common/download.cpp find_best_sibling(files, model, "mmproj"): deepest folder on the model's path,
    then the closest quantisation in bits, then the first listed."""
    assert [quant_bits(p) for p in ("m-Q4_K_M.gguf", "m-F16.gguf", "a/m-BF16-00001-of-00002.gguf",
                                    "mmproj.gguf", "m-IQ4_XS.gguf", "m.Q8_0.gguf", "m-Q8_0.bin")] == \
        [4, 16, 16, 0, 4, 8, 0]
    flat = ["README.md", "mmproj-m-F16.gguf", "mmproj-m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-F16.gguf", "m-Q8_0.gguf"]
    assert pick_mmproj(flat, "m-F16.gguf") == "mmproj-m-F16.gguf"
    assert pick_mmproj(flat, "m-Q8_0.gguf") == "mmproj-m-Q8_0.gguf"
    assert pick_mmproj(flat, "m-Q4_K_M.gguf") == "mmproj-m-Q8_0.gguf"  # 4 bits from Q8, 12 from F16
    assert pick_mmproj(["mmproj-m-F32.gguf", "mmproj-m-F16.gguf"], "m-BF16.gguf") == "mmproj-m-F16.gguf"
    assert pick_mmproj(["mmproj-a.gguf", "mmproj-b.gguf"], "m-Q4_K_M.gguf") == "mmproj-a.gguf"  # a tie: first
    assert pick_mmproj(["README.md", "m-Q4_K_M.gguf"], "m-Q4_K_M.gguf") is None
    assert pick_mmproj(["MMPROJ-m-F16.gguf", "mmproj-m-F16.safetensors"], "m-F16.gguf") is None  # as llama.cpp
    # folders: the model's own wins over one above it; a folder beside or below the model's is not looked in
    nested = ["mmproj-top-F16.gguf", "Q4/mmproj-Q4-F16.gguf", "Q8/mmproj-Q8-Q8_0.gguf", "Q4/sub/mmproj-x.gguf"]
    assert pick_mmproj(nested, "Q4/m-Q4_K_M-00001-of-00002.gguf") == "Q4/mmproj-Q4-F16.gguf"
    assert pick_mmproj(nested, "m-Q8_0.gguf") == "mmproj-top-F16.gguf"
    assert pick_mmproj(nested, "Q5/m-Q5_K_M.gguf") == "mmproj-top-F16.gguf"
    assert pick_mmproj(["mmproj/vision-F16.gguf"], "m-F16.gguf") is None  # "mmproj" in a folder below
    assert pick_mmproj(["mmproj/vision-F16.gguf"], "mmproj/m-F16.gguf") == "mmproj/vision-F16.gguf"
    assert pick_mmproj(["mmproj/m-F16.gguf"], "mmproj/m-F16.gguf") is None  # not the model itself


# --- pull ---------------------------------------------------------------------------------------------------
def test_pull_takes_the_matching_projector(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    commit = _add_vl(server, vl)
    f16 = store.pull("hf:org/vl:F16")
    proj = store.projector_for("hf:org/vl:F16")
    assert proj == store_env / "hf" / "org" / "vl" / commit / "mmproj-vl-F16.gguf"
    assert proj.read_bytes() == vl["mmproj-vl-F16.gguf"].read_bytes()
    record = json.loads(proj.with_name(proj.name + ".pyllama.json").read_text())
    assert record["verified"] and record["sha256"] == _sha256(vl["mmproj-vl-F16.gguf"])
    assert server.served() == vl["vl-F16.gguf"].stat().st_size + vl["mmproj-vl-F16.gguf"].stat().st_size
    assert store.projector_for(f16) == proj  # by the model's path too

    q4 = store.pull("hf:org/vl:Q4_0")  # 4 bits: the Q8_0 projector is closer than the F16 one
    q4_proj = store.projector_for("hf:org/vl:Q4_0")
    assert q4_proj is not None and q4_proj.name == "mmproj-vl-Q8_0.gguf"
    assert q4_proj.read_bytes() == vl["mmproj-vl-Q8_0.gguf"].read_bytes()
    assert store.projector_for(f"hf:org/vl/vl-Q4_0.gguf@{commit}") == q4_proj

    listed = {m.path.name: m for m in store.list_models()}
    assert set(listed) == {"vl-F16.gguf", "vl-Q4_0.gguf"}  # the projectors are not models of their own
    assert listed["vl-F16.gguf"].mmproj == proj and listed["vl-Q4_0.gguf"].mmproj == q4_proj
    assert listed["vl-F16.gguf"].path == f16 and listed["vl-Q4_0.gguf"].path == q4

    served = server.served()
    assert store.pull("hf:org/vl:F16") == f16 and server.served() == served  # all cached: nothing moves
    server.stop()
    assert store.resolve("hf:org/vl:F16", offline=True) == f16
    assert store.projector_for("hf:org/vl:F16") == proj  # the cache alone answers


def test_no_mmproj_skips_and_a_later_pull_adds_it(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    _add_vl(server, vl)
    f16 = store.pull("hf:org/vl:F16", mmproj=False)
    assert server.served("mmproj-vl-F16.gguf") == 0 and server.served() == vl["vl-F16.gguf"].stat().st_size
    assert store.projector_for("hf:org/vl:F16") is None
    assert store.pull("hf:org/vl:F16") == f16  # the model is cached; only the projector moves
    assert server.served("/vl-F16.gguf") == vl["vl-F16.gguf"].stat().st_size
    assert server.served("mmproj-vl-F16.gguf") == vl["mmproj-vl-F16.gguf"].stat().st_size
    proj = store.projector_for("hf:org/vl:F16")
    assert proj is not None and proj.name == "mmproj-vl-F16.gguf"
    with pytest.raises(NotCachedError, match="pull it first"):
        store.projector_for("hf:org/vl:Q4_0")
    assert store.projector_for(vl["vl-F16.gguf"]) is None  # a file outside the cache has no store projector


def test_a_repository_without_projector(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    server.add_repo("org/text", {"text-Q4_0.gguf": vl["vl-Q4_0.gguf"].read_bytes()})
    path = store.pull("hf:org/text:Q4_0")
    assert store.projector_for("hf:org/text:Q4_0") is None and store.projector_for(path) is None
    (entry,) = store.list_models()
    assert entry.mmproj is None
    # a projector pulled by its own name is a file of the cache, listed as such, with no projector of its own
    _add_vl(server, vl)
    alone = store.pull("hf:org/vl/mmproj-vl-F16.gguf")
    assert store.projector_for(alone) is None
    assert {m.path.name for m in store.list_models()} == {"text-Q4_0.gguf", "mmproj-vl-F16.gguf"}


def test_projector_download_resumes(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    """The projector goes through the model's download code: a dropped connection leaves a partial that the
    next pull continues with a Range request."""
    _add_vl(server, vl)
    data = vl["mmproj-vl-F16.gguf"].read_bytes()
    cut = len(data) // 3
    f16 = store.pull("hf:org/vl:F16", mmproj=False)
    server.drop_after, server.drops = cut, 1
    with pytest.raises(DownloadError, match="kept for a later resume"):
        store.pull("hf:org/vl:F16", retries=0)
    (part,) = store_env.rglob("*.part")
    assert part.name == "mmproj-vl-F16.gguf.part" and part.stat().st_size == cut
    (pending,) = store.list_partial()
    assert (pending.path.name, pending.done, pending.size) == ("mmproj-vl-F16.gguf", cut, len(data))
    assert store.projector_for("hf:org/vl:F16") is None  # not recorded before it is whole
    assert store.resolve("hf:org/vl:F16") == f16  # the model itself stays cached

    assert store.pull("hf:org/vl:F16") == f16
    proj = store.projector_for("hf:org/vl:F16")
    assert proj is not None and proj.read_bytes() == data
    assert server.range_requests("mmproj-vl-F16.gguf") == [None, f"bytes={cut}-"]
    assert server.served("mmproj-vl-F16.gguf") == len(data)  # only the rest moved
    assert not list(store_env.rglob("*.part"))


def test_projector_checksum_is_checked(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    _add_vl(server, vl)
    store.pull("hf:org/vl:F16", mmproj=False)
    server.corrupt_offset = 1000  # the API publishes the real file's sha256
    with pytest.raises(store.ChecksumError, match="mmproj-vl-F16.gguf: sha256 mismatch"):
        store.pull("hf:org/vl:F16")
    assert store.projector_for("hf:org/vl:F16") is None
    assert not [p for p in store_env.rglob("mmproj-vl-F16.gguf*") if not p.name.endswith(".lock")]


def test_remove_takes_the_projector_with_its_last_model(server: HFServer, store_env: Path) -> None:
    server.add_repo("org/two", {"two-Q4_K_M.gguf": fake_gguf(3000, seed=1), "two-Q8_0.gguf": fake_gguf(4000, seed=2),
                                "mmproj-two-F16.gguf": fake_gguf(2000, seed=3)})
    store.pull("hf:org/two:Q4_K_M")
    store.pull("hf:org/two:Q8_0")
    proj = store.projector_for("hf:org/two:Q8_0")
    assert proj is not None and store.projector_for("hf:org/two:Q4_K_M") == proj  # one projector for both
    assert [m.path.name for m in store.remove("hf:org/two:Q4_K_M")] == ["two-Q4_K_M.gguf"]
    assert proj.is_file()  # Q8_0 still uses it
    assert [m.path.name for m in store.remove("hf:org/two:Q8_0")] == ["two-Q8_0.gguf", "mmproj-two-F16.gguf"]
    assert not proj.exists() and not list(store_env.rglob("*.gguf*"))
    # a model's projector alone, by its path
    store.pull("hf:org/two:Q8_0")
    proj = store.projector_for("hf:org/two:Q8_0")
    assert proj is not None
    assert [m.path for m in store.remove(str(proj))] == [proj]
    assert store.projector_for("hf:org/two:Q8_0") is None and store.resolve("hf:org/two:Q8_0", offline=True)


# --- loading ------------------------------------------------------------------------------------------------
def test_model_loads_with_the_store_projector(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    _add_vl(server, vl)
    ref = "hf:org/vl:F16"
    store.pull(ref)
    with pyllama.Model(ref, mmproj=pyllama.store.projector_for(ref), n_gpu_layers=0) as model:
        assert model.path.is_relative_to(store_env) and model.mmproj is not None
        prompt = model.mmproj.tokenize([PARTS_BEFORE, pyllama.Image(vl["png"]), PARTS_AFTER])
        assert [s.kind for s in prompt.spans if s.kind != "text"] == ["image"]
        assert prompt.n_media_tokens == 16  # (32 / 8) ** 2 patches, no markers
    # mmproj="auto": the store's projector, as llama.cpp's -hf loads it; a plain Model(ref) loads none
    with pyllama.Model(ref, mmproj="auto", n_gpu_layers=0) as model:
        assert model.mmproj is not None and model.mmproj.path == pyllama.store.projector_for(ref)
    with pyllama.Model(ref, n_gpu_layers=0) as model:
        assert model.mmproj is None


# --- the command line ---------------------------------------------------------------------------------------
def test_pull_ls_rm_on_the_command_line(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    _add_vl(server, vl)
    out = _cli("pull", "--no-mmproj", "hf:org/vl:F16")
    assert out.returncode == 0, out.stderr
    assert server.served("mmproj-vl-F16.gguf") == 0 and "multimodal projector" not in out.stderr
    assert "mmproj" not in _cli("ls").stdout
    out = _cli("pull", "hf:org/vl:F16")
    assert out.returncode == 0, out.stderr
    proj = store.projector_for("hf:org/vl:F16")
    assert proj is not None and f"multimodal projector: {proj}" in out.stderr
    assert out.stdout.strip() == str(store.resolve("hf:org/vl:F16"))

    lines = _cli("ls").stdout.splitlines()
    (i,) = [n for n, ln in enumerate(lines) if "vl-F16.gguf" in ln and "mmproj" not in ln]
    assert lines[i + 1].split()[:3] == ["+", "mmproj", "mmproj-vl-F16.gguf"]
    assert len([ln for ln in lines if "mmproj" in ln]) == 1
    (row,) = json.loads(_cli("ls", "--json").stdout)
    assert row["mmproj"] == str(proj)

    gone = _cli("rm", "hf:org/vl:F16")
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.count("removed ") == 2 and "mmproj-vl-F16.gguf" in gone.stdout
    assert not proj.exists() and json.loads(_cli("ls", "--json").stdout) == []


def test_flags_keep_the_order_given() -> None:
    from pyllama.cli import build_parser

    for command in ("serve", "run", "chat"):
        base = [command, "m.gguf", "-p", "hi"] if command == "run" else [command, "m.gguf"]
        a = build_parser().parse_args(base)
        assert (a.mmproj, a.no_mmproj) == (None, False)
        a = build_parser().parse_args([*base, "--mmproj", "p.gguf", "--no-mmproj"])
        assert (a.mmproj, a.no_mmproj) == (None, True)
        a = build_parser().parse_args([*base, "--no-mmproj", "--mmproj", "p.gguf"])
        assert (a.mmproj, a.no_mmproj) == ("p.gguf", True)


def test_run_and_chat_take_the_store_projector(server: HFServer, store_env: Path, vl: dict[str, Path]) -> None:
    _add_vl(server, vl)
    gen = ["-n", "6", "--temp", "0", "-t", "1", "-c", "512"]
    local = _cli("run", str(vl["vl-F16.gguf"]), "--mmproj", str(vl["mmproj-vl-F16.gguf"]), "--image", str(vl["png"]),
                 "-p", "hi", "--chat", *gen)
    assert local.returncode == 0, local.stderr[-2000:]
    by_ref = _cli("--log-level", "INFO", "run", "hf:org/vl:F16", "--image", str(vl["png"]), "-p", "hi", "--chat", *gen)
    assert by_ref.returncode == 0, by_ref.stderr[-2000:]
    assert by_ref.stdout == local.stdout and local.stdout.strip()
    proj = store.projector_for("hf:org/vl:F16")
    assert f"multimodal projector {proj}, pulled with hf:org/vl:F16" in by_ref.stderr
    refused = _cli("run", "hf:org/vl:F16", "--no-mmproj", "--image", str(vl["png"]), "-p", "hi", *gen)
    assert refused.returncode != 0 and "need the model's projector" in refused.stderr

    chat = ["-p", "hi", "-n", "6", "--temp", "0", "-t", "1", "-c", "512", "--image", str(vl["png"])]
    local = _cli("chat", str(vl["vl-F16.gguf"]), "--mmproj", str(vl["mmproj-vl-F16.gguf"]), *chat)
    assert local.returncode == 0, local.stderr[-2000:]
    by_ref = _cli("chat", "hf:org/vl:F16", *chat)
    assert by_ref.returncode == 0, by_ref.stderr[-2000:]
    assert by_ref.stdout == local.stdout and local.stdout.strip()
    without = _cli("chat", "hf:org/vl:F16", "--no-mmproj", *chat)
    assert without.returncode == 1 and "the model has no projector" in without.stderr


@pytest.mark.parametrize("flags", [(), ("--isolate",), ("--no-mmproj",)], ids=["local", "isolate", "no-mmproj"])
def test_serve_takes_the_store_projector(server: HFServer, store_env: Path, vl: dict[str, Path],
                                         flags: tuple[str, ...]) -> None:
    _add_vl(server, vl)
    with RemoteServer("hf:org/vl:Q4_0", "-c", "256", "-np", "1", *flags) as srv:
        props: dict[str, Any] = httpx.get(srv.url_for("props"), timeout=30).json()
        log = srv.log_tail(20_000)
    proj = store.projector_for("hf:org/vl:Q4_0")
    assert proj is not None and proj.name == "mmproj-vl-Q8_0.gguf"  # pulled with the model either way
    taken = "--no-mmproj" not in flags
    assert props["modalities"]["vision"] is taken
    assert (f"multimodal projector {proj}, pulled with hf:org/vl:Q4_0" in log) is taken
