"""promote: point an alias (`prod`, or any custom one) at a published engine.

Refuses an engine whose validation gates did not pass unless forced; never
moves `validated` to such an engine, forced or not, and leaves `latest` to
publish. Checks that every blob of the engine is in the store, then moves the
alias by compare-and-swap under the store's shared lock (so gc cannot
interleave). The alias history records who moved it, from what, when and why.

`promote()` is what the CLI calls; `promote_flow` is the same as a Prefect
flow, for a deployment triggered from the UI.
"""

from __future__ import annotations

from typing import Optional

from prefect import flow

from ..errors import BadInput, GateFailed
from ..registry import status_of, validation_line
from ..store.base import MissingBlob, check_alias

MANAGED = {"latest": "latest moves on every publish; promote to prod or a custom alias instead"}


def promote(store, ref: dict, manifest: dict, alias: str, force: bool = False) -> dict:
    """Move `alias` of ref's recipe and variant to the engine `ref` points at."""
    check_alias(alias)
    if alias in MANAGED:
        raise BadInput(f"cannot promote to {alias!r}: {MANAGED[alias]}")
    recipe, variant = ref["recipe"], ref["variant"]
    validation = (manifest.get("results") or {}).get("validation") or {}
    passed = bool(validation.get("passed")) and status_of(validation) == "passed"
    src = f"{recipe}:{variant}@{ref['alias']}"
    if not passed:
        failed = [g for g, r in (validation.get("gates") or {}).items() if not r.get("passed")]
        why = f"its validation did not pass ({', '.join(failed) or 'no validation recorded'})"
        if status_of(validation) == "pending":
            why = f"its validation is {validation_line(validation)}"
        if alias == "validated":
            raise BadInput(f"cannot promote {src} ({ref['digest'][:12]}) to validated: {why}")
        if not force:
            raise GateFailed(f"refusing to promote {src} ({ref['digest'][:12]}) to {alias}: {why}; "
                             "pass --force to promote it anyway")
    with store.lock(f"promote {recipe}:{variant}@{alias}"):
        missing = sorted(rel for rel, f in manifest.get("files", {}).items() if not store.has_blob(f["sha256"]))
        if missing:
            raise MissingBlob(f"cannot promote {src}: blobs missing from {store.uri} for {', '.join(missing)}")
        before = store.get_ref(recipe, variant, alias)
        reason = f"promoted from @{ref['alias']}" + ("" if passed else " (forced: validation did not pass)")
        moved = store.move_alias(recipe, variant, alias, ref["manifest"], ref["digest"], reason,
                                 forced=bool(force and not passed), validation_passed=passed)
    return {
        "recipe": recipe, "variant": variant, "alias": alias, "digest": ref["digest"], "manifest": ref["manifest"],
        "from": before[0].get("digest") if before else None, "moved": moved, "forced": bool(force and not passed),
        "validation": passed,
    }


@flow(name="promote", log_prints=False, validate_parameters=True)
def promote_flow(ref: str, alias: str, force: bool = False, store: Optional[str] = None) -> dict:
    from ..registry import resolve
    from ..store import open_store

    st = open_store(store)
    value, m = resolve(st, ref)
    return promote(st, value, m, alias, force)
