"""Digests: files, canonical JSON, source code of steps."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

CHUNK = 8 * 1024 * 1024


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def digest_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_file(path: str | Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
            size += len(b)
    return h.hexdigest(), size


class HashingWriter:
    """A write-only, non-seekable wrapper around a binary file that hashes
    every byte written through it (in order): what was written is what was
    hashed, in one pass."""

    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, b) -> int:
        self.h.update(b)
        self.size += len(b)
        return self.f.write(b)

    def seekable(self) -> bool:
        return False

    def result(self) -> tuple[str, int]:
        return self.h.hexdigest(), self.size


def copy_hashed(src, dst) -> tuple[str, int]:
    """Copy the binary file object src into dst: (sha256, size) of the bytes."""
    w = HashingWriter(dst)
    while chunk := src.read(CHUNK):
        w.write(chunk)
    return w.result()


def code_version(*modules: str) -> str:
    """A digest of the source files of the given modules (dotted names).

    A step's code version is the digest of every module that shapes its
    output: change the code, and the step's cache key changes with it. The
    files are read, not imported, so a cached step never pays for importing
    torch.
    """
    h = hashlib.sha256()
    for name in modules:
        h.update(name.encode() + b"\0" + _source(name))
    return h.hexdigest()[:16]


_SOURCES: dict[str, tuple[tuple[int, int, int], bytes]] = {}


@functools.lru_cache(maxsize=None)
def _origin(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise RuntimeError(f"code_version: no source for module {name}")
    return Path(spec.origin)


def _source(name: str) -> bytes:
    """A module's source bytes, read again only when its file changed (a stat
    per call: the nightly asks for the same few modules for every variant)."""
    path = _origin(name)
    st = path.stat()
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    got = _SOURCES.get(name)
    if got is None or got[0] != stamp:
        got = (stamp, path.read_bytes())
        _SOURCES[name] = got
    return got[1]


def short(d: str, n: int = 12) -> str:
    return d[:n]


def iter_files(root: Path) -> Iterable[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p
