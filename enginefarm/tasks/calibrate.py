"""calibrate: ModelOpt's calibration of the Hugging Face model for a
calibrated quantization (w4a16_awq, w8a8_sq, fp8), a cached step of its own.

    fetch -> calibrate(algorithm, group size, data) -> convert(quant)

Its key holds the fetched checkpoint, the algorithm, the group size, the
digest of the calibration data and ModelOpt's version, so one calibration
serves every variant that shares them (tp sizes, dtypes) and a new ModelOpt
or new data calibrates again. Its one file, `calibration.safetensors`, holds
the statistics the converter applies (calibration.py); its manifest records
the data digest, the algorithm, ModelOpt's version and what was kept.

The data is the recipe's `validation.calibration`: by default the farm's text
set after the perplexity window (the first max_eval_tokens tokens), so that
calibration never sees the tokens the variant is judged on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..backends.base import version_of
from ..errors import BadInput
from ..families import get_family
from ..hashing import code_version, digest_bytes, digest_json
from ..calibration import SQ_ALPHA
from ..quant import CALIBRATED, awq_group_size
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task
from .reference import text_set

FILE = "calibration.safetensors"


def needed(variant: Variant) -> bool:
    return variant.quant in CALIBRATED


def data(ctx: Ctx) -> tuple[str, int]:
    """(calibration text, tokens to skip at its start)."""
    v = ctx.recipe.validation
    c = v.calibration
    if c.text_set:
        return text_set(c.text_set, ctx), 0
    return text_set(v.text_set, ctx), v.max_eval_tokens


def spec(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepSpec:
    c = ctx.recipe.validation.calibration
    text, skip = data(ctx)
    # AWQ's group size; SmoothQuant and FP8 have none (per channel, per tensor)
    group = (awq_group_size(fetched.results["config"], variant.tp, variant.group_size)
             if variant.quant == "w4a16_awq" else None)
    params = {
        "algorithm": CALIBRATED[variant.quant],
        "group_size": group,
        **({"smoothquant_alpha": SQ_ALPHA} if variant.quant == "w8a8_sq" else {}),
        "data": {"text_digest": digest_bytes(text.encode()), "skip_tokens": skip,
                 "max_tokens": c.max_tokens, "seq_len": c.seq_len},
    }
    tc = {"modelopt": version_of("nvidia-modelopt"), "torch": version_of("torch"),
          "transformers": version_of("transformers")}
    code = code_version(__name__, "enginefarm.calibration")
    return StepSpec("calibrate", params, {"fetch": fetched}, code, tc,
                    variant=params["algorithm"] + (f"-g{group}" if group else ""))


@step_task("calibrate")
def calibrate_task(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepResult:
    s = spec(ctx, fetched, variant)

    def work(out: Path, scratch: Path):
        from transformers import AutoTokenizer

        from .. import calibration

        src = materialize(ctx, fetched, scratch / "src")
        c = ctx.recipe.validation.calibration
        text, skip = data(ctx)
        tok = AutoTokenizer.from_pretrained(src)
        samples = calibration.calibration_ids(tok, text, skip, c.max_tokens, c.seq_len)
        if not samples:
            raise BadInput(f"recipe {ctx.recipe.name}: the calibration text has no tokens after the first {skip} "
                           f"(the perplexity window); set validation.calibration.text_set")
        algo, group = s.params["algorithm"], s.params["group_size"]
        log(f"calibrate [{algo}]: {len(samples)} samples, {sum(map(len, samples))} tokens"
            + (f", group {group}" if group else ""))
        fused = None
        if algo == "int4_awq":  # the linears that share one scale in the checkpoint (q/k/v)
            from ..checkpoint import fused_linears

            fused = fused_linears(get_family(ctx.recipe.family), src, variant,
                                  allow_pickle=ctx.recipe.source.allow_pickle)
        stats = _in_child(src, samples, algo, group, out / FILE, fused)
        results = {"algorithm": algo, "group_size": group, "modelopt": calibration.modelopt_version(),
                   "data_digest": digest_json(samples), **stats}
        return results, {}

    return run_step(ctx, s, work)


def _calibrate_child(src: str, samples: list, algo: str, group, path: str, fused, conn) -> None:
    from safetensors.torch import save_file

    from .. import calibration
    from ..evaluation import load_reference

    try:
        tensors, stats = calibration.calibrate(load_reference(src), samples, algo, group, fused=fused)
        # safetensors stores contiguous tensors only (a clip search's ratios come out of torch.where strided)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt", "algorithm": algo})
        conn.send(("ok", stats))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _in_child(src: Path, samples: list, algo: str, group, path: Path, fused=None) -> dict:
    """ModelOpt's calibration in a process of its own: ModelOpt changes
    process-wide state as it calibrates (its Hugging Face plugins rewrite
    attention classes and register hooks: calibration._no_attention_rewrite),
    and the build's other steps run in this process, in threads. (The wrong
    references first blamed on this were concurrent Hugging Face loads:
    evaluation.load_reference.)"""
    import multiprocessing as mp

    from ..errors import StepFailed

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_calibrate_child, args=(str(src), samples, algo, group, str(path), fused, child))
    p.start()
    child.close()
    try:
        status, got = parent.recv()
    except EOFError:
        status, got = "error", "the calibration process ended without a result"
    p.join()
    if status != "ok" or p.exitcode != 0:
        raise StepFailed(f"calibrate [{algo}]: {got if status != 'ok' else f'exit code {p.exitcode}'}")
    return got


def load(ctx: Ctx, calibrated: Optional[StepResult], scratch: Path) -> Optional[dict]:
    """The statistics of a calibrate result, as tensors (None: no calibration)."""
    if calibrated is None:
        return None
    from safetensors.torch import load_file

    d = materialize(ctx, calibrated, scratch / "calibration")
    return load_file(str(d / FILE))
