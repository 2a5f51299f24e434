"""The aoti backend's exporter: torch.export + AOTInductor packages of the
runtime's models, and their sidecars (runtime/sidecar.py). One path, with the
recipe's `components.<c>.aoti` options (spec.AotiOptions; none: the defaults).

A decoder-only LLM engine is a directory:

- `llm.pt2`: the step function (`DecoderLM.logits`, runtime/decoder.py) in its
  engine form (runtime/swaps.py), with a static KV cache of per-layer cache
  tensors written in place; dynamic batch (1..max_batch_size x
  max_beam_width) and token count (1..max_input_len), so it does prefill and,
  where there is no decode package, decode; built for a multimodal recipe
  (limits carry max_multimodal_len), it also takes a prompt table of
  1..max_multimodal_len rows;
- `decode.pt2` (CUDA targets, option decode_kernels): the same step for one
  token per sequence, compiled with the weight-only decode kernels
  (kernels/gemv.py);
- `weights.safetensors` (with a decode package): the weights once, in the
  kernels' layout, shared by both packages, which are compiled without them
  (package_constants_in_so=False) and handed them at load
  (load_constants(user_managed=True), runtime/engine.py). A single package
  keeps its weights inside;
- `engine.json`: the sidecar.

A visual engine (`export_visual`) is one package `visual.pt2` with dynamic
batch, its weights inside, and the same sidecar; with the option
static_batches, one package per batch size (`visual_b{N}.pt2`, static
shapes; sidecar `files`: `batch_{N}` -> file), compiled without the weights,
which `weights.safetensors` holds once for all of them (`files`: `weights`),
as an LLM's packages share theirs.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from . import sidecar as sc

ENGINE_FILE = "llm.pt2"
DECODE_FILE = "decode.pt2"
WEIGHTS_FILE = "weights.safetensors"
VISUAL_FILE = "visual.pt2"


def options_of(opts):
    """Recipe options (an AotiOptions, its dict, or None: the defaults) as an AotiOptions."""
    from ..spec import AotiOptions

    if opts is None:
        return AotiOptions()
    if isinstance(opts, AotiOptions):
        return opts
    try:
        return AotiOptions.model_validate(opts)
    except Exception as e:  # pydantic's ValidationError: unknown or mistyped options
        raise ValueError(f"bad aoti options {opts}: {e}") from None


def dtype_name(dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]


def inductor_configs(opts, weights_outside: bool, package: str = "general") -> dict:
    """Inductor's settings for one package ("general": prefill or a visual
    component; "decode": an LLM's one-token step)."""
    cfg = {}
    if weights_outside:
        cfg["aot_inductor.package_constants_in_so"] = False
    if opts.max_autotune:
        cfg["max_autotune"] = True
    cdt = opts.coordinate_descent_tuning
    if cdt is True or (cdt == "decode" and package == "decode"):
        cfg["coordinate_descent_tuning"] = True
    return cfg


def sdpa_context(attention: str):
    if attention == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[attention]
    return sdpa_kernel([b])


def dims(**ranges):
    """{name: Dim(name, lo..hi)}, None for a range of one value (not dynamic)."""
    from torch.export import Dim

    return {k: (Dim(k, min=lo, max=hi) if hi > lo else None) for k, (lo, hi) in ranges.items()}


def clean(spec):
    """A dynamic_shapes entry without its None dims (None where none is left)."""
    if isinstance(spec, dict):
        d = {k: v for k, v in spec.items() if v is not None}
        return d or None
    if isinstance(spec, (list, tuple)):
        return type(spec)(clean(s) for s in spec)
    return spec


def rows_of(limits: dict) -> int:
    """The sequences an LLM package takes at once: requests x beams (beam search runs every beam as a row)."""
    return limits["max_batch_size"] * (limits.get("max_beam_width") or 1)


class Step(torch.nn.Module):
    """The exported function: the model's step without the caches in its outputs."""

    def __init__(self, m, table: bool):
        super().__init__()
        self.m = m
        self.table = table

    def forward(self, input_ids, start_pos, k_cache, v_cache, prompt_table=None):
        return self.m.logits(input_ids, start_pos, k_cache, v_cache, prompt_table if self.table else None)


