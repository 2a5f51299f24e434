"""The `build` flow: one recipe, its variants, every step a cached task.

    fetch -> [calibrate: w4a16_awq, w8a8_sq, fp8] -> convert(tp, dtype, quant) -> [shards: tp > 1 or quantized] -> build[llm](backend, target)
          -> validate -> publish -> alias
      +--> export[visual](onnx) -> build[visual](backend) ---+            (multimodal families)

Everything that can be checked without weights is checked before the first
task runs (recipe, family, backends); the tp / head-count check runs right
after fetch, on the fetched config.json, before any conversion. After fetch
the variants fan out (one `variant` task each, bounded by the task runner);
a variant that fails does not stop the others. build and validate run here,
or as runs of the `gpu` deployment when ENGINEFARM_GPU_DEPLOYMENT names one
(see `gpu.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

from prefect import flow

from .. import backends
from ..concurrency import warm, warm_for_config
from ..errors import GateFailed, StepFailed
from ..families import get_family, load_recipe
from ..registry import status_of
from ..spec import Recipe, Variant
from ..store import open_store
from ..tasks import build as build_step
from ..tasks import calibrate as calibrate_step
from ..tasks import convert as convert_step
from ..tasks import export as export_step
from ..tasks import fetch as fetch_step
from ..tasks import publish as publish_step
from ..tasks import reference as reference_step
from ..tasks import shards as shards_step
from ..tasks import validate as validate_step
from ..tasks.base import Ctx, StepResult, StepSpec, log, lookup
from ..tasks.policy import step_task
from . import gpu, report
from .settings import gpu_deployment, task_runner


def prepare(recipe: str | Recipe, variants: Optional[list[str]] = None,
            require_backends: bool = True) -> tuple[Recipe, list[Variant]]:
    """The recipe and its variants, checked before anything runs. When GPU
    steps run on the `gpu` pool, GPU targets are checked there, not here.
    `plan` passes require_backends=False: it shows what would run anywhere."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    fam = get_family(r.family)
    fam.require_implemented(r)
    vs = [r.variant(v) for v in variants] if variants else r.variants()
    remote = gpu_deployment() is not None
    if require_backends:
        pairs = [(r.component_backend(c, v), c, r.component_variant(c, v).target)
                 for v in vs for c in r.enabled_components]
        backends.require([p for p in pairs if not (remote and p[2] != "cpu")])
    return r, vs


def workdir() -> Optional[Path]:
    return Path(os.environ["ENGINEFARM_WORK"]) if os.environ.get("ENGINEFARM_WORK") else None


def variant_summary(st, r: Recipe, steps: dict) -> dict:
    published, validated = steps["publish"], steps["validate"]
    return {
        "manifest": st.manifest_path(r.name, "publish", published.key),
        "digest": published.digest,
        "steps": {k: ("cached" if s.cached else "built") for k, s in steps.items()},
        "validation": validated.results.get("passed"),
        "validation_status": status_of(validated.results),  # passed, failed, or pending (no compatible GPU)
        **({"validation_components": validated.results["components"]} if validated.results.get("components") else {}),
        **({"shards": {"passed": steps["shards"].results.get("passed"), "gates": steps["shards"].results.get("gates")}}
           if steps.get("shards") else {}),
        "gates": validated.results.get("gates"),
        "files": published.files,
    }


def finish(summary: dict, all_cached: bool) -> dict:
    summary["all_cached"] = all_cached
    failed = [n for n, x in summary["variants"].items() if x["validation_status"] == "failed"]  # pending is no failure
    summary["failed"] = failed
    if failed:
        err = GateFailed(f"validation gates failed for {summary['recipe']}: {', '.join(failed)} "
                         f"(published as latest, not validated)")
        err.summary = summary
        raise err
    return summary


class PlanRow(NamedTuple):
    step: str  # fetch, convert, shards, build[<component>], validate, publish
    variant: str
    hit: Optional[StepResult]  # the stored result, or None: the step would run
    spec: Optional[StepSpec]  # None when an input is not built yet (its key is not known)


