"""validate: the engine against the Hugging Face model on the same inputs.

For each recipe prompt: logits max-abs-diff, top-1 agreement and greedy
tokens (engine vs `generate`: exactly, and up to the first near-tie, where
the recipe's greedy_tie_margin is passed on to evaluation.compare). Over the text set (the HF demo's accuracy
mode): perplexity and top-1 / top-5 next-token accuracy, engine next to
reference, plus their logits difference. The recipe's gates decide pass or
fail; the result goes into the manifest (a failed gate is a result, not an
exception: the build is published as `latest` but not `validated`).

Multimodal recipes (a visual engine next to the LLM): the recipe's images
(video families: its videos) and prompts, paired, through both engines and through the Hugging Face
model (fp32, `generate`): visual features max abs diff, prefill logits,
greedy tokens one pair at a time and batched; the text set through the LLM.
The Hugging Face side is the reference step's stored outputs, with a
decoder-only LLM (LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video, BLIP-2 with OPT) and
with an encoder-decoder one (BLIP-2 with Flan-T5, Nougat, BLIP): the model
is not loaded here, unless the engines' limits are not the ones the
reference was cut with (an encoder-decoder LLM's max_decoder_tokens among
them) or their decoder starts from, or stops at, another token than the
reference's; then it is loaded here, and the log says why.

An engine that cannot run on this machine (a TensorRT engine and no GPU
among its targets, say) is not validated here: its component is recorded
`pending` ("no compatible GPU"), with why, and the variant's status is
`pending` (unless another component failed: then `failed`); publish never
moves `validated` to it. The other components are still validated: an LLM
next to a pending visual engine runs on the features of the checkpoint's own
visual module (PyTorch) in its place, and the visual gate is not judged.
Which components are pending is part of the step's key, so a worker that
can run the engine validates it instead of finding the pending record.
Where a TensorRT visual engine does run, its features are also compared
with ONNX Runtime (the export it was built from) and with PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..backends import get_backend
from ..backends.base import version_of
from ..errors import BadInput
from ..hashing import code_version, digest_bytes
from ..evaluation import evaluate, evaluate_multimodal, gates_line, greedy_line, judge, load_reference
from ..families import get_family
from ..spec import Variant
from . import reference as reference_step
from .reference import text_set
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


PENDING = "no compatible GPU"
VISUAL_GATES = ("visual_max_abs_diff",)


def cannot_run(built: StepResult) -> Optional[str]:
    """Why a built engine cannot run on this machine (its backend says), or None."""
    return get_backend(built.manifest["params"]["backend"]).cannot_run(built.results.get("engine") or {})


def pending_components(built: StepResult, visual: StepResult | None = None) -> dict[str, str]:
    """{component: why its engine cannot run here} for the engines that cannot."""
    out = {}
    for c, b in (("llm", built), ("visual", visual)):
        why = cannot_run(b) if b is not None else None
        if why:
            out[c] = why
    return out


def spec(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant,
         visual: StepResult | None = None, referenced: StepResult | None = None) -> StepSpec:
    """built: the llm engine's build; visual: the visual engine's (multimodal recipes); referenced: the
    reference step's result."""
    v = ctx.recipe.validation
    validation = v.model_dump(mode="json")
    if validation["videos"] is None:  # unset: the key of a recipe from before the field is unchanged
        del validation["videos"]
    params = {
        "variant": variant.params(),
        "validation": validation,
        "text_digest": digest_bytes(text_set(v.text_set, ctx).encode()),
    }
    pending = pending_components(built, visual)
    if pending:  # only then: every other validate key stays what it was
        params["pending"] = sorted(pending)
    tc = {"torch": version_of("torch"), "transformers": version_of("transformers")}
    modules = [__name__]  # with what it imports (hashing.code_closure); a multimodal family's module besides
    inputs = {"fetch": fetched, "build": built, **({"reference": referenced} if referenced is not None else {})}
    if visual is not None:
        params.update(reference_step.media_digests(ctx))
        modules.append(type(get_family(ctx.recipe.family)).__module__)
        inputs["build.visual"] = visual
    return StepSpec("validate", params, inputs, code_version(*modules), tc, variant=variant.name)


