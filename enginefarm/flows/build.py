"""The `build` flow: one recipe, its variants, every step a cached task.

    fetch -> convert(tp, dtype, quant) -> build[llm](backend, target) -> validate -> publish -> alias
      +--> export[visual](onnx) -> build[visual](backend) ---+            (multimodal families)

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
from ..tasks import export as export_step
from ..tasks import fetch as fetch_step
from ..tasks import publish as publish_step
from ..tasks import validate as validate_step
from ..tasks.base import Ctx, log, lookup


def prepare(recipe: str | Recipe, variants: Optional[list[str]] = None) -> tuple[Recipe, list[Variant]]:
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    fam = get_family(r.family)
    fam.require_implemented(r)
    vs = [r.variant(v) for v in variants] if variants else r.variants()
    backends.require(
        [(r.components[c].backend or v.backend, c, v.target) for v in vs for c in r.enabled_components]
    )
    return r, vs


def variant_summary(st, r: Recipe, steps: dict) -> dict:
    published, validated = steps["publish"], steps["validate"]
    return {
        "manifest": st.manifest_path(r.name, "publish", published.key),
        "digest": published.digest,
        "steps": {k: ("cached" if s.cached else "built") for k, s in steps.items()},
        "validation": validated.results.get("passed"),
        "gates": validated.results.get("gates"),
        "files": published.files,
    }


def finish(summary: dict, all_cached: bool) -> dict:
    summary["all_cached"] = all_cached
    failed = [n for n, x in summary["variants"].items() if not x["validation"]]
    summary["failed"] = failed
    if failed:
        err = GateFailed(f"validation gates failed for {summary['recipe']}: {', '.join(failed)} "
                         f"(published as latest, not validated)")
        err.summary = summary
        raise err
    return summary


def plan(r: Recipe, vs: list[Variant], st) -> tuple[list[tuple[str, str, object]], dict]:
    """Every step's cache lookup, without running anything: rows of
    (step, variant, StepResult or None), and {variant: steps} for the
    variants whose every step is cached."""
    ctx = Ctx(store=st, recipe=r)
    fam = get_family(r.family)
    rows: list = []
    complete: dict = {}
    fetched = lookup(ctx, fetch_step.spec(ctx))
    rows.append(("fetch", "-", fetched))
    config = fetched.results["config"] if fetched else None
    if fetched:
        for v in vs:
            fam.check_config(config, v, where=f"{r.name}'s fetched config.json")
    for v in vs:
        conv = lookup(ctx, convert_step.spec(ctx, fetched, v)) if fetched else None
        rows.append(("convert", v.name, conv))
        exported = None
        if "visual" in r.enabled_components:
            exported = lookup(ctx, export_step.spec(ctx, fetched, v)) if fetched else None
            rows.append(("export[visual]", v.name, exported))
        builds = {}
        for c in r.enabled_components:
            src = exported if c == "visual" else conv
            builds[c] = lookup(ctx, build_step.spec(ctx, src, v, c, config)) if src else None
            rows.append((f"build[{c}]", v.name, builds[c]))
        val = None
        if builds.get("llm") and ("visual" not in builds or builds["visual"]):
            val = lookup(ctx, validate_step.spec(ctx, fetched, builds["llm"], v, builds.get("visual")))
        rows.append(("validate", v.name, val))
        pub = None
        if val and all(builds.values()):
            pub = lookup(ctx, publish_step.spec(ctx, v, fetched, conv, builds, val))
        rows.append(("publish", v.name, pub))
        if pub:
            complete[v.name] = {"fetch": fetched, "convert": conv, **({"export": exported} if exported else {}),
                                **{f"build.{c}": b for c, b in builds.items()}, "validate": val, "publish": pub}
    return rows, complete


def answer_from_store(recipe: str | Recipe, variants: Optional[list[str]], store: Optional[str]) -> Optional[dict]:
    """The build's result when every step of every variant is already in the
    store (aliases checked and, if behind, moved), or None. No flow run is
    started for a build that has nothing to do."""
    r, vs = prepare(recipe, variants)
    st = open_store(store)
    _, complete = plan(r, vs, st)
    if len(complete) != len(vs):
        return None
    summary: dict = {"recipe": r.name, "store": st.uri, "variants": {}, "flow_run": None}
    for v in vs:
        steps = complete[v.name]
        publish_step.move_aliases(st, r.name, v.name, steps["publish"])
        summary["variants"][v.name] = variant_summary(st, r, steps)
    return finish(summary, True)


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
    fam.derived_limits(r, config)  # and the limits must fit the checkpoint (visual features per image)

    summary: dict = {"recipe": r.name, "store": st.uri, "variants": {}}
    steps_cached: list[bool] = [fetched.cached]
    for v in vs:
        converted = convert_step.convert_task(ctx, fetched, v)
        exported = export_step.export_task(ctx, fetched, v) if "visual" in r.enabled_components else None
        builds = {c: build_step.build_task(ctx, exported if c == "visual" else converted, v, c, config)
                  for c in r.enabled_components}
        validated = validate_step.validate_task(ctx, fetched, builds["llm"], v, builds.get("visual"))
        published = publish_step.publish_task(ctx, v, fetched, converted, builds, validated)
        steps = {"fetch": fetched, "convert": converted, **({"export": exported} if exported else {}),
                 **{f"build.{c}": b for c, b in builds.items()}, "validate": validated, "publish": published}
        steps_cached += [s.cached for s in steps.values()]
        summary["variants"][v.name] = variant_summary(st, r, steps)
    try:
        from prefect.runtime import flow_run

        summary["flow_run"] = flow_run.id
    except Exception:
        summary["flow_run"] = None
    return finish(summary, all(steps_cached))
