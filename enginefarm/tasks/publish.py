"""publish: the release record of one variant, then its aliases.

Order: blobs (already in the store: every step wrote its own), then this
manifest, then the aliases by compare-and-swap: `latest` on every publish,
`validated` only when the validation gates passed. A reader following an
alias never finds a manifest whose blobs are missing: the publish manifest is
written only after every blob it names was checked to be in the store, and
the whole build holds the store's shared lock, so gc cannot interleave.

The publish manifest carries the engine's full provenance (the schema is
`enginefarm/schemas/manifest-2.schema.json`): recipe name and digest, source
repo and commit, the variant, the digests of every input (step manifests and
source files), toolchain versions, the hosts and timings of every step, the
validation results, and every file with its sha256 and size.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional


from .. import __version__
from ..backends.base import version_of
from ..errors import StepFailed
from ..hashing import code_version
from ..registry import status_of, validation_line
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, _user, log, run_step
from .policy import step_task

MAX_CAS_TRIES = 20


def spec(ctx: Ctx, variant: Variant, fetched: StepResult, converted: StepResult, builds: dict[str, StepResult],
         validated: StepResult, shards: Optional[StepResult] = None) -> StepSpec:
    inputs = {"fetch": fetched, "convert": converted, "validate": validated}
    if shards is not None:  # the proof of a tp > 1 or quantized checkpoint: part of the provenance
        inputs["shards"] = shards
    ref = (validated.manifest.get("inputs") or {}).get("reference")
    if ref:  # what validate was judged against, named here too: a reader of the release (the nightly's
        # staleness pass, through the store's index) knows its digest before it looks the reference up
        inputs["reference"] = StepResult("reference", ref["key"], ref["digest"], {}, cached=True)
    inputs.update({f"build.{c}": b for c, b in builds.items()})
    params = {"variant": variant.params(), "components": sorted(builds)}
    return StepSpec("publish", params, inputs, code_version(__name__), {}, variant=variant.name)


def toolchain() -> dict:
    """The versions of everything that can shape or run an engine (null: not installed)."""
    trt, rtx = version_of("tensorrt"), version_of("tensorrt-rtx") or version_of("tensorrt_rtx")
    torch_v = version_of("torch")
    cuda = None
    if "torch" in sys.modules:  # imported by the steps already; never imported just for this
        cuda = getattr(sys.modules["torch"].version, "cuda", None)
    elif torch_v and "+cu" in torch_v:
        cuda = torch_v.split("+cu", 1)[1]
    return {
        "python": platform.python_version(),
        "torch": torch_v,
        "transformers": version_of("transformers"),
        "tensorrt_flavour": "tensorrt" if trt else ("tensorrt-rtx" if rtx else None),
        "tensorrt": trt or rtx,
        "tensorrt_llm": version_of("tensorrt_llm") or version_of("tensorrt-llm"),
        "onnxruntime": version_of("onnxruntime"),
        "cuda": cuda,
        "prefect": version_of("prefect"),
    }


def farm_commit() -> Optional[str]:
    """The git commit of the enginefarm code that ran, when it runs from a checkout."""
    here = Path(__file__).resolve().parent.parent.parent
    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def provenance(ctx: Ctx, variant: Variant, fetched: StepResult, converted: StepResult,
               builds: dict[str, StepResult], validated: StepResult) -> dict:
    src = ctx.recipe.source
    fp = fetched.manifest.get("params", {})
    steps = {"fetch": fetched, "convert": converted, **{f"build.{c}": b for c, b in builds.items()},
             "validate": validated}
    return {
        "recipe": {"name": ctx.recipe.name, "digest": ctx.recipe.digest(), "origin": ctx.recipe.origin,
                   "default_variant": ctx.recipe.variant(None).name},  # what a ref without a variant means
        "source": {
            **src.model_dump(mode="json", exclude_defaults=True),
            "kind": src.kind,
            "repo": src.hf or src.s3 or (f"tiny:{src.tiny}" if src.tiny else fp.get("path")),
            "commit": fp.get("revision"),
        },
        "source_files": {rel: f["sha256"] for rel, f in sorted(fetched.files.items())},
        "variant": {**variant.params(), "components": sorted(builds)},
        "components": {c: {"backend": b.manifest["params"]["backend"],
                           "target": (b.manifest["params"].get("variant") or {}).get("target", variant.target),
                           "engine": b.results.get("engine", {}),
                           "toolchain": b.manifest["toolchain"]} for c, b in sorted(builds.items())},
        "toolchain": toolchain(),
        "farm": {"version": __version__, "commit": farm_commit(),
                 "code_versions": {k: s.manifest.get("code_version") for k, s in steps.items()}},
        "build_host": {"host": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "step_hosts": {k: s.manifest.get("host") for k, s in steps.items()}},
        "timings": {k: s.manifest.get("duration_s") for k, s in steps.items()},
        "validation": {
            "passed": bool(validated.results.get("passed")),
            "status": status_of(validated.results),
            **({"reason": validated.results["reason"]} if validated.results.get("reason") else {}),
            **({"components": validated.results["components"]} if validated.results.get("components") else {}),
            "gates": validated.results.get("gates") or {},
            "metrics": validated.results.get("metrics") or {},
        },
    }


@step_task("publish")
def publish_task(ctx: Ctx, variant: Variant, fetched: StepResult, converted: StepResult,
                 builds: dict[str, StepResult], validated: StepResult,
                 shards: Optional[StepResult] = None) -> StepResult:
    s = spec(ctx, variant, fetched, converted, builds, validated, shards)

    def work(out: Path, scratch: Path):
        files = {}
        for comp, b in sorted(builds.items()):
            for rel, info in b.files.items():
                files[f"{comp}/{rel}"] = info  # already blobs: nothing is copied
        missing = sorted(rel for rel, info in files.items() if not ctx.store.has_blob(info["sha256"]))
        if missing:
            raise StepFailed(f"publish [{variant.name}]: blobs missing from {ctx.store.uri} for {', '.join(missing)}; "
                             "nothing was published (rebuild with --force)")
        return provenance(ctx, variant, fetched, converted, builds, validated), files

    with ctx.store.lock(f"publish {ctx.recipe.name}:{variant.name}"):
        res = run_step(ctx, s, work)
        move_aliases(ctx.store, ctx.recipe.name, variant.name, res)
    return res


def move_aliases(store, recipe: str, variant: str, res: StepResult) -> None:
    """latest on every publish; validated only when the gates passed (never
    while any component's validation is pending: no GPU here could run it)."""
    path = store.manifest_path(recipe, "publish", res.key)
    if store.move_alias(recipe, variant, "latest", path, res.digest, "publish"):
        log(f"publish [{variant}]: latest -> {res.digest[:12]}")
    val = res.results.get("validation") or {}
    if status_of(val) == "pending":
        log(f"publish [{variant}]: validated not moved: validation {validation_line(val)}")
    elif status_of(val) == "passed" and val.get("passed"):
        if store.move_alias(recipe, variant, "validated", path, res.digest, "validation gates passed"):
            log(f"publish [{variant}]: validated -> {res.digest[:12]}")
