"""A slot's cache: requests pinned to a slot, saved to a file and restored into another slot (where a prompt
that starts with the restored history reuses it and answers as a fresh run), erased; an action on a busy
slot waits for it; llama-server's slot files (its packed token list) restore too."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama
from pyllama._ffi import ffi, lib
from pyllama.engine import Engine

BASE = [1] + list(range(5, 45))


def _fresh(model: Any, prompt: list[int], n: int) -> list[int]:
    with Engine(model, n_slots=1, n_ctx=128, n_threads=1) as engine:
        req = engine.submit(prompt, max_tokens=n, ignore_eos=True)
        req.result()
        return req.tokens.tolist()


def test_save_restore_erase(model: Any, tmp_path: Path) -> None:
    with Engine(model, n_slots=2, n_ctx=128, n_threads=1) as engine:
        a = engine.submit(BASE, max_tokens=4, ignore_eos=True, slot=1)
        a.result()
        assert a.slot_id == 1
        saved = engine.save_slot(1, tmp_path / "s1.bin")
        # the prompt and the generated tokens but the last (sampled, never decoded)
        assert saved.n_tokens == len(BASE) + 3 and saved.slot == 1
        assert saved.n_bytes == (tmp_path / "s1.bin").stat().st_size > 0

        restored = engine.restore_slot(0, tmp_path / "s1.bin")
        assert restored.n_tokens == saved.n_tokens and restored.n_bytes == saved.n_bytes
        b = engine.submit(BASE + [50, 51], max_tokens=4, ignore_eos=True, slot=0)
        b.result()
        assert b.slot_id == 0 and b.n_cached == len(BASE)  # the restored history is reused
        assert b.tokens.tolist() == _fresh(model, BASE + [50, 51], 4)

        assert engine.erase_slot(0) == len(BASE) + 2 + 3
        c = engine.submit(BASE + [50, 51], max_tokens=4, ignore_eos=True, slot=0)
        c.result()
        assert c.n_cached == 0  # nothing left to reuse
        assert c.tokens.tolist() == b.tokens.tolist()


def test_pinned_requests_wait_for_their_slot(model: Any) -> None:
    with Engine(model, n_slots=2, n_ctx=128, n_threads=1) as engine:
        first = engine.submit(BASE, max_tokens=40, ignore_eos=True, slot=0)
        second = engine.submit([1, 7, 8, 9], max_tokens=2, ignore_eos=True, slot=0)
        free = engine.submit([1, 3, 4], max_tokens=2, ignore_eos=True)
        free.result()
        assert free.slot_id == 1  # the other slot serves at once
        second.result()
        assert first.done and second.slot_id == 0
        assert second.t_start is not None and first.t_done is not None and second.t_start >= first.t_done
        for bad in (2, -1, True, "0"):
            with pytest.raises(ValueError, match="slot must be"):
                engine.submit(BASE, max_tokens=1, slot=bad)  # type: ignore[arg-type]


def test_an_action_on_a_busy_slot_waits(model: Any, tmp_path: Path) -> None:
    with Engine(model, n_slots=1, n_ctx=128, n_threads=1) as engine:
        running = engine.submit(BASE, max_tokens=60, ignore_eos=True)
        it = iter(running)
        next(it)  # it holds the slot now
        out: dict[str, Any] = {}
        saver = threading.Thread(target=lambda: out.update(saved=engine.save_slot(0, tmp_path / "busy.bin")))
        saver.start()
        list(it)
        saver.join(60)
        assert not saver.is_alive()
        assert running.done
        assert out["saved"].n_tokens == len(BASE) + 59  # saved after the request ended, all of it


def test_bad_files_leave_the_slot_empty(model: Any, tmp_path: Path) -> None:
    with Engine(model, n_slots=2, n_ctx=128, n_threads=1) as engine:
        engine.submit(BASE, max_tokens=4, ignore_eos=True, slot=0).result()
        engine.save_slot(0, tmp_path / "good.bin")
        data = bytearray((tmp_path / "good.bin").read_bytes())
        data[-5] ^= 0xFF
        (tmp_path / "flipped.bin").write_bytes(bytes(data))
        (tmp_path / "short.bin").write_bytes(bytes(data[:100]))
        (tmp_path / "junk.bin").write_bytes(b"not a state at all" * 10)
        for name in ("flipped.bin", "short.bin", "junk.bin"):
            with pytest.raises(pyllama.StateError):
                engine.restore_slot(1, tmp_path / name)
            again = engine.submit(BASE + [60], max_tokens=2, ignore_eos=True, slot=1)
            again.result()
            assert again.n_cached == 0
        with pytest.raises(pyllama.StateError):
            engine.restore_slot(1, tmp_path / "missing.bin")
        # a file saved by a context with longer slots does not fit a short one
        with Engine(model, n_slots=1, n_ctx=512, n_threads=1) as big:
            big.submit(list(range(5, 205)), max_tokens=2, ignore_eos=True).result()
            big.save_slot(0, tmp_path / "long.bin")
        with pytest.raises(pyllama.StateError):
            engine.restore_slot(1, tmp_path / "long.bin")


def _llama_seq_file(ctx: pyllama.Context, path: Path, seq: int, token_list: list[int]) -> None:
    """What llama.cpp's own llama_state_seq_save_file writes for ``seq`` with ``token_list`` as its tokens
    (llama-server passes its packed slot history there)."""
    arr = ffi.new("llama_token[]", token_list)
    assert lib.llama_state_seq_save_file(ctx._p(), str(path).encode(), seq, arr, len(token_list)) > 0


@pytest.mark.parametrize("packed", [True, False], ids=["llama-server-packed", "plain-token-list"])
def test_llama_server_slot_files_restore(model: Any, tmp_path: Path, packed: bool) -> None:
    tokens = BASE
    with model.context(n_ctx=256, n_seq_max=2) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(tokens))
        listed = [-1, 1, len(tokens), *tokens, 0] if packed else tokens
        _llama_seq_file(ctx, tmp_path / "ls.bin", 0, listed)
        ctx.decode(pyllama.Batch.from_tokens([50], len(tokens), 0))
        want = np.array(ctx.logits(-1))
    with model.context(n_ctx=256, n_seq_max=2) as ctx:
        got = ctx.state.load_seq_file(tmp_path / "ls.bin", 1)
        assert got.tolist() == tokens
        assert ctx.cached_tokens(1).tolist() == tokens  # known to be held: a prompt starting with it reuses it
        ctx.decode(pyllama.Batch.from_tokens([50], len(tokens), 1))
        np.testing.assert_allclose(np.array(ctx.logits(-1)), want, rtol=1e-4, atol=1e-4)
    bad = [-1, 2, len(tokens), *tokens, 0], [-1, 1, len(tokens), *tokens, 1, 5], [-1, 1, len(tokens) + 9, *tokens]
    for i, listed in enumerate(bad):
        with model.context(n_ctx=256, n_seq_max=2) as ctx:
            ctx.decode(pyllama.Batch.from_tokens(tokens))
            _llama_seq_file(ctx, tmp_path / f"bad{i}.bin", 0, listed)
            with pytest.raises(pyllama.StateError, match="llama-server slot file|images or audio"):
                ctx.state.load_seq_file(tmp_path / f"bad{i}.bin", 1)


def test_closing_the_engine_answers_a_waiting_action(model: Any, tmp_path: Path) -> None:
    engine = Engine(model, n_slots=1, n_ctx=128, n_threads=1)
    running = engine.submit(BASE, max_tokens=None, ignore_eos=True)
    next(iter(running))
    out: dict[str, Any] = {}

    def save() -> None:
        try:
            out["saved"] = engine.save_slot(0, tmp_path / "late.bin")
        except BaseException as exc:  # noqa: BLE001 - what the waiting caller gets is the point
            out["error"] = exc

    saver = threading.Thread(target=save)
    saver.start()
    time.sleep(0.2)
    engine.close()
    saver.join(60)
    assert not saver.is_alive()
    assert out  # answered one way or the other, never left waiting
