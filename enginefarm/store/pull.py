"""Pull: one published engine from the store into a directory, for CI and
inference servers.

Every file is fetched in parallel into a private staging directory beside
DEST (`.<dest>.pull-<digest>-<layout>`), each one verified against its sha256
and size before it gets its name there; only when every file is in place is
the staging directory moved to DEST in one rename (an exchange, where DEST
holds an earlier pull). DEST is therefore either untouched or complete.
An interrupted pull leaves its staging directory: the next pull of the same
engine keeps the files already verified there (hashing them once more) and
fetches the rest.

Layouts:
    plain   DEST/<component>/<file>                    the manifest's paths
    triton  DEST/<component>/config.pbtxt              a Triton model repository:
            DEST/<component>/1/<file>                  one model per component,
                                                       its engine in version 1
DEST/.enginefarm-pull.json records what was pulled (ref, manifest, digest,
layout, files); a later pull into the same DEST replaces it, and a DEST that
holds anything else is refused.

Atomic against a pull that is killed or fails; the files are not fsync'ed
(a pull is cheap to repeat, and syncing a GB costs about a second), so a
machine that crashes right after a pull may need it pulled again.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Optional

from ..errors import BadInput, StepFailed
from ..hashing import digest_file
from .base import CorruptBlob, MissingBlob, Store, check_rel_path

MARKER = ".enginefarm-pull.json"
LAYOUTS = ("plain", "triton")
WORKERS = 8
TRITON_VERSION = "1"


def plan_layout(manifest: dict, layout: str) -> tuple[dict[str, str], dict[str, str]]:
    """({manifest path: path under DEST}, {generated path under DEST: text})."""
    if layout not in LAYOUTS:
        raise BadInput(f"bad layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise StepFailed("the manifest names no files")
    for rel in files:
        check_rel_path(rel)
    if layout == "plain":
        return {rel: rel for rel in files}, {}
    from ..backends import get_backend

    components = (manifest.get("results") or {}).get("components") or {}
    placed: dict[str, str] = {}
    generated: dict[str, str] = {}
    for rel in files:
        comp, _, rest = rel.partition("/")
        if not rest or comp not in components:
            raise BadInput(f"cannot lay {rel!r} out as a Triton model: it belongs to no component of the engine")
        placed[rel] = f"{comp}/{TRITON_VERSION}/{rest}"
    for comp, info in sorted(components.items()):
        config, extra = get_backend(info["backend"]).triton_model(comp, info.get("engine") or {})
        generated[f"{comp}/config.pbtxt"] = config
        for name, text in extra.items():
            generated[f"{comp}/{TRITON_VERSION}/{check_rel_path(name)}"] = text
    clash = set(generated) & set(placed.values())
    if clash:
        raise BadInput(f"cannot lay the engine out for Triton: {', '.join(sorted(clash))} would be written twice")
    return placed, generated


def read_marker(dest: Path) -> Optional[dict]:
    try:
        value = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def pull(store: Store, ref: dict, manifest: dict, dest, layout: str = "plain", workers: int = WORKERS,
         progress: Optional[Callable[[str], None]] = None) -> dict:
    """Pull the engine that `ref` (a ref value: manifest, digest, ...) points
    at into dest. Returns a summary; raises BadInput for a DEST that cannot be
    used, CorruptBlob / MissingBlob (with the file named) when a blob is bad."""
    digest = ref["digest"]
    placed, generated = plan_layout(manifest, layout)
    dest = Path(os.path.abspath(os.fspath(dest)))
    if dest.parent == dest:
        raise BadInput(f"--dest {dest}: pick a directory below the root")
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"--dest {dest} exists and is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    files = manifest["files"]
    summary = {
        "ref": f"{ref['recipe']}:{ref['variant']}@{ref['alias']}", "recipe": ref["recipe"],
        "variant": ref["variant"], "alias": ref["alias"], "manifest": ref["manifest"], "digest": digest,
        "dest": str(dest), "layout": layout, "store": store.uri,
        "validation": bool(((manifest.get("results") or {}).get("validation") or {}).get("passed")),
        "files": [{"path": placed[rel], "source": rel, "sha256": f["sha256"], "size": f["size"]}
                  for rel, f in sorted(files.items())],
        "generated": sorted(generated),
        "bytes": sum(f["size"] for f in files.values()),
    }
    t0 = time.perf_counter()
    # one pull at a time per parent directory (a lock on the directory
    # itself: no lock file is left beside DEST)
    lock_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        previous = read_marker(dest) if dest.is_dir() else None
        if previous and previous.get("digest") == digest and previous.get("layout") == layout \
                and _intact(dest, previous):
            return {**summary, "up_to_date": True, "fetched_bytes": 0, "reused_files": len(files),
                    "seconds": round(time.perf_counter() - t0, 3)}
        _check_dest(dest)  # absent, empty, or an earlier pull holding only what it wrote
        staging = dest.parent / f".{dest.name}.pull-{digest[:16]}-{layout}"
        _clear_other_stagings(dest, staging)
        staging.mkdir(exist_ok=True)
        for junk in staging.rglob("*.part"):  # what an interrupted fetch was writing
            junk.unlink(missing_ok=True)
        todo, reused = [], 0
        for rel, f in sorted(files.items()):
            target = staging / placed[rel]
            if target.is_file() and target.stat().st_size == f["size"] and digest_file(target)[0] == f["sha256"]:
                reused += 1
            else:
                todo.append((rel, f, target))
        if progress:
            progress(f"pull {summary['ref']}: {len(todo)} file(s) to fetch, {reused} already here")
        _fetch_all(store, todo, workers)
        for rel, text in generated.items():
            p = staging / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        record = {k: summary[k] for k in ("ref", "recipe", "variant", "alias", "manifest", "digest", "layout",
                                           "store", "files", "generated")}
        record["pulled_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (staging / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        _move_into_place(staging, dest)
    finally:
        os.close(lock_fd)
    return {**summary, "up_to_date": False, "fetched_bytes": sum(f["size"] for _, f, _ in todo),
            "reused_files": reused, "seconds": round(time.perf_counter() - t0, 3)}


def _check_dest(dest: Path) -> Optional[dict]:
    """The marker of an earlier pull at dest, None if dest is absent or
    empty; BadInput if it holds anything else (nothing there is touched):
    files of its own, or files beside an earlier pull's."""
    if not dest.exists():
        return None
    marker = read_marker(dest)
    if marker is None:
        if any(dest.iterdir()):
            raise BadInput(f"--dest {dest} exists and is not empty (and is not an earlier pull); "
                           "pick another directory or empty it")
        return None
    # an earlier pull is replaced whole: only if it holds nothing it did not write
    ours = {MARKER} | {f.get("path") for f in marker.get("files", []) if isinstance(f, dict)} \
        | set(marker.get("generated", []))
    extra = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")
                   if not p.is_dir() and p.relative_to(dest).as_posix() not in ours)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise BadInput(f"--dest {dest} holds files that the earlier pull there did not write "
                       f"({', '.join(extra[:3])}{more}); move them away or pick another directory")
    return marker


