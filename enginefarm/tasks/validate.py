"""validate: the engine against the Hugging Face model on the same inputs.

For each recipe prompt: logits max-abs-diff, top-1 agreement and greedy
tokens (engine vs `generate`). Over the text set (the HF demo's accuracy
mode): perplexity and top-1 / top-5 next-token accuracy, engine next to
reference, plus their logits difference. The recipe's gates decide pass or
fail; the result goes into the manifest (a failed gate is a result, not an
exception: the build is published as `latest` but not `validated`).

Multimodal recipes (a visual engine next to the LLM): the recipe's images
(video families: its videos) and prompts, paired, through both engines and through the Hugging Face
model (fp32, `generate`): visual features max abs diff, prefill logits,
greedy tokens one pair at a time and batched; the text set through the LLM.
"""

from __future__ import annotations

from pathlib import Path


from ..backends import get_backend
from ..backends.base import version_of
from ..errors import BadInput
from ..hashing import code_version, digest_bytes
from ..evaluation import builtin_text, evaluate, evaluate_multimodal, gates_line, judge, load_reference
from ..families import get_family
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


def spec(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant,
         visual: StepResult | None = None) -> StepSpec:
    """built: the llm engine's build; visual: the visual engine's (multimodal recipes)."""
    v = ctx.recipe.validation
    validation = v.model_dump(mode="json")
    if validation["videos"] is None:  # unset: the key of a recipe from before the field is unchanged
        del validation["videos"]
    params = {
        "variant": variant.params(),
        "validation": validation,
        "text_digest": digest_bytes(text_set(v.text_set, ctx).encode()),
    }
    tc = {"torch": version_of("torch"), "transformers": version_of("transformers")}
    modules = [__name__, "enginefarm.runtime.engine", "enginefarm.runtime.encdec", "enginefarm.evaluation"]
    inputs = {"fetch": fetched, "build": built}
    if visual is not None:
        from ..images import image_digest

        if get_family(ctx.recipe.family).media == "video":
            from ..videos import video_digest

            params["video_digests"] = [video_digest(i, ctx.recipe.recipe_dir()) for i in videos_of(ctx)]
            modules.append("enginefarm.videos")
        else:
            params["image_digests"] = [image_digest(i, ctx.recipe.recipe_dir()) for i in v.images]
        modules += ["enginefarm.runtime.visual", "enginefarm.runtime.multimodal", "enginefarm.images",
                    "enginefarm.families._multimodal", type(get_family(ctx.recipe.family)).__module__]
        inputs["build.visual"] = visual
    return StepSpec("validate", params, inputs, code_version(*modules), tc, variant=variant.name)


DEFAULT_VIDEOS = ["builtin:orbit", "builtin:pan"]


def videos_of(ctx: Ctx) -> list[str]:
    return ctx.recipe.validation.videos or DEFAULT_VIDEOS


def _validate_multimodal(ctx: Ctx, fetched: StepResult, built: StepResult, visual: StepResult, variant: Variant,
                         scratch: Path) -> dict:
    from ..images import load_image
    from ..runtime.multimodal import MultimodalPipeline

    fam = get_family(ctx.recipe.family)
    v = ctx.recipe.validation
    src = materialize(ctx, fetched, scratch / "src")
    llm = get_backend(built.manifest["params"]["backend"]).load(materialize(ctx, built, scratch / "llm"))
    vis = get_backend(visual.manifest["params"]["backend"]).load(materialize(ctx, visual, scratch / "visual"))
    log(f"validate [{variant.name}]: loading the reference model (fp32), the processor and both engines")
    pipe = MultimodalPipeline(vis, llm, fam.load_processor(src, vis.visual))
    ref = fam.reference_model(src)
    if fam.media == "video":
        from ..videos import load_video

        names = videos_of(ctx)
        items = [load_video(i, ctx.recipe.recipe_dir()) for i in names]
    else:
        names = v.images
        items = [load_image(i, ctx.recipe.recipe_dir()) for i in names]
    return evaluate_multimodal(fam, ref, pipe, items, names, v.prompts, text_set(v.text_set, ctx),
                               v.max_new_tokens, v.max_eval_tokens)


@step_task("validate")
def validate_task(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant,
                  visual: StepResult | None = None) -> StepResult:
    s = spec(ctx, fetched, built, variant, visual)

    def work(out: Path, scratch: Path):
        if visual is not None:
            return _finish(_validate_multimodal(ctx, fetched, built, visual, variant, scratch))
        from transformers import AutoTokenizer

        src = materialize(ctx, fetched, scratch / "src")
        eng_dir = materialize(ctx, built, scratch / "engine")
        v = ctx.recipe.validation
        log(f"validate [{variant.name}]: loading the reference model (fp32) and the engine")
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        ref = load_reference(src)  # causal or seq2seq, from config.json
        eng = get_backend(built.manifest["params"]["backend"]).load(eng_dir)
        metrics = evaluate(ref, tok, eng, v.prompts, text_set(v.text_set, ctx), v.max_new_tokens, v.max_eval_tokens)
        return _finish(metrics)

    def _finish(metrics: dict):
        gates = judge(metrics, ctx.recipe.validation.gates_for(variant.quant).model_dump())
        passed = all(g["passed"] for g in gates.values())
        log(f"validate [{variant.name}]: {'PASSED' if passed else 'FAILED'}: {gates_line(gates)}")
        return {"metrics": metrics, "gates": gates, "passed": passed}, {}

    return run_step(ctx, s, work)
