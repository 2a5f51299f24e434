"""`tensorrt-llm`: engines from the converted checkpoint via `trtllm-build`.

Every flag a variant needs is derived from the recipe in one place,
`build_args`; `enginefarm plan` prints the command even where trtllm-build
is not installed, and the build runs it where it is. Detected at run time:
where it is not installed, that is reported before the run starts.

Weight-only checkpoints are written by convert in the plain layout
(quant.py); TensorRT-LLM's mixed-precision GEMMs want the integer matrix
interleaved for the GPU architecture, which only its own op
(`torch.ops.trtllm.preprocess_weights_for_mixed_gemm`) does. `build` applies
it to a copy of the checkpoint right before trtllm-build.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

from ..errors import NotAvailable, StepFailed
from .base import Backend, version_of

DTYPE_PLUGIN = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def build_args(ckpt_dir: str | Path, out_dir: str | Path, variant, limits: dict[str, Any],
               multimodal_len: Optional[int] = None) -> list[str]:
    """The trtllm-build command line for one variant (the one place these flags are chosen)."""
    dt = DTYPE_PLUGIN[variant.dtype]
    args = [
        "trtllm-build",
        "--checkpoint_dir", str(ckpt_dir),
        "--output_dir", str(out_dir),
        "--max_batch_size", str(limits["max_batch_size"]),
        "--max_input_len", str(limits["max_input_len"]),
        "--max_seq_len", str(limits["max_seq_len"]),
        # attention and GEMMs through TensorRT-LLM's plugins in the variant's dtype
        "--gpt_attention_plugin", dt,
        "--gemm_plugin", dt,
        "--remove_input_padding", "enable",
        "--context_fmha", "enable" if dt != "float32" else "disable",
        "--workers", str(variant.tp),
    ]
    mm = multimodal_len if multimodal_len is not None else limits.get("max_multimodal_len")
    if mm:
        # the visual features enter as a prompt table of this many rows
        args += ["--max_prompt_embedding_table_size", str(mm)]
    if limits.get("max_encoder_input_len"):
        # a decoder that cross-attends to given encoder features (Nougat: the visual engine's output)
        args += ["--max_encoder_input_len", str(limits["max_encoder_input_len"])]
    if variant.quant != "none":
        # weight-only GEMMs: the checkpoint's quantization section names the
        # algorithm; the plugin runs the int8/int4 x fp16 GEMM
        args += ["--weight_only_precision", {"w8a16": "int8", "w4a16": "int4"}[variant.quant]]
    return args


def preprocess_weight_only(ckpt_dir: Path, out_dir: Path) -> None:
    """Copy a plain-layout weight-only checkpoint, interleaving its integer
    matrices for this GPU with TensorRT-LLM's own op."""
    import torch
    from safetensors.torch import load_file, save_file

    import tensorrt_llm  # noqa: F401  (registers torch.ops.trtllm)

    from ..quant import bits_of

    cfg = json.loads((ckpt_dir / "config.json").read_text())
    bits = bits_of(cfg)
    qtype = torch.int8 if bits == 8 else torch.quint4x2
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in sorted(ckpt_dir.glob("rank*.safetensors")):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if t.dtype == torch.int8 and name.endswith(".weight"):
                tensors[name] = torch.ops.trtllm.preprocess_weights_for_mixed_gemm(t.contiguous(), qtype, torch.float16)
        save_file(tensors, str(out_dir / f.name))


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

    def command(self, variant, limits: dict, ckpt_dir="CKPT", out_dir="ENGINE") -> str:
        return shlex.join(build_args(ckpt_dir, out_dir, variant, limits))

    def build(self, component: str, src_dir: Path, out_dir: Path, variant, limits: dict, progress=None) -> dict:
        ok, why = self.usable(component, variant.target)
        if not ok:
            raise NotAvailable(why)
        ckpt = Path(src_dir)
        if variant.quant != "none":
            pre = out_dir.parent / (out_dir.name + ".preprocessed")
            if progress:
                progress("tensorrt-llm: interleaving weight-only matrices for this GPU")
            preprocess_weight_only(ckpt, pre)
            ckpt = pre
        args = build_args(ckpt, out_dir, variant, limits)
        if progress:
            progress("tensorrt-llm: " + shlex.join(args))
        p = subprocess.run(args, capture_output=True, text=True)
        if p.returncode != 0:
            tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-20:])
            raise StepFailed(f"trtllm-build exited with {p.returncode}:\n{tail}")
        meta = {"format": "tensorrt-llm", "command": args, "tensorrt_llm": version_of("tensorrt-llm"),
                "target": variant.target, "tp": variant.tp}
        (out_dir / "engine.json").write_text(json.dumps(meta, indent=2))
        return meta


    def load(self, engine_dir: Path, device: str = "cpu"):
        raise NotAvailable(
            f"{engine_dir}: tensorrt-llm engines run with TensorRT-LLM's own runner (ModelRunner / trtllm-serve); "
            f"enginefarm does not run them in-process"
        )


def backend(name: str) -> TensorRTLLM:
    return TensorRTLLM(name)
