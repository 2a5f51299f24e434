"""gc: delete what no kept engine needs.

Kept: for every recipe and variant, the N newest publish manifests, plus
every manifest an alias points at; then, transitively, every manifest those
were built from (their `inputs`). Everything else is deleted, manifests first
(publish before validate before build before convert before fetch, so a
manifest never names an input that is gone), then every blob that no
remaining manifest names. A gc killed half-way leaves no manifest or alias
pointing at a missing blob.

Safe while builds run: gc holds the store exclusively, and every build,
publish and promotion holds it shared (see `Store.lock`). gc waits up to
`wait` seconds for running builds to finish, then gives up (StoreBusy, exit
1) having deleted nothing. A build never starts while gc runs: it waits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from ..errors import BadInput
from ..store.base import LOCKS, _lock_live, parse_manifest_key
from ..store.index import Indexed

STEP_ORDER = {"publish": 0, "validate": 1, "build": 2, "shards": 3, "convert": 4, "calibrate": 5, "reference": 6,
              "fetch": 7}
PARTIAL_MAX_AGE = 3600.0  # half-written uploads older than this are abandoned


def gc(store, keep: int, dry_run: bool = False, wait: float = 60.0,
       progress: Optional[Callable[[str], None]] = None) -> dict:
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise BadInput(f"bad --keep {keep!r}: expected a whole number >= 0")
    say = progress or (lambda _m: None)
    with store.lock("gc", exclusive=True, wait=wait):
        view = Indexed(store)  # what did not change since the index was written is not read again
        # The listings are most of a dry run's time on S3 (a page of 1,000
        # keys a request; manifests/ and refs/ alone are ~14 pages at 1,000
        # variants), and none needs another: all run at once, with the read
        # of the index. Under the exclusive lock nothing is written meanwhile.
        with ThreadPoolExecutor(max_workers=5) as pool:
            jobs = [pool.submit(view.list_manifests), pool.submit(view.list_refs), pool.submit(store.list_blobs),
                    pool.submit(store.cache_digests), pool.submit(view._load)]
            manifests, refs, blobs, cached = (j.result() for j in jobs[:4])
            jobs[4].result()
        paths = [store.manifest_path(*t) for t in manifests]
        view.prefetch(paths + [store.ref_path(*x) for x in refs])
        loaded = {p: _load(view)(p) for p in paths}
        if not dry_run:  # a dry run writes nothing, the index included
            view.save()
        targets: dict[str, list[str]] = {}
        for r, v, a in refs:
            got = view.get_ref(r, v, a)
            if got:
                targets.setdefault(got[0].get("manifest"), []).append(f"{r}:{v}@{a}")
        groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for p, m in loaded.items():
            if m is not None and m.get("step") == "publish":
                r, _, _ = parse_manifest_key(p)
                groups.setdefault((r, str(m.get("variant"))), []).append((str(m.get("created_at") or ""), p))
        roots = {p for p in targets if p in loaded}
        for items in groups.values():
            roots.update(p for _, p in sorted(items, reverse=True)[:keep])
        # unreadable manifests are kept: never delete what cannot be understood
        roots.update(p for p, m in loaded.items() if m is None)
        reach: set[str] = set()
        stack = list(roots)
        while stack:
            p = stack.pop()
            if p in reach:
                continue
            reach.add(p)
            m = loaded.get(p)
            if m is None:
                continue
            recipe = parse_manifest_key(p)[0]
            for inp in (m.get("inputs") or {}).values():
                try:
                    stack.append(store.manifest_path(recipe, inp["step"], inp["key"]))
                except (BadInput, KeyError, TypeError):
                    continue
        doomed = sorted((p for p in loaded if p not in reach),
                        key=lambda p: (STEP_ORDER.get(parse_manifest_key(p)[1], 9), p))
        live: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for p, m in loaded.items():
            for f in ((m or {}).get("files") or {}).values():
                sizes[f.get("sha256")] = f.get("size", 0)
                if p in reach:
                    live[f.get("sha256")] = f.get("size", 0)
        for d in cached:  # timing caches: not artifacts, but not garbage either
            live.setdefault(d, 0)
        dead_blobs = [b for b in blobs if b not in live]
        summary = {
            "store": store.uri, "keep": keep, "dry_run": dry_run,
            "manifests": {"total": len(loaded), "kept": len(loaded) - len(doomed), "deleted": len(doomed)},
            "blobs": {"total": len(blobs), "kept": len(blobs) - len(dead_blobs), "deleted": len(dead_blobs)},
            "bytes_freed": sum(sizes.get(b, 0) for b in dead_blobs),
            "deleted_manifests": doomed,
            "aliases": sorted(a for names in targets.values() for a in names),
        }
        if dry_run:
            return summary
        for p in doomed:  # parents before their inputs
            store.delete_manifest(*parse_manifest_key(p))
        say(f"gc: deleted {len(doomed)} manifest(s)")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(store.delete_blob, dead_blobs))
        say(f"gc: deleted {len(dead_blobs)} blob(s), {summary['bytes_freed'] / 1e6:.1f} MB")
        summary["histories_moved"] = store.move_legacy_histories()  # out of refs/ (a store from before)
        summary["stale_locks"] = _sweep_locks(store)
        summary["partials"] = store._sweep_partials(PARTIAL_MAX_AGE)
        return summary


def _load(store):
    def load(path: str) -> Optional[dict]:
        try:
            return store.get_manifest_by_path(path)
        except Exception:  # noqa: BLE001 - a corrupt manifest is kept, not fatal
            return None

    return load


def _sweep_locks(store) -> int:
    """Delete the lock objects of holders that are gone (expired, or dead here)."""
    n = 0
    for k in store._list(LOCKS):
        info = store._read_lock(k)
        if info is not None and not _lock_live(info):
            store._delete(k)
            n += 1
    return n


def _gc_flow(keep: int = 3, dry_run: bool = False, store: Optional[str] = None) -> dict:
    from ..store import open_store

    return gc(open_store(store), keep, dry_run)


def __getattr__(name: str):
    """`gc_flow`, the Prefect flow of gc, made on first use: importing Prefect
    costs a process seconds (2 s on an idle 2-core machine, 7 to 15 s under
    load), which `enginefarm gc`, a plain function call, need not pay."""
    if name == "gc_flow":
        from prefect import flow

        f = flow(name="gc", log_prints=False, validate_parameters=True)(_gc_flow)
        globals()["gc_flow"] = f
        return f
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
