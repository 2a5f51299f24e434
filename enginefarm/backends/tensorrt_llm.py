"""`tensorrt-llm`: engines from the converted checkpoint via `trtllm-build`.

Every flag a variant needs is derived from the recipe in one place,
`build_args`; `enginefarm plan` prints the command even where trtllm-build
is not installed, and the build runs it where it is. Detected at run time:
where it is not installed, that is reported before the run starts.

Weight-only checkpoints are written by convert in the plain layout
(quant.py); TensorRT-LLM's mixed-precision GEMMs want the integer matrix
interleaved for the GPU architecture, which only its own op
(`torch.ops.trtllm.preprocess_weights_for_mixed_gemm`) does, and which
trtllm-build does not do for a checkpoint's int8 tensors (see
`preprocess_weight_only`). `build` applies it to a copy of the checkpoint
right before trtllm-build, after refusing (exit 2) a weight-only checkpoint
the installed release would reject: widths its weight-only layers pad
(`padded_layers`), or W8A16 per group before 0.15.0 (`groupwise_int8_refusal`).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

from ..errors import BadInput, NotAvailable, StepFailed
from ..runtime.sidecar import write as write_sidecar
from .base import Backend, BuildRequest, BuildResult, version_of

DTYPE_PLUGIN = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}

# ----------------------------------------------------------------------------- releases
# The TensorRT-LLM releases each checkpoint layout the farm writes serves, and
# the evidence. The upper end of every range is the last release that still
# builds TensorRT engines: TensorRT-LLM deprecated trtllm-build and
# convert_checkpoint.py in February 2026 (PR 11723) and removed the engine path
# in mid-2026 (PRs 15763, 15767, 15907, 15918, 16369); later releases run a
# PyTorch backend only and take Hugging Face checkpoints.
# Where the evidence names a tag, the file was read at that tag (a snapshot of
# the repository with its release tags: v0.12.0 28fb9aac, v0.13.0 201135e5,
# v0.14.0 b0880169, v0.15.0 8f91cff2; main be178810 of 2024-12-16, version
# 0.17.0.dev2024121700), or in the source pages of the versioned documentation
# (nvidia.github.io/TensorRT-LLM/<version>/_modules/..., built from the
# release). A boundary that could not be tied to a tag is given as the last
# release known without and the first known with. The release commits, for
# whoever reads further: the tensorrt_llm submodule of
# triton-inference-server/tensorrtllm_backend at its tag of the same name
# (equal to TensorRT-LLM's own tags for 0.13.0-0.15.0; at 42a7b092,
# version.py says 0.16.0): 0.16.0 42a7b092, 0.17.0 350625cc, 0.18.0 3c046200,
# 0.18.2 5aec7af4, 0.19.0 c6f7d423, 0.20.0 79658429, 0.21.0 b4b1185a; no
# stored source of 0.17-0.21 other than the documentation pages could be read.
LAST = "the last release with the TensorRT engine path (trtllm-build; removed mid-2026)"
RELEASES = {
    "decoder-only": {
        "range": f"0.16 through {LAST}",
        "evidence": "0.16: issue 16 loaded the farm's unquantized decoder-only checkpoints (opt, llama, mistral, gpt2, "
                    "gptj, gpt-neox, bloom; tp 1/2/4/8) into TensorRT-LLM 0.16's model classes, bit-identical to its "
                    "converters; their names and splits at tag v0.15.0: examples/opt/convert_checkpoint.py "
                    "convert_hf_opt (transformer.layers.N, qkv = cat(q, k, v) split by split_qkv_tp, lines 162-223; "
                    "lm_head, vocab/position embeddings, ln_f, lines 224-262), examples/gptneox/convert_checkpoint.py "
                    "(reorder_qkv_weight_or_bias, lines 99-178; convert_hf_gptneox, lines 515-626), "
                    "tensorrt_llm/models/gpt/convert.py load_weights_from_hf_model (lines 400-857); the same names at "
                    "main be178810 (2024-12-16), which only drops --use_embedding_sharing, as 0.16's release notes "
                    "say; newer: tests/test_conformance.py holds gpt2, llama, mistral, gptj and bloom equal to NVIDIA "
                    "ModelOpt 0.47's TensorRT-LLM writer",
    },
    "encoder-decoder": {
        "range": f"as written (transformer.layers.N): 0.20.0 through {LAST}; NOT 0.16, 0.17 or 0.18.x, whose "
                 f"EncoderModel/DecoderModel want encoder_layers.N / decoder_layers.N, embedding.*, final_layernorm "
                 f"(0.19.0 not determined); the build reads which names the installed release's EncoderModel has and "
                 f"renames a copy for the older ones, so builds serve 0.16 through {LAST}",
        "evidence": "older names: tensorrt_llm/models/enc_dec/model.py at tag v0.15.0 and at main be178810 "
                    "(2024-12-16): EncoderModel self.embedding = EncDecEmbedding (line 548), self.encoder_layers "
                    "(563), self.final_layernorm (593), and examples/enc_dec/convert_checkpoint.py writes "
                    "{component}_layers (173), embedding.vocab_embedding.weight (181), final_layernorm.weight (304); "
                    "0.18.2 (whose code is 0.17.0's, its release notes say) still has class EncDecEmbedding "
                    "(nvidia.github.io/TensorRT-LLM/0.18.2/_modules/tensorrt_llm/models/enc_dec/model.html); "
                    "new names: 0.20.0's page of the same module has class EncDecTransformer (vocab_embedding, "
                    "layers, ln_f, ln_embed), as 0.21.0's and the stored "
                    "examples/models/core/enc_dec/convert_checkpoint.py (transformer.layers.N, transformer.ln_f, "
                    "top-level rel_attn_table; the farm and ModelOpt 0.47 write the same, tests/test_conformance.py)",
    },
    "weight-only per channel": {
        "range": f"0.16 through {LAST}, where every quantized linear's full input and output width is a multiple "
                 f"of 64 x tp (otherwise TensorRT-LLM declares the layer padded and trtllm-build rejects the "
                 f"checkpoint: the build refuses it first)",
        "evidence": "quantization/layers.py WeightOnlyQuantLinear / WeightOnlyQuantRowLinear: weight int8 (in, out / "
                    "mode), per_channel_scale (out,); both round the full widths up to a multiple of 64 x tp_size "
                    "(tag v0.15.0 lines 716, 808; main be178810 lines 718, 813; first in v0.13.0, as its release "
                    "notes' auto-padding for INT8/INT4 weight-only; unchanged in the newest stored layers.py); "
                    "trtllm-build (commands/build.py line 360) loads a checkpoint with "
                    "PretrainedModel.from_checkpoint -> load (models/modeling_utils.py line 651 at v0.15.0), which "
                    "sets every parameter through Parameter.value, and that asserts the shape is the declared one "
                    "(parameter.py line 201); the padding itself is done only by the layers' postprocess "
                    "(quantization/functional.py postprocess_weight_only, line 863), which only the Hugging Face "
                    "loader calls (models/model_weights_loader.py line 296), never a checkpoint load. "
                    "quantization/quantize.py quantize_layers: no exclude_modules = the default list (lm_head, "
                    "embeddings unquantized); integers: cutlass_preprocessors.cpp symmetric_quantize (max|w|/128 or "
                    "/8, round half away, clamp); the interleave op's signature changed between releases (2 or 3 "
                    "arguments): both are handled",
    },
    "weight-only per group": {
        "range": f"W4A16_GPTQ and W8A16_GPTQ: 0.16 through {LAST} (W8A16_GPTQ since 0.15.0: the build refuses it "
                 f"where the installed quantize.py does not pass use_int8_weight), where every quantized linear's "
                 f"full input and output width is a multiple of max(64, group_size) x tp (otherwise refused, as "
                 f"per channel)",
        "evidence": "quantization/layers.py WeightOnlyGroupwiseQuantLinear: weight (in, out // pack_ratio) in the model "
                    "dtype (4 int4 or 2 int8 to a 16-bit word), weights_scaling_factor (in / group_size, out), full "
                    "widths rounded up to max(64, group_size) x tp_size (tag v0.15.0 lines 958, 1081; already in "
                    "v0.12.0); W8A16_GPTQ: quantization/quantize.py weight_only_groupwise_quantize sets "
                    "init_params['use_int8_weight'] = (quant_algo == W8A16_GPTQ) at tag v0.15.0 (line 139) and main "
                    "be178810, not at tag v0.14.0 (no use_int8_weight, no W8A16_GPTQ in the package), and 0.15.0's "
                    "release notes add INT8 GPTQ; integers as ModelOpt 0.47's block quantizer "
                    "(tests/test_conformance.py)",
    },
}


def layouts(kind: str, quant: str = "none", group_size: Optional[int] = None) -> list[str]:
    """The RELEASES keys a checkpoint of this kind (decoder / encoder-decoder)
    and quantization follows."""
    out = ["encoder-decoder" if kind == "encoder-decoder" else "decoder-only"]
    if quant != "none":
        out.append("weight-only per group" if group_size else "weight-only per channel")
    return out


def release_range(kind: str, quant: str = "none", group_size: Optional[int] = None) -> dict[str, str]:
    """{layout: the TensorRT-LLM releases it serves}, for plan, engine.json and the publish manifest."""
    return {k: RELEASES[k]["range"] for k in layouts(kind, quant, group_size)}


# ----------------------------------------------------------------------------- what trtllm-build would reject
# Group-wise int8 (W8A16_GPTQ): TensorRT-LLM's quantization/quantize.py
# `weight_only_groupwise_quantize` builds the group-wise linear layers of a
# checkpoint, and gives them `use_int8_weight` (the int8 layout) from 0.15.0
# on (tag v0.15.0 line 139); at tag v0.14.0 it sets group_size,
# pre_quant_scale, zero, use_w4a8_awq and tp_rank only, so a release before
# 0.15 would declare int4 layers for a W8A16_GPTQ checkpoint.
GROUPWISE_INT8_FROM = "0.15.0"


def groupwise_init_params(source: str) -> Optional[set[str]]:
    """The keyword names that a quantization/quantize.py source gives the
    group-wise linear layers it creates: the `init_params["..."] = ...`
    assignments inside its `weight_only_groupwise_quantize`. None where the
    source has no such function."""
    import ast

    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef) and fn.name == "weight_only_groupwise_quantize":
            return {t.slice.value for node in ast.walk(fn) if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "init_params"
                    and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)}
    return None


def groupwise_int8_refusal(params: Optional[set[str]]) -> Optional[str]:
    """Why the installed release cannot build a W8A16 per-group checkpoint
    (given `groupwise_init_params` of its quantize.py), or None where it can."""
    if params is None:
        return ("the installed TensorRT-LLM's quantization/quantize.py has no weight_only_groupwise_quantize "
                "(a release without the TensorRT engine path)")
    if "use_int8_weight" in params:
        return None
    return (f"the installed TensorRT-LLM's quantization/quantize.py gives its group-wise layers no use_int8_weight "
            f"(it sets {', '.join(sorted(params))}), so it would declare int4 layers for a W8A16_GPTQ checkpoint; "
            f"W8A16 per group needs TensorRT-LLM {GROUPWISE_INT8_FROM} or newer")


def installed_quantize_source() -> Optional[str]:
    """The installed tensorrt_llm/quantization/quantize.py, read as a file
    (importing tensorrt_llm needs its CUDA libraries), or None."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / "quantization" / "quantize.py"
    return f.read_text() if f.is_file() else None