def export_step(model, max_batch: int, max_tokens: int, max_seq_len: int, device: str = "cpu", prompt_rows: int = 0):
    """The model's step as a torch.export program with a dynamic batch
    (1..max_batch) and token count (1..max_tokens), per-layer cache inputs
    written in place; with prompt_rows, a prompt table of 1..prompt_rows rows."""
    c = model.cfg
    B, T, S = max_batch, max_tokens, max_seq_len
    eb, et = min(2, B), min(3, T)
    dt = model.embed.dtype
    # per-layer cache inputs (written in place), separate tensors: views of one
    # buffer would tie the batch size into their storage offsets
    shape = (eb, c.kv_heads_per_rank, S, c.head_size)
    kc = [torch.zeros(shape, dtype=dt, device=device) for _ in range(c.num_layers)]
    vc = [torch.zeros(shape, dtype=dt, device=device) for _ in range(c.num_layers)]
    d = dims(batch=(1, B), seq=(1, T), rows=(1, max(prompt_rows, 1)))
    ids = torch.zeros(eb, et, dtype=torch.long, device=device)
    start = torch.zeros(1, dtype=torch.long, device=device)
    per_layer = [clean({0: d["batch"]})] * c.num_layers
    args = (ids, start, kc, vc)
    dyn = [clean({0: d["batch"], 1: d["seq"]}), None, per_layer, per_layer]
    if prompt_rows:
        args += (torch.zeros(min(2, prompt_rows), c.hidden_size, dtype=dt, device=device),)
        dyn.append(clean({0: d["rows"]}))
    with torch.no_grad():
        return torch.export.export(Step(model, bool(prompt_rows)), args, dynamic_shapes=tuple(dyn), strict=False)


def export_llm(model, out_dir: Path, limits: dict, device: str, opts=None, progress=None,
               prompt_table_rows: int = 0, packages=("general", "decode"), write_weights: bool = True,
               target: str | None = None) -> sc.Sidecar:
    """Export a DecoderLM (tp 1, or one rank of tp > 1) into an engine directory; returns its sidecar.

    The model is swapped into its engine form (runtime/swaps.py) in place.
    `packages` and `write_weights` let a caller compile the packages in
    separate processes (they need the weights' shapes, not their values):
    then the weights are left outside the packages, whichever are compiled."""
    from ..kernels import gemv as G
    from .swaps import kernel_configs, prepare_engine, set_mode

    opts = options_of(opts)
    say = progress or (lambda m: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    B, T, S = rows_of(limits), limits["max_input_len"], limits["max_seq_len"]
    c = model.cfg
    prepare_engine(model)
    decode = (device == "cuda" and opts.decode_kernels and G.HAVE_TRITON and B <= G.BLOCK_M
              and "decode" in packages)
    split = tuple(packages) != ("general", "decode") or not write_weights
    weights_outside = decode or split
    timings = {}

    def compile_one(name: str, file: str, prompt_rows: int, max_tokens: int):
        t0 = time.perf_counter()
        say(f"aoti: torch.export ({name})")
        with torch.no_grad(), sdpa_context(opts.attention):
            ep = export_step(model, B, max_tokens, S, device, prompt_rows)
            t1 = time.perf_counter()
            say(f"aoti: AOTInductor compile ({name}, {device})")
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(out_dir / file), inductor_configs=inductor_configs(opts, weights_outside, name))
        timings[f"{name}_export_s"] = round(t1 - t0, 3)
        timings[f"{name}_compile_s"] = round(time.perf_counter() - t1, 3)

    files = {}
    set_mode(model, "general")
    if "general" in packages:  # prefill (and decode where there is no decode package)
        files["general"] = ENGINE_FILE
        compile_one("general", ENGINE_FILE, prompt_table_rows, T)
    if decode:
        set_mode(model, "decode", fp16_kernel=opts.fp16_decode_kernel)
        files["decode"] = DECODE_FILE
        compile_one("decode", DECODE_FILE, 0, 1)
        set_mode(model, "general")
    if weights_outside:
        files["weights"] = WEIGHTS_FILE
        if write_weights:  # the weights, once, under the names the packages know them by
            timings["weights_s"] = write_weights_file(model, out_dir, say)
    dt = dtype_name(model.embed.dtype)
    cache_shape = [c.num_layers, "batch", c.kv_heads_per_rank, S, c.head_size]
    table = sc.PromptTable(max_rows=prompt_table_rows, hidden_size=c.hidden_size) if prompt_table_rows else None
    inputs = [
        sc.TensorSpec(name="input_ids", dtype="int64", shape=["batch", "tokens"]),
        sc.TensorSpec(name="start_pos", dtype="int64", shape=[1]),
        sc.TensorSpec(name="k_cache", dtype=dt, shape=cache_shape[1:], per_layer=c.num_layers, mutated=True),
        sc.TensorSpec(name="v_cache", dtype=dt, shape=cache_shape[1:], per_layer=c.num_layers, mutated=True),
    ] + ([sc.TensorSpec(name="prompt_table", dtype=dt, shape=["rows", c.hidden_size])] if table else [])
    return sc.write(out_dir, sc.Sidecar(
        format="aoti-pt2", component="llm", device=device, target=target, dtype=dt,
        file=files.get("general"), files=files, quant_bits=c.quant_bits,
        **({"act_quant": c.act_quant} if c.act_quant else {}),
        max_batch_size=limits["max_batch_size"], max_beam_width=limits.get("max_beam_width") or 1,
        max_input_len=T, max_seq_len=S, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        cache_shape=cache_shape, prompt_table=table, inputs=inputs,
        outputs=[sc.TensorSpec(name="logits", dtype="float32", shape=["batch", "tokens", c.vocab_size])],
        options=opts.model_dump(), kernels=kernel_configs(model) if decode else [], timings=timings,
    ))


