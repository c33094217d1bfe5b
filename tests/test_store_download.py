"""Resumable, verified downloads against a real local HTTP server (tests/hfserver.py); no mocks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hfserver import HFServer, fake_gguf, server, store_env  # noqa: F401 - fixtures
from pyllama import store
from pyllama.store import ChecksumError, DownloadError, DownloadProgress, InsufficientSpaceError

SIZE = 1 << 20


def _partials(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.part"))


def _interrupted(server: HFServer, url: str, cache: Path) -> int:
    """Leave a partial download behind: the connection drops mid-file and no retry is allowed."""
    server.drop_after, server.drops = SIZE // 3, 1
    with pytest.raises(DownloadError, match="kept for a later resume"):
        store.pull(url, retries=0)
    (part,) = _partials(cache)
    assert part.stat().st_size == SIZE // 3
    (pending,) = store.list_partial()
    assert (pending.url, pending.done, pending.size) == (url, SIZE // 3, SIZE)
    return part.stat().st_size


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_download_resumes_in_a_new_process(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(2 * SIZE, seed=1)
    url = server.add_file("m/killed.gguf", data, sha256_file=True)
    server.throttle = (8 * 1024, 0.01)  # ~0.8 MB/s: the child is mid-file when it dies
    code = "import sys; from pyllama.store import pull; pull(sys.argv[1])"
    child = subprocess.Popen([sys.executable, "-c", code, url], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = _partials(store_env)
            if parts and parts[0].stat().st_size >= 64 * 1024:
                break
            assert child.poll() is None, "the download ended before it could be killed"
            time.sleep(0.005)
        else:
            pytest.fail("no partial data appeared")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    server.wait_idle()
    (part,) = _partials(store_env)
    offset = part.stat().st_size
    assert 0 < offset < len(data)
    assert part.with_name(part.name + ".json").is_file()  # the resume state record
    first_run = server.served("killed.gguf")
    assert first_run - offset < len(data) // 2  # only what was in flight when the process died is lost

    server.throttle = None
    path = store.pull(url)  # this process is the "new run"
    assert path.read_bytes() == data
    assert server.range_requests("killed.gguf")[-1] == f"bytes={offset}-"
    assert server.served("killed.gguf") - first_run == len(data) - offset  # only the rest moved
    assert not _partials(store_env)


def test_server_ignoring_range_restarts_from_zero(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=2)
    url = server.add_file("ignore.gguf", data, sha256_file=True)
    offset = _interrupted(server, url, store_env)
    server.ignore_range = True
    served = server.served("ignore.gguf")
    path = store.pull(url)
    assert path.read_bytes() == data
    assert server.range_requests("ignore.gguf")[-1] == f"bytes={offset}-"  # asked for the rest...
    assert server.served("ignore.gguf") - served == SIZE  # ...got the whole file, and took it from byte zero


def test_wrong_content_range_is_refused(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=3)
    url = server.add_file("wrong.gguf", data, sha256_file=True)
    offset = _interrupted(server, url, store_env)
    server.wrong_range = True  # a 206, but for byte 0 instead of the offset asked
    path = store.pull(url)
    assert path.read_bytes() == data
    assert server.range_requests("wrong.gguf")[-2:] == [f"bytes={offset}-", None]  # refused, then from zero


def test_etag_change_restarts(server: HFServer, store_env: Path) -> None:
    old = fake_gguf(SIZE, seed=4)
    url = server.add_file("changing.gguf", old, sha256_file=True)
    _interrupted(server, url, store_env)
    new = fake_gguf(SIZE, seed=5)
    server.add_file("changing.gguf", new, sha256_file=True)  # new content, new ETag, new .sha256
    served = server.served("changing.gguf")
    path = store.pull(url)
    assert path.read_bytes() == new  # If-Range did not match: the server sent the new file whole
    assert server.served("changing.gguf") - served == SIZE


def test_dropped_connection_and_stall_are_retried(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=6)
    url = server.add_file("flaky.gguf", data, sha256_file=True)
    server.drop_after, server.drops = 100_000, 2
    path = store.pull(url, retries=3)
    assert path.read_bytes() == data
    assert server.range_requests("flaky.gguf") == [None, "bytes=100000-", "bytes=200000-"]
    assert server.served("flaky.gguf") == SIZE

    url2 = server.add_file("stall.gguf", data, sha256_file=True)
    server.stall_after, server.stall_seconds, server.stalls = 300_000, 10.0, 1
    t0 = time.monotonic()
    path = store.pull(url2, read_timeout=0.5, retries=3)
    assert path.read_bytes() == data
    assert server.range_requests("stall.gguf") == [None, "bytes=300000-"]
    assert time.monotonic() - t0 < 6.0  # the stall was cut short by the read timeout, not waited out


def test_corrupted_byte_raises_and_leaves_nothing(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=7)
    url = server.add_file("corrupt.gguf", data, sha256_file=True)
    server.corrupt_offset = 12345
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        store.pull(url)
    assert err.value.expected == hashlib.sha256(data).hexdigest()
    left = {p.name for p in store_env.rglob("corrupt.gguf*")}
    assert left <= {"corrupt.gguf.lock"}  # no final file, no partial, no state, no record (the lock stays)
    with pytest.raises(ChecksumError):  # a sha256 given by the caller is checked the same way
        store.pull(server.add_file("plain.gguf", data), sha256=hashlib.sha256(data).hexdigest())
    server.corrupt_offset = None
    assert store.pull(url).read_bytes() == data


def test_progress_callback_totals(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=8)
    url = server.add_file("progress.gguf", data, sha256_file=True)
    offset = _interrupted(server, url, store_env)
    server.throttle = (16 * 1024, 0.01)
    events: list[DownloadProgress] = []
    store.pull(url, progress=events.append)
    assert events[0].done == offset  # a resume starts where the partial ends
    assert events[-1].done == events[-1].total == SIZE
    assert all(a.done <= b.done for a, b in zip(events, events[1:]))
    assert all(e.filename == "progress.gguf" for e in events)
    assert len(events) >= 3 and max(e.rate for e in events) > 0


def test_progress_callback_can_cancel(server: HFServer, store_env: Path) -> None:
    url = server.add_file("cancel.gguf", fake_gguf(SIZE, seed=9), sha256_file=True)
    server.throttle = (16 * 1024, 0.01)  # ~1.6 MB/s: several reports (10 a second at most) before the end
    with pytest.raises(store.DownloadCancelledError):
        store.pull(url, progress=lambda p: p.done < SIZE // 2)
    (part,) = _partials(store_env)  # kept for a resume
    assert 0 < part.stat().st_size < SIZE


def test_unverifiable_url_checks_size_and_records_it(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE // 4, seed=10)
    url = server.add_file("nosum.gguf", data)  # no .sha256 beside it
    path = store.pull(url)
    assert path.read_bytes() == data
    (entry,) = [m for m in store.list_models() if m.ref == url]
    assert not entry.verified and entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    before = server.served()
    assert store.pull(url) == path and server.served() == before  # a cached URL is not fetched again
    (removed,) = store.remove(str(path))  # a path inside the cache names its model too
    assert removed.ref == url and not path.exists() and not store.list_models()


def test_two_downloads_of_one_file_share_the_work(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=11)
    url = server.add_file("shared.gguf", data, sha256_file=True)
    server.throttle = (64 * 1024, 0.01)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(store.pull(url))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == data
    assert server.served("shared.gguf") == SIZE  # the lock made the second wait, not download again


def test_free_space_is_checked_before_any_byte(server: HFServer, store_env: Path) -> None:
    server.add_repo("org/huge", {"huge-Q4_K_M.gguf": fake_gguf(1024, seed=12)})
    server.api_sizes["huge-Q4_K_M.gguf"] = 1 << 60  # the Hub says: an exabyte
    with pytest.raises(InsufficientSpaceError, match="not enough free disk space"):
        store.pull("hf:org/huge:Q4_K_M")
    assert server.served() == 0


def test_token_is_sent_to_the_hub(server: HFServer, store_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.add_repo("org/private", {"p-Q4_K_M.gguf": fake_gguf(4096, seed=13)})
    server.token = "s3cret"
    with pytest.raises(store.ModelNotFoundError, match="HF_TOKEN"):
        store.pull("hf:org/private:Q4_K_M")
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    assert store.pull("hf:org/private:Q4_K_M").stat().st_size == 4096
    assert server.auth_seen[-1] == "Bearer s3cret"


# --- faults: each a clear error or a recovery, nothing at the final path ---------------------------

def _nothing_left(cache: Path, name: str) -> None:
    assert {p.name for p in cache.rglob(f"{name}*")} <= {f"{name}.lock"}


def test_busy_server_is_waited_out_as_it_asks(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=30)
    url = server.add_file("busy.gguf", data, sha256_file=True)
    server.busy = [(429, "1"), (503, "1")]
    t0 = time.monotonic()
    assert store.pull(url, retries=3).read_bytes() == data
    assert time.monotonic() - t0 >= 2.0  # Retry-After honoured (the backoff alone would be ~1.5 s)
    server.busy = [(503, "3600")]  # an hour: an error now, not a pull that sleeps an hour
    url2 = server.add_file("later.gguf", data, sha256_file=True)
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="retry after 3600 s"):
        store.pull(url2, retries=3)
    assert time.monotonic() - t0 < 10
    _nothing_left(store_env, "later.gguf")
    server.busy = [(429, None)] * 3  # no Retry-After: the usual backoff, then the retries run out
    with pytest.raises(DownloadError, match="HTTP 429"):
        store.pull(url2, retries=2)
    _nothing_left(store_env, "later.gguf")


def test_an_html_page_instead_of_the_file_is_refused(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=31)
    url = server.add_file("portal.gguf", data)  # no sha256: without the check, the page would be the model
    server.html_page = True
    with pytest.raises(DownloadError, match="web page"):
        store.pull(url)
    _nothing_left(store_env, "portal.gguf")
    server.html_page = False
    assert store.pull(url).read_bytes() == data


def test_a_redirect_loop_is_a_clear_error(server: HFServer, store_env: Path) -> None:
    url = server.add_file("loop.gguf", fake_gguf(SIZE, seed=32))
    server.redirect_loop = True
    with pytest.raises(DownloadError, match="redirect loop"):
        store.pull(url)
    _nothing_left(store_env, "loop.gguf")


def test_a_body_shorter_than_its_length_is_resumed(server: HFServer, store_env: Path) -> None:
    data = fake_gguf(SIZE, seed=33)
    url = server.add_file("short.gguf", data, sha256_file=True)
    server.drop_after, server.drops = 400_000, 1  # Content-Length says SIZE; the connection closes early
    assert store.pull(url, retries=1).read_bytes() == data
    assert server.range_requests("short.gguf") == [None, "bytes=400000-"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2 MiB tmpfs (root mounts it; elsewhere the test is skipped)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.may_skip
def test_a_disk_filling_up_mid_download_keeps_the_partial(server: HFServer, small_disk: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The space check passes, then another writer fills the disk: a clear error, the bytes written so far
    kept, nothing at the final path; with space again, the pull resumes where it stopped."""
    monkeypatch.setenv("PYLLAMA_CACHE", str(small_disk / "cache"))
    data = fake_gguf(SIZE, seed=34)
    url = server.add_file("full.gguf", data, sha256_file=True)
    server.throttle = (64 * 1024, 0.05)
    ballast = small_disk / "ballast"
    filled = threading.Event()

    def fill() -> None:  # once the download is under way
        deadline = time.monotonic() + 30
        while not list((small_disk / "cache").rglob("full.gguf.part")) or \
                list((small_disk / "cache").rglob("full.gguf.part"))[0].stat().st_size < 128 * 1024:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with open(ballast, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                filled.set()

    t = threading.Thread(target=fill, daemon=True)
    t.start()
    with pytest.raises(DownloadError, match="disk is full") as err:
        store.pull(url, retries=0)
    assert filled.is_set() and "kept" in str(err.value)
    (part,) = list((small_disk / "cache").rglob("full.gguf.part"))
    kept = part.stat().st_size
    assert 0 < kept < SIZE and part.read_bytes() == data[:kept]
    assert not [p for p in (small_disk / "cache").rglob("full.gguf") if p.is_file()]
    ballast.unlink()
    server.throttle = None
    assert store.pull(url).read_bytes() == data
    assert server.range_requests("full.gguf")[-1] == f"bytes={kept}-"
