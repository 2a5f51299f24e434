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
right before trtllm-build.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

from ..errors import NotAvailable, StepFailed
from ..runtime.sidecar import write as write_sidecar
from .base import Backend, BuildRequest, BuildResult, version_of

DTYPE_PLUGIN = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}

# ----------------------------------------------------------------------------- releases
# The TensorRT-LLM releases each checkpoint layout the farm writes serves, and
# the evidence. The upper end of every range is the last release that still
# builds TensorRT engines: TensorRT-LLM deprecated trtllm-build and
# convert_checkpoint.py in February 2026 (PR 11723) and removed the engine path
# in mid-2026 (PRs 15763, 15767, 15907, 15918, 16369); later releases run a
# PyTorch backend only and take Hugging Face checkpoints. The stored sources
# read name commits, not tags: where a tag could not be tied to a change, the
# range says so instead of guessing.
LAST = "the last release with the TensorRT engine path (trtllm-build; removed mid-2026)"
RELEASES = {
    "decoder-only": {
        "range": f"0.16 through {LAST}",
        "evidence": "0.16: issue 16 loaded the farm's unquantized decoder-only checkpoints (opt, llama, mistral, gpt2, "
                    "gptj, gpt-neox, bloom; tp 1/2/4/8) into TensorRT-LLM 0.16's model classes, bit-identical to its "
                    "converters; newer: tests/test_conformance.py holds them equal to NVIDIA ModelOpt 0.47's "
                    "TensorRT-LLM writer (its names: transformer.layers.N, transformer.vocab_embedding, lm_head)",
    },
    "encoder-decoder": {
        "range": f"as written: the releases whose converter is examples/models/core/enc_dec/convert_checkpoint.py, "
                 f"through {LAST}, NOT 0.16 (the first such tag was not determined); the build renames a copy to the "
                 f"older names (encoder_layers.N, embedding.*, final_layernorm) where the installed release's "
                 f"EncoderModel wants them (0.16), so the build serves both",
        "evidence": "examples/models/core/enc_dec/convert_checkpoint.py (stored commit 1b390186) writes "
                    "transformer.layers.N, transformer.vocab_embedding, transformer.ln_f and a top-level rel_attn_table, "
                    "as the farm and ModelOpt 0.47 do (tests/test_conformance.py); the older "
                    "examples/enc_dec/convert_checkpoint.py (stored commit 1cc1443b), which 0.16 ships, writes "
                    "{encoder,decoder}_layers.N, embedding.vocab_embedding, final_layernorm",
    },
    "weight-only per channel": {
        "range": f"0.16 through {LAST}",
        "evidence": "quantization/layers.py WeightOnlyQuantLinear: weight int8 (in, out / mode), per_channel_scale (out,); "
                    "quantization/quantize.py quantize_layers: no exclude_modules = the default list (lm_head, "
                    "embeddings unquantized), the same in an older and the newest stored version; integers: "
                    "cutlass_preprocessors.cpp symmetric_quantize (max|w|/128 or /8, round half away, clamp); the "
                    "interleave op's signature changed between releases (2 or 3 arguments): both are handled",
    },
    "weight-only per group": {
        "range": f"W4A16_GPTQ: 0.16 through {LAST}; W8A16_GPTQ: only releases whose quantize.py passes "
                 f"use_int8_weight (not in the older stored version; first tag not determined)",
        "evidence": "quantization/layers.py WeightOnlyGroupwiseQuantLinear: weight (in, out // pack_ratio) in the model "
                    "dtype (4 int4 or 2 int8 to a 16-bit word), weights_scaling_factor (in / group_size, out); "
                    "integers as ModelOpt 0.47's block quantizer (tests/test_conformance.py)",
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


    def load(self, engine_dir: Path, device: str = "cpu"):
        """The engine on TensorRT-LLM's own runtime (backends/trtllm_runner.py),
        with the interface of the aoti engines; NotAvailable where tensorrt_llm
        is not importable or no GPU is visible. Never run against a real
        TensorRT-LLM."""
        from . import trtllm_runner

        return trtllm_runner.load(engine_dir)


def backend(name: str) -> TensorRTLLM:
    return TensorRTLLM(name)