def _validate_multimodal(ctx: Ctx, fetched: StepResult, built: StepResult, visual: StepResult, variant: Variant,
                         scratch: Path, stand_in: bool = False, referenced: StepResult | None = None) -> dict:
    from ..runtime.multimodal import MultimodalPipeline

    fam = get_family(ctx.recipe.family)
    v = ctx.recipe.validation
    src = materialize(ctx, fetched, scratch / "src")
    llm = get_backend(built.manifest["params"]["backend"]).load(materialize(ctx, built, scratch / "llm"))
    if stand_in:
        vis = _pytorch_visual(fam, src, fetched.results["config"], visual.results["engine"]["visual"],
                              ctx.recipe.source.allow_pickle)
        log(f"validate [{variant.name}]: the visual engine cannot run here; the LLM is validated on the "
            f"checkpoint's own visual module (PyTorch) in its place")
    else:
        vis = get_backend(visual.manifest["params"]["backend"]).load(materialize(ctx, visual, scratch / "visual"))
    pipe = MultimodalPipeline(vis, llm, fam.load_processor(src, vis.visual))
    ref, stored = None, None
    why = reference_step.mismatch(referenced, llm, pipe.eos_token_id)
    if why is None:
        log(f"validate [{variant.name}]: the engines against the stored reference ({referenced.key[:12]})")
        stored = reference_step.load(ctx, referenced, scratch)
    else:  # no stored reference, or one cut with other limits (or decoder tokens) than these engines'
        log(f"validate [{variant.name}]: loading the reference model (fp32), the processor and the engines: {why}")
        ref = fam.reference_model(src)
    names, items = reference_step.media_of(ctx)
    metrics = evaluate_multimodal(fam, ref, pipe, items, names, v.prompts, text_set(v.text_set, ctx),
                                  v.max_new_tokens, v.max_eval_tokens, reference=stored,
                                  tie_margin=v.gates_for(variant.quant).greedy_tie_margin)
    if stand_in:
        for k in VISUAL_GATES:  # the stand-in's features against Hugging Face say nothing about the engine
            metrics.pop(k, None)
        metrics["visual_stand_in"] = "pytorch"
    elif visual.results["engine"].get("format") == "tensorrt-plan":
        more = _tensorrt_vs_onnxruntime_and_pytorch(ctx, fam, src, fetched.results["config"], visual, vis, scratch)
        metrics.update(more)  # and the visual gate judges the worst of the three comparisons
        metrics["visual_max_abs_diff"] = max(metrics.get("visual_max_abs_diff", 0.0), *more.values())
    return metrics


def _pytorch_visual(fam, src: Path, config: dict, meta: dict, allow_pickle: bool):
    """The checkpoint's visual module, run by PyTorch on the CPU, shaped as a visual engine."""
    from ..runtime.engine import DTYPES
    from ..runtime.sidecar import Sidecar
    from ..runtime.visual import VisualEngine

    dtype = DTYPES[meta["dtype"]]
    module = fam.load_visual(src, config, dtype, allow_pickle=allow_pickle)
    side = Sidecar(format="pytorch", component="visual", visual=meta, max_batch_size=meta["max_batch_size"],
                   dtype=meta["dtype"], device="cpu")
    return VisualEngine(module, side, fam.visual_extras(src, config, dtype))


def _tensorrt_vs_onnxruntime_and_pytorch(ctx: Ctx, fam, src: Path, config: dict, visual: StepResult, vis,
                                         scratch: Path) -> dict:
    """A TensorRT visual engine that runs here, on seeded inputs at batch 1
    and its max: against ONNX Runtime on the ONNX it was built from and the
    checkpoint's PyTorch module. (Needs a GPU among the engine's targets: not
    exercised where this was written, which had none.)"""
    import onnxruntime as ort
    import torch

    from ..hashing import digest_json
    from ..runtime.engine import DTYPES

    meta = visual.results["engine"]["visual"]
    ref = visual.manifest["inputs"]["export"]
    m = ctx.store.get_manifest(ctx.recipe.name, "export", ref["key"])
    exported = StepResult("export", ref["key"], digest_json(m), m, cached=True)
    onnx_dir = materialize(ctx, exported, scratch / "export")
    sess = ort.InferenceSession(str(onnx_dir / meta["onnx"]), providers=["CPUExecutionProvider"])
    module = _pytorch_visual(fam, src, config, meta, ctx.recipe.source.allow_pickle)
    g = torch.Generator().manual_seed(0)
    S = meta["image_size"]  # a side, or [height, width] (non-square families)
    hw = tuple(S) if isinstance(S, (list, tuple)) else (S, S)
    out = {"visual_vs_onnxruntime_max_abs_diff": 0.0, "visual_vs_pytorch_max_abs_diff": 0.0}
    for b in sorted({1, vis.max_batch_size}):
        x = torch.randn(b, 3, *hw, generator=g)
        got = vis(x)
        want_ort = torch.from_numpy(sess.run(None, {meta["input"]: x.to(DTYPES[meta["dtype"]]).numpy()})[0]).float()
        want_pt = module(x)
        out["visual_vs_onnxruntime_max_abs_diff"] = max(out["visual_vs_onnxruntime_max_abs_diff"],
                                                        float((got - want_ort).abs().max()))
        out["visual_vs_pytorch_max_abs_diff"] = max(out["visual_vs_pytorch_max_abs_diff"],
                                                    float((got - want_pt).abs().max()))
    log(f"validate: TensorRT visual engine vs ONNX Runtime {out['visual_vs_onnxruntime_max_abs_diff']:.3g}, "
        f"vs PyTorch {out['visual_vs_pytorch_max_abs_diff']:.3g} (max abs)")
    return out


