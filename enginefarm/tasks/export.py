"""export: a multimodal recipe's visual component, from the fetched
checkpoint, to ONNX with a dynamic batch axis, checked against PyTorch with
ONNX Runtime before any engine is built from it.

One torch.export trace of the family's visual module (pixel_values ->
features for the LLM) gives both files the backends build from:

    visual.onnx (+ visual.onnx.data)  ONNX, batch axis "batch"    tensorrt, tensorrt-rtx, onnxruntime
    visual.ep.pt2                     the ExportedProgram           aoti
    visual.extra.safetensors          tensors the runner's packing needs (LLaVA-NeXT's image_newline), if any
    visual.json                       facts the builds and the runner need (features, sizes, image token,
                                      ONNX Runtime's max abs diff against PyTorch per batch size checked)

The batch axis counts the encoder's inputs: images, or for LLaVA-NeXT tiles
(max_batch_size x the most tiles an image can take), or for LLaVA-NeXT-Video
frames (max_batch_size x components.visual.num_frames).

Only the visual tensors of the checkpoint are read. The check runs the ONNX
graph at batch 1 and at max_batch_size on seeded inputs; a difference over
the recipe's `validation.gates.visual_max_abs_diff` fails the step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


from ..backends.base import version_of
from ..errors import BadInput, StepFailed
from ..families import get_family
from ..hashing import code_version
from ..spec import Variant
from .policy import step_task
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step

ONNX_FILE = "visual.onnx"
EP_FILE = "visual.ep.pt2"
META_FILE = "visual.json"
EXTRA_FILE = "visual.extra.safetensors"
INPUT, OUTPUT = "pixel_values", "features"


def spec(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepSpec:
    fam = get_family(ctx.recipe.family)
    config = fam.media_config(fetched.results["config"], ctx.recipe)
    limits = fam.derived_limits(ctx.recipe, fetched.results["config"])
    params = {
        "component": "visual",
        "family": fam.name,
        "dtype": ctx.recipe.components["visual"].dtype or variant.dtype,
        "max_batch_size": limits["max_batch_size"] * fam.encoder_inputs_per_image(config),
        "image_size": ctx.recipe.components["visual"].image_size,
        "tolerance": ctx.recipe.validation.gates.visual_max_abs_diff,
    }
    if fam.media == "video":  # frames per video: the batch bound and the features follow from it
        params["num_frames"] = config["num_frames"]
    code = code_version(__name__, type(fam).__module__)
    tc = {d: version_of(d) for d in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")}
    return StepSpec("export", params, {"fetch": fetched}, code, tc, variant=f"visual-{params['dtype']}")


def _batch_axis_named(path: Path, name: str = "batch") -> None:
    """The exporter names the dynamic axis after its symbol (s0, s40 ...):
    call it `batch` wherever it appears, for the engine builders' profiles."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sym = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if sym:
        for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param == sym:
                    d.dim_param = name
        onnx.save(model, str(path))


