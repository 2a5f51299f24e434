"""Digests: files, canonical JSON, source code of steps."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
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


# Modules that move bytes, schedule or report but never shape what a step
# makes: the closure below neither hashes nor follows them, so a change to the
# store or the orchestration does not rebuild the catalog.
NEUTRAL = ("enginefarm.errors", "enginefarm.hashing", "enginefarm.concurrency", "enginefarm.store",
           "enginefarm.flows", "enginefarm.registry", "enginefarm.cli", "enginefarm.tasks.base",
           "enginefarm.tasks.policy")
_ROOT = Path(__file__).resolve().parent  # the enginefarm package


def code_version(*modules: str) -> str:
    """A digest of the source files of the given modules (dotted names) and of
    every module of this package they import, transitively (`code_closure`).

    A step's code version is the digest of every module that shapes its
    output: change the code, and the step's cache key changes with it. A step
    names itself and the modules it reaches only by name at run time (its
    backend's, its family's); what those import statically is found here, so
    no list is kept by hand. The files are read, not imported, so a cached
    step never pays for importing torch.
    """
    now = time.monotonic()
    got = _VERSIONS.get(modules)
    if got is not None:
        names, stamps, version, checked = got
        # the nightly asks for the same closures per variant and step: its files
        # are looked at again (a stat each) at most once a second
        if now - checked < RECHECK_S or stamps == [_stamp(n) for n in names]:
            if now - checked >= RECHECK_S:
                _VERSIONS[modules] = (names, stamps, version, now)
            return version
    names = code_closure(*modules)
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + _source(name))
    version = h.hexdigest()[:16]
    _VERSIONS[modules] = (names, [_stamp(n) for n in names], version, now)
    return version


RECHECK_S = 1.0
_VERSIONS: dict[tuple[str, ...], tuple[list[str], list, str, float]] = {}


def code_closure(*modules: str) -> list[str]:
    """The given modules and every `enginefarm` module they import (at module
    level or inside functions, `TYPE_CHECKING` blocks too), transitively,
    less the NEUTRAL ones; sorted."""
    seen: set[str] = set()
    todo = [m for m in modules]
    while todo:
        name = todo.pop()
        if name in seen or _neutral(name):
            continue
        seen.add(name)
        todo.extend(_imports(name))
    return sorted(seen)


def _neutral(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in NEUTRAL)


_IMPORTS: dict[str, tuple[bytes, tuple[str, ...]]] = {}
# CPython 3.11's ast.parse is not safe in several threads at once: it can raise "SystemError: AST
# constructor recursion depth mismatch" (python/cpython issue 106905, fixed in later releases); the nightly's
# parallel checks ask for code versions from several threads (seen: the catalog-scale bench's nightly)
_PARSE = threading.Lock()


def _imports(name: str) -> tuple[str, ...]:
    """The package's modules that `name`'s source imports (parsed again only when its file changed)."""
    import ast

    src = _source(name)
    got = _IMPORTS.get(name)
    if got is not None and got[0] is src:
        return got[1]
    if not name.startswith("enginefarm"):
        return ()
    package = name if _origin(name).name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    with _PARSE:
        tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            # `from . import x` / `from ..tasks import build`: x is a module
            found.update(f"{mod}.{a.name}" for a in node.names if _module_path(f"{mod}.{a.name}"))
    # a module is imported with its packages (their __init__ runs first)
    for m in list(found):
        parts = m.split(".")
        found.update(".".join(parts[:i]) for i in range(2, len(parts)))
    out = tuple(sorted(m for m in found if m.startswith("enginefarm.") and _module_path(m)))
    _IMPORTS[name] = (src, out)
    return out


@functools.lru_cache(maxsize=None)
def _module_path(name: str) -> Path | None:
    """The source file of one of this package's modules, found without importing anything."""
    if name != "enginefarm" and not name.startswith("enginefarm."):
        return None
    rel = Path(*name.split(".")[1:])
    for p in (_ROOT / rel.with_suffix(".py"), _ROOT / rel / "__init__.py"):
        if str(rel) != "." and p.is_file():
            return p
    return None


_SOURCES: dict[str, tuple[tuple[int, int, int], bytes]] = {}


@functools.lru_cache(maxsize=None)
def _origin(name: str) -> Path:
    import importlib.util

    own = _module_path(name)
    if own is not None:
        return own
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise RuntimeError(f"code_version: no source for module {name}")
    return Path(spec.origin)


def _stamp(name: str) -> tuple[int, int, int]:
    st = _origin(name).stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _source(name: str) -> bytes:
    """A module's source bytes, read again only when its file changed (a stat
    per call: the nightly asks for the same few modules for every variant)."""
    stamp = _stamp(name)
    got = _SOURCES.get(name)
    if got is None or got[0] != stamp:
        got = (stamp, _origin(name).read_bytes())
        _SOURCES[name] = got
    return got[1]


def short(d: str, n: int = 12) -> str:
    return d[:n]


def iter_files(root: Path) -> Iterable[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield p
