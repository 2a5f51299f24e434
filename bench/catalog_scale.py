"""What an unchanged night costs as the catalog grows: N = 10 to 1,000
variants, on a local store and on S3 (moto's server, over HTTP).

The catalog: recipes that share two tiny OPT checkpoints, each recipe a
2 x 2 matrix (float32 / bfloat16, none / w8a16: four variants; a smaller
last recipe makes up N). One recipe per checkpoint (`scale-c0`, `scale-c1`)
is built for real, through `enginefarm build`. Every other recipe is the
same recipe under another name; its steps are recorded by the farm's own
code (`enginefarm.testing.clone.record_like`: `run_step` with the real step
specs, so the real keys, manifests and schema check; publish and its alias
moves are the real publish task), with the files and results of the
template's step of the same variant: what its real build would have
produced, less the hours. (Its manifests differ from the template's where a
real build's would: recipe name and digest, keys, times.)

Then, per store and N, each as its own process, as a user runs them:

    enginefarm nightly --catalog DIR --store URI --json    twice (the first
                                   unchanged night after the build, then the next)
    python -c <an empty Prefect flow>                      the floor (before and after
                                   the nights, their mean)
    enginefarm ls / gc --keep 1 --dry-run / report

Each process counts the store's requests at the store interface (every
primitive call of LocalStore / S3Store; on S3 also the HTTP requests botocore
sends) and reports its peak RSS (its own ru_maxrss). Printed per N: the unchanged
night's seconds, requests and peak RSS, each beyond the empty-flow floor
measured in the same run, per variant; the goal line of issue 21 (S3, 1,000
variants: <= 20 ms and <= 2 requests a variant beyond the floor; ls and gc
--dry-run < 5 s). A PNG of seconds per variant against N.

    python bench/catalog_scale.py [--sizes 10,100,1000] [--stores local,s3] [--out DIR]
                                  [--compare EARLIER.json --compare-label before]

Results: OUT/catalog_scale.json, OUT/catalog_scale.png (OUT: bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PER_RECIPE = 4  # the template matrix: 2 dtypes x 2 quantizations
CHECKPOINTS = 2

TEMPLATE = {
    "family": "opt",
    "components": {"llm": {}},
    "matrix": {"backend": ["aoti"], "dtype": ["float32", "bfloat16"], "quant": ["none", "w8a16"], "tp": [1],
               "target": ["cpu"]},
    "limits": {"max_batch_size": 1, "max_input_len": 16, "max_seq_len": 32},
    # a bf16 or w8a16 engine of random weights does not agree with fp32: judged, recorded, not gated
    "validation": {
        "prompts": ["The build farm"], "max_new_tokens": 4, "max_eval_tokens": 32,
        "gates": {"logits_max_abs_diff": None, "top1_agreement": 0.0, "greedy_equal": False,
                  "perplexity_rel_diff": None, "top5_accuracy_drop": None},
        "quant_gates": {"w8a16": {"logits_max_abs_diff": None, "top1_agreement": 0.0, "greedy_equal": False,
                                  "perplexity_rel_diff": None, "top5_accuracy_drop": None}},
    },
}
# sub-matrices for a last recipe that makes up N (variants: matrix)
PARTS = {4: {}, 2: {"quant": ["none"]}, 1: {"dtype": ["float32"], "quant": ["none"]}}

# Runs the farm's CLI in a child process, counting the store's requests at
# the store interface (and botocore's HTTP requests), written to EF_COUNTS.
RUNNER = r"""
import json, os, sys, collections
sys.path.insert(0, os.getcwd())
counts = collections.Counter()
http = [0]
from enginefarm.store.local import LocalStore
from enginefarm.store.s3 import S3Store
from enginefarm.store.base import Store
PRIMS = ["_exists", "_put_bytes", "_put_file", "_get_bytes", "_get_file", "_list", "_get_with_version", "_cas",
         "_delete", "_list_versions"]
