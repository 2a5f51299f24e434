"""A tp-N variant built for a GPU goes to the gpu pool's work queue `gpus-N`
(docs/multi-machine.md), and fails, naming the worker it needs, where no
worker polls that queue.

A real `prefect server start` (tests/test_server.py's Farm), the `gpu`
deployment of prefect.yaml, a real process worker, and the CLI as a person
runs it (`enginefarm nightly`, `enginefarm build` with
ENGINEFARM_GPU_DEPLOYMENT, as the deployed nightly and build runs set it).
The recipe: the tiny LLaMA (4 heads) at tp 2 for sm_90. On this machine
(no GPU) the worker's run refuses it too: it sees fewer than 2 GPUs.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from enginefarm.flows import gpu
from enginefarm.spec import parse_recipe
from helpers import ROOT, enginefarm_exe, recipe_for
from test_server import Farm

pytestmark = pytest.mark.timeout(900)

DEP = "gpu-steps/gpu"
TP2_GPU = {"backend": ["aoti"], "dtype": ["float32"], "quant": ["none"], "tp": [2], "target": ["sm_90"]}


def _recipe(matrix: dict, components: dict | None = None):
    data = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-llama.yaml").read_text())
    data.update(name="place", matrix=matrix, default_variant=None)
    if components:
        data["components"] = components
    return parse_recipe(data, "place.yaml")


def test_the_gpus_a_variant_needs_name_its_queue():
    r = _recipe({**TP2_GPU, "tp": [1, 2, 4], "target": ["cpu", "sm_90"]})
    got = {v.name: (gpu.gpus_needed(r, v), gpu.work_queue(r, v)) for v in r.variants()}
    assert got == {"fp32-tp1-cpu": (0, None), "fp32-tp2-cpu": (0, None), "fp32-tp4-cpu": (0, None),
                   "fp32-tp1-sm_90": (1, None), "fp32-tp2-sm_90": (2, "gpus-2"), "fp32-tp4-sm_90": (4, "gpus-4")}


@pytest.mark.skipif(__import__("torch").cuda.device_count() >= 2, reason="this machine has 2 GPUs: nothing to refuse")
def test_a_gpu_run_refuses_a_tp_variant_on_too_few_gpus_and_runs_cpu_ones():
    import torch

    r = _recipe({**TP2_GPU, "target": ["cpu", "sm_90"]})
    gpu.require_gpus(r, r.variant("fp32-tp2-cpu"))  # gloo ranks on the CPU: no GPU needed, nothing refused
    with pytest.raises(gpu.NotAvailable) as e:
        gpu.require_gpus(r, r.variant("fp32-tp2-sm_90"))
    n = torch.cuda.device_count()
    assert str(e.value).startswith(f"recipe place, variant fp32-tp2-sm_90, step gpu failed: tp 2 on sm_90 needs 2 GPUs "
                                   f"on one machine; this one ("), str(e.value)
    assert f") sees {n} GPU" in str(e.value) and e.value.step_line == str(e.value)


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A Prefect server with the `gpu` pool and the `gpu-steps/gpu` deployment of prefect.yaml; no worker yet."""
    f = Farm(tmp_path_factory.mktemp("place"))
    try:
        f.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(f.port))
        f.wait_healthy()
        f.prefect("work-pool", "create", "gpu", "--type", "process")
        out = f.prefect("deploy", "--name", "gpu")
        assert "successfully created" in out, out
        from enginefarm.testing import write_tiny

        src = write_tiny("llama", f.tmp / "src", seed=11)
        f.recipe = recipe_for(f.tmp, "place", "llama", src, matrix=TP2_GPU, default_variant="fp32-tp2")
        yield f
    finally:
        f.close()


def _cli(farm: Farm, *args: str) -> subprocess.CompletedProcess:
    env = {**farm.env, "ENGINEFARM_GPU_DEPLOYMENT": DEP, "PREFECT_LOGGING_LEVEL": "WARNING"}
    return subprocess.run([enginefarm_exe(), *args], env=env, cwd=farm.tmp, capture_output=True, text=True,
                          timeout=600)


