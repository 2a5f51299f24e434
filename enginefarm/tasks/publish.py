"""publish: the release record of one variant, then its aliases.

Order: blobs (already in the store: every step wrote its own), then this
manifest, then the aliases by compare-and-swap: `latest` on every publish,
`validated` only when the validation gates passed. A reader following an
alias never finds a manifest whose blobs are missing.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path


from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, _user, log, run_step
from .policy import step_task

MAX_CAS_TRIES = 20


def spec(ctx: Ctx, variant: Variant, fetched: StepResult, converted: StepResult, builds: dict[str, StepResult],
         validated: StepResult) -> StepSpec:
    inputs = {"fetch": fetched, "convert": converted, "validate": validated}
    inputs.update({f"build.{c}": b for c, b in builds.items()})
    params = {"variant": variant.params(), "components": sorted(builds)}
    return StepSpec("publish", params, inputs, code_version(__name__), {}, variant=variant.name)


def move_alias(store, recipe: str, variant: str, alias: str, target: StepResult, reason: str) -> bool:
    """Point alias at target by compare-and-swap; True if it moved."""
    path = store.manifest_path(recipe, target.step, target.key)
    for _ in range(MAX_CAS_TRIES):
        cur = store.get_ref(recipe, variant, alias)
        value, version = (cur if cur else (None, None))
        if value and value.get("digest") == target.digest:
            return False
        new = {
            "manifest": path,
            "digest": target.digest,
            "recipe": recipe,
            "variant": variant,
            "alias": alias,
            "previous": value.get("digest") if value else None,
            "moved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "moved_by": f"{_user()}@{platform.node()}",
            "reason": reason,
        }
        if store.cas_ref(recipe, variant, alias, new, version):
            return True
    raise RuntimeError(f"alias {recipe}:{variant}@{alias} kept moving under us ({MAX_CAS_TRIES} tries)")


@step_task("publish")
def publish_task(ctx: Ctx, variant: Variant, fetched: StepResult, converted: StepResult,
                 builds: dict[str, StepResult], validated: StepResult) -> StepResult:
    s = spec(ctx, variant, fetched, converted, builds, validated)

    def work(out: Path, scratch: Path):
        files = {}
        for comp, b in sorted(builds.items()):
            for rel, info in b.files.items():
                files[f"{comp}/{rel}"] = info  # already blobs: nothing is copied
        src = ctx.recipe.source
        results = {
            "recipe": ctx.recipe.name,
            "recipe_digest": ctx.recipe.digest(),
            "source": src.model_dump(mode="json", exclude_defaults=True),
            "variant": variant.params(),
            "components": {c: {"backend": b.manifest["params"]["backend"], "engine": b.results.get("engine", {}),
                               "toolchain": b.manifest["toolchain"]} for c, b in builds.items()},
            "validation": {
                "passed": validated.results.get("passed"),
                "gates": validated.results.get("gates"),
                "perplexity": validated.results.get("metrics", {}).get("perplexity"),
            },
        }
        return results, files

    res = run_step(ctx, s, work)
    move_aliases(ctx.store, ctx.recipe.name, variant.name, res)
    return res


def move_aliases(store, recipe: str, variant: str, res: StepResult) -> None:
    """latest on every publish; validated only when the gates passed."""
    if move_alias(store, recipe, variant, "latest", res, "publish"):
        log(f"publish [{variant}]: latest -> {res.digest[:12]}")
    if res.results.get("validation", {}).get("passed"):
        if move_alias(store, recipe, variant, "validated", res, "validation gates passed"):
            log(f"publish [{variant}]: validated -> {res.digest[:12]}")
