"""The `build` flow: one recipe, its variants, every step a cached task.

    fetch -> convert(tp, dtype, quant) -> build[llm](backend, target) -> validate -> publish -> alias

Everything that can be checked without weights is checked before the first
task runs (recipe, family, backends); the tp / head-count check runs right
after fetch, on the fetched config.json, before any conversion.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from prefect import flow

from .. import backends
from ..errors import GateFailed
from ..families import get_family
from ..spec import Recipe, Variant, load_recipe
from ..store import open_store
from ..tasks import build as build_step
from ..tasks import convert as convert_step
from ..tasks import fetch as fetch_step
from ..tasks import publish as publish_step
from ..tasks import validate as validate_step
from ..tasks.base import Ctx, log


def prepare(recipe: str | Recipe, variants: Optional[list[str]] = None) -> tuple[Recipe, list[Variant]]:
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    fam = get_family(r.family)
    fam.require_implemented(r)
    vs = [r.variant(v) for v in variants] if variants else r.variants()
    backends.require(
        [(r.components[c].backend or v.backend, c, v.target) for v in vs for c in r.enabled_components]
    )
    return r, vs


@flow(name="build", log_prints=False, validate_parameters=True)
def build(recipe: str, variants: Optional[list[str]] = None, store: Optional[str] = None, force: bool = False) -> dict:
    r, vs = prepare(recipe, variants)
    st = open_store(store)
    workdir = Path(os.environ.get("ENGINEFARM_WORK", "")) if os.environ.get("ENGINEFARM_WORK") else None
    ctx = Ctx(store=st, recipe=r, force=force, workdir=workdir)
    log(f"build {r.name}: {len(vs)} variant(s) -> {st.uri}")
    fam = get_family(r.family)

    fetched = fetch_step.fetch_task(ctx)
    config = fetched.results["config"]
    for v in vs:  # before any conversion: tp must divide the heads
        fam.check_config(config, v, where=f"{r.name}'s fetched config.json")

    summary: dict = {"recipe": r.name, "store": st.uri, "variants": {}}
    steps_cached: list[bool] = [fetched.cached]
    for v in vs:
        converted = convert_step.convert_task(ctx, fetched, v)
        builds = {c: build_step.build_task(ctx, converted, v, c) for c in r.enabled_components}
        validated = validate_step.validate_task(ctx, fetched, builds["llm"], v)
        published = publish_step.publish_task(ctx, v, fetched, converted, builds, validated)
        steps = {"fetch": fetched, "convert": converted, **{f"build.{c}": b for c, b in builds.items()},
                 "validate": validated, "publish": published}
        steps_cached += [s.cached for s in steps.values()]
        summary["variants"][v.name] = {
            "manifest": st.manifest_path(r.name, "publish", published.key),
            "digest": published.digest,
            "steps": {k: ("cached" if s.cached else "built") for k, s in steps.items()},
            "validation": validated.results.get("passed"),
            "gates": validated.results.get("gates"),
            "files": published.files,
        }
    summary["all_cached"] = all(steps_cached)
    failed = [n for n, x in summary["variants"].items() if not x["validation"]]
    summary["failed"] = failed
    if failed:
        err = GateFailed(f"validation gates failed for {r.name}: {', '.join(failed)} (published as latest, not validated)")
        err.summary = summary
        raise err
    return summary
