"""The GPU engine form of the aoti backend (issue 8): what a recipe gets when
it sets `components.llm.aoti` (spec.AotiOptions), and what bench/gpu_*.py
measure.

An LLM engine in this form is a directory:

- `llm.pt2`: the step function (see `enginefarm.gpu.decoder`) with a
  static KV cache written in place (per-layer cache tensors); dynamic batch
  (1..max_batch_size) and token count (1..max_input_len), so it does prefill
  and, where there is no decode package, decode;
- `decode.pt2` (CUDA targets): the same step for one token per sequence,
  compiled with the weight-only decode kernels (kernels/gemv.py);
- `weights.safetensors`: the weights in the kernels' layout, once, shared
  by both packages (which are compiled without them) and loaded by
  `enginefarm.gpu.engine.LLMEngine.load`;
- `engine.json`: the sidecar, with `"engine_form": "gpu"` (the aoti
  backend's loader picks the runtime by it).

A visual engine (`export_visual`) is one package `visual.pt2` with dynamic
batch, its weights inside, and the same sidecar.

This module sits beside the plain aoti path (backends/aoti.py,
runtime/decoder.py, runtime/engine.py) rather than inside it: main's runtime
grew encoder-decoder, multimodal and tp support at the same time, and the two
are not merged yet. Recipes without `aoti` options build exactly as before.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

ENGINE_FILE = "llm.pt2"
DECODE_FILE = "decode.pt2"
WEIGHTS_FILE = "weights.safetensors"
VISUAL_FILE = "visual.pt2"
SIDECAR_VERSION = 2

DEFAULT_OPTIONS = {
    "max_autotune": False,
    "coordinate_descent_tuning": False,
    "attention": "auto",
    "decode_kernels": True,
    "fp16_decode_kernel": False,
    "cuda_graphs": False,
}


def options_of(opts) -> dict:
    """Recipe options (an AotiOptions, a dict or None) over the defaults."""
    if opts is None:
        return dict(DEFAULT_OPTIONS)
    if hasattr(opts, "model_dump"):
        opts = opts.model_dump()
    unknown = set(opts) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown aoti options: {sorted(unknown)}")
    return {**DEFAULT_OPTIONS, **opts}


def inductor_configs(opts: dict, weights_outside: bool) -> dict:
    cfg = {}
    if weights_outside:
        cfg["aot_inductor.package_constants_in_so"] = False
    if opts["max_autotune"]:
        cfg["max_autotune"] = True
    if opts["coordinate_descent_tuning"]:
        cfg["coordinate_descent_tuning"] = True
    return cfg


def sdpa_context(attention: str):
    if attention == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[attention]
    return sdpa_kernel([b])


def _dims(**dims):
    from torch.export import Dim

    return {k: (Dim(k, min=lo, max=hi) if hi > lo else None) for k, (lo, hi) in dims.items()}


def _clean(spec):
    if isinstance(spec, dict):
        d = {k: v for k, v in spec.items() if v is not None}
        return d or None
    return spec


def export_llm(model, out_dir: Path, limits: dict, device: str, opts=None, progress=None,
               prompt_table_rows: int = 0, packages=("general", "decode"), write_weights: bool = True) -> dict:
    """Export a DecoderLM (tp 1) into an engine directory; returns the sidecar.

    The model is rewritten into its engine form (gpu/fast.py) in place.
    With prompt_table_rows > 0 the general package takes a prompt table
    (multimodal: visual features for ids >= vocab_size) of 1..rows rows.
    `packages` and `write_weights` let a caller compile the packages in
    separate processes (they need the weights' shapes, not their values)."""
    import torch
    from safetensors.torch import save_file

    from ..kernels import gemv as G
    from .fast import kernel_configs, prepare_engine, set_mode

    opts = options_of(opts)
    say = progress or (lambda m: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    B, T, S = limits["max_batch_size"], limits["max_input_len"], limits["max_seq_len"]
    c = model.cfg
    prepare_engine(model)
    decode = (device == "cuda" and opts["decode_kernels"] and G.HAVE_TRITON and B <= G.BLOCK_M
              and "decode" in packages)

    class Step(torch.nn.Module):
        def __init__(self, m, table: bool):
            super().__init__()
            self.m = m
            self.table = table

        def forward(self, input_ids, start_pos, k_cache, v_cache, prompt_table=None):
            return self.m.logits(input_ids, start_pos, k_cache, v_cache, prompt_table if self.table else None)

    eb = min(2, B)
    start = torch.zeros(1, dtype=torch.long, device=device)
    # per-layer cache inputs (written in place), separate tensors: views of one
    # buffer would tie the batch size into their storage offsets
    shape = (eb, c.kv_heads_per_rank, S, c.head_size)
    kc = [torch.zeros(shape, dtype=model.embed.dtype, device=device) for _ in range(c.num_layers)]
    vc = [torch.zeros(shape, dtype=model.embed.dtype, device=device) for _ in range(c.num_layers)]
    timings = {}

    def compile_one(name: str, mod, args, dyn):
        t0 = time.perf_counter()
        say(f"aoti: torch.export ({name})")
        with torch.no_grad(), sdpa_context(opts["attention"]):
            ep = torch.export.export(mod, args, dynamic_shapes=dyn, strict=False)
            t1 = time.perf_counter()
            say(f"aoti: AOTInductor compile ({name}, {device})")
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(out_dir / packages[name]), inductor_configs=inductor_configs(opts, True))
        t2 = time.perf_counter()
        timings[f"{name}_export_s"] = round(t1 - t0, 3)
        timings[f"{name}_compile_s"] = round(t2 - t1, 3)
        return ep

    # the general step: prefill (and decode where there is no decode package)
    wanted = packages
    packages = {}
    set_mode(model, "general")
    table = prompt_table_rows > 0
    step = Step(model, table)
    d = _dims(batch=(1, B), seq=(1, T), rows=(1, max(prompt_table_rows, 1)))
    et = min(3, T)
    ids = torch.zeros(eb, et, dtype=torch.long, device=device)
    args = (ids, start, kc, vc)
    per_layer = [_clean({0: d["batch"]})] * c.num_layers
    dyn = [_clean({0: d["batch"], 1: d["seq"]}), None, per_layer, per_layer]
    if table:
        rows = min(2, prompt_table_rows)
        args = args + (torch.zeros(rows, c.hidden_size, dtype=model.embed.dtype, device=device),)
        dyn.append(_clean({0: d["rows"]}))
    ep = None
    if "general" in wanted:
        packages["general"] = ENGINE_FILE
        ep = compile_one("general", step, args, tuple(dyn))

    if decode:
        set_mode(model, "decode", fp16_kernel=opts["fp16_decode_kernel"])
        packages["decode"] = DECODE_FILE
        ids1 = torch.zeros(eb, 1, dtype=torch.long, device=device)
        dyn1 = (_clean({0: d["batch"]}), None, per_layer, per_layer)
        ep1 = compile_one("decode", Step(model, False), (ids1, start, kc, vc), dyn1)
        ep = ep or ep1
        set_mode(model, "general")

    if write_weights:  # the weights, once, under the names the packages know them by
        say("aoti: writing the weights")
        t0 = time.perf_counter()
        save_file(engine_constants(model), str(out_dir / WEIGHTS_FILE))
        timings["weights_s"] = round(time.perf_counter() - t0, 3)
    del kc, vc
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[model.embed.dtype]
    cache_shape = [c.num_layers, "batch", c.kv_heads_per_rank, S, c.head_size]
    sidecar = {
        "format": "aoti-pt2",
        "version": SIDECAR_VERSION,
        "engine_form": "gpu",
        "component": "llm",
        "file": ENGINE_FILE,
        "files": {**({"general": ENGINE_FILE} if "general" in packages else {}),
                  **({"decode": DECODE_FILE} if decode else {}), "weights": WEIGHTS_FILE},
        "device": device,
        "dtype": dtype_name,
        "quant_bits": c.quant_bits,
        "max_batch_size": B,
        "max_input_len": T,
        "max_seq_len": S,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "prompt_table_rows": prompt_table_rows,
        "cache_shape": cache_shape,
        "cache": "in place: the step writes the per-layer caches it is given",
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
            {"name": "start_pos", "dtype": "int64", "shape": [1]},
            {"name": "k_cache", "dtype": dtype_name, "shape": cache_shape[1:], "per_layer": c.num_layers, "mutated": True},
            {"name": "v_cache", "dtype": dtype_name, "shape": cache_shape[1:], "per_layer": c.num_layers, "mutated": True},
        ] + ([{"name": "prompt_table", "dtype": dtype_name, "shape": ["rows", c.hidden_size]}] if table else []),
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "tokens", c.vocab_size]}],
        "options": opts,
        "kernels": kernel_configs(model) if decode else [],
        "timings": timings,
    }
    (out_dir / "engine.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def engine_constants(model) -> dict:
    """The tensors an LLM engine's packages take as constants, by the names
    they know them by (the exported step wraps the model as `m`)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None:
            out["m." + name] = t.detach().contiguous()
    return out


def export_visual(module, out_dir: Path, max_batch_size: int, image_size: int, device: str, dtype, opts=None,
                  progress=None) -> dict:
    """Export a visual module (pixels [B, 3, H, W] -> features [B, n, d]) into
    an engine directory with one package, dynamic batch; returns the sidecar."""
    import torch

    opts = options_of(opts)
    say = progress or (lambda m: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    B = max_batch_size
    # the example is the largest batch: what max-autotune tunes the products for
    x = torch.randn(B, 3, image_size, image_size, device=device, dtype=dtype)
    d = _dims(batch=(1, B))
    t0 = time.perf_counter()
    say("aoti: torch.export (visual)")
    with torch.no_grad(), sdpa_context(opts["attention"]):
        ep = torch.export.export(module, (x,), dynamic_shapes=(_clean({0: d["batch"]}),), strict=False)
        t1 = time.perf_counter()
        say(f"aoti: AOTInductor compile (visual, {device})")
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / VISUAL_FILE),
                                                  inductor_configs=inductor_configs(opts, False))
        t2 = time.perf_counter()
        with torch.no_grad():
            y = module(x)
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    sidecar = {
        "format": "aoti-pt2",
        "version": SIDECAR_VERSION,
        "engine_form": "gpu",
        "component": "visual",
        "file": VISUAL_FILE,
        "device": device,
        "dtype": dtype_name,
        "max_batch_size": B,
        "image_size": image_size,
        "inputs": [{"name": "pixel_values", "dtype": dtype_name, "shape": ["batch", 3, image_size, image_size]}],
        "outputs": [{"name": "features", "dtype": dtype_name, "shape": ["batch", *list(y.shape[1:])]}],
        "options": opts,
        "timings": {"export_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)},
    }
    (out_dir / "engine.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def build_llm(src_dir: Path, out_dir: Path, variant, limits: dict, options, progress=None) -> dict:
    """The aoti backend's build of a decoder-only LLM checkpoint (tp 1) in the GPU engine form."""
    from .decoder import DecoderLM

    device = "cpu" if variant.target == "cpu" else "cuda"
    model = DecoderLM.from_checkpoint(src_dir).to(device)
    sidecar = export_llm(model, Path(out_dir), limits, device, options, progress,
                         prompt_table_rows=limits.get("max_multimodal_len") or 0)
    sidecar["target"] = variant.target
    (Path(out_dir) / "engine.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar
