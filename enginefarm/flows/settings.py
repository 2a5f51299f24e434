"""Where the flows run: the settings a deployment changes without code.

    ENGINEFARM_STORE            the store, when no parameter and no Prefect variable names one
    Prefect variable `enginefarm_store`
                                the store of deployed runs (set once per server:
                                `prefect variable set enginefarm_store s3://bucket/engines`)
    ENGINEFARM_GPU_DEPLOYMENT   run build/validate as runs of this deployment (`gpu-steps/gpu`,
                                on the `gpu` work pool; a tp-N variant for a GPU target on its
                                work queue `gpus-N`, see gpu.py); unset: in the same process
    ENGINEFARM_TASK_RUNNER      threads (default) | dask | ray: the task runner that fans
                                variants out inside one flow run
    ENGINEFARM_TASK_RUNNER_ADDRESS
                                an existing Dask scheduler / Ray cluster (dask, ray); unset:
                                a local one
    ENGINEFARM_MAX_PARALLEL     variants in flight at once in one flow run (default 4)
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

from ..errors import BadInput

STORE_VARIABLE = "enginefarm_store"
RUNNERS = ("threads", "dask", "ray")
# kind -> (module, task runner class, its options for a local cluster of n workers)
DISTRIBUTED = {
    "dask": ("prefect_dask", "DaskTaskRunner", lambda n: {"cluster_kwargs": {"n_workers": n, "threads_per_worker": 1}}),
    "ray": ("prefect_ray", "RayTaskRunner", lambda n: {"init_kwargs": {"num_cpus": n}}),
}


def max_parallel() -> int:
    raw = os.environ.get("ENGINEFARM_MAX_PARALLEL", "4")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise BadInput(f"ENGINEFARM_MAX_PARALLEL={raw!r}: expected a whole number >= 1")
    return n


def task_runner(kind: Optional[str] = None):
    """The task runner named by ENGINEFARM_TASK_RUNNER, bounded by ENGINEFARM_MAX_PARALLEL."""
    kind = (kind or os.environ.get("ENGINEFARM_TASK_RUNNER") or "threads").strip().lower()
    n = max_parallel()
    address = os.environ.get("ENGINEFARM_TASK_RUNNER_ADDRESS") or None
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=n)
    if kind in DISTRIBUTED:
        module, name, local = DISTRIBUTED[kind]
        try:
            runner = getattr(importlib.import_module(module), name)
        except ImportError:
            raise BadInput(f"ENGINEFARM_TASK_RUNNER={kind} needs {module.replace('_', '-')}: "
                           f"pip install 'enginefarm[{kind}]'") from None
        return runner(address=address) if address else runner(**local(n))
    raise BadInput(f"ENGINEFARM_TASK_RUNNER={kind!r}: expected one of {', '.join(RUNNERS)}")


def gpu_deployment() -> Optional[str]:
    """The deployment that runs GPU steps (FLOW/DEPLOYMENT), or None: run them here."""
    dep = (os.environ.get("ENGINEFARM_GPU_DEPLOYMENT") or "").strip()
    if dep and dep.count("/") != 1:
        raise BadInput(f"ENGINEFARM_GPU_DEPLOYMENT={dep!r}: expected FLOW_NAME/DEPLOYMENT_NAME, e.g. gpu-steps/gpu")
    return dep or None


def resolve_store(store: Optional[str]) -> str:
    """The store of a deployed run: the parameter, else the Prefect variable
    `enginefarm_store`, else $ENGINEFARM_STORE, else ./.farm."""
    if store:
        return store
    from prefect.variables import Variable

    value = Variable.get(STORE_VARIABLE, default=None)
    if value:
        if not isinstance(value, str):
            raise BadInput(f"Prefect variable {STORE_VARIABLE} is {value!r}: expected a store URI string")
        return value
    from ..store import DEFAULT

    return os.environ.get("ENGINEFARM_STORE") or DEFAULT
