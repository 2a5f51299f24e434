"""`aoti`: torch.export + AOTInductor packages (.pt2).

The LLM engine is one package holding a step function with a static KV cache
(see `enginefarm.runtime.decoder`): dynamic batch (1..max_batch_size) and
dynamic token count (1..max_input_len), so one package does prefill and
decode. Runs on CPU here and on CUDA where the target is a GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import NotAvailable
from .base import Backend, torch_toolchain, version_of

ENGINE_FILE = "llm.pt2"


class AOTI(Backend):
    components = ("llm",)
    max_tp = 1  # one process, one device: tp > 1 checkpoints are proven by the shards step, built by tensorrt-llm
    install_hint = "pip install 'torch>=2.6'"

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        if component not in self.components:
            return False, f"the aoti backend builds {', '.join(self.components)} components in this version"
        tv = version_of("torch")
        if tv is None:
            return False, f"torch is not installed ({self.install_hint})"
        major_minor = tuple(int(x) for x in tv.split("+")[0].split(".")[:2])
        if major_minor < (2, 6):
            return False, f"this torch ({tv}) has no AOTInductor packaging ({self.install_hint})"
        if target != "cpu":
            import torch

            if not torch.cuda.is_available():
                return False, f"target {target} needs a CUDA GPU; none is visible here"
            major, minor = torch.cuda.get_device_capability()
            if f"sm_{major}{minor}" != target:
                return False, f"target {target} but this machine's GPU is sm_{major}{minor}"
        return True, ""

    def toolchain(self, target: str) -> dict:
        return {"backend": "aoti", **torch_toolchain(target)}

    def build(self, component, src_dir, out_dir, variant, limits, progress=None) -> dict:
        import torch

        from ..runtime.decoder import DecoderLM

        ok, why = self.usable(component, variant.target)
        if not ok:
            raise NotAvailable(why)
        if variant.tp > self.max_tp:
            raise NotAvailable(f"the aoti backend builds tp=1 engines (variant {variant.name} has tp={variant.tp})")
        device = "cpu" if variant.target == "cpu" else "cuda"
        model = DecoderLM.from_checkpoint(src_dir).to(device)
        B, T, S = limits["max_batch_size"], limits["max_input_len"], limits["max_seq_len"]
        t0 = time.perf_counter()
        if progress:
            progress("aoti: torch.export")
        ep = export_decoder(model, B, T, S, device)
        t1 = time.perf_counter()
        if progress:
            progress(f"aoti: AOTInductor compile ({device})")
        out_dir.mkdir(parents=True, exist_ok=True)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / ENGINE_FILE))
        t2 = time.perf_counter()
        c = model.cfg
        sidecar = {
            "format": "aoti-pt2",
            "component": component,
            "file": ENGINE_FILE,
            "device": device,
            "target": variant.target,
            "dtype": variant.dtype,
            "max_batch_size": B,
            "max_input_len": T,
            "max_seq_len": S,
            "vocab_size": c.vocab_size,
            "cache_shape": [c.num_layers, "batch", c.num_kv_heads, S, c.head_size],
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                {"name": "start_pos", "dtype": "int64", "shape": [1]},
                {"name": "k_cache", "dtype": variant.dtype, "shape": [c.num_layers, "batch", c.num_kv_heads, S, c.head_size]},
                {"name": "v_cache", "dtype": variant.dtype, "shape": [c.num_layers, "batch", c.num_kv_heads, S, c.head_size]},
            ],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": ["batch", "tokens", c.vocab_size]},
                {"name": "k_cache", "dtype": variant.dtype},
                {"name": "v_cache", "dtype": variant.dtype},
            ],
            "timings": {"export_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)},
        }
        (out_dir / "engine.json").write_text(json.dumps(sidecar, indent=2))
        return sidecar

    def load(self, engine_dir: Path, device: str = "cpu"):
        from ..runtime.engine import LLMEngine

        return LLMEngine.load(engine_dir)

    def triton_model(self, name: str, sidecar: dict) -> tuple[str, dict[str, str]]:
        """Triton has no backend for AOTInductor packages: the engine is served
        by Triton's Python backend (`model.py` in the version folder, which
        needs enginefarm and torch in Triton's Python environment): token ids
        in, greedy continuation out, a batch of up to max_batch_size prompts
        of equal length per request."""
        gpu = sidecar.get("device") == "cuda"
        config = "\n".join([
            f'name: "{name}"',
            'backend: "python"',
            f"max_batch_size: {int(sidecar['max_batch_size'])}",
            "input [",
            '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },',
            '  { name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }',
            "]",
            "output [",
            '  { name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }',
            "]",
            f"instance_group [ {{ count: 1 kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]",
            f'parameters {{ key: "engine_file" value: {{ string_value: "{sidecar["file"]}" }} }}',
            f'parameters {{ key: "max_input_len" value: {{ string_value: "{int(sidecar["max_input_len"])}" }} }}',
            f'parameters {{ key: "max_seq_len" value: {{ string_value: "{int(sidecar["max_seq_len"])}" }} }}',
            "",
        ])
        return config, {"model.py": TRITON_MODEL_PY}


TRITON_MODEL_PY = '''"""Triton Python-backend model for an enginefarm aoti engine (written by
`enginefarm pull --layout triton`). The engine files sit beside this file."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from enginefarm.runtime.engine import LLMEngine

        here = os.path.join(args["model_repository"], args["model_version"])
        self.engine = LLMEngine.load(here)
        params = json.loads(args["model_config"]).get("parameters", {})
        budget = int(params.get("max_seq_len", {}).get("string_value", self.engine.max_seq_len))
        self.default_new_tokens = max(1, budget - int(params.get("max_input_len", {}).get("string_value", 0)))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
                n = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
                n = int(n.as_numpy().reshape(-1)[0]) if n is not None else self.default_new_tokens
                outs = self.engine.generate([[int(t) for t in row] for row in ids], n)
                width = max(len(o) for o in outs)
                arr = np.full((len(outs), width), -1, dtype=np.int64)
                for i, o in enumerate(outs):
                    arr[i, : len(o)] = o
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output_ids", arr)]))
            except Exception as e:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
'''


def export_decoder(model, max_batch: int, max_tokens: int, max_seq_len: int, device: str = "cpu"):
    """The decoder's step function as a torch.export program with a dynamic
    batch (1..max_batch) and token count (1..max_tokens): what the package
    is compiled from."""
    import torch
    from torch.export import Dim

    B, T, S = max_batch, max_tokens, max_seq_len
    eb, et = min(2, B), min(3, T)
    ids = torch.zeros(eb, et, dtype=torch.long, device=device)
    start = torch.zeros(1, dtype=torch.long, device=device)
    kc, vc = model.new_cache(eb, S)
    kc, vc = kc.to(device), vc.to(device)
    batch = Dim("batch", min=1, max=B) if B > 1 else None
    seq = Dim("seq", min=1, max=T) if T > 1 else None
    ds = (
        {0: batch, 1: seq} if (batch or seq) else None,
        None,
        {1: batch} if batch else None,
        {1: batch} if batch else None,
    )
    ds = tuple({k: v for k, v in d.items() if v is not None} if d else None for d in ds)
    with torch.no_grad():
        return torch.export.export(model, (ids, start, kc, vc), dynamic_shapes=ds, strict=False)


def backend(name: str) -> AOTI:
    return AOTI(name)
