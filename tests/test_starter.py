"""End to end on the real starter model (Gemma 3 270M Q4_K_M), against llama.cpp's own llama-simple."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyllama

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.starter

PROMPT = "The capital of France is"
N_PREDICT = 24


@pytest.fixture(scope="module")
def model(starter_model_path: Path) -> pyllama.Model:
    with pyllama.Model(starter_model_path) as m:
        yield m


def test_starter_facts(model: pyllama.Model) -> None:
    assert model.architecture == "gemma3"
    assert 250e6 < model.n_params < 300e6
    # This GGUF carries no template; chat falls back to llama.cpp's named "gemma" one.
    text = pyllama.apply_template(model, [{"role": "user", "content": "Hi"}])
    assert text.endswith("<start_of_turn>model\n")
    assert model.vocab.is_eog(model.vocab.eot or model.vocab.eos)


@pytest.mark.slow
def test_greedy_tokens_match_llama_simple(model: pyllama.Model, starter_model_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from bench import native

    simple = native.build(quiet=True) / "llama-simple"
    proc = subprocess.run([str(simple), "-m", str(starter_model_path), "-n", str(N_PREDICT), PROMPT],
                          capture_output=True, text=True, timeout=600, check=True)
    prompt = model.tokenize(PROMPT, add_special=True, parse_special=True)
    # llama-simple: n_ctx = n_prompt + n_predict - 1, n_batch = n_prompt, llama.cpp's default
    # threads (4) and flash attention (auto), greedy sampling.
    with model.context(n_ctx=prompt.size + N_PREDICT - 1, n_batch=prompt.size, n_threads=4,
                       flash_attn="auto") as ctx:
        with pyllama.generate(ctx, prompt, sampler=[pyllama.Greedy()], max_tokens=N_PREDICT) as gen:
            list(gen)
    tokens = np.concatenate([prompt, gen.tokens])
    ours = "".join(model.vocab.token_to_piece(int(t), special=True).decode("utf-8", "replace") for t in tokens)
    # llama-simple prints each token's piece (special tokens rendered) as it goes.
    assert proc.stdout.rstrip("\n") == ours
    assert gen.n_generated >= N_PREDICT - 2


MULTILINGUAL = ["Bonjour, ça va ? Très bien.", "日本語とEnglishの混在", "Emoji 🦙🔥 and 👩‍🚀!", "Ünïcödé façade — ok"]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_stream_equals_one_shot_on_starter(model: pyllama.Model, text: str) -> None:
    toks = model.tokenize(text, add_special=False)
    assert model.detokenize(toks) == text
    dec = pyllama.StreamDecoder(model.vocab)
    assert "".join(dec.push(int(t)) for t in toks) + dec.flush() == text


def test_chat_on_starter(model: pyllama.Model) -> None:
    # The starter is the pretrained (not instruction-tuned) 270M model: check the
    # mechanics (template tokens parsed as special tokens, streamed reply recorded,
    # KV reuse across turns), not the quality of its answers.
    with model.context(n_ctx=1024) as ctx:
        chat = pyllama.ChatSession(ctx, max_tokens=12)
        prompt = pyllama.apply_template(model, [{"role": "user", "content": "Hi"}])
        toks = model.tokenize(prompt, parse_special=True)
        assert model.vocab.text(int(toks[1])) == "<start_of_turn>"
        reply = chat.ask("What is the capital of France?")
        assert reply and chat.messages[-1]["content"] == reply
        ctx.reset_perf()
        chat.ask("And of Italy?")
        assert ctx.perf().n_p_eval < model.tokenize(pyllama.apply_template(model, chat.messages[:-1])).size


def test_logits_view_on_starter(model: pyllama.Model) -> None:
    with model.context(n_ctx=256) as ctx:
        ctx.evaluate(model.tokenize(PROMPT))
        view = ctx.logits(-1)
        assert view.shape == (model.vocab.n_tokens,)
        assert model.vocab.detokenize([int(np.argmax(view))]).strip() != ""


def test_cli_run_streams_on_starter(model: pyllama.Model) -> None:
    """`pyllama run` with no model resolves the starter and streams what the API generates."""
    out = subprocess.run([sys.executable, "-m", "pyllama", "run", "-p", PROMPT, "-n", "8", "--temp", "0", "-t", "2"],
                         capture_output=True, text=True, timeout=300, check=True)
    with model.context(n_ctx=4096, n_threads=2) as ctx:
        expected = pyllama.generate_text(ctx, PROMPT, max_tokens=8, parse_special=False)
    assert out.stdout == expected + "\n" and expected.strip()
