"""The nightly over the catalog's tiny recipes: first night vs a night where
nothing changed, as whole commands, from process start to exit.

Runs `enginefarm nightly --catalog models/tiny` against a fresh store (and a
fresh tiny-checkpoint dir, inductor cache and PREFECT_HOME, so the first
night pays every cost a new farm would), then --repeat unchanged nights.
Each run is a new Python process with an audit hook that records every file
opened under the tiny checkpoints and the store's blobs: an unchanged night
must open none. Goal: an unchanged night < 20 s.

Two ways to reach Prefect, both timed: a local `prefect server start`
(started once, before the first night: deployed runs find their server
running), and Prefect's ephemeral API, which each process starts for itself
(`enginefarm nightly` on one machine without a server). CPU seconds (user +
sys of the process and its children, the ephemeral server included) are
printed next to wall seconds: on a shared machine they vary less (with a
local server, its own CPU is not counted). The floor, measured the same way
in the same run: a process that runs an empty Prefect flow.

    .venv/bin/python bench/nightly.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNNER = r"""
import json, os, sys
roots = [os.path.realpath(r) for r in os.environ["EF_WATCH"].split(os.pathsep)]
hits = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.path.realpath(os.fsdecode(args[0]))
        if any(p.startswith(r) for r in roots):
            hits.append(p)
sys.addaudithook(hook)
from enginefarm.cli import main
rc = main(sys.argv[1:])
with open(os.environ["EF_HITS"], "w") as f:
    json.dump(sorted(set(hits)), f)
sys.exit(rc)
"""


def night(env: dict, tmp: Path, catalog: str) -> tuple[float, float, dict, list[str]]:
    """(wall s, cpu s, summary, weight files opened) of one `enginefarm nightly` process."""
    hits = tmp / "hits.json"
    env = dict(env, EF_HITS=str(hits))
    cmd = [sys.executable, "-c", RUNNER, "nightly", "--catalog", catalog, "--json"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"nightly failed ({p.returncode})")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, cpu, json.loads(p.stdout), json.loads(hits.read_text())


EMPTY_FLOW = "from prefect import flow\nflow(lambda: None, name='empty')()\n"


def empty_flows(env: dict, n: int) -> tuple[list[float], list[float]]:
    """The floor: an empty Prefect flow run, as a whole process, the same way."""
    walls, cpus = [], []
    for _ in range(n):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", EMPTY_FLOW], env=env, cwd=ROOT, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    return walls, cpus


def unchanged(env: dict, tmp: Path, catalog: str, n: int, built: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(n):
        dt, cpu, s, hits = night(env, tmp, catalog)
        assert s["counts"]["built"] == 0 and s["counts"]["up to date"] == built, s["counts"]
        assert hits == [], f"an unchanged night opened {hits}"
        walls.append(dt)
        cpus.append(cpu)
    return walls, cpus


def start_server(env: dict, tmp: Path) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=open(tmp / "server.log", "wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the Prefect server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--catalog", default="models/tiny")
    ap.add_argument("--repeat", type=int, default=3, help="unchanged nights to time (median reported)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ef-bench-nightly-") as d:
        tmp = Path(d)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            ENGINEFARM_STORE=str(tmp / "store"),
            ENGINEFARM_TINY_DIR=str(tmp / "tiny"),
            TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"),
            PREFECT_HOME=str(tmp / "prefect"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
            EF_WATCH=os.pathsep.join([str(tmp / "tiny"), str(tmp / "store" / "blobs")]),
        )
        server = start_server(env, tmp)
        try:
            first, first_cpu, s1, hits1 = night(env, tmp, a.catalog)
            built = s1["counts"]["built"]
            assert built > 0 and not s1["counts"]["failed"], s1["counts"]
            on_server = unchanged(env, tmp, a.catalog, a.repeat, built)
            server_floor = empty_flows(env, a.repeat)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        env.pop("PREFECT_API_URL")
        ephemeral = unchanged(env, tmp, a.catalog, a.repeat, built)
        ephemeral_floor = empty_flows(env, a.repeat)
    print(f"catalog {a.catalog}: {built} variants; every unchanged night built 0 and opened 0 weight files")
    print(f"{'':34} {'wall s':>8} {'cpu s':>7}   runs (wall)")
    print(f"{'first night (local server)':34} {first:8.2f} {first_cpu:7.2f}   built {built}, "
          f"opened {len(hits1)} weight files")
    for label, (walls, cpus) in (("unchanged night (local server)", on_server),
                                 ("  an empty flow (local server)", server_floor),
                                 ("unchanged night (ephemeral API)", ephemeral),
                                 ("  an empty flow (ephemeral API)", ephemeral_floor)):
        goal = "   goal < 20 s" if label.startswith("unchanged") else "   (the floor: Prefect alone)"
        print(f"{label:34} {statistics.median(walls):8.2f} {statistics.median(cpus):7.2f}   "
              f"median of {len(walls)}: {', '.join(f'{x:.2f}' for x in walls)}{goal}")
    print(f"ratio unchanged/first (local server) = {statistics.median(on_server[0]) / first:.3f}")
    print(f"machine load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
