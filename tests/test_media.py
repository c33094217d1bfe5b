"""Images and audio through llama.cpp's libmtmd, proven against llama-mtmd-cli on synthetic files.

No real vision or audio model can be downloaded here, so the plumbing is proven on tests/synth.py's
projector (LLaVA's "mlp" tower over a tiny CLIP ViT, Qwen2-Audio's "qwen2a" whisper encoder) beside the
synthetic text model: greedy text for an image prompt through ``generate``, ``ChatSession``, the engine,
``pyllama serve`` (in process and ``--isolate``) is llama-mtmd-cli's, built from the vendored tree, on the
same files, image and prompt; different images give different text. Bad media and bad projectors are
clear errors.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import bench_scripts
import pyllama
import synth
from pyllama.errors import ModelLoadError
from server_fixture import RemoteServer

N = 12
ASK = "describe"
# what llama-mtmd-cli renders for `-p describe` with one image: the marker first, then the prompt, in ChatML
PARTS_BEFORE = "<|im_start|>user\n"
PARTS_AFTER = f"{ASK}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(5)
    array = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    (d / "array.png").write_bytes(synth.png_bytes(array))
    np.save(d / "array.npy", array)
    return {
        "text": synth.write_llama_model(d / "text.gguf"),
        "proj": synth.write_projector(d / "proj.gguf"),
        "av": synth.write_projector(d / "av.gguf", audio=True),
        "a": synth.write_image(d / "a.png", seed=1),
        "b": synth.write_image(d / "b.png", seed=2),
        "array": d / "array.png",
        "array_npy": d / "array.npy",
        "wav": synth.write_audio(d / "clip.wav", seconds=2.0, seed=3),
        "dir": d,
    }


def mtmd_cli(*args: str | Path) -> str:
    """llama-mtmd-cli's generated text. Its log thread is never joined (common/log.cpp), so a fast run may
    exit before its output is printed: the run is repeated until the log shows the whole run."""
    native = bench_scripts.load("native")
    cmd = [str(native.native_tool("llama-mtmd-cli")), "-lv", "4", *map(str, args)]
    out = native.run_logged(cmd, lambda o: "llama_perf_context_print" in o.stderr and "total time" in o.stderr,
                            tries=15, timeout=120)
    return str(out.stdout.strip("\n"))


def native_text(files: dict[str, Path], image: str, *, proj: str = "proj", n: int = N) -> str:
    flag = "--audio" if image == "wav" else "--image"
    return mtmd_cli("-m", files["text"], "--mmproj", files[proj], flag, files[image], "-p", ASK, "-n", str(n),
                    "--temp", "0", "--seed", "42", "-c", "2048", "-t", "2")


def image_of(files: dict[str, Path], name: str) -> pyllama.Media:
    if name == "array":  # the pixels themselves, as an application holds them
        return pyllama.Image(np.load(files["array_npy"]))
    if name == "wav":
        return pyllama.Audio(files["wav"])
    return pyllama.Image(files[name])


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> dict[str, str]:
    """llama-mtmd-cli's greedy text per image."""
    return {name: native_text(files, name) for name in ("a", "b", "array")}


@pytest.mark.timeout(1800)  # the first use of the native tools builds them (bench/native.py)
def test_generate_matches_llama_mtmd_cli(files: dict[str, Path], reference: dict[str, str]) -> None:
    assert len(set(reference.values())) == 3  # three images, three answers: the image reaches the text model
    with pyllama.Model(files["text"], n_gpu_layers=0, mmproj=files["proj"]) as m:
        proj = m.mmproj
        assert proj is not None and proj.modalities == ("image",) and not proj.audio
        with m.context(n_ctx=512) as ctx:
            for name, want in reference.items():
                mp = proj.tokenize([PARTS_BEFORE, image_of(files, name), PARTS_AFTER])
                assert [s.n_tokens for s in mp.spans] == [16] and mp.n_media_tokens == 16  # (32 / 8) ** 2 patches
                with pyllama.generate(ctx, mp, max_tokens=N) as gen:
                    text = "".join(ev.text for ev in gen)
                assert text == want, name
                assert mp.encode_ms > 0
                # the same as a list of parts, tokenized with the model's projector by generate itself
                with pyllama.generate(ctx, [PARTS_BEFORE, image_of(files, name), PARTS_AFTER], max_tokens=N,
                                      reuse_prefix=False) as gen:
                    assert "".join(ev.text for ev in gen) == want


