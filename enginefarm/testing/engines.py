"""Synthetic engines published through the real step machinery.

`publish_synthetic` runs fetch, convert, build and validate as real steps
(`run_step`: blobs written, manifests checked against the schema and
written) whose work is trivial, with a build step whose "engine" is seeded
random bytes or the files you give it; then the real publish task and alias
moves, under the store's shared lock. No torch, no weights: what the fault,
concurrency and bad-input tests and the registry benchmark publish, quickly
and many times.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from ..runtime.sidecar import write as write_sidecar
from ..spec import Variant, parse_recipe
from ..tasks.base import Ctx, StepSpec, run_step

VARIANT = Variant(name="fp32-tp1", backend="aoti", dtype="float32", quant="none", tp=1, target="cpu")


def recipe(name: str, fields: Optional[dict] = None):
    return parse_recipe({"name": name, "family": "opt", "source": {"tiny": "opt"}, **(fields or {})},
                        f"<synthetic {name}>")


def publish_synthetic(store, name: str = "synth", seed: int = 0, n_files: int = 4, size: int = 64 * 1024,
                      files: Optional[dict[str, Path]] = None, passed: bool = True, ppl: float = 10.0,
                      variant: Variant = VARIANT, force: bool = False, recipe_fields: Optional[dict] = None):
    """Publish one engine of recipe `name`: seeded random files (n_files x
    size bytes) or `files` ({name: path}). Returns the publish StepResult.
    The same arguments give the same keys, so a rerun finds what an
    interrupted run had finished; force runs every step again (new keys,
    the same blobs). recipe_fields: more fields of the synthetic recipe
    (matrix, default_variant, ...)."""
    from ..tasks import publish

    ctx = Ctx(store=store, recipe=recipe(name, recipe_fields), force=force)

    def step(step: str, params: dict, inputs: dict, produce) -> object:
        return run_step(ctx, StepSpec(step, {**params, "seed": seed}, inputs, "synthetic", {}, variant=variant.name),
                        produce)

    def write(path: Path, data) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data) if isinstance(data, str) else path.write_bytes(data)

    with store.lock(f"synthetic publish {name}"):
        fetched = step("fetch", {}, {}, lambda out, _: (
            write(out / "config.json", json.dumps({"seed": seed})), ({"config": {"seed": seed}}, {}))[1])
        converted = step("convert", {}, {"fetch": fetched}, lambda out, _: (
            write(out / "config.json", json.dumps({"tp": variant.tp})), ({}, {}))[1])

        def build(out: Path, _):
            rng = random.Random(seed)
            sidecar = {"format": "aoti-pt2", "file": "engine.bin", "device": "cpu", "dtype": variant.dtype,
                       "max_batch_size": 2, "max_input_len": 32, "max_seq_len": 64}
            sidecar = write_sidecar(out, sidecar).dump()
            if files:
                return {"engine": sidecar}, dict(files)
            for i in range(n_files):
                write(out / f"rank{i}.engine", rng.randbytes(size))
            return {"engine": sidecar}, {}

        built = step("build", {"backend": variant.backend}, {"convert": converted}, build)
        gates = {"perplexity_rel_diff": {"value": 0.0 if passed else 0.5, "limit": 0.01, "passed": passed}}
        validated = step("validate", {"passed": passed}, {"fetch": fetched, "build.llm": built}, lambda out, _: (
            {"passed": passed, "gates": gates, "metrics": {"perplexity": {"engine": ppl, "reference": ppl}}}, {}))
        return publish.publish_task.fn(ctx, variant, fetched, converted, {"llm": built}, validated)


# ---------------------------------------------------------------------- in child processes
# Entry points for tests that kill or race publishers: each opens its own
# store (the endpoint is passed in: a forked server process may hold an
# older environment) and reports through a multiprocessing queue.


def open_store_for(store_uri: str, endpoint: Optional[str] = None, part_mb: Optional[int] = None):
    """Open a store; an S3 one with multipart from part_mb MiB (parts of that size) if given."""
    import os

    from ..store import open_store
    from ..store.s3 import S3Store

    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    st = open_store(store_uri)
    if part_mb and isinstance(st, S3Store):
        mib = 1024 * 1024
        st = S3Store(st.bucket, st.prefix.rstrip("/"), multipart_threshold=part_mb * mib,
                     multipart_chunksize=part_mb * mib, max_concurrency=4)
    return st


def child_publish(store_uri: str, endpoint: Optional[str], name: str, seed: int, kwargs: dict,
                  go=None, q=None, part_mb: Optional[int] = None) -> None:
    st = open_store_for(store_uri, endpoint, part_mb)
    if go is not None:
        go.wait(60)
    res = publish_synthetic(st, name, seed, **kwargs)
    if q is not None:
        q.put((seed, res.key, res.digest))


def child_pull(store_uri: str, endpoint: Optional[str], ref: str, dest: str, workers: int = 1) -> None:
    from ..registry import resolve
    from ..store.pull import pull

    st = open_store_for(store_uri, endpoint)
    value, m = resolve(st, ref)
    pull(st, value, m, dest, workers=workers)