# Weight-only layers TensorRT-LLM pads: WeightOnlyQuantLinear / ...RowLinear
# (quantization/layers.py, tag v0.15.0 lines 716, 808) round the full input
# and output widths of a quantized linear up to a multiple of 64 x tp_size,
# the group-wise ones (lines 958, 1081) to max(64, group_size) x tp_size, and
# declare their parameters with the padded widths. trtllm-build loads a
# checkpoint through PretrainedModel.from_checkpoint -> load
# (models/modeling_utils.py), where Parameter.value asserts that a tensor has
# the declared shape (parameter.py); only the Hugging Face loader pads
# (postprocess_weight_only[_groupwise], quantization/functional.py, with its
# own uneven split of the padded width across ranks). So a checkpoint whose
# widths TensorRT-LLM pads is rejected, its own converters' included
# (examples/opt/convert_checkpoint.py stores unpadded weight-only tensors).
ROW_PARALLEL = ("attention.dense.weight", "mlp.proj.weight")


def padded_layers(ckpt_dir: Path) -> list[str]:
    """The quantized linears of a converted weight-only checkpoint (each part
    of an encoder-decoder one) whose widths TensorRT-LLM would pad, each as
    'name: in x out (full widths) not multiples of M'; empty where none."""
    from safetensors import safe_open

    out = []
    for part in checkpoint_parts(Path(ckpt_dir)):
        d = Path(ckpt_dir) / part
        cfg = json.loads((d / "config.json").read_text())
        q = cfg.get("quantization") or {}
        algo = (q.get("quant_algo") or "").upper()
        if not algo.startswith(("W8A16", "W4A16")):
            continue
        tp = int((cfg.get("mapping") or {}).get("tp_size") or 1)
        # per group (W*_GPTQ, W4A16_AWQ): TensorRT-LLM's QuantConfig.group_size defaults to 128
        group = int(q.get("group_size") or 128) if algo.endswith(("_GPTQ", "_AWQ")) else None
        multiple = max(64, group) * tp if group else 64 * tp
        with safe_open(str(d / "rank0.safetensors"), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(names):
                base = name[: -len("weight")]
                scale = next((base + s for s in ("per_channel_scale", "weights_scaling_factor")
                              if base + s in names), None)
                if not name.endswith(".weight") or scale is None:
                    continue
                in_local = f.get_slice(name).get_shape()[0]
                out_local = f.get_slice(scale).get_shape()[-1]
                row = name.endswith(ROW_PARALLEL)
                full_in, full_out = (in_local * tp, out_local) if row else (in_local, out_local * tp)
                if full_in % multiple or full_out % multiple:
                    out.append(f"{(part + '/') if part else ''}{name[:-len('.weight')]}: {full_in} x {full_out} "
                               f"not multiples of {multiple}")
    return out


def build_args(ckpt_dir: str | Path, out_dir: str | Path, variant, limits: dict[str, Any],
               multimodal_len: Optional[int] = None, part: str = "") -> list[str]:
    """The trtllm-build command line for one checkpoint directory of a
    variant: the one place these flags are chosen. `part` is "" for a
    decoder-only LLM, or "encoder" / "decoder" for the two checkpoints of an
    encoder-decoder model (built separately, as TensorRT-LLM's enc-dec
    examples do).

    Weight-only quantization needs no flag: trtllm-build reads the algorithm
    (W8A16, W4A16, W4A16_GPTQ + group size) from the checkpoint's
    config.json and enables the matching weight-only GEMM plugin itself."""
    dt = DTYPE_PLUGIN[variant.dtype]
    mm = multimodal_len if multimodal_len is not None else limits.get("max_multimodal_len")
    batch = int(limits["max_batch_size"])
    beams = int(limits.get("max_beam_width") or 1)
    args = ["trtllm-build", "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(out_dir),
            "--max_batch_size", str(batch)]
    if beams > 1 and part != "encoder":  # trtllm-build's default is 1; the encoder does no search
        args += ["--max_beam_width", str(beams)]
    if part == "":
        args += [
            "--max_input_len", str(limits["max_input_len"]),
            "--max_seq_len", str(limits["max_seq_len"]),
            # attention and GEMMs through TensorRT-LLM's plugins in the variant's dtype
            "--gpt_attention_plugin", dt,
            "--gemm_plugin", dt,
            "--remove_input_padding", "enable",
            "--context_fmha", "enable" if dt != "float32" else "disable",
        ]
    else:
        # the encoder reads the prompt plus, for a multimodal model, the
        # visual rows of its prompt table; the decoder attends to all of them
        enc_len = int(limits["max_input_len"]) + (int(mm) // batch if mm else 0)
        args += ["--bert_attention_plugin", dt, "--gpt_attention_plugin", dt, "--gemm_plugin", dt,
                 "--remove_input_padding", "enable",
                 # T5's relative attention bias is not in the fused attention kernels
                 "--context_fmha", "disable"]
        if beams == 1:
            args += ["--max_beam_width", "1"]
        if part == "encoder":
            args += ["--max_input_len", str(enc_len), "--kv_cache_type", "disabled"]
        elif part == "decoder":
            # generation starts from the decoder start token; validation's
            # teacher-forced logits feed the decoder up to min(max_input_len,
            # max_seq_len) tokens in one pass and read their context logits
            # (as the aoti decoder's max_decoder_tokens)
            # (Nougat: the encoder input is the visual engine's features)
            enc_len = int(limits.get("max_encoder_input_len") or enc_len)
            dec_in = min(int(limits["max_input_len"]), int(limits["max_seq_len"]))
            args += ["--max_input_len", str(dec_in), "--max_seq_len", str(limits["max_seq_len"]),
                     "--max_encoder_input_len", str(enc_len), "--kv_cache_type", "paged"]
        else:
            raise ValueError(f"unknown checkpoint part {part!r}")
    if mm and part in ("", "encoder"):
        # the visual features enter as a prompt table of this many rows
        args += ["--max_prompt_embedding_table_size", str(mm)]
    args += ["--workers", str(variant.tp)]
    if part != "encoder":
        # the logits of every input token, which validation's logits and
        # perplexity gates read (backends/trtllm_runner.py CONTEXT_LOGITS_FLAG);
        # a switch without a value, kept last so the flags before it pair up
        args.append("--gather_context_logits")
    return args


def build_commands(ckpt_dir: str | Path, out_dir: str | Path, variant, limits: dict[str, Any],
                   parts: tuple[str, ...] = ("",), multimodal_len: Optional[int] = None) -> list[list[str]]:
    """Every trtllm-build run a variant needs, one per checkpoint part: ("",)
    for a decoder-only LLM, ("encoder", "decoder") for T5/BART, ("decoder",)
    for a decoder that cross-attends to visual features (Nougat)."""
    if parts == ("",):
        return [build_args(ckpt_dir, out_dir, variant, limits, multimodal_len)]
    return [build_args(Path(ckpt_dir) / part, Path(out_dir) / part, variant, limits, multimodal_len, part)
            for part in parts]


def checkpoint_parts(ckpt_dir: Path) -> tuple[str, ...]:
    """The parts of a converted checkpoint, from what is on disk."""
    parts = tuple(p for p in ("encoder", "decoder") if (Path(ckpt_dir) / p / "config.json").is_file())
    return parts or ("",)


def preprocess_weight_only(ckpt_dir: Path, out_dir: Path) -> None:
    """Copy a plain-layout weight-only checkpoint, interleaving its integer
    matrices for this GPU with TensorRT-LLM's own op (both checkpoints of
    an encoder-decoder model).

    Why here and not in trtllm-build: TensorRT-LLM's converters store the
    interleaved matrix in the checkpoint (examples/opt/convert_checkpoint.py
    `get_tllm_linear_weight`, stored commit 14e801da: results[prefix + 'weight']
    = the `processed_torch_weights` that
    `symmetric_quantize_last_axis_of_batched_matrix` returns, and
    cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp `symmetric_quantize_helper`
    returns the processed weight unless asked for both), and trtllm-build re-processes nothing it
    finds already int8: models/modeling_utils.py `preprocess_weights` ->
    `preprocess_perlayer_weights` calls `weight_only_quantize_dict`
    (models/convert_utils.py), which skips tensors whose dtype is int8, and
    has no branch for W4A16_GPTQ / W8A16_GPTQ at all. A group-wise weight is
    stored viewed in the model dtype (quantization/layers.py
    WeightOnlyGroupwiseQuantLinear; its GPTQ loader does the same:
    `preprocess_weights_for_mixed_gemm(...).view(torch.float16)`), so it is
    viewed as int8 for the op and back afterwards.

    NEVER RUN against a real TensorRT-LLM (it cannot be installed where the
    farm's CI runs): see `_interleave` for the signatures it was checked against."""
    import torch
    from safetensors.torch import load_file, save_file

    import tensorrt_llm  # noqa: F401  (registers torch.ops.trtllm)

    from ..quant import bits_of

    if checkpoint_parts(ckpt_dir) != ("",):
        for part in checkpoint_parts(ckpt_dir):
            preprocess_weight_only(ckpt_dir / part, out_dir / part)
        return
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    bits = bits_of(cfg)
    qtype = torch.int8 if bits == 8 else torch.quint4x2
    act = {"bfloat16": torch.bfloat16}.get(cfg.get("dtype"), torch.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in sorted(ckpt_dir.glob("rank*.safetensors")):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if not name.endswith(".weight"):
                continue
            grouped = name[: -len("weight")] + "weights_scaling_factor" in tensors
            if t.dtype == torch.int8 or grouped:
                q = t.contiguous().view(torch.int8)
                p = _interleave(q, qtype, act)
                tensors[name] = p.view(t.dtype) if grouped else p
        save_file(tensors, str(out_dir / f.name))


# ----------------------------------------------------------------------------- encoder-decoder names by release
# The farm writes encoder-decoder checkpoints with the names of
# examples/models/core/enc_dec/convert_checkpoint.py (stored commit 1b390186):
# transformer.layers.N, transformer.vocab_embedding, ... Older releases (0.16)
# name the tensors after the modules of tensorrt_llm/models/enc_dec/model.py
# (stored commits 04a2cacb, 14e801da): EncoderModel/DecoderModel hold
# `embedding` (EncDecEmbedding: vocab_embedding, position_embedding,
# embedding_layernorm), `encoder_layers` / `decoder_layers`, `final_layernorm`,
# and their converter (examples/enc_dec/convert_checkpoint.py, stored commits
# 1cc1443b, 20709ce9) writes exactly those: `{component}_layers.N`,
# `embedding.vocab_embedding.weight`, `final_layernorm.weight`; lm_head and the
# decoder's top-level rel_attn_table keep their names; the names inside a layer
# are the same in both.
LEGACY_ENCDEC_PREFIXES = (
    ("transformer.layers.", "{part}_layers."),
    ("transformer.vocab_embedding.", "embedding.vocab_embedding."),
    ("transformer.position_embedding.", "embedding.position_embedding."),
    ("transformer.ln_embed.", "embedding.embedding_layernorm."),
    ("transformer.ln_f.", "final_layernorm."),
)


def legacy_encdec_name(name: str, part: str) -> str:
    """A tensor name of the farm's encoder/decoder checkpoint in the older
    releases' layout (`part`: encoder or decoder)."""
    for new, old in LEGACY_ENCDEC_PREFIXES:
        if name.startswith(new):
            return old.format(part=part) + name[len(new):]
    return name


def installed_encdec_layout() -> str:
    """'legacy' where the installed TensorRT-LLM's EncoderModel keeps its layers
    as `encoder_layers` (the module names its loader matches checkpoint names
    against), else 'transformer'. Read from the installed source itself, since
    the release that changed the names is not pinned down. Never run against a
    real TensorRT-LLM."""
    import inspect

    from tensorrt_llm.models.enc_dec import model as encdec_model  # type: ignore

    src = inspect.getsource(encdec_model.EncoderModel.__init__)
    return "legacy" if "self.encoder_layers" in src and "self.transformer" not in src else "transformer"


def rename_for_legacy(ckpt_dir: Path, out_dir: Path) -> None:
    """Copy an encoder-decoder checkpoint with the older releases' tensor names."""
    from safetensors.torch import load_file, save_file

    for part in checkpoint_parts(ckpt_dir):
        (out_dir / part).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ckpt_dir / part / "config.json", out_dir / part / "config.json")
        for f in sorted((ckpt_dir / part).glob("rank*.safetensors")):
            tensors = load_file(str(f))
            save_file({legacy_encdec_name(k, part): v for k, v in tensors.items()}, str(out_dir / part / f.name))


def _interleave(q, qtype, act):
    """torch.ops.trtllm.preprocess_weights_for_mixed_gemm across releases: an
    older cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp registers it as
    (Tensor row_major_quantized_weight, ScalarType quant_type); newer ones add
    the activation type (models/modeling_utils.py `preprocess_perlayer_weights`
    calls it as preprocessor(param, torch.quint4x2, activation_type)). Checked
    against the stored source only; never run here."""
    import torch

    op = torch.ops.trtllm.preprocess_weights_for_mixed_gemm
    try:
        return op(q, qtype, act)
    except (RuntimeError, TypeError):  # the two-argument registration
        return op(q, qtype)


def runtime_settings(ckpt_dir: Path, max_seq_len: int, encoder_decoder: bool = False) -> dict:
    """What TensorRT-LLM's runner must be given at run time because the
    engine does not carry it: the attention window of each layer (Mistral's
    sliding window, GPT-Neo's local layers), as `max_attention_window_size`
    (one value per layer; the whole sequence where a layer has no window)."""
    cfg = json.loads((ckpt_dir / ("decoder" if encoder_decoder else "") / "config.json").read_text())
    windows = cfg.get("max_attention_window_size")
    if not isinstance(windows, list) or all(w is None for w in windows):
        return {}
    return {"max_attention_window_size": [int(w) if w is not None else int(max_seq_len) for w in windows]}


class TensorRTLLM(Backend):
    components = ("llm",)
    install_hint = "pip install tensorrt-llm (NVIDIA's index; a GPU machine with CUDA)"

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        if component not in self.components:
            return False, "tensorrt-llm builds llm components"
        if shutil.which("trtllm-build") is None or version_of("tensorrt-llm") is None:
            return False, f"tensorrt-llm is not installed: no trtllm-build on PATH ({self.install_hint})"
        return True, ""

    def toolchain(self, target: str) -> dict:
        return {"backend": "tensorrt-llm", "tensorrt_llm": version_of("tensorrt-llm"), "gpu_arch": target}

    def command(self, variant, limits: dict, ckpt_dir="CKPT", out_dir="ENGINE", parts: tuple[str, ...] = ("",)) -> str:
        return " && ".join(shlex.join(a) for a in build_commands(ckpt_dir, out_dir, variant, limits, parts))

    def releases(self, variant, parts: tuple[str, ...] = ("",)) -> str:
        """One line: the TensorRT-LLM releases the checkpoint this variant converts to serves."""
        kind = "decoder" if parts == ("",) else "encoder-decoder"
        return "; ".join(f"{k}: {v}" for k, v in release_range(kind, variant.quant, variant.group_size).items())

    def build(self, req: BuildRequest) -> BuildResult:
        return BuildResult(self._build(req.component, Path(req.src_dir), Path(req.out_dir), req.variant, req.limits,
                                       req.progress))

    def _build(self, component: str, src_dir: Path, out_dir: Path, variant, limits: dict, progress=None) -> dict:
        ok, why = self.usable(component, variant.target)
        if not ok:
            raise NotAvailable(why)
        ckpt = Path(src_dir)
        parts = checkpoint_parts(Path(src_dir))
        names = "transformer"
        if parts != ("",):
            names = installed_encdec_layout()
            if names == "legacy":
                if progress:
                    progress("tensorrt-llm: this release names encoder-decoder tensors encoder_layers.N / embedding.*: "
                             "renaming a copy")
                legacy = out_dir.parent / (out_dir.name + ".legacy-names")
                rename_for_legacy(ckpt, legacy)
                ckpt = legacy
        if variant.quant != "none":
            self._refuse_unloadable(Path(src_dir), variant)
            pre = out_dir.parent / (out_dir.name + ".preprocessed")
            if progress:
                progress("tensorrt-llm: interleaving weight-only matrices for this GPU")
            preprocess_weight_only(ckpt, pre)
            ckpt = pre
        commands = build_commands(ckpt, out_dir, variant, limits, parts)
        for args in commands:
            if progress:
                progress("tensorrt-llm: " + shlex.join(args))
            p = subprocess.run(args, capture_output=True, text=True)
            if p.returncode != 0:
                tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-20:])
                raise StepFailed(f"trtllm-build exited with {p.returncode}:\n{tail}")
        kind = "decoder" if parts == ("",) else "encoder-decoder"
        meta = {"format": "tensorrt-llm", "command": commands[0] if len(commands) == 1 else commands,
                "checkpoint_serves": release_range(kind, variant.quant, variant.group_size),
                **({"encoder_decoder_names": names} if parts != ("",) else {}),
                "runtime": runtime_settings(Path(src_dir), limits["max_seq_len"], parts != ("",)), "tensorrt_llm": version_of("tensorrt-llm"),
                "target": variant.target, "tp": variant.tp}
        return write_sidecar(out_dir, meta).dump()


    @staticmethod
    def _refuse_unloadable(ckpt: Path, variant) -> None:
        """Refuse, before trtllm-build runs, a weight-only checkpoint that the
        installed release would reject (see `padded_layers`,
        `groupwise_int8_refusal`)."""
        cfg = json.loads((ckpt / checkpoint_parts(ckpt)[0] / "config.json").read_text())
        if ((cfg.get("quantization") or {}).get("quant_algo") or "").upper() == "W8A16_GPTQ":
            src = installed_quantize_source()
            why = groupwise_int8_refusal(groupwise_init_params(src) if src is not None else None)
            if why:
                raise BadInput(f"variant {variant.name}: {why}")
        padded = padded_layers(ckpt)
        if padded:
            more = f" (and {len(padded) - 4} more)" if len(padded) > 4 else ""
            raise BadInput(
                f"variant {variant.name}: TensorRT-LLM declares these weight-only layers with padded widths, and "
                f"trtllm-build rejects a checkpoint whose tensors are not padded: {'; '.join(padded[:4])}{more}. "
                f"Pick a tp at which these widths are multiples (64 x tp per channel, max(64, group_size) x tp per "
                f"group), or build this variant unquantized or with the aoti backend")

    def load(self, engine_dir: Path, device: str = "cpu"):
        """The engine on TensorRT-LLM's own runtime (backends/trtllm_runner.py),
        with the interface of the aoti engines; NotAvailable where tensorrt_llm
        is not importable or no GPU is visible. Never run against a real
        TensorRT-LLM."""
        from . import trtllm_runner

        return trtllm_runner.load(engine_dir)


def backend(name: str) -> TensorRTLLM:
    return TensorRTLLM(name)
