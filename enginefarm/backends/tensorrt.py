"""`tensorrt` and `tensorrt-rtx`: one module, two flavours through an import
shim (`tensorrt` for datacenter TensorRT, `tensorrt_rtx` for TensorRT for
RTX). Engines are built from ONNX exports of visual components; the build
itself is the TensorRT issue's work, so this version reports what is usable
and refuses to build rather than pretending."""

from __future__ import annotations

import importlib

from ..errors import NotAvailable
from .base import Backend, version_of

FLAVOURS = {
    "tensorrt": ("tensorrt", "tensorrt", "pip install tensorrt (NVIDIA's index; a datacenter GPU machine)"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx", "pip install tensorrt-rtx"),
}


def import_flavour(name: str):
    module, _, hint = FLAVOURS[name]
    try:
        return importlib.import_module(module)
    except Exception as e:  # an import of a stub wheel raises all sorts
        raise NotAvailable(f"{name} is not installed ({hint}): {e.__class__.__name__}") from None


class TensorRT(Backend):
    components = ("visual",)

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        module, dist, hint = FLAVOURS[self.name]
        try:
            import_flavour(self.name)
        except NotAvailable as e:
            return False, str(e)
        if component not in self.components:
            return False, f"{self.name} builds visual components (ONNX exports); LLMs build with tensorrt-llm"
        return False, f"{self.name} engine builds are not implemented in this version of enginefarm"

    def toolchain(self, target: str) -> dict:
        module, dist, _ = FLAVOURS[self.name]
        return {"backend": self.name, dist: version_of(dist), "gpu_arch": target}


def backend(name: str) -> TensorRT:
    return TensorRT(name)
