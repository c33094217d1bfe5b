"""Materialise vendor/llama.cpp/ from the committed pin (vendor/llama.cpp.lock).

The way `git submodule update` would: fetch the pinned artifact with pip's own
client, verify its sha256, extract only the llama.cpp subtree, stamp the tree.
Idempotent: a tree whose stamp matches the pin is left alone, and a cached
artifact whose hash matches is reused, so a second run fetches nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "vendor" / "llama.cpp.lock"
TREE = ROOT / "vendor" / "llama.cpp"
STAMP_NAME = ".pyllama-vendor"


def read_lock() -> dict[str, str]:
    """The pin is `key = "value"` lines (TOML, parsed without tomllib for Python < 3.11)."""
    pairs = re.findall(r'^(\w+)\s*=\s*"([^"]*)"\s*$', LOCK.read_text(), flags=re.M)
    return dict(pairs)


def _cache_dir() -> Path:
    env = os.environ.get("PYLLAMA_VENDOR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyllama" / "vendor"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(lock: dict[str, str]) -> str:
    return f"{lock['upstream_commit']} {lock['sha256']}\n"


def tree_is_current(lock: dict[str, str]) -> bool:
    stamp = TREE / STAMP_NAME
    return stamp.is_file() and stamp.read_text() == _stamp(lock)


def fetch_artifact(lock: dict[str, str]) -> Path:
    """Return a verified copy of the pinned artifact, downloading it only if needed."""
    cache = _cache_dir()
    cached = cache / lock["artifact_file"]
    if cached.is_file() and _sha256(cached) == lock["sha256"]:
        print(f"vendor: using cached {cached}")
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --no-build-isolation: pip prepares the sdist's metadata with the
        # scikit-build-core already installed here instead of building the
        # artifact's build requirements (cmake among them) from source.
        cmd = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--no-binary", lock["artifact_name"], "--no-build-isolation",
            "-d", tmp, f"{lock['artifact_name']}=={lock['artifact_version']}",
        ]
        print("vendor: " + " ".join(cmd[2:]))
        subprocess.run(cmd, check=True)
        got = Path(tmp) / lock["artifact_file"]
        if not got.is_file():
            raise SystemExit(f"vendor: pip did not produce {lock['artifact_file']}")
        digest = _sha256(got)
        if digest != lock["sha256"]:
            raise SystemExit(
                f"vendor: sha256 mismatch for {got.name}: got {digest}, pin says {lock['sha256']}"
            )
        os.replace(got, cached)
    return cached


def extract(lock: dict[str, str], artifact: Path) -> None:
    prefix = lock["artifact_subtree"].rstrip("/") + "/"
    staging = TREE.with_name(TREE.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    count = 0
    with tarfile.open(artifact, "r:gz") as tar:
        for member in tar:
            if not member.name.startswith(prefix):
                continue
            rel = member.name[len(prefix):]
            # The subtree's .git is a gitlink file pointing into the artifact's
            # own repository; without it the tree is plain source.
            if not rel or rel == ".git" or rel.startswith(".git/"):
                continue
            member.name = rel
            tar.extract(member, staging, filter="data")
            count += 1
    (staging / STAMP_NAME).write_text(_stamp(lock))
    shutil.rmtree(TREE, ignore_errors=True)
    os.replace(staging, TREE)
    print(f"vendor: extracted {count} entries into {TREE.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="re-extract even if the tree is current")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the tree matches the pin")
    args = parser.parse_args(argv)
    lock = read_lock()
    if args.check:
        ok = tree_is_current(lock)
        print(f"vendor: tree {'matches' if ok else 'does not match'} the pin")
        return 0 if ok else 1
    if tree_is_current(lock) and not args.force:
        print(f"vendor: vendor/llama.cpp is at {lock['upstream_commit'][:9]}; nothing to do")
        return 0
    extract(lock, fetch_artifact(lock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