def _unserved(farm: Farm, queue: str, n: int):
    """gpu._unserved asked of the farm's server, from this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: farm.api}):
        return gpu._unserved(DEP, queue, n)


def _need(queue: str = "gpus-2", n: int = 2) -> str:
    return f"needs a gpu worker with {n} GPUs (work queue {queue} of pool gpu)"


START = "CUDA_VISIBLE_DEVICES=0,1 prefect worker start --pool gpu --work-queue gpus-2 --limit 1"


def test_a_tp_variant_without_a_worker_of_its_gpus_fails_at_once_naming_it(farm):
    missing = (f"{_need()}: the pool has no such queue; create it (prefect work-queue create gpus-2 --pool gpu) "
               f"and start a worker on a machine with 2 GPUs: {START}")
    assert _unserved(farm, "gpus-2", 2) == missing

    # the nightly: that variant fails as its `gpu` step, before convert; the night goes on to its record
    catalog = farm.tmp / "catalog"
    catalog.mkdir()
    (catalog / "place.yaml").write_text(farm.recipe.read_text())
    t0 = time.monotonic()
    p = _cli(farm, "nightly", "--catalog", str(catalog), "--store", farm.store, "--json")
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    (row,) = json.loads(p.stdout)["rows"]
    assert (row["recipe"], row["variant"], row["status"]) == ("place", "fp32-tp2", "failed"), row
    assert row["why"] == f"recipe place, variant fp32-tp2, step gpu failed: {missing}", row["why"]
    from enginefarm.store import open_store

    st = open_store(farm.store)
    assert st.list_manifests("place", "fetch") and not st.list_manifests("place", "convert")  # refused before convert
    assert farm.flow_runs(farm.deployment("gpu-steps", "gpu")) == []  # nothing sent
    print(f"\nnightly refused in {took:.0f} s")

    # a queue nobody polls
    farm.prefect("work-queue", "create", "gpus-2", "--pool", "gpu")
    assert _unserved(farm, "gpus-2", 2) == f"{_need()}: none has ever polled it; start one on a machine with 2 GPUs: {START}"
    assert _unserved(farm, "gpus-4", 4).startswith(f"{_need('gpus-4', 4)}: the pool has no such queue")
    farm.prefect("work-queue", "pause", "gpus-2", "--pool", "gpu")
    try:
        assert _unserved(farm, "gpus-2", 2) == (f"{_need()}: the queue is paused; resume it: "
                                                "prefect work-queue resume gpus-2 --pool gpu")
    finally:
        farm.prefect("work-queue", "resume", "gpus-2", "--pool", "gpu")


def test_a_tp_variant_goes_to_its_queue_and_a_worker_with_too_few_gpus_refuses_it(farm):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: its worker would build the engine")
    r = farm.call("POST", "/work_pools/gpu/queues", json={"name": "gpus-2"})  # made above, unless run alone
    assert r.status_code in (201, 409), r.text
    farm.spawn("worker-gpus-2", "worker", "start", "--pool", "gpu", "--work-queue", "gpus-2", "--type", "process",
               "--limit", "1", "--name", "gpus-2-worker")
    deadline = time.monotonic() + 180
    while (why := _unserved(farm, "gpus-2", 2)) is not None:
        assert time.monotonic() < deadline, f"the gpus-2 worker did not poll: {why}\n{farm.logs('worker-gpus-2')}"
        time.sleep(2)

    p = _cli(farm, "build", str(farm.recipe), "--store", farm.store)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:] + farm.logs("worker-gpus-2")
    runs = farm.flow_runs(farm.deployment("gpu-steps", "gpu"))
    assert [(r["name"], r["work_pool_name"], r["work_queue_name"], r["state"]["type"]) for r in runs] == [
        ("place:fp32-tp2", "gpu", "gpus-2", "FAILED")], runs
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("enginefarm: recipe place, variant fp32-tp2, step gpu failed: tp 2 on sm_90 needs 2 GPUs "
                           "on one machine; this one ("), p.stderr[-3000:]
    assert (f" sees {torch.cuda.device_count()} GPU" in line and "this run came from work queue gpus-2 of pool gpu" in line
            and line.endswith(START)), line
    print(f"\n{line}")
