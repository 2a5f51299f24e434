"""The backend interface."""

from __future__ import annotations

import importlib.metadata as md
import platform
from pathlib import Path
from typing import Any


def version_of(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def torch_toolchain(target: str) -> dict[str, Any]:
    tc = {"python": platform.python_version(), "torch": version_of("torch")}
    if target != "cpu":
        import torch

        tc["cuda"] = torch.version.cuda
        tc["gpu_arch"] = target
    else:
        tc["cpu"] = platform.machine()
    return tc


class Backend:
    name: str = ""
    components: tuple[str, ...] = ()
    install_hint: str = ""
    max_tp: int = 8  # the largest tensor-parallel size it builds engines for

    def __init__(self, name: str):
        self.name = name

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        """(True, '') or (False, why-with-install-hint), cheap, no heavy imports if avoidable."""
        raise NotImplementedError

    def toolchain(self, target: str) -> dict[str, Any]:
        """Versions that shape this backend's output (part of the build step's cache key)."""
        raise NotImplementedError

    def build(self, component: str, src_dir: Path, out_dir: Path, variant, limits: dict, progress=None) -> dict:
        """Build an engine for `component` from `src_dir` (a converted checkpoint or an export) into
        `out_dir`; write `engine.json` (the sidecar) there and return it."""
        raise NotImplementedError

    def load(self, engine_dir: Path, device: str = "cpu"):
        """A runnable engine from a built engine directory."""
        raise NotImplementedError

    def triton_model(self, name: str, sidecar: dict) -> tuple[str, dict[str, str]]:
        """How Triton serves this backend's engine: (config.pbtxt text, {file
        name: text} to add to the version folder beside the engine files)."""
        from ..errors import NotAvailable

        raise NotAvailable(f"the {self.name} backend has no Triton model layout in this version")
