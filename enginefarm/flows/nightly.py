"""The `nightly` flow: walk the catalog, rebuild only what is stale.

One `check` task works out, for every variant of every recipe of the
catalog directory and without reading a weight, whether anything that
shapes it changed: the upstream revision (the Hugging Face API, for a source
that tracks a branch), the recipe's parameters of any step, a step's code
version, the toolchain. A variant is up to date when every step's manifest
for today's keys is in the store; otherwise the first step whose key moved
says why, compared with the engine that `latest` points at now.

The check reads the store through its index (`store/index.py`): one
listing of the manifests and one of the refs, and the bytes of what did not
change since the index was written, so an unchanged variant costs no store
request and no task run of its own; what the listing shows changed is read
from the store. Recipes are checked side by side (ENGINEFARM_MAX_PARALLEL
threads); one recipe's failure (after the `check` policy's retries on
transient errors) fails that recipe's variants only.

Stale variants fan out: one fetch per recipe, then one `variant` task per
variant (bounded by the task runner, ENGINEFARM_MAX_PARALLEL). A failing
variant does not stop the others. The run publishes its artifacts, writes
its record to the store (reports/nightly/), and ends Completed, or Failed
with a message that says how many variants failed.

Recipes that cannot be built here (a family not implemented yet, a backend
not installed) are reported as skipped, with the reason; a recipe that does
not load is a failure.
"""

from __future__ import annotations

import contextvars
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from prefect import flow
from prefect.states import Completed, Failed

from ..concurrency import warm_transformers
from ..errors import BadInput, NotAvailable
from ..families import get_family
from ..hashing import canonical_json
from ..families import load_recipe
from ..spec import Recipe, Variant
from ..store import open_store
from ..store.index import Indexed
from ..tasks import fetch as fetch_step
from ..tasks import publish as publish_step
from ..tasks.base import Ctx, StepSpec, log
from ..tasks.policy import POLICIES, one_line, should_retry, step_failed, step_task
from . import report
from .build import flow_run_id, plan, prepare, submit_variants, workdir
from .settings import max_parallel, resolve_store, task_runner


@dataclass
class Verdict:
    variant: str
    stale: bool
    reasons: list[str] = field(default_factory=list)
    steps: Optional[dict] = None  # every step's stored result, when up to date


# ----------------------------------------------------------------------------- why stale


def _old_chain(st, recipe: str, variant: str) -> Optional[dict]:
    """{step name: manifest} loader of the engine `latest` points at, or None."""
    got = st.get_ref(recipe, variant, "latest")
    if not got:
        return None
    pub = st.get_manifest_by_path(got[0]["manifest"])
    if pub is None:
        return None
    cache: dict = {"publish": pub}

    def get(name: str) -> Optional[dict]:
        if name not in cache:
            ref = pub.get("inputs", {}).get(name)
            cache[name] = st.get_manifest(recipe, ref["step"], ref["key"]) if ref else None
        return cache[name]

    return {"get": get}


