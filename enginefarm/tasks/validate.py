"""validate: the engine against the Hugging Face model on the same inputs.

For each recipe prompt: logits max-abs-diff, top-1 agreement and greedy
tokens (engine vs `generate`). Over the text set (the HF demo's accuracy
mode): perplexity and top-1 / top-5 next-token accuracy, engine next to
reference, plus their logits difference. The recipe's gates decide pass or
fail; the result goes into the manifest (a failed gate is a result, not an
exception: the build is published as `latest` but not `validated`).
"""

from __future__ import annotations

from pathlib import Path


from ..backends import get_backend
from ..backends.base import version_of
from ..errors import BadInput
from ..hashing import code_version, digest_bytes
from ..evaluation import builtin_text, evaluate, gates_line, judge, load_reference
from ..spec import Variant
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def text_set(name: str, ctx: Ctx) -> str:
    if name == "builtin:eval":
        return builtin_text()
    p = Path(name)
    if not p.is_absolute():
        p = ctx.recipe.recipe_dir() / p
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"recipe {ctx.recipe.name}: validation.text_set {name}: {e}") from None


def spec(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant) -> StepSpec:
    v = ctx.recipe.validation
    params = {
        "variant": variant.params(),
        "validation": v.model_dump(mode="json"),
        "text_digest": digest_bytes(text_set(v.text_set, ctx).encode()),
    }
    tc = {"torch": version_of("torch"), "transformers": version_of("transformers")}
    code = code_version(__name__, "enginefarm.runtime.engine", "enginefarm.runtime.encdec", "enginefarm.evaluation")
    return StepSpec("validate", params, {"fetch": fetched, "build": built}, code, tc, variant=variant.name)


@step_task("validate")
def validate_task(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant) -> StepResult:
    s = spec(ctx, fetched, built, variant)

    def work(out: Path, scratch: Path):
        from transformers import AutoTokenizer

        src = materialize(ctx, fetched, scratch / "src")
        eng_dir = materialize(ctx, built, scratch / "engine")
        v = ctx.recipe.validation
        log(f"validate [{variant.name}]: loading the reference model (fp32) and the engine")
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        ref = load_reference(src)  # causal or seq2seq, from config.json
        eng = get_backend(built.manifest["params"]["backend"]).load(eng_dir)
        metrics = evaluate(ref, tok, eng, v.prompts, text_set(v.text_set, ctx), v.max_new_tokens, v.max_eval_tokens)
        gates = judge(metrics, v.gates_for(variant.quant).model_dump())
        passed = all(g["passed"] for g in gates.values())
        log(f"validate [{variant.name}]: {'PASSED' if passed else 'FAILED'}: {gates_line(gates)}")
        return {"metrics": metrics, "gates": gates, "passed": passed}, {}

    return run_step(ctx, s, work)
