"""``POST /slots/{id}?action=save|restore|erase`` and ``--slot-save-path`` as llama-server has them, in process
and with ``--isolate``: a saved slot restored into another one is reused by the next prompt; a file name never
leads out of the directory (``..``, absolute paths, separators, symlinks out: 400, nothing read or written
outside), and errors do not show where the directory is. A real `pyllama serve` on the synthetic model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_fixture import RemoteServer

PROMPT = "the quick brown fox jumps over the lazy dog " * 3


@pytest.fixture(scope="module", params=["in-process", "isolate"])
def srv(request: pytest.FixtureRequest, synth_model_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, Path]]:
    folder = tmp_path_factory.mktemp("slots")
    extra = ["--isolate"] if request.param == "isolate" else []
    with RemoteServer(synth_model_path, "-np", "2", "-c", "1024", "--slot-save-path", str(folder), *extra) as s:
        yield s, folder


def _complete(s: RemoteServer, prompt: str, slot: int, n: int = 8) -> dict:
    r = httpx.post(s.url_for("completion"), json={"prompt": prompt, "id_slot": slot, "n_predict": n,
                                                  "temperature": 0, "cache_prompt": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _action(s: RemoteServer, slot: int | str, action: str, filename: object = None) -> httpx.Response:
    body = None if filename is None else {"filename": filename}
    return httpx.post(s.url_for("slots", str(slot)), params={"action": action}, json=body, timeout=60)


def test_save_restore_erase(srv: tuple[RemoteServer, Path]) -> None:
    s, folder = srv
    first = _complete(s, PROMPT, slot=1)
    assert first["id_slot"] == 1
    r = _action(s, 1, "save", "one.bin")
    assert r.status_code == 200, r.text
    saved = r.json()
    assert saved["id_slot"] == 1 and saved["filename"] == "one.bin"
    assert saved["n_saved"] == first["timings"]["prompt_n"] + first["tokens_predicted"] - 1
    assert saved["n_written"] == (folder / "one.bin").stat().st_size and "save_ms" in saved["timings"]

    r = _action(s, 0, "restore", "one.bin")
    assert r.status_code == 200, r.text
    restored = r.json()
    assert restored["n_restored"] == saved["n_saved"] and restored["n_read"] == saved["n_written"]
    again = _complete(s, PROMPT + "and then", slot=0)
    assert again["id_slot"] == 0
    assert again["timings"]["cache_n"] >= first["timings"]["prompt_n"] - 1  # the restored prompt is reused
    alone = _complete(s, PROMPT + "and then", slot=1)  # slot 1 holds the same prompt: same answer
    assert again["content"] == alone["content"]

    r = _action(s, 0, "erase")
    assert r.status_code == 200 and r.json() == {"id_slot": 0, "n_erased": again["timings"]["prompt_n"] +
                                                 again["timings"]["cache_n"] + again["tokens_predicted"] - 1}
    assert _complete(s, PROMPT + "and then", slot=0)["timings"]["cache_n"] == 0


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/one.bin", "..", ".", "", "a:b", "x" * 300,
                                  "trailing.", " lead", "nul\x00.bin", 7, None])
def test_file_names_stay_inside(srv: tuple[RemoteServer, Path], name: object) -> None:
    s, folder = srv
    before = sorted(os.listdir(folder.parent))
    for action in ("save", "restore"):
        r = httpx.post(s.url_for("slots", "0"), params={"action": action}, json={"filename": name}, timeout=30)
        assert r.status_code == 400, (name, r.text)
        assert str(folder) not in r.text
    assert sorted(os.listdir(folder.parent)) == before


def test_symlinks_out_are_refused(srv: tuple[RemoteServer, Path], tmp_path: Path) -> None:
    s, folder = srv
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"do not read me")
    link = folder / "link.bin"
    link.symlink_to(secret)
    (folder / "dir").symlink_to(tmp_path, target_is_directory=True)
    try:
        for action in ("save", "restore"):
            r = _action(s, 0, action, "link.bin")
            assert r.status_code == 400 and "leads out" in r.json()["error"]["message"], r.text
            assert str(tmp_path) not in r.text and str(folder) not in r.text
        assert secret.read_bytes() == b"do not read me"
        assert not (tmp_path / "secret.bin.tmp").exists()
    finally:
        link.unlink()
        (folder / "dir").unlink()


def test_bad_requests(srv: tuple[RemoteServer, Path]) -> None:
    s, folder = srv
    assert _action(s, 0, "restore", "missing.bin").status_code == 400
    (folder / "junk.bin").write_bytes(b"junk" * 100)
    r = _action(s, 0, "restore", "junk.bin")
    assert r.status_code == 400 and str(folder) not in r.text, r.text
    assert _action(s, 2, "save", "x.bin").status_code == 400  # two slots: 0 and 1
    assert _action(s, "one", "save", "x.bin").status_code == 400
    assert _action(s, 0, "rename", "x.bin").status_code == 400
    assert httpx.post(s.url_for("slots", "0"), params={"action": "save"}, content=b"{", timeout=30).status_code == 400
    assert httpx.get(s.url_for("health"), timeout=10).status_code == 200


def test_without_a_save_path_actions_are_501(synth_model_path: Path) -> None:
    with RemoteServer(synth_model_path, "-np", "1") as s:
        r = _action(s, 0, "save", "x.bin")
        assert r.status_code == 501 and "--slot-save-path" in r.json()["error"]["message"]
