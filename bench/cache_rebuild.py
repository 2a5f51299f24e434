"""Cold build vs cached rebuild of the same tiny recipe, as whole commands.

Runs `enginefarm build RECIPE` twice against a fresh store (and a fresh
tiny-checkpoint dir and inductor cache, so the first run pays every cost a
new machine would), times both from process start to exit, checks that the
second reported every step cached, and prints the ratio. Goal: <= 0.25.

    .venv/bin/python bench/cache_rebuild.py [--recipe tiny-opt] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, env) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    return dt, json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny-opt")
    ap.add_argument("--repeat", type=int, default=3, help="cached rebuilds to time (median reported)")
    a = ap.parse_args()
    exe = str(Path(sys.executable).parent / "enginefarm")
    with tempfile.TemporaryDirectory(prefix="ef-bench-") as tmp:
        env = dict(os.environ)
        env.update(
            ENGINEFARM_STORE=f"{tmp}/store",
            ENGINEFARM_TINY_DIR=f"{tmp}/tiny",
            TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor",
            PREFECT_HOME=f"{tmp}/prefect",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        cmd = [exe, "build", a.recipe, "--json"]
        cold, s1 = run(cmd, env)
        assert not s1["all_cached"], "the first build found a cache: the store was not fresh"
        warm, flow = [], []
        for _ in range(a.repeat):
            dt, s2 = run(cmd, env)
            assert s2["all_cached"] and not s2["flow_run"], f"a rebuild ran steps: {s2['variants']}"
            warm.append(dt)
            dt, s3 = run(cmd + ["--flow"], env)
            assert s3["all_cached"] and s3["flow_run"], f"a rebuild ran steps: {s3['variants']}"
            flow.append(dt)
    med, fmed = statistics.median(warm), statistics.median(flow)
    print(f"recipe {a.recipe}")
    print(f"cold build                 {cold:8.2f} s   steps: {', '.join(f'{k}={v}' for k, v in next(iter(s1['variants'].values()))['steps'].items())}")
    print(f"cached rebuild             {med:8.2f} s   (median of {len(warm)}: {', '.join(f'{x:.2f}' for x in warm)}; every step cached, answered from the store)")
    print(f"cached rebuild, --flow     {fmed:8.2f} s   (median of {len(flow)}: {', '.join(f'{x:.2f}' for x in flow)}; a Prefect flow run on the ephemeral API, every task cached)")
    print(f"ratio cached/cold          = {med / cold:.3f}  (goal <= 0.25)")
    print(f"ratio cached --flow/cold   = {fmed / cold:.3f}")


if __name__ == "__main__":
    main()