def _as_stored(x: dict) -> dict:
    """x as a manifest holds it (JSON: tuples become lists)."""
    return json.loads(canonical_json(x))


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def explain(r: Recipe, name: str, spec: StepSpec, old: Optional[dict]) -> list[str]:
    """Why the step `name` (fetch, convert, build.llm, validate, publish) has
    a new key, compared with the manifest it had in the old chain."""
    if old is None:
        return [f"{spec.step}: no earlier record to compare with"]
    reasons = []
    step = spec.step + (f"[{spec.params['component']}]" if spec.step == "build" else "")
    p_old, p_new = old.get("params", {}), _as_stored(spec.params)
    for k in _changed(p_old, p_new):
        if step == "fetch" and k == "revision":
            src = r.source
            what = f"branch {src.track} of {src.hf} moved" if src.track else f"{src.hf} revision changed"
            reasons.append(f"upstream: {what} {str(p_old.get(k))[:12]} -> {str(p_new.get(k))[:12]}")
        elif step == "fetch" and k in ("files", "objects"):
            a = {x[0]: x[1:] for x in p_old.get(k) or []}
            b = {x[0]: x[1:] for x in p_new.get(k) or []}
            names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            reasons.append(f"source files changed: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
        else:
            reasons.append(f"recipe changed: {step} {k}")
    if old.get("code_version") != spec.code:
        reasons.append(f"{step} code changed ({str(old.get('code_version'))[:8]} -> {spec.code[:8]})")
    t_old, t_new = old.get("toolchain", {}), _as_stored(spec.toolchain)
    tc = _changed(t_old, t_new)
    if tc:
        reasons.append(f"{step} toolchain changed: " + ", ".join(f"{k} {t_old.get(k)} -> {t_new.get(k)}" for k in tc))
    return reasons or [f"{step}: an input was rebuilt"]


def staleness(r: Recipe, vs: list[Variant], st) -> dict[str, Verdict]:
    """Per variant: up to date (every step's manifest is in the store), or
    stale, with the reasons. Reads metadata only."""
    prime = getattr(st, "prime", None)  # an Indexed store: the chains `latest` points at, from the index
    if prime is not None:
        prime(r.name, [v.name for v in vs])
    rows, complete = plan(r, vs, st)
    out: dict[str, Verdict] = {}
    for v in vs:
        if v.name in complete:
            out[v.name] = Verdict(v.name, False, steps=complete[v.name])
            continue
        first = next(x for x in rows if x.variant in ("-", v.name) and x.hit is None)
        chain = _old_chain(st, r.name, v.name)
        if chain is None:
            reasons = ["never built"]
        else:
            name = "build." + first.spec.params["component"] if first.spec.step == "build" else first.spec.step
            reasons = explain(r, name, first.spec, chain["get"](name))
        out[v.name] = Verdict(v.name, True, reasons)
    return out


def check_recipe(recipe: Recipe, variants: list[Variant], store) -> dict[str, Verdict]:
    """staleness(), retried on transient errors as the `check` policy says;
    a failure is the check step's one line (recipe, step, why)."""
    pol = POLICIES["check"]
    for attempt in range(pol.retries + 1):
        try:
            return staleness(recipe, variants, store)
        except Exception as e:  # noqa: BLE001 - retried or reported for this recipe only
            if attempt < pol.retries and should_retry("check", e):
                log(f"recipe {recipe.name}, step check: {one_line(e)} (attempt {attempt + 1} of {pol.retries + 1}; "
                    "will retry)", "warning")
                time.sleep(pol.retry_delays[min(attempt, len(pol.retry_delays) - 1)])
                continue
            raise step_failed("check", e, recipe.name, None) from e
    raise AssertionError("unreachable")


def check_catalog(items: list[tuple[Recipe, list[Variant]]], store) -> list[dict[str, Verdict] | BaseException]:
    """Per recipe of items, in order: its verdicts, or the error that stopped its check."""
    def one(item: tuple[Recipe, list[Variant]]) -> dict[str, Verdict] | BaseException:
        try:
            return check_recipe(item[0], item[1], store)
        except Exception as e:  # noqa: BLE001 - one recipe's failure is reported, the rest go on
            return e

    if len(items) <= 1:
        return [one(x) for x in items]
    if any(get_family(r.family).kind == "multimodal" for r, _ in items):
        warm_transformers()  # their checks read configs through transformers: import it before the threads
    with ThreadPoolExecutor(max_workers=min(max_parallel(), len(items))) as pool:
        # each in a copy of this context: the task run's logger works in the threads
        futures = [pool.submit(contextvars.copy_context().run, one, x) for x in items]
        return [f.result() for f in futures]


@step_task("check", task_run_name="check {n} recipe(s)")
def check_task(items: list[tuple[Recipe, list[Variant]]], store, n: int) -> list[dict[str, Verdict] | BaseException]:
    return check_catalog(items, store)


# ----------------------------------------------------------------------------- the catalog


def load_catalog(catalog: str) -> tuple[list[tuple[Recipe, list[Variant]]], list[dict]]:
    """(buildable recipes with their variants, rows of recipes that are not)."""
    root = Path(catalog)
    if not root.is_dir():
        raise BadInput(f"catalog {catalog}: not a directory of recipes")
    paths = sorted(p for p in root.rglob("*.yaml") if p.is_file())
    if not paths:
        raise BadInput(f"catalog {catalog}: no recipes (*.yaml) in it")
    items, rows = [], []
    for p in paths:
        try:
            r = load_recipe(str(p))
        except BadInput as e:
            rows.append(report.failed_row(p.stem, "-", e))
            continue
        try:
            items.append(prepare(r))
        except NotAvailable as e:
            rows += [report.skipped_row(r.name, v.name, report.why(e)) for v in r.variants()]
        except BadInput as e:
            rows += [report.failed_row(r.name, v.name, e) for v in r.variants()]
    return items, rows


# ----------------------------------------------------------------------------- the flow


@flow(name="nightly", log_prints=False, validate_parameters=True, task_runner=task_runner())
def nightly(catalog: str = "models", store: Optional[str] = None, force: bool = False, nights: int = 14):
    """Rebuild what changed in the catalog.

    Args:
        catalog: a directory of recipes (relative to the repository)
        store: a store URI; empty: the Prefect variable enginefarm_store
        force: rebuild every variant, stale or not
        nights: how many nights the plot shows
    """
    started = datetime.now(timezone.utc)
    st = open_store(resolve_store(store))
    items, rows = load_catalog(catalog)
    log(f"nightly: {len(items)} buildable recipe(s) in {catalog} -> {st.uri}")

    view = Indexed(st)  # manifests and refs through the store's index: unchanged ones cost no request
    todo = []
    for (r, vs), verdicts in zip(items, check_task(items, view, len(items))):
        if isinstance(verdicts, BaseException):
            rows += [report.failed_row(r.name, v.name, verdicts) for v in vs]
            continue
        stale = [v for v in vs if force or verdicts[v.name].stale]
        for v in vs:
            verdict = verdicts[v.name]
            if v not in stale:
                publish_step.move_aliases(view, r.name, v.name, verdict.steps["publish"])
                rows.append(report.row(st, r.name, v.name, verdict.steps))
            else:
                log(f"{r.name}:{v.name} is stale: {'; '.join(verdict.reasons) or 'forced'}")
        if stale:
            todo.append((r, stale, verdicts))
    view.save()

    builds = []
    for r, stale, verdicts in todo:
        ctx = Ctx(store=st, recipe=r, force=force, workdir=workdir())
        fetched = fetch_step.fetch_task.submit(ctx)  # once per recipe, however many variants
        builds.append((r, stale, verdicts, fetched, submit_variants(ctx, fetched, stale)))
    for r, stale, verdicts, fetched, outcomes in builds:
        outcomes = outcomes()
        for v in stale:
            got = outcomes[v.name]
            if isinstance(got, BaseException):
                cause = fetched.state.result(raise_on_failure=False) if fetched.state.is_failed() else got
                rows.append(report.failed_row(r.name, v.name, cause))
            else:
                reasons = verdicts[v.name].reasons or ["forced"]
                rows.append(report.row(st, r.name, v.name, got, reasons))

    rows.sort(key=lambda x: (x["recipe"], x["variant"]))
    record = report.night_record(started, catalog, st, flow_run_id(), rows)
    name = report.night_name(started, record["flow_run"])
    key = st.put_report(report.NIGHTLY, name, record)
    png = report.plot(report.last_nights(st, max(nights, 1)))
    report.publish_nightly(st, record, key, png)
    failed = [r for r in rows if r["status"] == "failed"]
    message = f"nightly: {report.headline(rows)}"
    log(message)
    for r in failed:
        log(f"failed: {r['recipe']}:{r['variant']}: {r['why']}", "error")
    summary = {**record, "record": key}
    if failed:
        return Failed(message=f"{len(failed)} of {len(rows)} variants failed: "
                              + "; ".join(f"{r['recipe']}:{r['variant']}" for r in failed), data=summary)
    return Completed(message=message, data=summary)

