"""The farm as a team deploys it: `prefect server start` on a free loopback
port with its own PREFECT_HOME (SQLite), the work pools, `prefect deploy
--all` of prefect.yaml, a process worker for each pool, and runs created
through the REST API exactly as the UI creates them.

One tiny build (the `build` deployment, its GPU steps on the `gpu` pool),
then two nightlies over a catalog whose one recipe differs from the built
one in its validation settings: the first re-validates that variant (on the
`gpu` pool again), the second builds nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from enginefarm.store import open_store
from helpers import ROOT

pytestmark = pytest.mark.timeout(1200)

BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Farm:
    def __init__(self, tmp: Path, api: str | None = None, store: str | None = None):
        self.tmp = tmp
        self.port = None if api else _free_port()
        self.api = api or f"http://127.0.0.1:{self.port}/api"
        self.store = store or str(tmp / "store")
        self.env = dict(os.environ)
        for k in list(self.env):  # nothing of the test session's own Prefect settings
            if k.startswith("PREFECT_"):
                del self.env[k]
        self.env.update(
            PREFECT_HOME=str(tmp / "prefect-home"),
            PREFECT_API_URL=self.api,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_LOGGING_LEVEL="WARNING",
            PREFECT_LOGGING_LEVEL="INFO",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="5",
            ENGINEFARM_REPO=str(ROOT),
        )
        self.procs: list[subprocess.Popen] = []
        self.http = self.client()

    def client(self):
        return httpx.Client(base_url=self.api, timeout=60)

    def argv(self, argv: list[str], host: str | None) -> list[str]:
        """argv as run on host (here: one machine, so as it is)."""
        return argv

    def spawn(self, name: str, *args: str, host: str | None = None, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        p = subprocess.Popen(self.argv([str(BIN / "prefect"), *args], host), env={**self.env, **(env or {})},
                             cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def prefect(self, *args: str, host: str | None = None) -> str:
        p = subprocess.run(self.argv([str(BIN / "prefect"), "--no-prompt", *args], host), env=self.env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"prefect {' '.join(args)}: {p.stdout[-3000:]}{p.stderr[-3000:]}"
        return p.stdout

    def wait_healthy(self, timeout: float = 240) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.procs[0].poll() is None, (self.tmp / "server.log").read_text()[-3000:]
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"the Prefect server did not answer within {timeout} s")

    def call(self, method: str, url: str, **kw) -> httpx.Response:
        """One API call, retried as Prefect's own client retries it: the
        server answers 503 when its SQLite database is busy (a loaded CI
        machine), 429/502 in passing."""
        for attempt in range(6):
            r = self.http.request(method, url, **kw)
            if r.status_code not in (429, 502, 503):
                return r
            time.sleep(0.5 * 2 ** attempt)
        return r

    def deployment(self, flow: str, name: str) -> dict:
        r = self.call("GET", f"/deployments/name/{flow}/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def run(self, deployment: dict, parameters: dict) -> dict:
        """What the UI's Run button posts."""
        r = self.call("POST", f"/deployments/{deployment['id']}/create_flow_run",
                      json={"parameters": parameters, "state": {"type": "SCHEDULED"}})
        assert r.status_code == 201, r.text
        return r.json()

    def wait(self, run: dict, timeout: float = 900, tick=None) -> dict:
        """The run, once final; tick(flow run) is called at every poll (fault injection)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            fr = self.call("GET", f"/flow_runs/{run['id']}").json()
            if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return fr
            if tick is not None:
                tick(fr)
            for p in self.procs:
                assert p.poll() is None, f"a farm process exited: {p.args}"
            time.sleep(2)
        raise AssertionError(f"flow run {run['name']} did not finish within {timeout} s: {fr['state']}")

    def pause_schedules(self, deployment: dict) -> None:
        """Pause the deployment's schedules and delete the runs they made: no
        night over the whole catalog may start during a test (with the
        pinned SQLAlchemy the server's scheduler makes them)."""
        for sched in deployment["schedules"]:
            r = self.call("PATCH", f"/deployments/{deployment['id']}/schedules/{sched['id']}", json={"active": False})
            assert r.status_code in (200, 204), r.text
        for run in self.flow_runs(deployment):
            if run["state"]["type"] == "SCHEDULED":
                self.call("DELETE", f"/flow_runs/{run['id']}")

    def flow_runs(self, deployment: dict) -> list[dict]:
        r = self.call("POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}})
        return r.json()

    def artifacts(self, run: dict) -> dict:
        import json

        arts = self.call("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
        return {a["key"]: (json.loads(a["data"]) if a["type"] == "table" else a["data"]) for a in arts if a["key"]}

    def logs(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-6000:]

    def close(self) -> None:
        self.http.close()
        for p in reversed(self.procs):  # workers first, then the server
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    f = Farm(tmp_path_factory.mktemp("server"))
    try:
        f.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(f.port))
        f.wait_healthy()
        yield f
    finally:
        f.close()


def test_deploy_build_from_the_ui_then_two_nightlies(farm):
    # --- the server as `prefect.yaml` says, and the store as a Prefect variable
    for pool in ("cpu", "gpu"):
        farm.prefect("work-pool", "create", pool, "--type", "process")
    r = farm.http.post("/variables/", json={"name": "enginefarm_store", "value": farm.store})
    assert r.status_code == 201, r.text
    out = farm.prefect("deploy", "--all")
    assert out.count("successfully created") == 3, out

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    want = {d["name"]: d for d in spec["deployments"]}
    nightly = farm.deployment("nightly", "nightly")
    (sched,) = nightly["schedules"]
    assert sched["schedule"]["cron"] == want["nightly"]["schedules"][0]["cron"]
    assert sched["schedule"]["timezone"] == want["nightly"]["schedules"][0]["timezone"]
    assert sched["active"] and nightly["work_pool_name"] == "cpu"
    farm.pause_schedules(nightly)
    assert nightly["parameters"]["catalog"] == "models"
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

    build = farm.deployment("build", "build")
    assert build["work_pool_name"] == "cpu"
    assert build["job_variables"]["env"]["ENGINEFARM_GPU_DEPLOYMENT"] == "gpu-steps/gpu"
    schema = build["parameter_openapi_schema"]
    assert schema["required"] == ["request"]
    form = schema["definitions"]["BuildRequest"]
    assert form["required"] == ["recipe"] and form["additionalProperties"] is False
    recipes = schema["definitions"]["CatalogRecipe"]["enum"]
    assert {"tiny-opt", "tiny-llama", "opt-125m"} <= set(recipes)
    assert form["properties"]["variants"]["items"] == {"type": "string"}
    assert "tensorrt-llm" in form["properties"]["backend"]["anyOf"][0]["enum"]
    assert form["properties"]["force"] == {"default": False, "description": form["properties"]["force"]["description"],
                                           "title": "Force", "type": "boolean"}

    gpu = farm.deployment("gpu-steps", "gpu")
    assert gpu["work_pool_name"] == "gpu"
    assert gpu["global_concurrency_limit"]["limit"] == 1  # one engine build per GPU slot

    # the form is validated by the server: a recipe outside the catalog is refused
    r = farm.http.post(f"/deployments/{build['id']}/create_flow_run",
                       json={"parameters": {"request": {"recipe": "no-such-recipe"}}})
    assert r.status_code == 409 and "no-such-recipe" in r.text, r.text

    # --- a process worker for each pool
    farm.spawn("worker-cpu", "worker", "start", "--pool", "cpu", "--type", "process")
    farm.spawn("worker-gpu", "worker", "start", "--pool", "gpu", "--work-queue", "default", "--type", "process",
               "--limit", "1")  # as docs/multi-machine.md starts one: tp-N runs go to queues gpus-N

    # --- the UI's Run: build tiny-opt
    run = farm.wait(farm.run(build, {"request": {"recipe": "tiny-opt", "variants": ["fp32-tp1"], "force": False}}))
    assert run["state"]["type"] == "COMPLETED", farm.logs("worker-cpu") + farm.logs("worker-gpu")
    st = open_store(farm.store)
    ref, _ = st.get_ref("tiny-opt", "fp32-tp1", "validated")
    engine = st.get_manifest_by_path(ref["manifest"])
    assert "llm/llm.pt2" in engine["files"] and engine["results"]["validation"]["passed"] is True
    gpu_runs = farm.flow_runs(gpu)
    assert len(gpu_runs) == 1 and gpu_runs[0]["state"]["type"] == "COMPLETED"
    assert gpu_runs[0]["work_pool_name"] == "gpu" and gpu_runs[0]["name"] == "tiny-opt:fp32-tp1"
    arts = farm.artifacts(run)
    (row,) = arts["build-tiny-opt-variants"]
    assert row["status"] == "built" and row["validation"] == "passed" and row["manifest"] == ref["manifest"]
    assert arts["build-tiny-opt-fp32-tp1-manifest"].endswith(f"({(st.root / ref['manifest']).as_uri()})")

    # --- nightly 1: tiny-opt's validation settings changed since that build
    catalog = farm.tmp / "catalog"
    catalog.mkdir()
    data = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-opt.yaml").read_text())
    data["validation"]["max_new_tokens"] = 8
    (catalog / "tiny-opt.yaml").write_text(yaml.safe_dump(data))
    first = farm.wait(farm.run(nightly, {"catalog": str(catalog)}))
    assert first["state"]["type"] == "COMPLETED", farm.logs("worker-cpu")
    (row,) = farm.artifacts(first)["nightly-variants"]
    assert (row["status"], row["why"]) == ("built", "recipe changed: reference max_new_tokens")
    assert row["cache"] == "ran: validate, publish"
    assert len(farm.flow_runs(gpu)) == 2  # re-validated on the gpu pool

    # --- nightly 2: nothing changed, nothing built, no GPU run
    second = farm.wait(farm.run(nightly, {"catalog": str(catalog)}))
    assert second["state"]["type"] == "COMPLETED", farm.logs("worker-cpu")
    assert second["state"]["message"] == "nightly: 1 variant: 0 built, 1 up to date, 0 failed"
    (row,) = farm.artifacts(second)["nightly-variants"]
    assert row["status"] == "up to date" and row["cache"] == "all cached"
    assert len(farm.flow_runs(gpu)) == 2
    assert len(st.list_reports("nightly")) == 2
