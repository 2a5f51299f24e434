"""Publish and verified pull of a 1 GB engine against the S3 test server,
next to a plain single-stream boto3 upload and download of the same bytes,
measured in the same run; then a republish, counting the blob bytes it sends.

    .venv/bin/python bench/registry.py [--size-mb 1024] [--repeat 3]

A moto S3 server is started as its own process on a free loopback port (the
same server the tests use). For each repeat, on a fresh bucket:

  baseline upload    s3.put_object(Body=<file>): one request, one stream
  publish            the engine through the real publish path (enginefarm.
                     testing.engines.publish_synthetic: build step storing the
                     file as a blob, hashed once, multipart with parallel parts
                     and SHA-256 part checksums; manifests; aliases by CAS)
  baseline download  s3.get_object streamed to a file: one request, one stream
  pull               enginefarm's pull: every byte hashed (in a second thread,
                     as it arrives) and checked against the manifest, files
                     fetched in parallel, atomic move into place. Against this
                     server with ENGINEFARM_S3_RANGED_GET_MB=0 (one stream per
                     object): moto answers every ranged GET by reading the
                     whole object (moto/s3/responses.py, _handle_range_header
                     slices key.value), so N parallel parts cost it N whole
                     reads; --ranged times the default (ranged parts) too.
  republish          the same engine again through every step (forced: new
                     manifests), counting the bytes of every blob PUT/part

The two orders alternate between repeats. Printed: the median of each, and
ratios as throughput relative to the baseline (baseline time / our time;
goal >= 0.9), and the blob bytes the republish sent (goal: 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]  # e.g. moto installed with --target
    p = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, url
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise SystemExit("the moto server did not start")


def make_engine(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


def timed(fn) -> float:
    os.sync()  # what the step before wrote is flushed first, not on this step's clock
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024, help="engine size in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="scratch directory (needs ~3x the engine size)")
    ap.add_argument("--ranged", action="store_true",
                    help="also time a pull with the default parallel ranged GETs (slow against moto)")
    a = ap.parse_args()

    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING")
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        env.pop(k, None)
    server, url = start_server(env)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on the way out
    env["AWS_ENDPOINT_URL"] = url
    os.environ.clear()
    os.environ.update(env)

    import boto3

    import enginefarm.tasks.publish  # noqa: F401  - imported before any timing (prefect, jsonschema)
    from enginefarm.registry import resolve
    from enginefarm.store import open_store
    from enginefarm.store.pull import pull
    from enginefarm.testing.engines import publish_synthetic

    size = a.size_mb * MiB
    rows: dict[str, list[float]] = {k: [] for k in ("put", "publish", "get", "pull", "republish", "ranged")}
    republish_blob_bytes, other_bytes = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="ef-bench-reg-", dir=a.tmp) as tmp:
            tmp = Path(tmp)
            engine = tmp / "engine" / "rank0.engine"
            print(f"writing a {a.size_mb} MiB engine ...", file=sys.stderr)
            make_engine(engine, size)
            s3 = boto3.client("s3")  # plain: boto3's defaults, nothing tuned
            for r in range(a.repeat):
                bucket = f"bench-{uuid.uuid4().hex[:10]}"
                s3.create_bucket(Bucket=bucket)
                store_uri = f"s3://{bucket}/farm"
                st = open_store(store_uri)  # defaults: multipart uploads, 16 MiB parts, 8 at once
                os.environ["ENGINEFARM_S3_RANGED_GET_MB"] = "0"
                st_pull = open_store(store_uri)  # one verified stream per object
                del os.environ["ENGINEFARM_S3_RANGED_GET_MB"]

                def put():
                    with open(engine, "rb") as f:
                        s3.put_object(Bucket=bucket, Key="baseline/engine.bin", Body=f)

                def publish():
                    publish_synthetic(st, "bench", seed=r, files={"rank0.engine": engine})

                def get():
                    body = s3.get_object(Bucket=bucket, Key="baseline/engine.bin")["Body"]
                    with open(tmp / "baseline.out", "wb") as f:
                        shutil.copyfileobj(body, f, 8 * MiB)

                def do_pull(store=st_pull):
                    value, m = resolve(store, "bench")
                    out = pull(store, value, m, tmp / "pulled")
                    assert out["fetched_bytes"] >= size

                order = [("put", put), ("publish", publish)]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    rows[name].append(timed(fn))
                    print(f"  repeat {r + 1}: {name:<9} {rows[name][-1]:7.2f} s", file=sys.stderr)
                order = [("get", get), ("pull", do_pull)]
                for name, fn in (order if r % 2 == 0 else order[::-1]):
                    rows[name].append(timed(fn))
                    print(f"  repeat {r + 1}: {name:<9} {rows[name][-1]:7.2f} s", file=sys.stderr)
                    shutil.rmtree(tmp / "pulled", ignore_errors=True)
                if (tmp / "baseline.out").stat().st_size != size:
                    raise SystemExit("the baseline download is short")
                (tmp / "baseline.out").unlink()
                if a.ranged:
                    rows["ranged"].append(timed(lambda: do_pull(st)))
                    print(f"  repeat {r + 1}: ranged    {rows['ranged'][-1]:7.2f} s", file=sys.stderr)
                    shutil.rmtree(tmp / "pulled", ignore_errors=True)

                # republish: every step again (forced), counting what goes up
                sent = {"blob": 0, "other": 0}

                def count(request, **kw):
                    if request.method in ("PUT", "POST"):
                        n = int(request.headers.get("Content-Length") or 0)
                        sent["blob" if "/blobs/" in request.url else "other"] += n

                st.s3.meta.events.register("before-send.s3", count)
                rows["republish"].append(timed(lambda: publish_synthetic(st, "bench", seed=r, force=True,
                                                                         files={"rank0.engine": engine})))
                st.s3.meta.events.unregister("before-send.s3", count)
                republish_blob_bytes.append(sent["blob"])
                other_bytes.append(sent["other"])
                print(f"  repeat {r + 1}: republish {rows['republish'][-1]:7.2f} s, blob bytes sent {sent['blob']}, "
                      f"other bytes {sent['other']}", file=sys.stderr)
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    for o in page.get("Contents", []):
                        s3.delete_object(Bucket=bucket, Key=o["Key"])
    finally:
        server.terminate()
        server.wait(timeout=30)

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    mb = size / 1e6
    print(f"engine {a.size_mb} MiB ({mb:.0f} MB), moto S3 server, {a.repeat} repeats, medians "
          f"(cores: {os.cpu_count()})")
    for k, label in (("put", "baseline upload (put_object, 1 stream)"), ("publish", "publish (enginefarm)"),
                     ("get", "baseline download (get_object, 1 stream)"), ("pull", "verified pull (enginefarm)"),
                     ("ranged", "verified pull, parallel ranged GETs"),
                     ("republish", "republish, unchanged engine")):
        if k not in med:
            continue
        runs = ", ".join(f"{x:.2f}" for x in rows[k])
        print(f"  {label:<42} {med[k]:7.2f} s  {mb / med[k]:7.1f} MB/s   ({runs})")
    print(f"ratio publish / baseline upload   = {med['put'] / med['publish']:.2f}x  (throughput; goal >= 0.9)")
    print(f"ratio pull / baseline download    = {med['get'] / med['pull']:.2f}x  (throughput; goal >= 0.9)")
    if "ranged" in med:
        print(f"ratio ranged pull / baseline      = {med['get'] / med['ranged']:.2f}x  (moto reads the whole object "
              "for every ranged GET)")
    print(f"republish: blob bytes sent        = {max(republish_blob_bytes)}  (goal 0; manifests and refs: "
          f"{statistics.median(other_bytes):.0f} bytes)")


if __name__ == "__main__":
    main()
