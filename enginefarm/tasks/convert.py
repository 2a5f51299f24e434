"""convert: Hugging Face weights -> the TensorRT-LLM checkpoint for one
variant (dtype, quant, tp), streamed tensor by tensor."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from .. import checkpoint
from ..backends.base import version_of
from ..families import get_family
from ..families import _split, base as fam_base
from ..hashing import code_version
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step


def spec(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepSpec:
    fam = get_family(ctx.recipe.family)
    params = {"family": fam.name, "dtype": variant.dtype, "quant": variant.quant, "tp": variant.tp}
    code = code_version(sys.modules[__name__], checkpoint, fam_base, _split, sys.modules[type(fam).__module__])
    import torch

    tc = {"torch": torch.__version__, "safetensors": version_of("safetensors")}
    return StepSpec("convert", params, {"fetch": fetched}, code, tc, variant=f"tp{variant.tp}-{variant.dtype}-{variant.quant}")


@task(name="convert", cache_policy=NONE)
def convert_task(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepResult:
    s = spec(ctx, fetched, variant)

    def work(out: Path, scratch: Path):
        src = materialize(ctx, fetched, scratch / "src")
        fam = get_family(ctx.recipe.family)
        summary = checkpoint.convert_checkpoint(
            fam, src, out, variant, allow_pickle=ctx.recipe.source.allow_pickle, progress=log
        )
        return summary, {}

    return run_step(ctx, s, work)
