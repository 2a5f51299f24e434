"""`onnxruntime`: serves the ONNX export of a visual component on the CPU
(a CPU serving option; the export step checks every export with it too).
LLM engines are not built with it.

The "engine" is the export's ONNX file as it is (plus its external data),
with a sidecar; the runner opens it in an ONNX Runtime session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import NotAvailable
from ..runtime.sidecar import write as write_sidecar
from .base import Backend, BuildRequest, BuildResult, version_of


class OnnxRuntime(Backend):
    components = ("visual",)
    install_hint = "pip install onnxruntime"

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        if version_of("onnxruntime") is None:
            return False, f"onnxruntime is not installed ({self.install_hint})"
        if component not in self.components:
            return False, "onnxruntime serves visual components (ONNX exports); build LLMs with aoti or tensorrt-llm"
        if target != "cpu":
            return False, f"this backend serves on the CPU (target cpu), not {target}"
        return True, ""

    def toolchain(self, target: str) -> dict:
        return {"backend": "onnxruntime", "onnxruntime": version_of("onnxruntime")}

    def build(self, req: BuildRequest) -> BuildResult:
        return BuildResult(self._build(req.component, Path(req.src_dir), Path(req.out_dir), req.variant, req.limits,
                                       req.progress))

    def _build(self, component, src_dir, out_dir, variant, limits, progress=None) -> dict:
        ok, why = self.usable(component, variant.target)
        if not ok:
            raise NotAvailable(why)
        meta = json.loads((Path(src_dir) / "visual.json").read_text())
        B = meta["max_batch_size"]  # encoder inputs per call: images, or tiles (max_batch_size x tiles per image)
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in sorted(Path(src_dir).iterdir()):
            if p.name.startswith(meta["onnx"]) or p.name == meta.get("extras"):  # visual.onnx(.data), extras
                shutil.copyfile(p, out_dir / p.name)
        from ..images import image_hw

        (Hh, Ww), F, H = image_hw(meta["image_size"]), meta["encoder_features"], meta["hidden_size"]
        sidecar = {
            "format": "onnx",
            "component": component,
            "file": meta["onnx"],
            "device": "cpu",
            "target": "cpu",
            "dtype": meta["dtype"],
            "max_batch_size": B,
            "visual": meta,
            "inputs": [{"name": meta["input"], "dtype": meta["dtype"], "shape": ["batch", 3, Hh, Ww]}],
            "outputs": [{"name": meta["output"], "dtype": meta["dtype"], "shape": ["batch", F, H]}],
        }
        return write_sidecar(out_dir, sidecar).dump()

    def load(self, engine_dir: Path, device: str = "cpu"):
        from ..runtime.engine import load_engine

        return load_engine(engine_dir)


def backend(name: str) -> OnnxRuntime:
    return OnnxRuntime(name)