@step_task("validate")
def validate_task(ctx: Ctx, fetched: StepResult, built: StepResult, variant: Variant,
                  visual: StepResult | None = None, referenced: StepResult | None = None) -> StepResult:
    s = spec(ctx, fetched, built, variant, visual, referenced)

    def work(out: Path, scratch: Path):
        pending = pending_components(built, visual)
        for c, why in pending.items():
            log(f"validate [{variant.name}]: {c}: pending ({PENDING}): the engine is {why}")
        if "llm" in pending:  # nothing here can run the engines: nothing to measure
            return _finish({}, pending)
        if visual is not None:
            return _finish(_validate_multimodal(ctx, fetched, built, visual, variant, scratch,
                                                stand_in="visual" in pending, referenced=referenced), pending)
        from transformers import AutoTokenizer

        src = materialize(ctx, fetched, scratch / "src")
        eng_dir = materialize(ctx, built, scratch / "engine")
        v = ctx.recipe.validation
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        eng = get_backend(built.manifest["params"]["backend"]).load(eng_dir)
        why = reference_step.mismatch(referenced, eng)
        if why is None:
            log(f"validate [{variant.name}]: the engine against the stored reference ({referenced.key[:12]})")
            ref = reference_step.load(ctx, referenced, scratch)
        else:  # no stored reference, or one cut with other limits than this engine's
            log(f"validate [{variant.name}]: loading the reference model (fp32) and the engine: {why}")
            ref = load_reference(src, device="auto")  # causal or seq2seq, from config.json
        metrics = evaluate(ref, tok, eng, v.prompts, text_set(v.text_set, ctx), v.max_new_tokens, v.max_eval_tokens,
                           tie_margin=v.gates_for(variant.quant).greedy_tie_margin)
        return _finish(metrics, pending)

    def _finish(metrics: dict, pending: dict[str, str]):
        limits = ctx.recipe.validation.gates_for(variant.quant).model_dump()
        if "visual" in pending:
            for k in VISUAL_GATES:
                limits[k] = None
        gates = judge(metrics, limits) if "llm" not in pending else {}
        components = {}
        for c in ["llm"] + (["visual"] if visual is not None else []):
            if c in pending:
                components[c] = {"status": "pending", "reason": PENDING, "detail": pending[c]}
                continue
            mine = {g: r for g, r in gates.items() if (g in VISUAL_GATES) == (c == "visual")}
            components[c] = {"status": "passed" if all(r["passed"] for r in mine.values()) else "failed",
                             "gates": sorted(mine)}
        status = ("failed" if any(x["status"] == "failed" for x in components.values())
                  else "pending" if pending else "passed")
        word = {"passed": "PASSED", "failed": "FAILED", "pending": f"PENDING ({PENDING}: {', '.join(sorted(pending))})"}
        log(f"validate [{variant.name}]: {word[status]}: {gates_line(gates) or 'no gates judged'}")
        greedy = greedy_line(metrics)
        if greedy:
            log(f"validate [{variant.name}]: {greedy}")
        return {"metrics": metrics, "gates": gates, "passed": status == "passed", "status": status,
                "components": components, **({"reason": PENDING} if status == "pending" else {})}, {}

    return run_step(ctx, s, work)