def export_visual(fam, src: Path, config: dict, out: Path, dtype_name: str, max_batch: int,
                  image_size: int | None, tolerance: float | None, allow_pickle: bool = False) -> dict:
    import onnxruntime as ort
    import torch
    from torch.export import Dim

    from ..images import image_hw
    from ..runtime.clip import fuse_vision_tower
    from ..runtime.engine import DTYPES

    dtype = DTYPES[dtype_name]
    S = fam.image_size(config)
    if image_size is not None and image_hw(image_size) != image_hw(S):
        raise BadInput(
            f"components.visual.image_size is {image_size}, but the checkpoint's vision tower takes {S} px images "
            f"(interpolating position embeddings is not supported); remove it or set {S}"
        )
    module = fam.load_visual(src, config, dtype, allow_pickle=allow_pickle)
    fused = fuse_vision_tower(module)  # the fused CLIP tower where the family's module takes it
    g = torch.Generator().manual_seed(0)
    example = torch.randn(min(2, max_batch), 3, *image_hw(S), generator=g).to(dtype)
    dyn = ({0: Dim("batch", min=1, max=max_batch)},) if max_batch > 1 else None
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(module, (example,), dynamic_shapes=dyn, strict=False)
    torch.export.save(ep, str(out / EP_FILE))
    t1 = time.perf_counter()
    torch.onnx.export(ep, (example,), str(out / ONNX_FILE), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                      external_data=True, verbose=False)
    _batch_axis_named(out / ONNX_FILE)
    t2 = time.perf_counter()

    # the check: ONNX Runtime and the ExportedProgram against the PyTorch module
    try:
        sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own error types
        hint = (" (ONNX Runtime's CPU kernels take no bfloat16 convolutions: set components.visual.dtype to "
                "float16 or float32)") if dtype_name == "bfloat16" else ""
        raise StepFailed(f"export: ONNX Runtime cannot load the {dtype_name} visual export{hint}: "
                         f"{str(e).splitlines()[0][:300]}") from None
    ep_mod = ep.module()
    ort_diff: dict[str, float] = {}
    ep_diff = 0.0
    F = H = None
    for b in sorted({1, max_batch}):
        x = torch.randn(b, 3, *image_hw(S), generator=g).to(dtype)
        with torch.no_grad():
            ref = module(x)
            ep_diff = max(ep_diff, float((ep_mod(x) - ref).abs().max()))
        try:
            got = sess.run(None, {INPUT: x.numpy()})[0]
        except Exception as e:  # onnxruntime raises its own error types
            raise StepFailed(f"export: ONNX Runtime cannot run the visual export at batch {b}: {e}") from None
        if tuple(got.shape) != tuple(ref.shape):
            raise StepFailed(f"export: ONNX Runtime gives features of shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
        ort_diff[str(b)] = float((torch.from_numpy(got).float() - ref.float()).abs().max())
        F, H = ref.shape[1], ref.shape[2]
    worst = max(ort_diff.values())
    if not worst == worst or (tolerance is not None and worst > tolerance):  # NaN, or over the gate
        raise StepFailed(
            f"export: ONNX Runtime differs from PyTorch by {worst:.3g} (max abs, batches {list(ort_diff)}), over "
            f"validation.gates.visual_max_abs_diff {tolerance}; no engine is built from this export"
        )
    import onnx

    opset = next(o.version for o in onnx.load(str(out / ONNX_FILE), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    meta = {
        **fam.visual_meta(config),
        "dtype": dtype_name,
        "max_batch_size": max_batch,
        "input": INPUT,
        "output": OUTPUT,
        "onnx": ONNX_FILE,
        "onnx_opset": opset,
        "exported_program": EP_FILE,
        "ort_max_abs_diff": worst,
        "ort_max_abs_diff_by_batch": ort_diff,
        "exported_program_max_abs_diff": ep_diff,
        "fused_tower": fused,
        "timings": {"torch_export_s": round(t1 - t0, 3), "onnx_s": round(t2 - t1, 3)},
    }
    if (meta["encoder_features"], meta["hidden_size"]) != (F, H):
        raise StepFailed(f"export: the visual module makes [{F}, {H}] features per input, the family says "
                         f"[{meta['encoder_features']}, {meta['hidden_size']}]")
    extras = fam.visual_extras(src, config, dtype)
    if extras:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in extras.items()}, str(out / EXTRA_FILE))
        meta["extras"] = EXTRA_FILE
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


@step_task("export")
def export_task(ctx: Ctx, fetched: StepResult, variant: Variant) -> StepResult:
    s = spec(ctx, fetched, variant)

    def work(out: Path, scratch: Path):
        src = materialize(ctx, fetched, scratch / "src")
        fam = get_family(ctx.recipe.family)
        p = s.params
        log(f"export [visual-{p['dtype']}]: torch.export, ONNX, ONNX Runtime check")
        config = fam.media_config(fetched.results["config"], ctx.recipe)
        meta = export_visual(fam, src, config, out, p["dtype"], p["max_batch_size"],
                             p["image_size"], p["tolerance"], allow_pickle=ctx.recipe.source.allow_pickle)
        log(f"export [visual-{p['dtype']}]: {meta['features']} features x {meta['hidden_size']}"
            f"{' (fused CLIP tower)' if meta['fused_tower'] else ''}; ONNX Runtime vs PyTorch max abs diff "
            f"{meta['ort_max_abs_diff']:.3g}")
        return meta, {}

    return run_step(ctx, s, work)
