"""`aoti`: torch.export + AOTInductor packages (.pt2).

The LLM engine is one package holding a step function with a static KV cache
(see `enginefarm.runtime.decoder`): dynamic batch (1..max_batch_size) and
dynamic token count (1..max_input_len), so one package does prefill and
decode. Runs on CPU here and on CUDA where the target is a GPU. Built for a
multimodal recipe (limits carry max_multimodal_len), the step also takes a
prompt table of 1..max_multimodal_len rows.

The visual engine is the export step's ExportedProgram (the graph its ONNX
was made from) compiled by AOTInductor: pixel_values with a dynamic batch
(1..max_batch_size) -> features.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import NotAvailable
from .base import Backend, torch_toolchain, version_of

ENGINE_FILE = "llm.pt2"
VISUAL_FILE = "visual.pt2"


class AOTI(Backend):
    components = ("llm", "visual")
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
        from torch.export import Dim

        from ..runtime.decoder import DecoderLM

        ok, why = self.usable(component, variant.target)
        if not ok:
            raise NotAvailable(why)
        if component == "visual":
            return self._build_visual(src_dir, out_dir, variant, limits, progress)
        if variant.tp != 1:
            raise NotAvailable(f"the aoti backend builds tp=1 engines (variant {variant.name} has tp={variant.tp})")
        device = "cpu" if variant.target == "cpu" else "cuda"
        model = DecoderLM.from_checkpoint(src_dir).to(device)
        B, T, S = limits["max_batch_size"], limits["max_input_len"], limits["max_seq_len"]
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
        args = (ids, start, kc, vc)
        M = limits.get("max_multimodal_len") or 0
        if M:  # multimodal: the prompt table (visual features) is an input
            table = torch.zeros(min(2, M), model.cfg.hidden_size, dtype=kc.dtype, device=device)
            args += (table,)
            ds += ({0: Dim("prompt_rows", min=1, max=M)} if M > 1 else None,)
        ds = tuple({k: v for k, v in d.items() if v is not None} if d else None for d in ds)
        t0 = time.perf_counter()
        if progress:
            progress("aoti: torch.export")
        with torch.no_grad():
            ep = torch.export.export(model, args, dynamic_shapes=ds, strict=False)
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
        if M:
            H = model.cfg.hidden_size
            sidecar["prompt_table"] = {"max_rows": M, "hidden_size": H}
            sidecar["inputs"].append({"name": "prompt_table", "dtype": variant.dtype, "shape": ["rows", H]})
        (out_dir / "engine.json").write_text(json.dumps(sidecar, indent=2))
        return sidecar

    def _build_visual(self, src_dir: Path, out_dir: Path, variant, limits: dict, progress=None) -> dict:
        """src_dir: the export step's files (visual.ep.pt2, visual.json)."""
        import torch

        meta = json.loads((src_dir / "visual.json").read_text())
        B = meta["max_batch_size"]  # encoder inputs per call: images, or tiles (max_batch_size x tiles per image)
        from torch.export import Dim

        from ..runtime.engine import DTYPES

        device = "cpu" if variant.target == "cpu" else "cuda"
        t0 = time.perf_counter()
        ep = torch.export.load(str(src_dir / meta["exported_program"]))
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            ep = move_to_device_pass(ep, device)
        # Re-traced before compiling: with torch 2.13, AOTInductor compiling the
        # deserialized program of the CLIP tower gave NaN at batch 1 (batch 2
        # was right); compiling a fresh trace of its module is right at every
        # batch size (tests/test_multimodal.py checks batch 1 and max).
        S = meta["image_size"]
        example = torch.zeros(min(2, B), 3, S, S, dtype=DTYPES[meta["dtype"]], device=device)
        dyn = ({0: Dim("batch", min=1, max=B)},) if B > 1 else None
        with torch.no_grad():
            ep = torch.export.export(ep.module(), (example,), dynamic_shapes=dyn, strict=False)
        if progress:
            progress(f"aoti: AOTInductor compile of the visual encoder ({device})")
        out_dir.mkdir(parents=True, exist_ok=True)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(out_dir / VISUAL_FILE))
        t1 = time.perf_counter()
        F, H = meta["encoder_features"], meta["hidden_size"]
        sidecar = {
            "format": "aoti-pt2",
            "component": "visual",
            "file": VISUAL_FILE,
            "device": device,
            "target": variant.target,
            "dtype": meta["dtype"],
            "max_batch_size": B,
            "visual": meta,
            "inputs": [{"name": meta["input"], "dtype": meta["dtype"], "shape": ["batch", 3, S, S]}],
            "outputs": [{"name": meta["output"], "dtype": meta["dtype"], "shape": ["batch", F, H]}],
            "timings": {"compile_s": round(t1 - t0, 3)},
        }
        if meta.get("extras"):
            shutil.copyfile(src_dir / meta["extras"], out_dir / meta["extras"])
        (out_dir / "engine.json").write_text(json.dumps(sidecar, indent=2))
        return sidecar

    def load(self, engine_dir: Path, device: str = "cpu"):
        from ..runtime.engine import LLMEngine
        from ..runtime.visual import VisualEngine

        meta = json.loads((Path(engine_dir) / "engine.json").read_text())
        if meta.get("component") == "visual":
            return VisualEngine.load(engine_dir)
        return LLMEngine.load(engine_dir)


def backend(name: str) -> AOTI:
    return AOTI(name)
