"""`tensorrt-llm`: engines from the converted checkpoint via `trtllm-build`.
Detected at run time; where it is not installed, that is reported before
the run starts."""

from __future__ import annotations

import shutil

from .base import Backend, version_of


class TensorRTLLM(Backend):
    components = ("llm",)
    install_hint = "pip install tensorrt-llm (NVIDIA's index; a GPU machine with CUDA)"

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        if shutil.which("trtllm-build") is None or version_of("tensorrt-llm") is None:
            return False, f"tensorrt-llm is not installed: no trtllm-build on PATH ({self.install_hint})"
        if component not in self.components:
            return False, "tensorrt-llm builds llm components"
        return False, "trtllm-build invocation is not implemented in this version of enginefarm"

    def toolchain(self, target: str) -> dict:
        return {"backend": "tensorrt-llm", "tensorrt_llm": version_of("tensorrt-llm"), "gpu_arch": target}


def backend(name: str) -> TensorRTLLM:
    return TensorRTLLM(name)
