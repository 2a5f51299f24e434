"""`onnxruntime`: runs ONNX exports of visual components on CPU (checks and a
CPU serving option). LLM engines are not built with it."""

from __future__ import annotations

from .base import Backend, version_of


class OnnxRuntime(Backend):
    components = ("visual",)
    install_hint = "pip install onnxruntime"

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        if version_of("onnxruntime") is None:
            return False, f"onnxruntime is not installed ({self.install_hint})"
        if component not in self.components:
            return False, "onnxruntime serves visual components (ONNX exports); build LLMs with aoti or tensorrt-llm"
        return False, "visual components are not implemented in this version of enginefarm"

    def toolchain(self, target: str) -> dict:
        return {"backend": "onnxruntime", "onnxruntime": version_of("onnxruntime")}


def backend(name: str) -> OnnxRuntime:
    return OnnxRuntime(name)
