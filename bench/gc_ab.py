"""`gc --keep K --dry-run` on one store, an earlier tree's code against this
tree's, alternating in one run (whole CLI processes, as a user runs them):
the median of each, their ratio, and whether both gave the same answer.

    python bench/gc_ab.py --store URI --before DIR [--before-store URI] [--reps 3] [--keep 1] [--command gc|ls]

--before-store: the earlier code's own copy of the store, where a change is
one of layout (both copies hold the same catalog, each written as its code
writes it). --command ls: time `enginefarm ls --json` instead.

DIR: a checkout of the earlier code (e.g. `git worktree add DIR main`, or
`git archive main | tar -x -C DIR`). The store's endpoint and credentials
come from the environment, as for the CLI (for moto: AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = "import sys; from enginefarm.cli import main; sys.exit(main(sys.argv[1:]))"


def once(tree: Path, uri: str, keep: int, command: str = "gc") -> tuple[float, dict]:
    args = ["gc", "--keep", str(keep), "--dry-run"] if command == "gc" else ["ls"]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CLI, *args, "--json", "--store", uri],
                       cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"gc_ab: {command} in {tree} exited {p.returncode}")
    return dt, json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--before", required=True, help="a checkout of the earlier code")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", type=int, default=1)
    ap.add_argument("--before-store", default=None, help="the store the earlier code reads (default: --store)")
    ap.add_argument("--command", choices=("gc", "ls"), default="gc")
    a = ap.parse_args()
    before = Path(a.before)
    if not (before / "enginefarm" / "cli.py").is_file():
        print(f"gc_ab: --before {a.before!r} is not a checkout of enginefarm (no enginefarm/cli.py)", file=sys.stderr)
        raise SystemExit(2)
    if a.reps < 1 or a.keep < 0:
        print(f"gc_ab: bad --reps {a.reps} or --keep {a.keep}: expected reps >= 1, keep >= 0", file=sys.stderr)
        raise SystemExit(2)
    trees = {"before": before, "after": ROOT}
    uris = {"before": a.before_store or a.store, "after": a.store}
    times: dict[str, list[float]] = {k: [] for k in trees}
    answers: dict[str, dict] = {}
    for _ in range(a.reps):
        for name, tree in trees.items():  # alternating: both see the same load
            dt, out = once(tree, uris[name], a.keep, a.command)
            times[name].append(dt)
            if isinstance(out, dict):
                out.pop("store", None)
            answers.setdefault(name, out)
    med = {k: statistics.median(v) for k, v in times.items()}
    what = f"gc --keep {a.keep} --dry-run" if a.command == "gc" else "ls"
    size = (f"{answers['after']['manifests']['total']} manifests, {answers['after']['blobs']['total']} blobs"
            if a.command == "gc" else f"{len(answers['after'])} rows")
    print(f"{what}: {a.reps} run(s) each, alternating; {size}")
    for k, v in times.items():
        print(f"  {k:6s} ({trees[k]}, {uris[k]}): median {med[k]:.2f} s, runs {', '.join(f'{x:.2f}' for x in v)}")
    print(f"  ratio after/before = {med['after'] / med['before']:.3f}; the same answer: {answers['before'] == answers['after']}")
    print(f"  load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
