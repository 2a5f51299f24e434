"""build: one engine for one component of one variant, with its backend:
the llm from the converted checkpoint, the visual encoder from its export."""

from __future__ import annotations

from pathlib import Path

from ..backends import get_backend
from ..families import get_family
from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def component_backend(ctx: Ctx, component: str, variant: Variant) -> str:
    return ctx.recipe.component_backend(component, variant)


def spec(ctx: Ctx, source: StepResult, variant: Variant, component: str = "llm", config: dict | None = None) -> StepSpec:
    """source: the convert step's result (llm) or the export step's (visual);
    config: the fetched config.json, for limits that depend on the checkpoint."""
    bname = component_backend(ctx, component, variant)
    b = get_backend(bname)
    variant = ctx.recipe.component_variant(component, variant)  # the component's own target, if the recipe gives one
    limits = get_family(ctx.recipe.family).derived_limits(ctx.recipe, config)
    params = {"component": component, "backend": bname, "variant": variant.params(), "limits": limits}
    mods = [__name__, type(b).__module__, "enginefarm.runtime.decoder", "enginefarm.runtime.engine",
            "enginefarm.runtime.encdec", "enginefarm.runtime.visual", "enginefarm.runtime.export",
            "enginefarm.runtime.swaps", "enginefarm.runtime.sidecar", "enginefarm.kernels.gemv"]
    opts = ctx.recipe.components[component].aoti
    if bname == "aoti" and opts is not None:  # only when set: recipes without options keep their cache keys
        params["options"] = opts.model_dump()
    code = code_version(*mods)
    inputs = {"export" if component == "visual" else "convert": source}
    return StepSpec("build", params, inputs, code, b.toolchain(variant.target), variant=variant.name)


@step_task("build")
def build_task(ctx: Ctx, source: StepResult, variant: Variant, component: str = "llm",
               config: dict | None = None) -> StepResult:
    s = spec(ctx, source, variant, component, config)
    variant = ctx.recipe.component_variant(component, variant)

    def work(out: Path, scratch: Path):
        src = materialize(ctx, source, scratch / "src")
        b = get_backend(s.params["backend"])
        extra = {"options": s.params["options"]} if "options" in s.params else {}
        cache_name = b.timing_cache_name(variant.target) if hasattr(b, "timing_cache_name") else None
        if cache_name:  # TensorRT: the timing cache of this flavour, version and GPU target, from the store
            extra.update(timing_cache=ctx.store.get_cache(cache_name), timing_cache_out=scratch / "timing.cache")
        sidecar = b.build(component, src, out, variant, s.params["limits"], progress=log, **extra)
        if cache_name and extra["timing_cache_out"].is_file():
            ctx.store.put_cache(cache_name, extra["timing_cache_out"].read_bytes())
        return {"engine": sidecar}, {}

    return run_step(ctx, s, work)