def engine_constants(model, prefix: str = "m.") -> dict:
    """The tensors an engine's packages take as constants, by the names they
    know them by (an LLM's exported step wraps the model as `m`; a visual
    module is exported as it is: prefix "")."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None:
            out[prefix + name] = t.detach().contiguous()
    return out


def write_weights_file(model, out_dir: Path, say, prefix: str = "m.") -> float:
    """The packages' constants (engine_constants) written once as WEIGHTS_FILE,
    for packages compiled without them; returns the seconds it took."""
    from safetensors.torch import save_file

    say("aoti: writing the weights")
    t0 = time.perf_counter()
    save_file(engine_constants(model, prefix), str(Path(out_dir) / WEIGHTS_FILE))
    return round(time.perf_counter() - t0, 3)


def static_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a visual engine built with static_batches holds packages for: 1, 2, 4, ... and the max."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def export_visual(module, out_dir: Path, max_batch_size: int, image_size, device: str, dtype, opts=None,
                  progress=None, visual: dict | None = None, target: str | None = None,
                  names: tuple[str, str] = ("pixel_values", "features")) -> sc.Sidecar:
    """Export a visual module (pixels [B, 3, H, W] -> features [B, n, d]) into
    an engine directory, one package with a dynamic batch (or, with the
    option static_batches, one package per batch size of
    static_batch_sizes); returns the sidecar. image_size: a side, or
    [height, width]; visual: the export step's facts."""
    from ..images import image_hw

    opts = options_of(opts)
    say = progress or (lambda m: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    B = max_batch_size
    Hh, Ww = image_hw(image_size)
    static = opts.static_batches and B > 1
    cfg = inductor_configs(opts, weights_outside=static)  # static packages share one copy of the weights
    timings = {"export_s": 0.0, "compile_s": 0.0}

    def compile_one(x, dynamic, file: str, what: str) -> None:
        t0 = time.perf_counter()
        say(f"aoti: torch.export ({what})")
        ep = torch.export.export(module, (x,), dynamic_shapes=dynamic, strict=False)
        t1 = time.perf_counter()
        say(f"aoti: AOTInductor compile ({what}, {device})")
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / file), inductor_configs=cfg)
        timings["export_s"] = round(timings["export_s"] + t1 - t0, 3)
        timings["compile_s"] = round(timings["compile_s"] + time.perf_counter() - t1, 3)

    files = {}
    with torch.no_grad(), sdpa_context(opts.attention):
        if static:
            for b in static_batch_sizes(B):
                files[f"batch_{b}"] = f"visual_b{b}.pt2"
                compile_one(torch.randn(b, 3, Hh, Ww, device=device, dtype=dtype), None, files[f"batch_{b}"],
                            f"visual, batch {b}")
            file = files[f"batch_{B}"]
            files["weights"] = WEIGHTS_FILE  # under the module's own names (it is exported as it is)
            timings["weights_s"] = write_weights_file(module, out_dir, say, prefix="")
        else:
            # with max-autotune the example is the largest batch (what it tunes the products for)
            x = torch.randn(B if opts.max_autotune else min(2, B), 3, Hh, Ww, device=device, dtype=dtype)
            file = VISUAL_FILE
            compile_one(x, (clean({0: dims(batch=(1, B))["batch"]}),), file, "visual")
        y = module(torch.randn(1, 3, Hh, Ww, device=device, dtype=dtype))
    dt = dtype_name(dtype)
    return sc.write(out_dir, sc.Sidecar(
        format="aoti-pt2", component="visual", file=file, **({"files": files} if files else {}), device=device,
        target=target, dtype=dt, max_batch_size=B, visual=visual,
        inputs=[sc.TensorSpec(name=names[0], dtype=dt, shape=["batch", 3, Hh, Ww])],
        outputs=[sc.TensorSpec(name=names[1], dtype=dt, shape=["batch", *list(y.shape[1:])])],
        options=opts.model_dump(), timings=timings,
    ))


def build_llm(src_dir: Path, out_dir: Path, variant, limits: dict, options=None, progress=None,
              rank: int = 0) -> sc.Sidecar:
    """The aoti backend's build of a decoder-only LLM checkpoint: tp 1, or
    one rank of a tp > 1 one (in that rank's process of a process group: the
    collectives compile against it)."""
    from .decoder import DecoderLM

    device = "cpu" if variant.target == "cpu" else "cuda"
    model = DecoderLM.from_checkpoint(src_dir, rank=rank, allow_tp=True).to(device)
    return export_llm(model, Path(out_dir), limits, device, options, progress,
                      prompt_table_rows=limits.get("max_multimodal_len") or 0, target=variant.target)
