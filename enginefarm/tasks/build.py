"""build: one engine for one component of one variant, with its backend."""

from __future__ import annotations

from pathlib import Path


from ..backends import get_backend
from ..families import get_family
from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def component_backend(ctx: Ctx, component: str, variant: Variant) -> str:
    return ctx.recipe.components[component].backend or variant.backend


def spec(ctx: Ctx, converted: StepResult, variant: Variant, component: str = "llm") -> StepSpec:
    bname = component_backend(ctx, component, variant)
    b = get_backend(bname)
    limits = get_family(ctx.recipe.family).derived_limits(ctx.recipe)
    params = {"component": component, "backend": bname, "variant": variant.params(), "limits": limits}
    code = code_version(__name__, type(b).__module__, "enginefarm.runtime.decoder", "enginefarm.runtime.engine")
    return StepSpec("build", params, {"convert": converted}, code, b.toolchain(variant.target), variant=variant.name)


@step_task("build")
def build_task(ctx: Ctx, converted: StepResult, variant: Variant, component: str = "llm") -> StepResult:
    s = spec(ctx, converted, variant, component)

    def work(out: Path, scratch: Path):
        ckpt = materialize(ctx, converted, scratch / "ckpt")
        sidecar = get_backend(s.params["backend"]).build(component, ckpt, out, variant, s.params["limits"], progress=log)
        return {"engine": sidecar}, {}

    return run_step(ctx, s, work)