def plan(r: Recipe, vs: list[Variant], st) -> tuple[list[PlanRow], dict]:
    """Every step's cache lookup, without running anything: one PlanRow a
    step and variant, and {variant: steps} for the variants whose every step
    is cached."""
    ctx = Ctx(store=st, recipe=r)
    fam = get_family(r.family)
    rows: list[PlanRow] = []
    complete: dict = {}

    def look(step: str, variant: str, spec: Optional[StepSpec]) -> Optional[StepResult]:
        hit = lookup(ctx, spec) if spec else None
        rows.append(PlanRow(step, variant, hit, spec))
        return hit

    fetched = look("fetch", "-", fetch_step.spec(ctx))
    config = fetched.results["config"] if fetched else None
    ref, ref_needed = None, reference_step.needed(ctx, fetched)
    if ref_needed:
        ref = look("reference", "-", reference_step.spec(ctx, fetched) if fetched else None)
    # the shards step takes a text reference only (a multimodal one's prompts are images and text)
    shards_ref, shards_ref_needed = (None, False) if reference_step.multimodal(ctx) else (ref, ref_needed)
    if fetched:
        for v in vs:
            fam.check_config(fetched.results["config"], v, where=f"{r.name}'s fetched config.json")
    for v in vs:
        cal = None
        if calibrate_step.needed(v):
            cal = look("calibrate", v.name, calibrate_step.spec(ctx, fetched, v) if fetched else None)
            conv = look("convert", v.name, convert_step.spec(ctx, fetched, v, cal) if cal else None)
        else:
            conv = look("convert", v.name, convert_step.spec(ctx, fetched, v) if fetched else None)
        shards = None
        if shards_step.needed(v):
            shards = look("shards", v.name,
                          shards_step.spec(ctx, fetched, conv, v, shards_ref)
                          if conv and (shards_ref or not shards_ref_needed) else None)
        exported = None
        if "visual" in r.enabled_components:
            exported = look("export[visual]", v.name, export_step.spec(ctx, fetched, v) if fetched else None)
        builds = {}
        for c in r.enabled_components:
            src = exported if c == "visual" else conv
            builds[c] = look(f"build[{c}]", v.name, build_step.spec(ctx, src, v, c, config) if src else None)
        both = builds.get("llm") and ("visual" not in builds or builds["visual"]) and (ref or not ref_needed)
        val = look("validate", v.name,
                   validate_step.spec(ctx, fetched, builds["llm"], v, builds.get("visual"), ref) if both else None)
        ready = val and all(builds.values()) and (shards or not shards_step.needed(v))
        pub = look("publish", v.name, publish_step.spec(ctx, v, fetched, conv, builds, val, shards) if ready else None)
        if pub:
            complete[v.name] = {"fetch": fetched, **({"calibrate": cal} if cal else {}), "convert": conv, **({"shards": shards} if shards else {}),
                                **({"export": exported} if exported else {}),
                                **{f"build.{c}": b for c, b in builds.items()},
                                "validate": val, "publish": pub}
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


# ----------------------------------------------------------------------------- one variant


def ready(ctx: Ctx, fetched: StepResult) -> None:
    """After fetch, before a variant's first step: the checkpoint's model
    types imported (before this thread's steps import anything), and what
    later steps load (tokenizer, processor) checked to be there; both once
    per checkpoint and process."""
    warm_for_config(fetched.results.get("config"))
    fetch_step.check_inputs(ctx, fetched)


def run_variant(ctx: Ctx, fetched: StepResult, v: Variant) -> dict[str, StepResult]:
    """[calibrate] -> convert -> [shards] -> build + validate (here or on the gpu pool) -> publish; the steps by
    name. The reference is computed by the first step that needs it: shards here (text recipes), or validate
    where that runs (a GPU worker). A variant that needs a gpu worker with N GPUs fails first, before any
    step, where none polls its work queue (gpu.check_placement)."""
    gpu.check_placement(ctx, v)
    ready(ctx, fetched)
    calibrated = calibrate_step.calibrate_task(ctx, fetched, v) if calibrate_step.needed(v) else None
    converted = convert_step.convert_task(ctx, fetched, v, calibrated)
    checked = None
    if shards_step.needed(v):
        text_ref = reference_step.needed(ctx, fetched) and not reference_step.multimodal(ctx)
        referenced = reference_step.reference_task(ctx, fetched) if text_ref else None
        checked = shards_step.shards_task(ctx, fetched, converted, v, referenced)
    exported = export_step.export_task(ctx, fetched, v) if "visual" in ctx.recipe.enabled_components else None
    builds, validated = gpu.gpu_steps_for(ctx, fetched, converted, v, exported)
    published = publish_step.publish_task(ctx, v, fetched, converted, builds, validated, checked)
    return {"fetch": fetched, **({"calibrate": calibrated} if calibrated else {}), "convert": converted,
            **({"shards": checked} if checked else {}),
            **({"export": exported} if exported else {}),
            **{f"build.{c}": b for c, b in builds.items()}, "validate": validated, "publish": published}


@step_task("variant", task_run_name="{ctx.recipe.name}:{variant.name}")
def variant_task(ctx: Ctx, fetched: StepResult, variant: Variant) -> dict[str, StepResult]:
    return run_variant(ctx, fetched, variant)


def submit_variants(ctx: Ctx, fetched, vs: list[Variant]):
    """Submit each variant as its own task (bounded by the flow's task
    runner); returns collect(), which waits and gives {variant: its steps, or
    the error that stopped it}. One failure stops no other variant."""
    warm()  # the lazy imports, here, before threads race on them
    futures = [(v, variant_task.submit(ctx, fetched, v)) for v in vs]

    def collect() -> dict[str, dict | BaseException]:
        out: dict[str, dict | BaseException] = {}
        for v, fut in futures:
            try:
                out[v.name] = fut.result()
            except Exception as e:  # noqa: BLE001 - reported per variant
                out[v.name] = e
        return out

    return collect