def _intact(dest: Path, marker: dict) -> bool:
    """Whether an earlier pull's files are all there with their sizes (a
    cheap check: an up-to-date pull does not re-hash gigabytes)."""
    try:
        return all((dest / f["path"]).stat().st_size == f["size"] for f in marker.get("files", []))
    except (OSError, KeyError, TypeError):
        return False


def _clear_other_stagings(dest: Path, keep: Path) -> None:
    for p in dest.parent.glob(f".{dest.name}.pull-*"):
        if p != keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _fetch_all(store: Store, todo: list, workers: int) -> None:
    if not todo:
        return

    def one(item):
        rel, f, target = item
        try:
            store.get_blob_file(f["sha256"], target, size=f["size"])
        except CorruptBlob as e:
            raise CorruptBlob(f"{rel}: {e}; nothing was written to the destination") from None
        except MissingBlob as e:
            raise MissingBlob(f"{rel}: {e}; nothing was written to the destination") from None

    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo))))
    try:
        futures = [pool.submit(one, item) for item in todo]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in futures:
            if fut.done() and fut.exception() is not None:
                for other in futures:
                    other.cancel()
                raise fut.exception()
        for fut in futures:
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(staging: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(staging, dest)
        return
    if not any(dest.iterdir()):
        os.rename(staging, dest)  # replaces an empty directory in one step
        return
    if _exchange(staging, dest):  # dest now complete; staging holds the old pull
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    os.rename(dest, old)
    os.rename(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
