"""convert: Hugging Face weights -> the TensorRT-LLM checkpoint for one
variant (dtype, quant, tp), streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path


from ..backends.base import version_of
from ..families import get_family
from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def spec(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepSpec:
    fam = get_family(ctx.recipe.family)
    params = {"family": fam.name, "dtype": variant.dtype, "quant": variant.quant, "tp": variant.tp}
    code = code_version(__name__, *fam.code_modules())
    tc = {"torch": version_of("torch"), "safetensors": version_of("safetensors")}
    return StepSpec("convert", params, {"fetch": fetched}, code, tc, variant=f"tp{variant.tp}-{variant.dtype}-{variant.quant}")


@step_task("convert")
def convert_task(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepResult:
    s = spec(ctx, fetched, variant)

    def work(out: Path, scratch: Path):
        from .. import checkpoint

        src = materialize(ctx, fetched, scratch / "src")
        fam = get_family(ctx.recipe.family)
        summary = checkpoint.convert_checkpoint(
            fam, src, out, variant, allow_pickle=ctx.recipe.source.allow_pickle, progress=log
        )
        return summary, {}

    return run_step(ctx, s, work)