def test_chat_session_keeps_the_image_in_the_cache(files: dict[str, Path], reference: dict[str, str]) -> None:
    with pyllama.Model(files["text"], n_gpu_layers=0, mmproj=files["proj"]) as m, m.context(n_ctx=512) as ctx:
        chat = pyllama.ChatSession(ctx)
        assert chat.ask([pyllama.Image(files["a"]), ASK], max_tokens=N) == reference["a"]
        assert m.mmproj is not None and m.mmproj.n_encoded == 1
        second = chat.ask("and then?", max_tokens=4)
        assert second and m.mmproj.n_encoded == 1  # the image stayed in the KV cache: not encoded again
        # OpenAI-style content parts, a data: URL
        b64 = base64.b64encode(files["b"].read_bytes()).decode()
        chat2 = pyllama.ChatSession(ctx)
        got = chat2.ask([{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                         {"type": "text", "text": ASK}], max_tokens=N)
        assert got == reference["b"]


def test_engine_matches_and_batches_text_beside_media(files: dict[str, Path], reference: dict[str, str]) -> None:
    with pyllama.Model(files["text"], n_gpu_layers=0, mmproj=files["proj"]) as m, \
            pyllama.Engine(m, n_slots=3, n_ctx=256) as eng:
        assert eng.modalities == ("image",)
        reqs = {name: eng.submit([PARTS_BEFORE, image_of(files, name), PARTS_AFTER], max_tokens=N)
                for name in reference}
        text = eng.submit("the quick brown fox", max_tokens=N)
        for name, r in reqs.items():
            assert r.result() == reference[name], name
        assert len(text.result()) > 0
        with pytest.raises(pyllama.MediaError, match="takes no audio"):
            eng.submit([PARTS_BEFORE, pyllama.Audio(files["wav"]), PARTS_AFTER])
        with pytest.raises(ValueError, match="must not end with an image"):
            eng.submit([PARTS_BEFORE, pyllama.Image(files["a"])])


@pytest.fixture(scope="module")
def heavy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A projector whose tower takes long enough to see (224-pixel images, 256 patches, 6 blocks of width
    256) and an image for it."""
    d = tmp_path_factory.mktemp("heavy")
    return (synth.write_projector(d / "big.gguf", image_size=224, patch_size=14, n_embd=256, n_ff=1024, n_layer=6),
            synth.write_image(d / "big.png", width=224, height=224, seed=4))


def test_media_prefill_does_not_stall_a_text_stream(heavy: tuple[Path, Path], files: dict[str, Path]) -> None:
    """A text stream's longest gap between tokens while another slot's image is encoded stays below the
    encode itself: the tower runs beside the steps."""
    proj, img = heavy
    with pyllama.Model(files["text"], n_gpu_layers=0) as m:
        m.projector(proj, n_threads=1)
        with pyllama.Engine(m, n_slots=2, n_ctx=4096, n_threads=1) as eng:
            stream = eng.submit("the quick brown fox", max_tokens=4000, ignore_eos=True)
            stamps: list[float] = []
            it = iter(stream)
            for _ in range(5):  # the stream is under way
                next(it)
            media = eng.submit([PARTS_BEFORE, pyllama.Image(img), PARTS_AFTER], max_tokens=2)
            after = 0
            for _ in it:  # until a few tokens after the image request ended
                stamps.append(time.perf_counter())
                after += media.finish_reason is not None
                if after >= 5:
                    break
            stream.cancel()
            assert after >= 5, "the text stream ended before the image request"
            assert media.error is None and media.result() is not None
            assert media.media is not None
            encode_ms = media.media.encode_ms
    gaps = np.diff(stamps) * 1e3
    print(f"encode {encode_ms:.1f} ms; text gaps: median {np.median(gaps):.2f} ms, max {gaps.max():.2f} ms")
    assert encode_ms > 50 * np.median(gaps)  # the tower is heavy enough to see a stall
    assert gaps.max() < encode_ms / 2


@pytest.mark.timeout(600)
def test_audio_matches_llama_mtmd_cli(files: dict[str, Path]) -> None:
    want = native_text(files, "wav", proj="av", n=8)
    with pyllama.Model(files["text"], n_gpu_layers=0, mmproj=files["av"]) as m, m.context(n_ctx=2048) as ctx:
        assert m.mmproj is not None and m.mmproj.modalities == ("image", "audio")
        assert m.mmproj.audio_sample_rate == 16000
        with pyllama.generate(ctx, [PARTS_BEFORE, pyllama.Audio(files["wav"]), PARTS_AFTER], max_tokens=8) as gen:
            assert "".join(ev.text for ev in gen) == want
        # samples in memory: the same clip, decoded to 16 kHz floats
        import wave

        with wave.open(str(files["wav"])) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        mp = m.mmproj.tokenize([PARTS_BEFORE, pyllama.Audio(pcm), PARTS_AFTER])
        assert mp.spans[0].kind == "audio" and mp.n_media_tokens > 0


# --- bad media and bad projectors ---------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


@pytest.mark.parametrize("case", ["truncated", "huge", "unsupported", "empty", "not_an_image", "bad_array"])
def test_bad_media_are_clear_errors(files: dict[str, Path], case: str) -> None:
    good = files["a"].read_bytes()
    with pyllama.Model(files["text"], n_gpu_layers=0, mmproj=files["proj"]) as m:
        proj = m.mmproj
        assert proj is not None
        with pytest.raises((pyllama.MediaError, TypeError)) as info:
            if case == "truncated":
                proj.tokenize([PARTS_BEFORE, pyllama.Image(good[: len(good) // 2]), PARTS_AFTER])
            elif case == "huge":  # a 50,000 x 50,000 header: refused before a byte of pixels is allocated
                proj.tokenize([PARTS_BEFORE, pyllama.Image(_png_header(50_000, 50_000)), PARTS_AFTER])
            elif case == "unsupported":
                proj.tokenize([PARTS_BEFORE, pyllama.Image(b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(32)), PARTS_AFTER])
            elif case == "empty":
                pyllama.Image(b"")
            elif case == "not_an_image":
                proj.tokenize([PARTS_BEFORE, pyllama.Image(files["wav"]), PARTS_AFTER])
            else:
                pyllama.Image(np.zeros((4, 4), dtype=np.float32))
        assert str(info.value)
        # the projector still works
        mp = proj.tokenize([PARTS_BEFORE, pyllama.Image(good), PARTS_AFTER])
        assert mp.n_media_tokens == 16


def test_media_size_bound(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pyllama.media

    monkeypatch.setattr(pyllama.media, "MAX_MEDIA_BYTES", 16)
    with pytest.raises(pyllama.MediaError, match="bytes"):
        pyllama.Image(bytes(17))
    (tmp_path / "big.png").write_bytes(bytes(17))
    with pytest.raises(pyllama.MediaError, match="bytes"):
        pyllama.Image(tmp_path / "big.png").data()
    assert pyllama.Image(bytes(16)).source == bytes(16)


def test_audio_to_a_vision_projector_and_mismatched_projectors(files: dict[str, Path], tmp_path: Path) -> None:
    with pyllama.Model(files["text"], n_gpu_layers=0) as m:
        with pytest.raises(pyllama.MediaError, match="takes no audio"):
            m.projector(files["proj"]).tokenize([PARTS_BEFORE, pyllama.Audio(files["wav"]), PARTS_AFTER])
        narrow = synth.write_projector(tmp_path / "narrow.gguf", n_embd_text=32)
        with pytest.raises(ModelLoadError, match="width"):
            m.projector(narrow)
        with pytest.raises(ModelLoadError, match="not a multimodal projector"):
            m.projector(files["text"])
        with pytest.raises(ModelLoadError, match="not found"):
            m.projector(tmp_path / "missing.gguf")
    with pyllama.Model(files["text"], n_gpu_layers=0) as m, m.context(n_ctx=128) as ctx:
        with pytest.raises(pyllama.MediaError, match="no projector"):
            pyllama.generate(ctx, [PARTS_BEFORE, pyllama.Image(files["a"]), PARTS_AFTER])


def test_lifetimes(files: dict[str, Path]) -> None:
    m = pyllama.Model(files["text"], n_gpu_layers=0, mmproj=files["proj"])
    proj = m.mmproj
    assert proj is not None
    mp = proj.tokenize([PARTS_BEFORE, pyllama.Image(files["a"]), PARTS_AFTER])
    m.close()  # closes its projector first
    assert proj.closed
    with pytest.raises(pyllama.ClosedError):
        proj.tokenize(["x"])
    with pytest.raises(pyllama.ClosedError):
        mp.encode()
    mp.close()
    mp.close()


# --- the server -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["in-process", "isolate"])
def srv(request: pytest.FixtureRequest, files: dict[str, Path]) -> Iterator[RemoteServer]:
    extra = ["--isolate"] if request.param == "isolate" else []
    with RemoteServer(files["text"], "--mmproj", str(files["proj"]), "--media-path", str(files["dir"]), "-np", "2",
                      "-c", "1024", *extra) as s:
        yield s


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_server_image_url_matches_llama_mtmd_cli(srv: RemoteServer, files: dict[str, Path],
                                                 reference: dict[str, str]) -> None:
    import openai

    client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="none")
    for name, want in reference.items():
        r = client.chat.completions.create(model="m", max_tokens=N, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(files[name])}}, {"type": "text", "text": ASK}]}])
        assert r.choices[0].message.content == want, name
        assert r.usage is not None and r.usage.prompt_tokens == 39  # 23 text tokens and 16 for the image
    # a file under --media-path, by name
    r = client.chat.completions.create(model="m", max_tokens=N, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file://a.png"}}, {"type": "text", "text": ASK}]}])
    assert r.choices[0].message.content == reference["a"]
    props = httpx.get(srv.url_for("props"), timeout=30).json()
    assert props["modalities"] == {"vision": True, "video": False, "audio": False}


def test_server_other_apis_take_images(srv: RemoteServer, files: dict[str, Path], reference: dict[str, str]) -> None:
    import anthropic
    import ollama

    b64 = base64.b64encode(files["b"].read_bytes()).decode()
    msg = anthropic.Anthropic(base_url=srv.url, api_key="none").messages.create(
        model="m", max_tokens=N, extra_body={"temperature": 0}, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
            {"type": "text", "text": ASK}]}])
    assert msg.content[0].text == reference["b"]  # type: ignore[union-attr]
    out = ollama.Client(host=srv.url).chat(model="m", options={"temperature": 0, "num_predict": N},
                                           messages=[{"role": "user", "content": ASK, "images": [b64]}])
    assert out.message.content == reference["b"]
    show = ollama.Client(host=srv.url).show("text.gguf")
    assert "vision" in (show.capabilities or [])


@pytest.mark.parametrize("content, status", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "x"}], 400),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, {"type": "text", "text": "x"}], 400),
    ([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,AAAA"}}, {"type": "text", "text": "x"}], 400),
    ([{"type": "image_url", "image_url": {"url": "file://../text.gguf"}}, {"type": "text", "text": "x"}], 400),
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "x"}], 400),
    ([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}, {"type": "text", "text": "x"}], 400),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, {"type": "text", "text": "x"}], 400),
    ([{"type": "image_url"}], 400),
    ([{"type": "video_url", "video_url": {"url": "x"}}], 400),
])
def test_server_bad_media_are_400(srv: RemoteServer, files: dict[str, Path], content: list[object],
                                  status: int) -> None:
    r = httpx.post(srv.url_for("v1", "chat", "completions"), json={"messages": [{"role": "user", "content": content}]},
                   timeout=60)
    assert r.status_code == status, r.text
    assert str(files["dir"]) not in r.text  # the client learns nothing of the server's directories
    # and the server goes on answering
    assert httpx.get(srv.url_for("health"), timeout=30).status_code == 200


def test_serve_without_projector_refuses_images(files: dict[str, Path]) -> None:
    with RemoteServer(files["text"], "-np", "1", "-c", "256") as s:
        r = httpx.post(s.url_for("v1", "chat", "completions"), timeout=60, json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(files["a"])}}, {"type": "text", "text": ASK}]}]})
        assert r.status_code == 400 and "mmproj" in r.json()["error"]["message"]
        assert httpx.get(s.url_for("props"), timeout=30).json()["modalities"]["vision"] is False


def test_cli_run_with_an_image(files: dict[str, Path], reference: dict[str, str]) -> None:
    out = subprocess.run([sys.executable, "-m", "pyllama", "run", str(files["text"]), "--mmproj", str(files["proj"]),
                          "--image", str(files["a"]), "-p", ASK, "-n", str(N), "--temp", "0", "--chat"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert reference["a"] in out.stdout


def test_worker_matches_llama_mtmd_cli(files: dict[str, Path], reference: dict[str, str]) -> None:
    with pyllama.Worker() as w:
        w.load(files["text"], n_gpu_layers=0, n_ctx=512, mmproj=files["proj"])
        for name, want in reference.items():
            gen = w.generate([PARTS_BEFORE, image_of(files, name), PARTS_AFTER], max_tokens=N)
            assert "".join(ev.text for ev in gen) == want, name
        chat = w.chat(max_tokens=N)
        assert chat.ask([pyllama.Image(files["a"]), ASK]) == reference["a"]


def test_engine_cancel_during_encode_and_shared_prompts(heavy: tuple[Path, Path], files: dict[str, Path]) -> None:
    """A request cancelled while its image is encoded frees its slot without waiting for the tower; one prepared
    media prompt serves several requests (n choices) and is freed when the last ends."""
    proj, img = heavy
    with pyllama.Model(files["text"], n_gpu_layers=0) as m:
        m.projector(proj, n_threads=1)
        with pyllama.Engine(m, n_slots=2, n_ctx=512, n_threads=1) as eng:
            doomed = eng.submit([PARTS_BEFORE, pyllama.Image(img), PARTS_AFTER], max_tokens=4)
            deadline = time.monotonic() + 30
            while eng.stats().busy_slots == 0 and time.monotonic() < deadline:  # admitted: encoding
                time.sleep(0.001)
            t0 = time.perf_counter()
            doomed.cancel()
            text = eng.submit("the quick brown fox", max_tokens=4)
            assert text.result() and doomed.finish_reason == "cancelled"
            print(f"a text request after the cancel: {(time.perf_counter() - t0) * 1e3:.1f} ms")
            mp = eng.media_prompt([PARTS_BEFORE, pyllama.Image(img), PARTS_AFTER])
            two = [eng.submit(mp, max_tokens=3) for _ in range(2)]
            outs = [r.result() for r in two]
            assert outs[0] == outs[1]
            deadline = time.monotonic() + 30
            while not mp.closed and time.monotonic() < deadline:  # freed by the last request (maybe a moment later)
                time.sleep(0.01)
            assert mp.closed


@pytest.mark.timeout(600)
def test_server_input_audio_matches_llama_mtmd_cli(files: dict[str, Path]) -> None:
    want = native_text(files, "wav", proj="av", n=8)
    with RemoteServer(files["text"], "--mmproj", str(files["av"]), "-np", "1", "-c", "2048") as s:
        assert httpx.get(s.url_for("props"), timeout=30).json()["modalities"]["audio"] is True
        b64 = base64.b64encode(files["wav"].read_bytes()).decode()
        r = httpx.post(s.url_for("v1", "chat", "completions"), timeout=300, json={
            "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                {"type": "text", "text": ASK}]}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want


def test_server_completion_multimodal_data(srv: RemoteServer, files: dict[str, Path], reference: dict[str, str]) -> None:
    """llama-server's /completion form: each of /props' media_marker in prompt_string stands for the next of
    multimodal_data (base64 files); the marker is random per server, so no text holds it by accident."""
    marker = httpx.get(srv.url_for("props"), timeout=30).json()["media_marker"]
    assert marker.startswith("<__media_") and marker != "<__media__>"
    b64 = base64.b64encode(files["a"].read_bytes()).decode()
    prompt = {"prompt_string": f"{PARTS_BEFORE}{marker}{PARTS_AFTER}", "multimodal_data": [b64]}
    r = httpx.post(srv.url_for("completion"), json={"prompt": prompt, "n_predict": N, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["content"] == reference["a"]
    for bad in ({"prompt_string": "no marker", "multimodal_data": [b64]},
                {"prompt_string": marker, "multimodal_data": ["@@"]},
                {"prompt_string": marker, "multimodal_data": "x"}):
        r = httpx.post(srv.url_for("completion"), json={"prompt": bad, "n_predict": 2}, timeout=60)
        assert r.status_code == 400, r.text
    r = httpx.post(srv.url_for("embeddings"), json={"input": prompt}, timeout=60)
    assert r.status_code in (400, 501), r.text
