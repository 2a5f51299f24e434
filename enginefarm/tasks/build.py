"""build: one engine for one component of one variant, with its backend:
the llm from the converted checkpoint, the visual encoder from its export."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from ..backends import get_backend
from ..families import get_family
from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step


def component_backend(ctx: Ctx, component: str, variant: Variant) -> str:
    return ctx.recipe.components[component].backend or variant.backend


def spec(ctx: Ctx, source: StepResult, variant: Variant, component: str = "llm", config: dict | None = None) -> StepSpec:
    """source: the convert step's result (llm) or the export step's (visual);
    config: the fetched config.json, for limits that depend on the checkpoint."""
    bname = component_backend(ctx, component, variant)
    b = get_backend(bname)
    limits = get_family(ctx.recipe.family).derived_limits(ctx.recipe, config)
    params = {"component": component, "backend": bname, "variant": variant.params(), "limits": limits}
    code = code_version(__name__, type(b).__module__, "enginefarm.runtime.decoder", "enginefarm.runtime.engine",
                        "enginefarm.runtime.visual")
    inputs = {"export" if component == "visual" else "convert": source}
    return StepSpec("build", params, inputs, code, b.toolchain(variant.target), variant=variant.name)


@task(name="build", cache_policy=NONE)
def build_task(ctx: Ctx, source: StepResult, variant: Variant, component: str = "llm",
               config: dict | None = None) -> StepResult:
    s = spec(ctx, source, variant, component, config)

    def work(out: Path, scratch: Path):
        ckpt = materialize(ctx, source, scratch / "src")
        sidecar = get_backend(s.params["backend"]).build(component, ckpt, out, variant, s.params["limits"], progress=log)
        return {"engine": sidecar}, {}

    return run_step(ctx, s, work)
