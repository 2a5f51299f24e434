"""convert: Hugging Face weights -> the TensorRT-LLM checkpoint for one
variant (dtype, quant, tp), streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


from ..backends.base import version_of
from ..families import get_family
from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def spec(ctx: Ctx, fetched: StepResult, variant: Variant, calibrated: Optional[StepResult] = None) -> StepSpec:
    fam = get_family(ctx.recipe.family)
    params = {"family": fam.name, "dtype": variant.dtype, "quant": variant.quant, "tp": variant.tp}
    if variant.group_size:
        params["group_size"] = variant.group_size
    code = code_version(__name__, *fam.code_modules())
    tc = {"torch": version_of("torch"), "safetensors": version_of("safetensors")}
    inputs = {"fetch": fetched, **({"calibrate": calibrated} if calibrated is not None else {})}
    return StepSpec("convert", params, inputs, code, tc, variant=f"tp{variant.tp}-{variant.dtype}-{variant.quant}")


@step_task("convert")
def convert_task(ctx: Ctx, fetched: StepResult, variant: Variant, calibrated: Optional[StepResult] = None) -> StepResult:
    s = spec(ctx, fetched, variant, calibrated)

    def work(out: Path, scratch: Path):
        from .. import checkpoint

        src = materialize(ctx, fetched, scratch / "src")
        from .calibrate import load as load_calibration

        fam = get_family(ctx.recipe.family)
        summary = checkpoint.convert_checkpoint(
            fam, src, out, variant, allow_pickle=ctx.recipe.source.allow_pickle, progress=log,
            calibration=load_calibration(ctx, calibrated, scratch),
        )
        return summary, {}

    return run_step(ctx, s, work)
