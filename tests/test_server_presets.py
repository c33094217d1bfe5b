"""llama-server's `--models-preset FILE` on `pyllama serve`'s router: an INI file whose `[*]` section gives every
model's options and whose sections give one model's (a model the router serves) or define a new one
(`model = FILE`); keys are the serve flags without dashes, their short forms and llama-server's LLAMA_ARG_*
names, parsed by `pyllama serve`'s own parser; the command line beats a model's section, which beats `[*]`;
`load-on-startup` loads a model when the server starts, `stop-timeout` bounds how long an unload waits for
the model's requests; the router's own options are ignored with a log line; an unknown key is exit code 2
naming the file, the section and the key. Observed through /props, /slots, /apply-template and /v1/models
of each routed model: real servers as subprocesses on synthetic models; no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_fixture import RemoteServer, free_port, router, statuses
from synth import write_llama_model

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.gguf and b.gguf in models/, extra.gguf beside it (only the preset names it)."""
    root = tmp_path_factory.mktemp("presets")
    (root / "models").mkdir()
    for i, name in enumerate(("models/a", "models/b", "extra")):
        write_llama_model(root / f"{name}.gguf", seed=300 + i, n_ctx_train=4096)
    return root


def props(s: RemoteServer, model: str) -> dict[str, object]:
    r = httpx.get(s.url_for("props"), params={"model": model}, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def load(s: RemoteServer, model: str) -> None:
    r = httpx.post(s.url_for("models", "load"), json={"model": model}, timeout=120)
    assert r.status_code == 200, r.text


def write_preset(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_sections_defaults_a_new_model_precedence_and_load_on_startup(models: Path, tmp_path: Path) -> None:
    preset = write_preset(tmp_path / "models.ini", f"""version = 1

; every model: beaten by the command line's -c, and by a model's own np
[*]
c = 4096
np = 2
port = 1            ; the router's own: ignored with a log line
temp = 0.25

[a]
np = 3
chat-template = {TEMPLATE}
load-on-startup = true
alias = alpha

[b]
ctx-slot = 128      ; the same setting as -c, which the command line gave: the command line's stays

[extra]
model = {models / "extra.gguf"}
LLAMA_ARG_N_PARALLEL = 1
no-slots = true
""")
    with router("--models-dir", str(models / "models"), "--models-preset", str(preset), "-c", "1536",
                "--models-max", "3") as s:
        assert set(statuses(s)) == {"a", "b", "extra"}
        deadline = time.monotonic() + 120
        while statuses(s)["a"] != "loaded":  # load-on-startup: loaded with no request for it
            assert time.monotonic() < deadline, statuses(s)
            time.sleep(0.1)
        assert statuses(s) == {"a": "loaded", "b": "unloaded", "extra": "unloaded"}
        for name in ("b", "extra"):
            load(s, name)
        a, b, extra = props(s, "a"), props(s, "b"), props(s, "extra")
        # a: its own np over [*]'s; -c 1536 (command line) over [*]'s c = 4096, shared by the slots
        assert a["total_slots"] == 3 and a["default_generation_settings"]["n_ctx"] == 512  # type: ignore[index]
        assert a["chat_template"] == TEMPLATE
        # b: [*]'s np; its ctx-slot left out, as the command line set the context (-c)
        assert b["total_slots"] == 2 and b["default_generation_settings"]["n_ctx"] == 768  # type: ignore[index]
        assert b["chat_template"] != TEMPLATE
        # extra: a model of the preset alone, its slots by llama-server's environment name
        assert extra["total_slots"] == 1
        assert extra["default_generation_settings"]["n_ctx"] == 1536  # type: ignore[index]
        assert extra["model_path"] == str(models / "extra.gguf")
        # [*]'s request defaults reach every model
        for p in (a, b, extra):
            assert p["default_generation_settings"]["params"]["temperature"] == 0.25  # type: ignore[index]
        assert len(httpx.get(s.url_for("slots"), params={"model": "a"}, timeout=30).json()) == 3
        assert httpx.get(s.url_for("slots"), params={"model": "extra"}, timeout=30).status_code == 501  # no-slots
        r = httpx.post(s.url_for("apply-template"), timeout=60,
                       json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})  # a's alias
        assert r.status_code == 200 and r.json()["prompt"] == "<user>hi"
        card = {m["id"]: m for m in httpx.get(s.url_for("v1", "models"), timeout=10).json()["data"]}["a"]
        assert card["aliases"] == ["alpha"]
        r = httpx.post(s.url_for("completion"), timeout=120,
                       json={"model": "extra", "prompt": "hello", "n_predict": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
        assert "port is controlled by the router: ignored" in s.log_tail(20000)


def test_the_command_line_beats_the_preset(models: Path, tmp_path: Path) -> None:
    preset = write_preset(tmp_path / "models.ini", """[*]
np = 2
temp = 0.7
[a]
np = 4
no-slots = true
""")
    with router("--models-dir", str(models / "models"), "--models-preset", str(preset), "-c", "1024", "-np", "1",
                "--temp", "0.5", "--slots") as s:
        load(s, "a")
        a = props(s, "a")
        assert a["total_slots"] == 1 and a["default_generation_settings"]["n_ctx"] == 1024  # type: ignore[index]
        assert a["default_generation_settings"]["params"]["temperature"] == 0.5  # type: ignore[index]
        assert httpx.get(s.url_for("slots"), params={"model": "a"}, timeout=30).status_code == 200


def serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyllama", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("text, message", [
    ("[*]\nc = 512\n[a]\nctx-sizee = 512\n", "[a] ctx-sizee: not an option of pyllama serve"),
    ("[*]\nc = lots\n", "[*] c: argument -c/--ctx-size: invalid int value: 'lots'"),
    ("[a]\njinja = maybe\n", "[a] jinja: jinja is a switch: true or false, not 'maybe'"),
    ("[a]\nload-on-startup = soon\n", "[a] load-on-startup: true or false, not 'soon'"),
    ("[nobody]\nc = 512\n", "[nobody] is not a model this server serves"),
    ("[a]\nthis line is not INI\n", "not a section, a `key = value` line or a comment"),
])
def test_a_bad_preset_is_a_usage_error_naming_file_section_and_key(models: Path, tmp_path: Path, text: str,
                                                                   message: str) -> None:
    preset = write_preset(tmp_path / "bad.ini", text)
    r = serve_fails("--models-dir", str(models / "models"), "--models-preset", str(preset))
    assert r.returncode == 2, r.stderr
    assert str(preset) in r.stderr and message in r.stderr, r.stderr


def test_a_missing_model_file_and_a_preset_alone(models: Path, tmp_path: Path) -> None:
    preset = write_preset(tmp_path / "new.ini", f"[x]\nmodel = {tmp_path / 'missing.gguf'}\n")
    r = serve_fails("--models-preset", str(preset))
    assert r.returncode == 1 and "no such model file" in r.stderr and "[x]" in r.stderr, r.stderr
    preset = write_preset(tmp_path / "only.ini", f"[only]\nmodel = {models / 'extra.gguf'}\nc = 256\nnp = 1\n")
    with router("--models-preset", str(preset)) as s:  # the preset alone makes the router
        assert statuses(s) == {"only": "unloaded"}
        load(s, "only")
        assert props(s, "only")["default_generation_settings"]["n_ctx"] == 256  # type: ignore[index]


def test_stop_timeout_cancels_the_requests_an_unload_waits_for(models: Path, tmp_path: Path) -> None:
    long = write_llama_model(tmp_path / "long.gguf", seed=7, n_ctx_train=65536)
    preset = write_preset(tmp_path / "stop.ini", f"[long]\nmodel = {long}\nstop-timeout = 1\nnp = 1\nc = 65536\n")
    with router("--models-preset", str(preset)) as s:
        events: list[dict[str, object]] = []
        with httpx.stream("POST", s.url_for("completion"), timeout=120, json={
                "model": "long", "prompt": "hello", "n_predict": -1, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the model is answering
            t0 = time.monotonic()
            assert httpx.post(s.url_for("models", "unload"), json={"model": "long"}, timeout=10).status_code == 200
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
            waited = time.monotonic() - t0
        # cut after the stop timeout, long before the end of its context
        assert 0.9 < waited < 30, waited
        last = events[-1]
        assert "error" in last or int(str(last["tokens_predicted"])) < 65000, last
        deadline = time.monotonic() + 30
        while statuses(s)["long"] != "unloaded":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_llama_servers_environment_names_name_the_same_flags() -> None:
    """Every LLAMA_ARG_* name of llama.cpp's common/arg.cpp whose flag `pyllama serve` has is a preset key for
    that flag (ENV_FLAGS holds those not spelled as the flag itself)."""
    import re

    from pyllama.server.cli import serve_parser
    from pyllama.server.presets import flag_of

    parser = serve_parser()
    options = parser._option_string_actions
    source = (Path(__file__).parents[1] / "vendor" / "llama.cpp" / "common" / "arg.cpp").read_text()
    checked = 0
    for chunk in source.split("add_opt(common_arg(")[1:]:
        names = re.findall(r'"([^"]+)"', chunk[:chunk.index("}")])
        ours = [options[n] for n in names if n in options]
        for env in re.findall(r'set_env\("((?:LLAMA|HF)_[A-Z0-9_]+)"\)', chunk.split("add_opt(")[0]):
            if ours:
                flag = flag_of(env, parser)
                assert flag is not None and options[flag] in ours, (env, names, flag)
                checked += 1
    assert checked > 80
