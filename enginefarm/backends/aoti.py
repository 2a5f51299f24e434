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