def flow_run_id() -> Optional[str]:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


def run_build(recipe: str | Recipe, variants: Optional[list[str]], store: Optional[str], force: bool) -> dict:
    """The body of the `build` flows (CLI and deployment)."""
    r, vs = prepare(recipe, variants)
    st = open_store(store)
    ctx = Ctx(store=st, recipe=r, force=force, workdir=workdir())
    log(f"build {r.name}: {len(vs)} variant(s) -> {st.uri}")
    fam = get_family(r.family)

    fetched = fetch_step.fetch_task(ctx)
    config = fetched.results["config"]
    for v in vs:  # before any conversion: tp must divide the heads
        fam.check_config(config, v, where=f"{r.name}'s fetched config.json")
    fam.derived_limits(r, config)  # and the limits must fit the checkpoint (visual features per image)
    ready(ctx, fetched)

    outcomes = submit_variants(ctx, fetched, vs)()
    summary: dict = {"recipe": r.name, "store": st.uri, "variants": {}, "flow_run": flow_run_id()}
    rows, errors = [], {}
    for v in vs:
        got = outcomes[v.name]
        if isinstance(got, BaseException):
            errors[v.name] = got
            rows.append(report.failed_row(r.name, v.name, got))
            continue
        summary["variants"][v.name] = variant_summary(st, r, got)
        rows.append(report.row(st, r.name, v.name, got))
    report.publish_build(st, r.name, rows)
    if errors:
        if len(errors) == 1:
            err = next(iter(errors.values()))
        else:
            err = StepFailed(f"{len(errors)} of {len(vs)} variants of {r.name} failed: "
                             + "; ".join(report.why(e) for e in errors.values()))
        err.summary = summary
        raise err
    all_cached = all(s.cached for steps in outcomes.values() for s in steps.values())
    return finish(summary, all_cached)


@flow(name="build", log_prints=False, validate_parameters=True, task_runner=task_runner())
def build(recipe: str, variants: Optional[list[str]] = None, store: Optional[str] = None, force: bool = False) -> dict:
    return run_build(recipe, variants, store, force)


def local_config(r: Recipe) -> Optional[dict]:
    """A path source's config.json, read in place (no fetch needed to plan it)."""
    if not r.source.path:
        return None
    p = Path(r.source.path)
    if not p.is_absolute():
        p = r.recipe_dir() / p
    try:
        return json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None


def plan_notes(r: Recipe, vs: list[Variant], planned: list) -> dict[str, list[str]]:
    """Per variant, what `enginefarm plan` says besides the steps: the
    backend's command where it has one (trtllm-build's), the toolchain
    releases its input serves, or why it cannot build here."""
    fam = get_family(r.family)
    # the fetched config.json, where fetch is cached: what the LLM is (BLIP-2: OPT or T5) and its limits;
    # a local (path) source's own config.json where it is not
    config = next((x.hit.results.get("config") for x in planned if x.step == "fetch" and x.hit), None)
    if config is None:
        config = local_config(r)
    limits = fam.derived_limits(r, config) if config else fam.derived_limits(r)
    notes = {}  # per variant: the backend command where there is one, or why it cannot run here
    for v in vs:
        for c in r.enabled_components:
            b = backends.get_backend(r.component_backend(c, v))
            cv = r.component_variant(c, v)  # the component's own target, where the recipe gives one
            ok, why = b.usable(c, cv.target)
            parts = fam.llm_parts(config) if c == "llm" else ("",)
            if parts is None and b.command(cv, limits) is not None:
                # before the fetch the family cannot tell which LLM the checkpoint holds:
                # the commands for each kind it takes, and what decides
                for label, p in fam.llm_part_choices():
                    notes.setdefault(v.name, []).append(
                        f"build[{c}] if the LLM is {label} (the fetched config.json decides; `enginefarm build` "
                        f"fetches it): {b.command(cv, limits, parts=p)}")
                if not ok:
                    notes[v.name].append(f"build[{c}]: not here: {why}")
                continue
            line = b.command(cv, limits, parts=parts) or ""
            serves = b.releases(cv, parts)
            if serves:
                notes.setdefault(v.name, []).append(f"build[{c}] checkpoint serves TensorRT-LLM: {serves}")
            if cv.target != v.target:
                line = f"{b.name} for {cv.target} (the variant's target: {v.target})" + (f"; {line}" if line else "")
            if not ok:
                line = (line + "\n      " if line else "") + f"not here: {why}"
            if line:
                notes.setdefault(v.name, []).append(f"build[{c}]: {line}")
    return notes
