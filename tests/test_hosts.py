"""The farm on several hosts, with faults: each host is a network namespace
of its own (tests/netns.py), joined by veth cables to one bridge.

    db       PostgreSQL (Debian's `postgresql`, `make postgres`): a cluster made here with initdb
    prefect  `prefect server start` on that database
    s3       the store: moto's S3 server
    cpu      a process worker of the `cpu` pool (the nightly, fetch, convert, publish)
    gpu      a process worker of the `gpu` pool (build + validate)
    ctl      where the test stands: the pools, `prefect deploy --all`, the runs, the checks

Over a catalog of two tiny recipes (tiny-gpt2, tiny-opt), four nightlies:

1. the first night, with two faults: the gpu host dies (every process on it
   SIGKILLed) while it builds tiny-gpt2, and the Prefect server is
   restarted while tiny-opt's steps run. tiny-gpt2's row names the step it
   died in; tiny-opt is built; nothing of tiny-gpt2 is published.
2. S3 cut off for 30 s (its cable unplugged) while tiny-gpt2 is rebuilt:
   exactly that variant is built.
3. a forced night whose work directory is a tmpfs too small for a
   checkpoint: each variant fails with one line naming the full directory;
   the directory is left empty.
4. nothing changed: nothing built, no gpu run.

At the end every manifest in the store names only blobs that are there,
every ref a manifest that is there, and every published engine pulls
verified, byte for byte.

ENGINEFARM_HOSTS_NIGHTS=N (`make soak`) repeats nightlies 2-4 N times.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import netns
from helpers import ROOT
from test_server import BIN, Farm

pytestmark = pytest.mark.timeout(1800 + 600 * int(os.environ.get("ENGINEFARM_HOSTS_ROUNDS", "0")))

HOSTS = ["db", "prefect", "s3", "cpu", "gpu", "ctl"]
RECIPES = ["tiny-gpt2", "tiny-opt"]
PG_PASSWORD = "farm-test-only"  # a throwaway cluster in a temp dir, reachable only inside the sandbox
BUCKET = "farm"
HEARTBEAT_S = 30  # the workers' flow-run heartbeat (automations.yaml: within 60)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    w = shutil.which("initdb")
    return Path(w).parent if w else None


class HostFarm(Farm):
    """test_server's Farm, each process on its host."""

    def __init__(self, tmp: Path, box: netns.Sandbox):
        self.box = box
        super().__init__(tmp, api=f"http://{box.addr['prefect']}:4200/api", store=f"s3://{BUCKET}/engines")
        self.named: dict[str, subprocess.Popen] = {}
        self.s3_url = f"http://{box.addr['s3']}:5000"
        self.env.update(AWS_ENDPOINT_URL=self.s3_url, PREFECT_UI_ENABLED="false")
        self.db_url = f"postgresql+asyncpg://prefect:{PG_PASSWORD}@{box.addr['db']}:5432/prefect"

    def client(self):
        return netns.NsHttp(self.box, self.api)

    def argv(self, argv: list[str], host: str | None) -> list[str]:
        return self.box.argv(host or "ctl", argv)

    def home(self, host: str) -> dict:
        d = self.tmp / "hosts" / host
        d.mkdir(parents=True, exist_ok=True)
        return {"PREFECT_HOME": str(d / "prefect-home"), "ENGINEFARM_TINY_DIR": str(d / "tiny"),
                "ENGINEFARM_CACHE": str(d / "cache")}

    def start(self, name: str, host: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        p = subprocess.Popen(self.box.argv(host, argv), env={**self.env, **self.home(host), **(env or {})},
                             cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        self.named[name] = p
        return p

    def prefect_on(self, name: str, host: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        return self.start(name, host, [str(BIN / "prefect"), *args], env)

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 30) -> None:
        p = self.named.pop(name)
        self.procs.remove(p)
        if p.poll() is None:
            os.killpg(p.pid, sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process on host (its namespace), as when the machine dies."""
        out = subprocess.run(["ip", "netns", "pids", self.box.ns[host]], capture_output=True, text=True).stdout
        pids = [int(x) for x in out.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name, p in list(self.named.items()):
            if p.args[:4] == self.box.argv(host, [])[:4]:
                p.wait(timeout=30)
                self.named.pop(name)
                self.procs.remove(p)
        return pids

    def healthy(self) -> bool:
        try:
            return self.http.get("/health").status_code == 200
        except Exception:  # noqa: BLE001 - down, or coming up
            return False

    def wait_up(self, timeout: float = 240) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            p = self.named["server"]
            assert p.poll() is None, self.logs("server")
            if self.healthy():
                return
            time.sleep(1)
        raise AssertionError(f"the Prefect server did not answer within {timeout} s: {self.logs('server')}")

    def start_server(self) -> None:
        self.prefect_on("server", "prefect", "server", "start", "--host", self.box.addr["prefect"], "--port", "4200",
                        env={"PREFECT_API_DATABASE_CONNECTION_URL": self.db_url,
                             "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"})
        self.wait_up()

    def start_worker(self, pool: str) -> None:
        args = ["worker", "start", "--pool", pool, "--type", "process", "--name", f"{pool}-host"]
        if pool == "gpu":  # a single-GPU worker serves the pool's default queue (docs/multi-machine.md)
            args += ["--work-queue", "default", "--limit", "1"]
        env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}  # docs/multi-machine.md, automations.yaml
        if os.environ.get("ENGINEFARM_MAX_PARALLEL"):
            env["ENGINEFARM_MAX_PARALLEL"] = os.environ["ENGINEFARM_MAX_PARALLEL"]
        self.prefect_on(f"worker-{pool}", pool, *args, env=env)

    def open_store(self):
        from enginefarm.store import open_store

        return self.box.inns(open_store, self.store)

    def task_runs(self, run: dict) -> list[dict]:
        return self.call("POST", "/task_runs/filter",
                         json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()

    def gpu_runs(self) -> list[dict]:
        return self.flow_runs(self.deployment("gpu-steps", "gpu"))


# ----------------------------------------------------------------------------- the hosts


def _postgres(farm: HostFarm, pg: Path) -> Path:
    """A fresh cluster owned by the `postgres` user in a temp dir, listening on the db host only."""
    user = pwd.getpwnam("postgres")
    d = Path(tempfile.mkdtemp(prefix="ef-pg-"))
    os.chown(d, user.pw_uid, user.pw_gid)
    (d / "pw").write_text(PG_PASSWORD + "\n")
    os.chown(d / "pw", user.pw_uid, user.pw_gid)
    as_pg = ["runuser", "-u", "postgres", "--"]
    p = subprocess.run([*as_pg, str(pg / "initdb"), "-D", str(d / "data"), "-U", "prefect", "--pwfile", str(d / "pw"),
                        "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(d / "data" / "pg_hba.conf", "a") as f:
        f.write(f"host all all {netns.SUBNET}.0/24 scram-sha-256\n")
    farm.start("postgres", "db", [*as_pg, str(pg / "postgres"), "-D", str(d / "data"), "-k", str(d),
                                  "-c", f"listen_addresses={farm.box.addr['db']}", "-c", "port=5432",
                                  "-c", "fsync=off", "-c", "max_connections=200"])
    t0 = time.time()
    while subprocess.run(farm.box.argv("db", [*as_pg, str(pg / "pg_isready"), "-q", "-h", str(d)])).returncode:
        assert time.time() - t0 < 120, farm.logs("postgres")
        assert farm.named["postgres"].poll() is None, farm.logs("postgres")
        time.sleep(0.5)
    p = subprocess.run(farm.box.argv("db", [*as_pg, str(pg / "createdb"), "-h", str(d), "-U", "prefect", "prefect"]),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return d


def _s3(farm: HostFarm) -> None:
    import boto3

    farm.start("s3", "s3", [str(BIN / "moto_server"), "-H", farm.box.addr["s3"], "-p", "5000"])

    def bucket():
        boto3.client("s3", endpoint_url=farm.s3_url).create_bucket(Bucket=BUCKET)

    t0 = time.time()
    while True:
        try:
            farm.box.inns(bucket)
            return
        except Exception:  # noqa: BLE001 - not up yet
            assert time.time() - t0 < 120 and farm.named["s3"].poll() is None, farm.logs("s3")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = netns.why_not()
    if reason:
        pytest.skip(f"several hosts need network namespaces: {reason}")
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL is not installed: `make postgres` (Debian's postgresql package)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no `postgres` user (Debian's postgresql package makes it)")
    box = netns.Sandbox(HOSTS)
    farm = pgdir = None
    mp = pytest.MonkeyPatch()
    try:
        farm = HostFarm(tmp_path_factory.mktemp("hosts"), box)
        mp.setenv("AWS_ENDPOINT_URL", farm.s3_url)  # the test's own store reads (from the ctl host)
        # the small work directory of night 3, mounted before any worker starts: each host's mount
        # namespace (`ip netns exec` makes one) is a copy taken when its first process starts
        farm.small = farm.tmp / "work-small"
        farm.small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(farm.small)], check=True)
        pgdir = _postgres(farm, pg)
        _s3(farm)
        farm.start_server()
        yield farm
    finally:
        mp.undo()
        if farm is not None:
            farm.close()
            if getattr(farm, "small", None) is not None:
                subprocess.run(["umount", "-l", str(farm.small)], check=False)
        box.close()
        if pgdir is not None:
            shutil.rmtree(pgdir, ignore_errors=True)


# ----------------------------------------------------------------------------- checks


def audit(farm: HostFarm) -> dict:
    """Every manifest names blobs that are in the store, every ref a manifest
    that is; every published engine pulls, verified. Figures for the README."""
    from enginefarm.store.pull import pull

    def run():  # on the ctl host already
        from enginefarm.store import open_store

        st = open_store(farm.store)
        blobs = set(st.list_blobs())
        named, missing, published = set(), [], []
        for recipe, step, key in st.list_manifests():
            m = st.get_manifest(recipe, step, key)
            for rel, info in m.get("files", {}).items():
                named.add(info["sha256"])
                if info["sha256"] not in blobs:
                    missing.append(f"{recipe}/{step}/{key[:12]}: {rel}")
            if step == "publish":
                published.append((recipe, m["variant"], key, sum(f["size"] for f in m["files"].values())))
        dangling = []
        for recipe, variant, alias in st.list_refs():
            got = st.get_ref(recipe, variant, alias)
            if got and st.get_manifest_by_path(got[0]["manifest"]) is None:
                dangling.append(f"{recipe}:{variant}@{alias}")
        pulled = 0
        dest = farm.tmp / "pulled"
        for recipe, variant, alias in st.list_refs():
            if alias != "latest":
                continue
            ref, _ = st.get_ref(recipe, variant, alias)
            out = dest / f"{recipe}-{variant}"
            shutil.rmtree(out, ignore_errors=True)
            pulled += pull(st, ref, st.get_manifest_by_path(ref["manifest"]), out)["bytes"]  # every byte verified
        return {"blobs": len(blobs), "orphans": len(blobs - named), "missing": missing, "dangling": dangling,
                "published": len(published), "pulled_bytes": pulled}

    return farm.box.inns(run)


def rows(farm: HostFarm, run: dict) -> dict:
    return {(r["recipe"], r["variant"]): r for r in farm.artifacts(run)["nightly-variants"]}


def step_of(farm: HostFarm, run: dict, state: str = "RUNNING") -> str | None:
    """The step (task name) of run now in `state`, if any."""
    for t in farm.task_runs(run):
        if t["state"] and t["state"]["type"] == state:
            return t["name"].rsplit("-", 1)[0]
    return None


def scheduled_then_paused(farm: HostFarm, nightly: dict) -> int:
    """The server's scheduler makes the nightly's next runs from its cron
    (prefect.yaml); then the schedule is paused and those runs deleted, so
    that no night over the whole catalog starts during the test."""
    import sqlalchemy
    from packaging.version import Version

    pinned = Version(sqlalchemy.__version__) < Version("2.1")  # pyproject.toml: prefect 3.8's scheduler needs < 2.1
    t0, scheduled = time.time(), []
    while not scheduled and time.time() - t0 < (60 if pinned else 10):
        time.sleep(2)
        scheduled = [r for r in farm.flow_runs(nightly) if r["state"]["type"] == "SCHEDULED"]
    farm.pause_schedules(nightly)
    if pinned:
        assert scheduled, "the server's scheduler made no run of the nightly's cron: " + farm.logs("server")
    elif not scheduled:
        import warnings

        warnings.warn(f"SQLAlchemy {sqlalchemy.__version__} is outside pyproject.toml's pin (<2.1): the Prefect "
                      "server's scheduler fails, no cron schedule makes runs (`make venv` installs the pinned one)")
    return len(scheduled)


# ----------------------------------------------------------------------------- the test


class Faults:
    """Fault injectors, each driven by Farm.wait's tick (one poll of the night's run, every ~2 s)."""

    def __init__(self, farm: HostFarm):
        self.farm = farm

    def gpu_run(self, name: str | None = None, state: str = "RUNNING") -> dict | None:
        for r in self.farm.gpu_runs():
            if (name is None or r["name"] == name) and r["state"]["type"] == state:
                return r
        return None

    def kill_gpu_host_in_build(self, out: dict, name: str | None = None):
        """SIGKILL every process on the gpu host while a gpu run (of name) is in its build step; the host
        comes back (a new worker) at once. out: the run killed, how many processes, when the run was Crashed."""
        def tick(fr: dict) -> None:
            if "killed_at" not in out:
                g = self.gpu_run(name)
                if g and step_of(self.farm, g) == "build":
                    out["pids"] = len(self.farm.kill_host("gpu"))
                    out["killed_at"], out["run"] = time.time(), g
                    self.farm.start_worker("gpu")
            elif "crashed_after_s" not in out:
                r = self.farm.call("GET", f"/flow_runs/{out['run']['id']}").json()
                if r["state"]["type"] == "CRASHED":
                    out["crashed_after_s"] = round(time.time() - out["killed_at"])
        return tick

    def restart_server(self, out: dict, when):
        """Stop the Prefect server (SIGTERM) and start it again, once when(fr) holds; out: seconds it was down."""
        def tick(fr: dict) -> None:
            if "down_s" not in out and when(fr):
                t0 = time.time()
                out["in_flight"] = [fr["name"] + " (nightly)"] + sorted(
                    r["name"] for r in self.farm.gpu_runs() if r["state"]["type"] == "RUNNING")
                self.farm.stop("server")
                self.farm.start_server()
                out["down_s"] = round(time.time() - t0)
        return tick

    def cut_s3(self, out: dict, seconds: float = 30, name: str | None = None):
        """Unplug the S3 host for `seconds` once a gpu run (of name) runs; out: the step it was in, the cut."""
        def tick(fr: dict) -> None:
            if "cut_at" not in out:
                g = self.gpu_run(name)
                if g:
                    self.farm.box.unplug("s3")
                    out["cut_at"], out["step"] = time.time(), step_of(self.farm, g)
            elif "cut_s" not in out and time.time() - out["cut_at"] >= seconds:
                self.farm.box.plug("s3")
                out["cut_s"] = round(time.time() - out["cut_at"])
            if "cut_at" in out and "build_after_s" not in out and out["step"] is None:
                g = self.gpu_run(name)  # the run's first S3 reads (its inputs' manifests) wait for the cable
                if g and step_of(self.farm, g) == "build":
                    out["build_after_s"] = round(time.time() - out["cut_at"])
        return tick

    def plug_all(self) -> None:
        self.farm.box.plug("s3")


def both(*ticks):
    def tick(fr: dict) -> None:
        for t in ticks:
            t(fr)
    return tick


def retries_logged(farm: HostFarm, since: dict) -> int:
    """Lines "will retry" in the workers' logs past the byte offsets in since ({log name: offset})."""
    n = 0
    for name, off in since.items():
        with open(farm.tmp / f"{name}.log", "rb") as f:
            f.seek(off)
            n += f.read().decode(errors="replace").count("will retry")
    return n


def test_hosts_nightlies_with_faults(hosts):
    farm = hosts
    t_start = time.time()
    figures: dict = {"faults": []}
    faults = Faults(farm)

    # --- the server, once: pools, store, automations, deployments
    for pool in ("cpu", "gpu"):
        farm.prefect("work-pool", "create", pool, "--type", "process")
    r = farm.call("POST", "/variables/", json={"name": "enginefarm_store", "value": farm.store})
    assert r.status_code == 201, r.text
    farm.prefect("automation", "create", "--from-file", str(ROOT / "automations.yaml"))
    out = farm.prefect("deploy", "--all")
    assert out.count("successfully created") == 3, out
    nightly = farm.deployment("nightly", "nightly")
    figures["scheduler_runs"] = scheduled_then_paused(farm, nightly)
    farm.start_worker("cpu")
    farm.start_worker("gpu")

    catalog = farm.tmp / "catalog"
    catalog.mkdir()
    for name in RECIPES:
        shutil.copy(ROOT / "models" / "tiny" / f"{name}.yaml", catalog / f"{name}.yaml")
    timings: dict = {}

    def night(label: str, tick=None, **params) -> dict:
        t0 = time.time()
        job_variables = params.pop("job_variables", None)
        body = {"parameters": {"catalog": str(catalog), **params}, "state": {"type": "SCHEDULED"}}
        if job_variables:
            body["job_variables"] = job_variables
        r = farm.call("POST", f"/deployments/{nightly['id']}/create_flow_run", json=body)
        assert r.status_code == 201, r.text
        try:
            run = farm.wait(r.json(), timeout=900, tick=tick)
        finally:
            faults.plug_all()
        timings[label] = round(time.time() - t0)
        return run

    def worker_logs() -> str:
        return farm.logs("worker-cpu") + farm.logs("worker-gpu")

    def log_sizes() -> dict:
        return {n: (farm.tmp / f"{n}.log").stat().st_size for n in ("worker-cpu", "worker-gpu")}

    # --- night 1: the gpu host dies building tiny-gpt2; the server restarts mid-night
    killed: dict = {}
    restart: dict = {}
    first = night("1", both(
        faults.kill_gpu_host_in_build(killed, "tiny-gpt2:fp32-tp1"),
        # while tiny-opt's gpu steps run, or (when they came first) once tiny-gpt2's run is Crashed
        faults.restart_server(restart, lambda fr: "killed_at" in killed and (
            faults.gpu_run("tiny-opt:fp32-tp1") is not None or "crashed_after_s" in killed))))
    assert "killed_at" in killed and "down_s" in restart, worker_logs()
    assert first["state"]["type"] == "FAILED", worker_logs()
    assert first["state"]["message"].startswith("1 of 2 variants failed: tiny-gpt2:fp32-tp1"), first["state"]
    got = rows(farm, first)
    gpt2, opt = got[("tiny-gpt2", "fp32-tp1")], got[("tiny-opt", "fp32-tp1")]
    assert gpt2["status"] == "failed" and opt["status"] == "built", got
    assert gpt2["why"].startswith("recipe tiny-gpt2, variant fp32-tp1, step build failed: the gpu run "
                                  "tiny-gpt2:fp32-tp1 of gpu-steps/gpu ended Crashed in its build step"), gpt2["why"]
    killed_run = {r["name"]: r for r in farm.gpu_runs()}["tiny-gpt2:fp32-tp1"]
    assert killed_run["state"]["type"] == "CRASHED", killed_run["state"]
    st = farm.open_store()
    left = {step: len(farm.box.inns(st.list_manifests, "tiny-gpt2", step))
            for step in ("fetch", "convert", "build", "validate", "publish")}
    assert left == {"fetch": 1, "convert": 1, "build": 0, "validate": 0, "publish": 0}, left  # nothing half-published
    assert farm.box.inns(st.list_refs, "tiny-gpt2") == []
    a1 = audit(farm)
    assert not a1["missing"] and not a1["dangling"], a1
    figures["faults"].append({"fault": "gpu host SIGKILLed (every process) in tiny-gpt2's build step",
                              "processes": killed["pids"], "row": gpt2["why"], "gpu_run": "CRASHED",
                              "crashed_after_s": killed.get("crashed_after_s"),
                              "left_manifests_of_tiny_gpt2": left, "orphan_blobs": a1["orphans"]})
    figures["faults"].append({"fault": "Prefect server restarted mid-night", "down_s": restart["down_s"],
                              "gpu_runs_in_flight": restart["in_flight"], "tiny-opt": opt["status"],
                              "night": first["state"]["type"]})

    # --- night 2: S3 unplugged for 30 s while tiny-gpt2 is rebuilt: exactly that variant, from its build on
    cut: dict = {}
    logs_at = log_sizes()
    second = night("2", faults.cut_s3(cut, 30, "tiny-gpt2:fp32-tp1"))
    assert "cut_s" in cut, worker_logs()
    got = rows(farm, second)
    assert second["state"]["type"] == "COMPLETED", (second["state"], got)
    assert second["state"]["message"] == "nightly: 2 variants: 1 built, 1 up to date, 0 failed", second["state"]
    gpt2 = got[("tiny-gpt2", "fp32-tp1")]
    assert (gpt2["status"], gpt2["why"], gpt2["cache"]) == ("built", "never built", "ran: build.llm, validate, publish")
    assert got[("tiny-opt", "fp32-tp1")]["status"] == "up to date"
    figures["faults"].append({"fault": "S3 unplugged 30 s", "cut_s": cut["cut_s"], "gpu_step_at_cut": cut["step"],
                              "gpu_build_started_after_s": cut.get("build_after_s"),
                              "retries_logged": retries_logged(farm, logs_at), "tiny-gpt2": gpt2["status"],
                              "night_s": timings["2"]})

    # --- night 3: a forced night in a work directory too small for a checkpoint
    small = farm.small
    third = night("3", force=True, job_variables={"env": {"ENGINEFARM_WORK": str(small)}})
    left_in_work = sorted(p.name for p in small.iterdir())
    got = rows(farm, third)
    assert third["state"]["type"] == "FAILED", third["state"]
    for key, row in got.items():
        assert row["status"] == "failed", got
        assert row["why"].startswith(f"recipe {key[0]}, variant {key[1]}, step convert failed: no space left on "
                                     f"device in the work directory {small} (ENGINEFARM_WORK, a 256 KiB file system"), row
    assert left_in_work == [], left_in_work
    figures["faults"].append({"fault": "work dir a 256 KiB tmpfs, filled", "row": got[("tiny-opt", "fp32-tp1")]["why"],
                              "left_in_workdir": left_in_work})

    # --- night 4: nothing changed, nothing built, no gpu run
    n_gpu = len(farm.gpu_runs())
    fourth = night("4")
    assert fourth["state"]["type"] == "COMPLETED", fourth["state"]
    assert fourth["state"]["message"] == "nightly: 2 variants: 0 built, 2 up to date, 0 failed"
    assert len(farm.gpu_runs()) == n_gpu

    # --- make soak-hosts: forced nights, each with one fault in turn, each followed by a quiet night
    rounds = []
    for i in range(int(os.environ.get("ENGINEFARM_HOSTS_ROUNDS", "0"))):
        kind = ("kill", "restart", "s3")[i % 3]
        out: dict = {}
        tick = {"kill": lambda: faults.kill_gpu_host_in_build(out),
                "restart": lambda: faults.restart_server(out, lambda fr: faults.gpu_run() is not None),
                "s3": lambda: faults.cut_s3(out, 30)}[kind]()
        forced = night(f"soak{i}", tick, force=True)
        got = rows(farm, forced)
        failed = {f"{k[0]}:{k[1]}": r["why"] for k, r in got.items() if r["status"] == "failed"}
        for why in failed.values():  # a failure names its step
            assert ", step " in why and " failed: " in why, why
        if kind != "kill":
            assert not failed, failed
        after = night(f"soak{i}-after")
        assert after["state"]["type"] == "COMPLETED", after["state"]
        a = audit(farm)
        assert not a["missing"] and not a["dangling"], a
        rounds.append({"fault": kind, "night": forced["state"]["type"], "failed": failed, "s": timings[f"soak{i}"],
                       "injected": {k: v for k, v in out.items() if k in ("pids", "crashed_after_s", "down_s", "cut_s")}})
    if rounds:
        figures["soak"] = rounds

    end = audit(farm)
    assert not end["missing"] and not end["dangling"], end
    assert end["published"] >= 2 and end["pulled_bytes"] > 0
    figures.update(audit=end, nights_s=timings, total_s=round(time.time() - t_start))
    (farm.tmp / "figures.json").write_text(json.dumps(figures, indent=2))
    print("\nFIGURES " + json.dumps(figures))
