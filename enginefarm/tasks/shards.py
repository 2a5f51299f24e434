"""shards: proof that a converted checkpoint's rank files are right, before
an engine is built from them.

Runs for every variant with tp > 1 or weight-only quantization: the rank
files are loaded in tp processes joined by torch.distributed (gloo on CPU,
nccl on GPUs; runtime/tp.py), the forward pass all-reduces where
TensorRT-LLM does, and the logits, greedy tokens and text-set perplexity are
compared with the Hugging Face model in fp32 (enginefarm/evaluation.py). The
variant's gates (validation.gates, or validation.quant_gates for quantized
variants) decide; a checkpoint that fails them is not built.
"""

from __future__ import annotations

from pathlib import Path

from ..backends.base import version_of
from ..errors import StepFailed
from ..evaluation import check_shards, gates_line, judge
from ..hashing import code_version, digest_bytes
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task
from . import reference as reference_step
from .reference import text_set


def needed(variant: Variant) -> bool:
    return variant.tp > 1 or variant.quant != "none"


def spec(ctx: Ctx, fetched: StepResult, converted: StepResult, variant: Variant,
         referenced: StepResult | None = None) -> StepSpec:
    v = ctx.recipe.validation
    params = {
        "variant": variant.params(),
        "validation": v.model_dump(mode="json"),
        "text_digest": digest_bytes(text_set(v.text_set, ctx).encode()),
        "limits": ctx.recipe.limits.model_dump(mode="json"),
    }
    tc = {"torch": version_of("torch"), "transformers": version_of("transformers")}
    code = code_version(__name__)
    inputs = {"fetch": fetched, "convert": converted, **({"reference": referenced} if referenced is not None else {})}
    return StepSpec("shards", params, inputs, code, tc, variant=variant.name)


@step_task("shards")
def shards_task(ctx: Ctx, fetched: StepResult, converted: StepResult, variant: Variant,
                referenced: StepResult | None = None) -> StepResult:
    s = spec(ctx, fetched, converted, variant, referenced)

    def work(out: Path, scratch: Path):
        src = materialize(ctx, fetched, scratch / "src")
        ckpt = materialize(ctx, converted, scratch / "ckpt")
        v, lim = ctx.recipe.validation, ctx.recipe.limits
        stored = reference_step.load(ctx, referenced, scratch) if referenced is not None else None
        log(f"shards [{variant.name}]: running the rank files in {variant.tp} process(es) against the HF model"
            + (f"'s stored outputs ({referenced.key[:12]})" if stored else ""))
        (m,) = check_shards(src, [ckpt], v.prompts, text_set(v.text_set, ctx), v.max_new_tokens, v.max_eval_tokens,
                            lim.max_input_len, lim.max_seq_len, reference=stored,
                            tie_margin=v.gates_for(variant.quant).greedy_tie_margin)
        m.pop("checkpoint", None)
        gates = judge(m, v.gates_for(variant.quant).model_dump())
        passed = all(g["passed"] for g in gates.values())
        summary = gates_line(gates)
        if not passed:
            raise StepFailed(f"shards [{variant.name}]: the converted tp={variant.tp} {variant.quant} checkpoint does "
                             f"not match the Hugging Face model: {summary}")
        log(f"shards [{variant.name}]: PASSED: {summary}")
        return {"metrics": m, "gates": gates, "passed": passed}, {}

    return run_step(ctx, s, work)
