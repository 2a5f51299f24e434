"""build: one engine for one component of one variant, with its backend:
the llm from the converted checkpoint, the visual encoder from its export."""

from __future__ import annotations

from pathlib import Path

from ..backends import get_backend
from ..backends.base import BuildRequest
from ..families import get_family
from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def component_backend(ctx: Ctx, component: str, variant: Variant) -> str:
    return ctx.recipe.component_backend(component, variant)


def built_variant(ctx: Ctx, component: str, variant: Variant) -> Variant:
    """`variant` as `component` is built in it: the component's own target, where
    the recipe gives one. A visual engine depends on neither the LLM's weight
    quantization nor its tensor parallelism (it runs whole, in the export's
    dtype), so variants that differ only in those share one visual build: its
    variant is named for the component, in the component's own dtype (as
    the export step is), with neither."""
    v = ctx.recipe.component_variant(component, variant)
    if component == "visual":
        dtype = ctx.recipe.components[component].dtype or v.dtype
        v = v.model_copy(update={"name": f"visual-{dtype}-{v.target}", "dtype": dtype, "quant": "none", "tp": 1,
                                 "group_size": None})
    return v


def spec(ctx: Ctx, source: StepResult, variant: Variant, component: str = "llm", config: dict | None = None) -> StepSpec:
    """source: the convert step's result (llm) or the export step's (visual);
    config: the fetched config.json, for limits that depend on the checkpoint."""
    bname = component_backend(ctx, component, variant)
    b = get_backend(bname)
    variant = built_variant(ctx, component, variant)
    limits = get_family(ctx.recipe.family).derived_limits(ctx.recipe, config)
    params = {"component": component, "backend": bname, "variant": variant.params(), "limits": limits}
    opts = ctx.recipe.components[component].aoti
    if bname == "aoti" and opts is not None:  # only when set: recipes without options keep their parameters
        params["options"] = opts.model_dump()
    # this module and the backend's, with everything they import (hashing.code_closure)
    code = code_version(__name__, type(b).__module__)
    inputs = {"export" if component == "visual" else "convert": source}
    return StepSpec("build", params, inputs, code, b.toolchain(variant.target), variant=variant.name)


@step_task("build")
def build_task(ctx: Ctx, source: StepResult, variant: Variant, component: str = "llm",
               config: dict | None = None) -> StepResult:
    s = spec(ctx, source, variant, component, config)
    variant = built_variant(ctx, component, variant)

    def work(out: Path, scratch: Path):
        src = materialize(ctx, source, scratch / "src")
        b = get_backend(s.params["backend"])
        options = ctx.recipe.components[component].aoti if "options" in s.params else None
        cache_name = b.timing_cache_name(variant.target)  # TensorRT's, of its flavour, version and GPU target
        req = BuildRequest(component, src, out, variant, s.params["limits"], options=options,
                           timing_cache=ctx.store.get_cache(cache_name) if cache_name else None, progress=log)
        res = b.build(req)
        if cache_name and res.timing_cache:
            ctx.store.put_cache(cache_name, res.timing_cache)
        return {"engine": res.sidecar}, {}

    return run_step(ctx, s, work)
