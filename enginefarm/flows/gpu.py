"""The GPU steps of one variant: build (each component) and validate.

Run here, as tasks of the calling flow, or, when ENGINEFARM_GPU_DEPLOYMENT
names a deployment (`gpu-steps/gpu` in prefect.yaml, on the `gpu` work
pool), as a run of that deployment through `run_deployment`. The deployment
has a concurrency limit of one run per GPU slot, so builds queue for a GPU
instead of sharing one.

Placement: a variant whose llm is built for a GPU target with tp N > 1
needs one worker with N GPUs (its ranks run on one host). Its run goes to
the work queue `gpus-N` of the deployment's pool, which only workers started
with `--work-queue gpus-N` (on a machine with N GPUs) poll; every other run
goes to the deployment's own queue (the pool's `default`). Before a tp-N
variant's first step, and again before its run is sent, the caller asks the
Prefect API whether a worker polls that queue, and fails the variant with one
line naming the worker it needs when none does. The gpu run itself refuses a
tp-N job on a machine that sees fewer than N GPUs.

The job travels as plain JSON (the recipe as the caller loaded it, the store
URI, the keys of the fetch and convert manifests); the results come back
through the store: the gpu run publishes a table artifact of the manifest
keys it produced, the caller reads it back from the Prefect API and loads
those manifests. Nothing but keys crosses between the pools.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from datetime import datetime, timezone
from typing import Optional

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from .. import backends
from ..errors import NotAvailable, StepFailed
from ..families import get_family
from ..hashing import digest_json
from ..spec import Recipe, Variant, parse_recipe
from ..store import open_store
from ..tasks import build as build_step
from ..tasks import reference as reference_step
from ..tasks import validate as validate_step
from ..tasks.base import Ctx, StepResult, log, log_error
from ..tasks.policy import POLICIES, failure_line, step_failed
from .settings import gpu_deployment


class GpuJob(BaseModel):
    """What the `gpu` deployment needs to build and validate one variant."""

    model_config = ConfigDict(extra="forbid")

    recipe: dict = Field(description="the recipe as the dispatching build loaded it")
    origin: Optional[str] = Field(None, description="where that recipe was loaded from (relative paths resolve there)")
    variant: str
    store: str = Field(description="the store URI (shared by both pools: S3 on many machines)")
    fetch_key: str
    convert_key: str
    export_key: Optional[str] = Field(None, description="the visual export's key (multimodal recipes)")
    force: bool = False
    force_nonce: str


# a work queue counts as served when a worker polled it this recently (workers
# poll every PREFECT_WORKER_QUERY_SECONDS, 10 s by default; Prefect's server
# marks a queue NOT_READY after 60 s without a poll)
POLLED_WITHIN_S = 90


def gpus_needed(r: Recipe, v: Variant) -> int:
    """The GPUs one worker needs for this variant's gpu steps: its tp where
    its llm is built for a GPU (one rank per GPU), 1 where only another
    component is, 0 where everything is built for the CPU."""
    targets = {c: r.component_variant(c, v).target for c in r.enabled_components}
    if targets.get("llm", "cpu") != "cpu":
        return v.tp
    return 1 if any(t != "cpu" for t in targets.values()) else 0


def work_queue(r: Recipe, v: Variant) -> Optional[str]:
    """The gpu pool's work queue of this variant's run: `gpus-N` where it
    needs N > 1 GPUs on one worker, else None (the deployment's own queue)."""
    n = gpus_needed(r, v)
    return f"gpus-{n}" if n > 1 else None


def start_worker_line(pool: str, queue: str, n: int) -> str:
    devices = ",".join(str(i) for i in range(n))
    return f"CUDA_VISIBLE_DEVICES={devices} prefect worker start --pool {pool} --work-queue {queue} --limit 1"


def _unserved(dep: str, queue: str, n: int) -> Optional[str]:
    """None when a worker polls `queue` of dep's work pool; else the sentence
    that says what is missing and how to start it."""
    from prefect import get_client
    from prefect.client.schemas.objects import WorkQueueStatus
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_deployment_by_name(dep).work_pool_name
        except ObjectNotFound:
            raise NotAvailable(f"deployment {dep} (ENGINEFARM_GPU_DEPLOYMENT) is not on the Prefect server; "
                               "deploy it: prefect deploy --all") from None
        if not pool:
            raise NotAvailable(f"deployment {dep} has no work pool; it needs one (the gpu pool) for tp {n}")
        need = f"needs a gpu worker with {n} GPUs (work queue {queue} of pool {pool})"
        start = start_worker_line(pool, queue, n)
        try:
            q = client.read_work_queue_by_name(queue, work_pool_name=pool)
        except ObjectNotFound:
            return (f"{need}: the pool has no such queue; create it (prefect work-queue create {queue} --pool {pool}) "
                    f"and start a worker on a machine with {n} GPUs: {start}")
    last = q.last_polled
    age = (datetime.now(timezone.utc) - last).total_seconds() if last is not None else None
    if q.status == WorkQueueStatus.READY and age is not None and age <= POLLED_WITHIN_S:
        return None
    if q.status == WorkQueueStatus.PAUSED:
        return f"{need}: the queue is paused; resume it: prefect work-queue resume {queue} --pool {pool}"
    since = "none has ever polled it" if age is None else f"none is polling it (last poll {age:.0f} s ago)"
    return f"{need}: {since}; start one on a machine with {n} GPUs: {start}"


def check_placement(ctx: Ctx, v: Variant) -> Optional[str]:
    """The work queue this variant's gpu run goes to (None: the deployment's
    own, or no deployment: in process). A variant that needs N > 1 GPUs on
    one worker fails here, as its `gpu` step, when no worker polls its queue."""
    dep = gpu_deployment()
    queue = work_queue(ctx.recipe, v) if dep else None
    if queue is None:
        return None
    try:
        why = _unserved(dep, queue, gpus_needed(ctx.recipe, v))
    except Exception as e:  # noqa: BLE001 - the Prefect API or a missing deployment: this variant's line
        raise step_failed("gpu", e, ctx.recipe.name, v.name) from e
    if why:
        raise step_failed("gpu", NotAvailable(why), ctx.recipe.name, v.name)
    return queue


def require_gpus(r: Recipe, v: Variant) -> None:
    """Refuse, as this variant's `gpu` step, a tp-N GPU variant on a machine
    that sees fewer than N GPUs (CPU variants need none)."""
    n = gpus_needed(r, v)
    if n <= 1:  # one GPU or none: the backends' own checks say what is missing
        return
    import torch

    have = torch.cuda.device_count()
    if have >= n:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{have} GPU{'s' if have != 1 else ''}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
    line = (f"tp {v.tp} on {r.component_variant('llm', v).target} needs {n} GPUs on one machine; this one "
            f"({socket.gethostname()}) sees {seen}")
    pool, queue = _this_run_queue()
    if pool:  # a gpu run: which queue brought it here, and where it belongs
        line += (f"; this run came from work queue {queue} of pool {pool}: work queue gpus-{n} is for workers on "
                 f"machines with {n} GPUs, and a worker started without --work-queue polls every queue of its "
                 f"pool; start one: {start_worker_line(pool, f'gpus-{n}', n)}")
    raise step_failed("gpu", NotAvailable(line), r.name, v.name)


def _this_run_queue() -> tuple[Optional[str], Optional[str]]:
    """(work pool, work queue) of the flow run this runs in, where it came from one."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    fr = ctx.flow_run if ctx else None
    return (getattr(fr, "work_pool_name", None), getattr(fr, "work_queue_name", None)) if fr else (None, None)


def stored_result(st, recipe: str, step: str, key: str) -> StepResult:
    m = st.get_manifest(recipe, step, key)
    if m is None:
        raise StepFailed(f"manifest {st.manifest_path(recipe, step, key)} is not in {st.uri}")
    return StepResult(step, key, digest_json(m), m, cached=True)


# One variant's GPU steps at a time in one process: the rule the `gpu`
# deployment's concurrency limit keeps across machines (one GPU slot), kept
# here for runs without it. Thread safety is not this lock's job: every step
# that traces or runs a model holds enginefarm.concurrency's gate, whichever
# flow runs it.
_ONE_AT_A_TIME = threading.Lock()


def run_gpu_steps(ctx: Ctx, fetched: StepResult, converted: StepResult, v: Variant,
                  exported: Optional[StepResult] = None):
    """build every component (the llm from the converted checkpoint, the
    visual encoder from its export) and validate them together."""
    config = fetched.results.get("config")
    with _ONE_AT_A_TIME:
        builds = {c: build_step.build_task(ctx, exported if c == "visual" else converted, v, c, config)
                  for c in ctx.recipe.enabled_components}
        # the Hugging Face reference of the recipe, once: computed by the first variant, here (on the GPUs of a
        # GPU worker) unless a shards step computed it already
        referenced = reference_step.reference_task(ctx, fetched) if reference_step.needed(ctx, fetched) else None
        validated = validate_step.validate_task(ctx, fetched, builds["llm"], v, builds.get("visual"), referenced)
    return builds, validated


@flow(name="gpu-steps", log_prints=False, validate_parameters=True)
def gpu_steps(job: GpuJob) -> list[dict]:
    """build + validate of one variant, on a GPU worker."""
    from prefect.artifacts import create_table_artifact

    from .build import workdir

    r = parse_recipe(job.recipe, job.origin or "the dispatched recipe")
    get_family(r.family).check_recipe(r)
    v = r.variant(job.variant)
    require_gpus(r, v)  # before the backends: a tp-N job on a worker with too few GPUs says so
    backends.require([(r.component_backend(c, v), c, r.component_variant(c, v).target) for c in r.enabled_components])
    st = open_store(job.store)
    ctx = Ctx(store=st, recipe=r, force=job.force, force_nonce=job.force_nonce, workdir=workdir())
    fetched = stored_result(st, r.name, "fetch", job.fetch_key)
    converted = stored_result(st, r.name, "convert", job.convert_key)
    exported = stored_result(st, r.name, "export", job.export_key) if job.export_key else None
    builds, validated = run_gpu_steps(ctx, fetched, converted, v, exported)
    rows = [{"step": "build", "component": c, "key": b.key, "cached": b.cached} for c, b in builds.items()]
    rows.append({"step": "validate", "component": "llm", "key": validated.key, "cached": validated.cached})
    create_table_artifact(rows, description=f"gpu steps of {r.name}:{v.name}: the manifests they produced")
    return rows


def _read_rows(flow_run_id) -> Optional[list[dict]]:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType,
    )

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["table"])))
    for a in arts:
        data = json.loads(a.data) if isinstance(a.data, str) else a.data
        if isinstance(data, list) and data and {"step", "key"} <= set(data[0]):
            return data
    return None


_EXC_PREFIX = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Failed|Input|Available|Blob): ")


def _state_cause(state) -> str:
    """The one line that says why a gpu run failed, from its final state."""
    msg = " ".join((getattr(state, "message", None) or "").split())
    for prefix in ("Flow run encountered an exception: ", "Flow run encountered an exception:"):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
            break
    return _EXC_PREFIX.sub("", msg, count=1) or state.name


def _unfinished_step(flow_run_id) -> Optional[str]:
    """The step a gpu run that ended without finishing was in: its task run
    that never ended (the process died in it), else its last failed one."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    except Exception:  # noqa: BLE001 - the cause is still reported, without the step
        return None
    open_ = [t for t in runs if t.state is not None and not t.state.is_final()]
    failed = [t for t in runs if t.state is not None and (t.state.is_failed() or t.state.is_crashed())]
    for group in (open_, failed):
        if group:
            last = max(group, key=lambda t: t.start_time or t.expected_start_time or t.created)
            return last.name.rsplit("-", 1)[0]  # "<step>-<suffix>": step_task names the task after its step
    return None


def gpu_steps_for(ctx: Ctx, fetched: StepResult, converted: StepResult, v: Variant,
                  exported: Optional[StepResult] = None):
    """(builds, validated) of one variant: here, or on the gpu pool."""
    dep = gpu_deployment()
    if not dep:
        require_gpus(ctx.recipe, v)
        return run_gpu_steps(ctx, fetched, converted, v, exported)
    from prefect.deployments import run_deployment

    queue = check_placement(ctx, v)  # again: the worker may have gone since the variant started
    r = ctx.recipe
    job = GpuJob(recipe=r.model_dump(mode="json"), origin=r.origin, variant=v.name, store=ctx.store.uri,
                 fetch_key=fetched.key, convert_key=converted.key,
                 export_key=exported.key if exported else None, force=ctx.force, force_nonce=ctx.force_nonce)
    log(f"{r.name}:{v.name}: build + validate on deployment {dep}" + (f", work queue {queue}" if queue else ""))
    fr = run_deployment(dep, parameters={"job": job.model_dump(mode="json")}, timeout=POLICIES["gpu"].timeout_s,
                        poll_interval=2, work_queue_name=queue,
                        flow_run_name=f"{r.name}:{v.name}", tags=["enginefarm", f"recipe:{r.name}"])
    state = fr.state
    if state is None or not state.is_completed():
        if state is not None and state.is_final():
            cause = _state_cause(state)
        else:
            cause = (f"the gpu steps (flow run {fr.name} of {dep}) did not finish within "
                     f"{POLICIES['gpu'].timeout_s:.0f} s (state {state.name if state else 'unknown'})")
        if cause.startswith(f"recipe {r.name}, variant {v.name}, step "):  # the failing step's own line
            err = StepFailed(cause)
            err.step_line = cause
            raise err
        step = _unfinished_step(fr.id) if state is not None and state.is_final() else None
        if step in POLICIES:  # the run died in a step (a crash: its process never said why)
            line = failure_line(r.name, v.name, step, StepFailed(
                f"the gpu run {fr.name} of {dep} ended {state.name} in its {step} step: {cause}"))
            log_error(line)
            err = StepFailed(line)
            err.step_line = line
            raise err
        raise step_failed("gpu", StepFailed(cause), r.name, v.name)
    rows = _read_rows(fr.id)
    if not rows:
        raise StepFailed(f"the gpu steps (flow run {fr.name} of {dep}) finished but published no result table")
    st = ctx.store
    builds = {x["component"]: stored_result(st, r.name, "build", x["key"]) for x in rows if x["step"] == "build"}
    validated = next(stored_result(st, r.name, "validate", x["key"]) for x in rows if x["step"] == "validate")
    cached = {(x["step"], x["component"]): x["cached"] for x in rows}
    for c, b in builds.items():
        b.cached = cached[("build", c)]
    validated.cached = cached[("validate", "llm")]
    return builds, validated