import threading
depth = threading.local()
def wrap(cls, name):
    fn = cls.__dict__.get(name)
    if fn is None:
        return
    def counted(self, *a, **k):
        d = getattr(depth, "n", 0)
        if d == 0:  # a primitive that calls another (a listing that lists) is one request
            counts[name] += 1
        depth.n = d + 1
        try:
            return fn(self, *a, **k)
        finally:
            depth.n = d
    setattr(cls, name, counted)
for cls in (LocalStore, S3Store):
    for name in PRIMS:
        wrap(cls, name)
import botocore.endpoint
_send = botocore.endpoint.Endpoint._send
def send(self, request):
    http[0] += 1
    return _send(self, request)
botocore.endpoint.Endpoint._send = send
rc = 0
try:
    if sys.argv[1] == "--empty-flow":
        from prefect import flow
        flow(lambda: None, name="empty")()
    else:
        from enginefarm.cli import main
        rc = main(sys.argv[1:])
finally:
    with open(os.environ["EF_COUNTS"], "w") as f:
        import resource
        json.dump({"store": dict(counts), "http": http[0],
                   "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
sys.exit(rc)
"""


def log(msg: str) -> None:
    print(f"[catalog_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes


def run(env: dict, args: list[str], tmp: Path, check: bool = True) -> dict:
    """One CLI process: wall seconds, peak RSS (MiB), store requests, stdout."""
    counts = tmp / f"counts-{time.monotonic_ns()}.json"
    env = dict(env, EF_COUNTS=str(counts))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", RUNNER, *args], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        sys.stderr.write(err.decode()[-4000:])
        raise SystemExit(f"{' '.join(args[:3])} exited {p.returncode}")
    c = json.loads(counts.read_text()) if counts.exists() else {"store": {}, "http": 0, "rss_mib": float("nan")}
    counts.unlink(missing_ok=True)
    return {"s": dt, "rss_mib": c["rss_mib"], "requests": sum(c["store"].values()), "by_kind": c["store"],
            "http": c["http"], "stdout": out.decode(), "rc": p.returncode}


# ----------------------------------------------------------------------------- the catalog


def recipe_names(n: int) -> list[tuple[str, int, int]]:
    """(name, checkpoint, variants) of the recipes of an N-variant catalog:
    the templates first, then clones by turns over the checkpoints."""
    out, left, k = [], n, 0
    while left:
        size = next(s for s in (4, 2, 1) if s <= left)
        ckpt = k % CHECKPOINTS
        if k < CHECKPOINTS and size == PER_RECIPE:
            name = f"scale-c{ckpt}"
        else:
            name = f"scale-c{ckpt}-{k:04d}" + ("" if size == PER_RECIPE else f"-m{size}")
        out.append((name, ckpt, size))
        left -= size
        k += 1
    return out


def write_recipe(d: Path, name: str, src: Path, size: int) -> Path:
    import yaml

    data = json.loads(json.dumps(TEMPLATE))
    data.update(name=name, source={"path": str(src)})
    data["matrix"].update(PARTS[size])
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def write_catalog(d: Path, n: int, srcs: list[Path]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, ckpt, size in recipe_names(n):
        write_recipe(d, name, srcs[ckpt], size)
    return d


# ----------------------------------------------------------------------------- building once


def clone(store: str, recipe_path: Path, template_path: Path) -> None:
    """Record every step of `recipe_path` from the template (see the module doc)."""
    from enginefarm.store import open_store
    from enginefarm.testing.clone import record_like

    record_like(open_store(store), str(recipe_path), str(template_path))


def copy_store(src: Path, dst_uri: str, recipes: set[str]) -> int:
    """Copy a local store's objects (blobs, and the manifests, refs and alias
    histories of `recipes`) into another store, byte for byte; how many
    objects."""
    from enginefarm.store import open_store
    from concurrent.futures import ThreadPoolExecutor

    dst = open_store(dst_uri)
    keys = []
    for p in sorted(src.rglob("*")):
        if not p.is_file() or any(x.startswith(".") for x in p.relative_to(src).parts):
            continue
        k = p.relative_to(src).as_posix()
        top = k.split("/")[0]
        if top == "blobs" or (top in ("manifests", "refs", "history") and k.split("/")[1] in recipes):
            keys.append(k)

    def put(k: str) -> None:
        p = src / k
        if k.startswith("blobs/"):
            dst._put_file(k, p, k.split("/")[-1], p.stat().st_size)
        else:
            dst._put_bytes(k, p.read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys))
    return len(keys)


# ----------------------------------------------------------------------------- S3


def start_moto(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(tmp / "moto.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the moto server did not start")


def make_bucket(name: str) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


# ----------------------------------------------------------------------------- measuring


def measure(env: dict, tmp: Path, catalog: Path, uri: str, n: int) -> dict:
    nightly = ["nightly", "--catalog", str(catalog), "--store", uri, "--json"]
    floors = [run(env, ["--empty-flow"], tmp)]
    first = run(env, nightly, tmp)
    again = run(env, nightly, tmp)
    for x in (first, again):
        summary = json.loads(x["stdout"])
        c = summary["counts"]
        assert c == {"built": 0, "up to date": n, "failed": 0, "skipped": 0}, c
        x["flow_s"] = summary["seconds"]  # inside the flow run: no process start, no Prefect server start
    floors.append(run(env, ["--empty-flow"], tmp))
    # the floor: an empty flow, before and after the nights (their mean: the machine is shared)
    floor = {k: (sum(f[k] for f in floors) / 2 if k in ("s", "rss_mib") else floors[0][k]) for k in floors[0]}
    e = {**env, "ENGINEFARM_STORE": uri}
    ls = run(e, ["ls", "--json"], tmp)
    assert len(json.loads(ls["stdout"])) >= 2 * n, "ls: not every alias"
    gc = run(e, ["gc", "--keep", "1", "--dry-run", "--json"], tmp)
    rep = run(e, ["report", "--out", str(tmp / f"report-{n}.png"), "--json"], tmp)
    keep = ("s", "flow_s", "rss_mib", "requests", "by_kind", "http")
    out = {"n": n, **{k: {f: x[f] for f in keep if f in x} for k, x in
                      (("first_night", first), ("night", again), ("floor", floor), ("ls", ls), ("gc_dry_run", gc),
                       ("report", rep))}}
    fl = out["floor"]
    for k in ("first_night", "night"):
        x = out[k]
        x["ms_per_variant"] = (x["s"] - fl["s"]) / n * 1e3
        x["flow_ms_per_variant"] = x["flow_s"] / n * 1e3
        x["req_per_variant"] = (x["requests"] - fl["requests"]) / n
        x["http_per_variant"] = (x["http"] - fl["http"]) / n
        x["rss_over_floor_mib"] = x["rss_mib"] - fl["rss_mib"]
    return out


def table(results: dict) -> str:
    head = (f"{'store':<6} {'N':>5} {'night s':>8} {'floor s':>8} {'ms/var':>7} {'flow ms/var':>11} {'req/var':>8} {'http/var':>9} "
            f"{'RSS MiB':>8} {'+floor':>7} {'1st ms/var':>10} {'1st req/var':>11} {'ls s':>6} {'gc -n s':>8} "
            f"{'report s':>8}")
    lines = [head, "-" * len(head)]
    for store, rows in results.items():
        for x in rows:
            nt, f1 = x["night"], x["first_night"]
            lines.append(
                f"{store:<6} {x['n']:>5} {nt['s']:>8.2f} {x['floor']['s']:>8.2f} {nt['ms_per_variant']:>7.1f} "
                f"{_flow_ms(nt):>11} "
                f"{nt['req_per_variant']:>8.2f} {nt['http_per_variant']:>9.2f} {nt['rss_mib']:>8.0f} "
                f"{nt['rss_over_floor_mib']:>7.0f} {f1['ms_per_variant']:>10.1f} {f1['req_per_variant']:>11.2f} "
                f"{x['ls']['s']:>6.2f} {x['gc_dry_run']['s']:>8.2f} {x['report']['s']:>8.2f}")
    return "\n".join(lines)


def _flow_ms(x: dict) -> str:
    return f"{x['flow_ms_per_variant']:.1f}" if "flow_ms_per_variant" in x else "-"


def goals(results: dict) -> list[str]:
    out = []
    for x in results.get("s3", []):
        if x["n"] == max(r["n"] for r in results["s3"]):
            nt = x["night"]
            ok = nt["ms_per_variant"] <= 20 and nt["req_per_variant"] <= 2
            out.append(f"goal (S3, {x['n']} variants, unchanged night beyond the floor): <= 20 ms and <= 2 requests "
                       f"a variant: {nt['ms_per_variant']:.1f} ms, {nt['req_per_variant']:.2f} requests "
                       f"-> {'met' if ok else 'NOT met'}")
            out.append(f"goal (S3, {x['n']} variants): ls and gc --dry-run < 5 s: ls {x['ls']['s']:.2f} s, "
                       f"gc {x['gc_dry_run']['s']:.2f} s -> "
                       f"{'met' if max(x['ls']['s'], x['gc_dry_run']['s']) < 5 else 'NOT met'}")
    return out


def plot(results: dict, path: Path, compare: dict | None, label: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.subplots()
    for data, style, tag in ((results, "-", "this run"), (compare or {}, "--", label)):
        for store, rows in data.items():
            ns = [x["n"] for x in rows]
            ax.plot(ns, [x["night"]["ms_per_variant"] for x in rows], style, marker="o", label=f"{store} ({tag})")
    ax.axhline(20, color="grey", lw=0.8, ls=":", label="goal: 20 ms")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("variants in the catalog")
    ax.set_ylabel("ms per variant beyond an empty flow")
    ax.set_title("enginefarm: an unchanged night, per variant")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", bbox_inches="tight")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="catalog sizes in variants (default 10,100,1000)")
    ap.add_argument("--stores", default="local,s3", help="local, s3 or both (default both)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON and PNG go")
    ap.add_argument("--work", default=None, help="a directory to keep (and reuse) the template build in")
    ap.add_argument("--compare", default=None, help="an earlier run's JSON, drawn dashed (e.g. before a change)")
    ap.add_argument("--compare-label", default="before")
    a = ap.parse_args()
    try:
        sizes = sorted({int(x) for x in a.sizes.split(",") if x.strip()})
        assert sizes and min(sizes) >= 1
    except (ValueError, AssertionError):
        print(f"catalog_scale: bad --sizes {a.sizes!r}: expected whole numbers >= 1, comma-separated", file=sys.stderr)
        raise SystemExit(2)
    stores = [s.strip() for s in a.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"local", "s3"}:
        print(f"catalog_scale: bad --stores {a.stores!r}: expected local, s3 or local,s3", file=sys.stderr)
        raise SystemExit(2)
    compare = json.loads(Path(a.compare).read_text())["results"] if a.compare else None
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_all = time.perf_counter()
    work = Path(a.work) if a.work else None
    with tempfile.TemporaryDirectory(prefix="ef-bench-scale-") as d:
        tmp = Path(d)
        work = work or tmp / "work"
        work.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "ENGINEFARM_"))}
        env.update(
            ENGINEFARM_TINY_DIR=str(work / "tiny"), TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"),
            PREFECT_HOME=str(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING", ENGINEFARM_WORK=str(tmp),
            # a loaded machine starts the ephemeral API slowly (the default wait is 20 s)
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp / "aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-credentials"),
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "ENGINEFARM_"))})
        sys.path.insert(0, str(ROOT))
        from enginefarm.testing import write_tiny

        srcs = [work / f"ckpt{i}" for i in range(CHECKPOINTS)]
        for i, src in enumerate(srcs):  # written once: a new mtime would make every fetch key new
            if not (src / "config.json").is_file():
                write_tiny("opt", src, seed=100 + i)
        master = work / "store"
        tdir = work / "templates"
        tdir.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        for i in range(CHECKPOINTS):  # the real builds (kept in --work: a second run reuses them)
            p = write_recipe(tdir, f"scale-c{i}", srcs[i], PER_RECIPE)
            b = run({**env, "ENGINEFARM_MAX_PARALLEL": "1"}, ["build", str(p), "--store", str(master), "--json"], tmp)
            log(f"built scale-c{i} ({PER_RECIPE} variants) for real in {b['s']:.1f} s")
        t_build = time.perf_counter() - t0

        names = {}
        for n in sizes:
            for name, ckpt, size in recipe_names(n):
                names[name] = (ckpt, size)
        t0 = time.perf_counter()
        cdir = work / "clones"
        cdir.mkdir(exist_ok=True)
        todo = [x for x in sorted(names) if x not in {f"scale-c{i}" for i in range(CHECKPOINTS)}]
        for k, name in enumerate(todo):  # a recipe recorded before: every step is found, nothing written
            ckpt, size = names[name]
            clone(str(master), write_recipe(cdir, name, srcs[ckpt], size), tdir / f"scale-c{ckpt}.yaml")
            if k % 50 == 49:
                log(f"recorded {k + 1} of {len(todo)} recipes")
        log(f"recorded {len(todo)} recipes from the templates in {time.perf_counter() - t0:.1f} s")

        moto = None
        results: dict = {s: [] for s in stores}
        try:
            if "s3" in stores:
                moto, url = start_moto(tmp)
                env["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"] = url
            for n in sizes:
                catalog = write_catalog(tmp / f"catalog-{n}", n, srcs)
                recipes = {name for name, _, _ in recipe_names(n)}
                for s in stores:
                    if s == "local":
                        uri = str(tmp / f"store-{n}")
                    else:
                        make_bucket(f"scale-{n}")
                        uri = f"s3://scale-{n}/farm"
                    t0 = time.perf_counter()
                    k = copy_store(master, uri, recipes)
                    log(f"{s} store for {n} variants: {k} objects copied in {time.perf_counter() - t0:.1f} s")
                    x = measure(env, tmp, catalog, uri, n)
                    results[s].append(x)
                    log(f"{s} N={n}: night {x['night']['s']:.2f} s (floor {x['floor']['s']:.2f} s), "
                        f"{x['night']['requests']} requests; ls {x['ls']['s']:.2f} s, gc {x['gc_dry_run']['s']:.2f} s")
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(timeout=30)
    doc = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cores": os.cpu_count(),
           "load_avg_end": os.getloadavg(), "template_build_s": t_build, "results": results}
    (out_dir / "catalog_scale.json").write_text(json.dumps(doc, indent=1))
    png = out_dir / "catalog_scale.png"
    plot(results, png, compare, a.compare_label)
    print(f"catalog_scale: unchanged nightly, {', '.join(stores)} stores; ms/var = (night - empty flow) / N, "
          f"both whole processes; flow ms/var = the flow run's own seconds / N (no process or Prefect start); "
          f"req/var = (store requests - the empty flow's) / N; RSS: peak of the nightly process, +floor: over the "
          f"empty flow's")
    print(table(results))
    if compare:
        print(f"\n{a.compare_label} (from {a.compare}):")
        print(table(compare))
        for s in results:
            for x in results[s]:
                old = next((y for y in compare.get(s, []) if y["n"] == x["n"]), None)
                if old:
                    print(f"ratio {s} N={x['n']}: night s now/{a.compare_label} = {x['night']['s'] / old['night']['s']:.3f}, "
                          f"requests {x['night']['requests']}/{old['night']['requests']}")
    for g in goals(results):
        print(g)
    print(f"plot: {png}; figures: {out_dir / 'catalog_scale.json'}; "
          f"whole run {time.perf_counter() - t_all:.0f} s on {os.cpu_count()} cores "
          f"(load {', '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
