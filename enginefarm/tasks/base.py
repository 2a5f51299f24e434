"""The step machinery: content-addressed cache keys, store lookups, and the
manifest every step writes.

A step's key is the digest of its inputs' manifest digests, its parameters,
its code version and the toolchain versions that shape its output. Before
doing any work a step looks for `manifests/<recipe>/<step>/<key>.json` in the
store; if it is there, that manifest is the answer and no weight file is
read. Otherwise the step works in a scratch directory, writes its files as
blobs (each hashed once, while written) and then its manifest.
"""

from __future__ import annotations

import getpass
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from ..concurrency import torch_work
from ..errors import StepFailed
from ..hashing import digest_json
from ..spec import Recipe
from ..store.base import check_rel_path

SCHEMA = "enginefarm.manifest/2"
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "manifest-2.schema.json"
UPLOAD_WORKERS = 4  # files stored at once (each S3 file also goes up in parallel parts)


def log(msg: str, level: str = "info") -> None:
    """Progress: to stderr for people, and to the Prefect run log when in a run."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if TaskRunContext.get() or FlowRunContext.get():
            getattr(get_run_logger(), level)(msg)
            return
    except Exception:
        pass
    print(f"[enginefarm] {'ERROR ' if level == 'error' else ''}{msg}", file=sys.stderr, flush=True)


def log_error(msg: str) -> None:
    log(msg, "error")


@dataclass
class Ctx:
    store: Any
    recipe: Recipe
    force: bool = False
    workdir: Optional[Path] = None
    # set by the flow: one nonce per forced run, so forced rebuilds never collide with cached records
    force_nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass
class StepSpec:
    step: str
    params: dict
    inputs: dict[str, "StepResult"]
    code: str
    toolchain: dict
    variant: Optional[str] = None

    def key(self, force_nonce: Optional[str] = None) -> str:
        body = {
            "step": self.step,
            "params": self.params,
            "inputs": {k: r.digest for k, r in sorted(self.inputs.items())},
            "code": self.code,
            "toolchain": self.toolchain,
        }
        if force_nonce:
            body["forced"] = force_nonce
        return digest_json(body)


@dataclass
class StepResult:
    step: str
    key: str
    digest: str
    manifest: dict
    cached: bool

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest.get("files", {})

    @property
    def results(self) -> dict:
        return self.manifest.get("results", {})


def validate_manifest(manifest: dict) -> None:
    """Check a manifest against the versioned JSON schema in the package
    (`enginefarm/schemas/`); StepFailed naming the first problem."""
    import jsonschema

    v = _validator()
    err = jsonschema.exceptions.best_match(v.iter_errors(manifest))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise StepFailed(f"manifest does not follow {SCHEMA} at {where}: {err.message}")


_VALIDATOR = None


def _validator():
    global _VALIDATOR
    if _VALIDATOR is None:
        import json

        import jsonschema

        schema = json.loads(SCHEMA_FILE.read_text())
        _VALIDATOR = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    return _VALIDATOR


def store_files(store, files: dict[str, Any], consumed: frozenset = frozenset()) -> dict[str, dict]:
    """Store every file as a blob, several at once: {rel: {sha256, size}}.
    Values are paths, or {sha256, size} for what already is a blob. Every
    name is checked first (a relative path that cannot escape a pull). The
    paths in `consumed` are given up (a step's outputs): the store may move
    them in instead of copying."""
    from concurrent.futures import ThreadPoolExecutor

    for rel in files:
        check_rel_path(rel)
    out = {rel: dict(v) for rel, v in files.items() if isinstance(v, dict)}
    todo = sorted((rel, Path(v)) for rel, v in files.items() if not isinstance(v, dict))
    if todo:
        with ThreadPoolExecutor(max_workers=min(UPLOAD_WORKERS, len(todo))) as pool:
            for rel, (d, n) in zip([r for r, _ in todo],
                                   pool.map(lambda t: store.put_blob_file(t[1], consume=t[1] in consumed), todo)):
                out[rel] = {"sha256": d, "size": n}
    return dict(sorted(out.items()))


def lookup(ctx: Ctx, spec: StepSpec) -> Optional[StepResult]:
    key = spec.key()
    got = ctx.store.get_manifest_and_digest(ctx.recipe.name, spec.step, key)
    if got is None:
        return None
    return StepResult(spec.step, key, got[1], got[0], cached=True)


def materialize(ctx: Ctx, result: StepResult, dest: Path, only: Optional[Callable[[str], bool]] = None) -> Path:
    """Lay a step's files out under dest (verified against their sha256)."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel, info in sorted(result.files.items()):
        if only and not only(rel):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        ctx.store.get_blob_file(info["sha256"], target, size=info["size"], link=True)  # read-only: a step never writes its inputs
    return dest


def run_step(
    ctx: Ctx,
    spec: StepSpec,
    work: Callable[[Path, Path], tuple[dict, dict[str, Path]]],
) -> StepResult:
    """Answer from the store, or do `work(out_dir, scratch_dir)`.

    `work` writes its output files under out_dir and returns (results,
    extra) where extra maps relative names to existing files to store as
    they are (no copy). Every file becomes a blob; then the manifest.
    """
    label = f"{spec.step}" + (f" [{spec.variant}]" if spec.variant else "")
    if not ctx.force:
        hit = lookup(ctx, spec)
        if hit is not None:
            log(f"{label}: cached ({hit.key[:12]})")
            return hit
    key = spec.key(ctx.force_nonce if ctx.force else None)
    log(f"{label}: running ({key[:12]})")
    t0 = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix=f"ef-{spec.step}-", dir=ctx.workdir))
    try:
        out, scratch = base / "out", base / "scratch"
        out.mkdir()
        scratch.mkdir()
        with torch_work(spec.step, label, waiting=log):  # one trace alone, or runs together
            results, extra = work(out, scratch)
        produced = {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*")) if p.is_file()}
        files = store_files(ctx.store, {**produced, **(extra or {})}, consumed=frozenset(produced.values()))  # extra: paths, or {sha256, size} blobs
    finally:
        shutil.rmtree(base, ignore_errors=True)
    dt = time.perf_counter() - t0
    manifest = {
        "schema": SCHEMA,
        "recipe": ctx.recipe.name,
        "recipe_digest": ctx.recipe.digest(),
        "step": spec.step,
        "key": key,
        "variant": spec.variant,
        "params": spec.params,
        "inputs": {k: {"step": r.step, "key": r.key, "digest": r.digest} for k, r in sorted(spec.inputs.items())},
        "code_version": spec.code,
        "toolchain": spec.toolchain,
        "files": files,
        "results": results,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "host": platform.node(),
        "user": _user(),
        "duration_s": round(dt, 3),
    }
    validate_manifest(manifest)
    digest = ctx.store.put_manifest(ctx.recipe.name, spec.step, key, manifest)
    stored = ctx.store.get_manifest(ctx.recipe.name, spec.step, key) or manifest
    log(f"{label}: done in {dt:.1f}s ({len(files)} files)")
    return StepResult(spec.step, key, digest, stored, cached=False)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return os.environ.get("USER", "unknown")
