"""``pyllama chat`` driven like a user drives it: through a pseudo-terminal, on the chat starter model
(SmolLM2-135M-Instruct, the default when no model is given).

The pty tests start ``python -m pyllama chat`` as the session leader of a new
pseudo-terminal (``pty.fork``), so Ctrl-C is a real ``\\x03`` keystroke that the
terminal turns into SIGINT, exactly as at a shell.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pty = pytest.importorskip("pty")  # POSIX only

pytestmark = [pytest.mark.starter, pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")]

STAT = re.compile(rb"\[prompt: (\d+) new tokens, (\d+) reused; answer: (\d+) tokens")
PROMPT = b"\n> "
COMMON = ["--temp", "0", "-c", "1024", "-t", "2", "-v"]


class Terminal:
    """A program on the far side of a pseudo-terminal: read what it prints, type at it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: becomes the program, with the pty as its controlling terminal
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.buf = b""
        self.pos = 0  # what expect() has consumed
        self.status: int | None = None

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program exited and the terminal closed
            data = b""
        if not data:
            return False
        self.buf += data
        return True

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 120) -> re.Match[bytes]:
        """Wait for ``pattern`` in the output after what earlier expects consumed."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 1.0)):
                m = rx.search(self.buf, self.pos)
                if m:
                    self.pos = m.end()
                    return m
                tail = self.buf[-2000:].decode("utf-8", "replace")
                pytest.fail(f"did not see {rx.pattern!r} within {timeout}s; output ends with:\n{tail}")

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait_reading(self, timeout: float = 30) -> None:
        """Wait until the program's main thread sleeps in select()/poll() (readline waiting for a key):
        a SIGINT that arrives between printing the prompt and that wait is only seen at the next key."""
        deadline = time.monotonic() + timeout
        wchan = ""
        while time.monotonic() < deadline:
            with open(f"/proc/{self.pid}/wchan") as fh:
                wchan = fh.read()
            if "select" in wchan or "poll" in wchan:
                return
            time.sleep(0.01)
        pytest.fail(f"the program never waited for input (its main thread sleeps in {wchan!r})")

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        pytest.fail("pyllama chat did not exit")

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
        os.close(self.fd)


@pytest.fixture()
def chat_env(chat_starter_path: Path, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # A plain terminal: readline prints no colour or bracketed-paste escapes around the prompt.
    env.update(TERM="dumb", INPUTRC=os.devnull, HOME=str(tmp_path))
    env.pop("PYTHONSTARTUP", None)
    return env


@contextlib.contextmanager
def _chat(env: dict[str, str], *args: str) -> Iterator[Terminal]:
    term = Terminal([sys.executable, "-m", "pyllama", "chat", *COMMON, *args], env)
    try:
        yield term
    finally:
        term.close()


def _stat(term: Terminal) -> tuple[int, int, int]:
    m = term.expect(STAT)
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _ask(term: Terminal, question: bytes) -> str:
    """Type a question; the answer is what comes between its echo and the -v statistics line."""
    term.send(question + b"\r")
    echo = term.expect(question)
    stat = term.expect(STAT)
    return term.buf[echo.end():stat.start()].decode("utf-8", "replace").strip()


def test_two_turns_reuse_the_kv_cache_and_a_session_round_trips(chat_env: dict[str, str], tmp_path: Path) -> None:
    with _chat(chat_env, "-n", "12") as term:  # no model given: the chat starter
        term.expect(b"pyllama chat: ")
        term.expect(PROMPT)
        term.send(b"Name a colour.\r")
        new1, reused1, n1 = _stat(term)
        assert new1 > 0 and n1 > 0
        term.expect(PROMPT)
        term.send(b"Name another one.\r")
        new2, reused2, _ = _stat(term)
        # The second turn evaluated only its new tokens: all of the first prompt came from the KV cache.
        assert reused2 >= new1 + reused1
        assert 0 < new2 < new1 + n1 + 40
        term.expect(PROMPT)

        saved = tmp_path / "talk.chat"
        term.send(f"/save {saved}\r".encode())
        term.expect(b"[saved 5 messages")  # the default system prompt and two turns
        term.expect(PROMPT)
        term.send(b"/reset\r")
        term.expect(b"[conversation reset]")
        term.expect(PROMPT)
        term.send(f"/load {saved}\r".encode())
        m = term.expect(re.compile(rb"\[loaded 5 messages from .*?; (\d+) tokens of KV cache restored\]"))
        assert int(m.group(1)) >= new1 + reused1
        term.expect(PROMPT)
        term.send(b"And a third?\r")
        _, reused3, _ = _stat(term)
        assert reused3 >= reused2 + new2  # the restored KV cache served the whole earlier conversation
        term.expect(PROMPT)
        term.send(b"/exit\r")
        assert term.wait() == 0


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "isolate"])
def test_ctrl_c_stops_an_answer_and_the_next_prompt_works(chat_env: dict[str, str], isolate: bool) -> None:
    # -n 200: the answer is still streaming when Ctrl-C comes (it takes seconds), and the next one ends.
    with _chat(chat_env, "-n", "200", *(["--isolate"] if isolate else [])) as term:
        term.expect(PROMPT)
        term.send(b"Write a very long story about a dragon who learns to cook. Make it at least ten paragraphs.\r")
        term.expect(re.compile(rb"\n\s*\S"))  # the answer has started streaming
        term.send(b"\x03")
        term.expect(b"[stopped]", timeout=30)
        _, _, n_stopped = _stat(term)
        assert n_stopped > 0
        term.expect(PROMPT)
        term.send(b"Say yes.\r")
        new, reused, n = _stat(term)
        assert n > 0 and reused > 0  # the stopped answer stayed in the conversation and its cache
        term.expect(PROMPT)
        # readline prints the prompt before it waits in select(): a SIGINT in between is only seen at
        # the next key (a CPython readline race no person is fast enough to hit), so wait for that wait.
        term.wait_reading()
        term.send(b"\x03")  # Ctrl-C at the prompt: a hint; a second one quits
        term.expect(b"Ctrl-C again")
        term.expect(PROMPT)
        term.wait_reading()
        term.send(b"\x03")
        assert term.wait() == 0


def test_the_chat_starter_answers_a_question(chat_env: dict[str, str]) -> None:
    # Greedy, so the answer is always the same; what a user meets: no -s, so `pyllama chat`'s default system
    # prompt (under the one the starter's template adds, "You are a helpful AI assistant named SmolLM, ...",
    # the 135M model answers the first question with a list of French words).
    with _chat(chat_env, "-n", "48") as term:
        term.expect(b"pyllama chat: ")
        term.expect(PROMPT)
        answer = _ask(term, b"What is the capital of France?")
        assert "Paris" in answer, answer
        term.expect(PROMPT)
        answer = _ask(term, b"What is 2+2? Answer briefly.")
        assert "4" in answer, answer
        term.expect(PROMPT)
        term.send(b"/exit\r")
        assert term.wait() == 0


def test_non_interactive(chat_starter_path: Path) -> None:
    base = [sys.executable, "-m", "pyllama", "chat", str(chat_starter_path), *COMMON, "-n", "8"]
    two = subprocess.run([*base, "-p", "Name a colour.", "-p", "Another one?"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert two.returncode == 0, two.stderr
    stats = [tuple(map(int, m)) for m in re.findall(r"\[prompt: (\d+) new tokens, (\d+) reused", two.stderr)]
    assert len(stats) == 2 and stats[1][1] >= stats[0][0] + stats[0][1]
    assert "pyllama chat:" not in two.stdout and ">" not in two.stdout.splitlines()[0][:1]
    piped = subprocess.run(base, input="What is two plus two?\n", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip()
    empty = subprocess.run(base, input="", capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and "nothing to answer" in empty.stderr
