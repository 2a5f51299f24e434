"""The backend interface."""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from ..spec import AotiOptions, Variant


def version_of(dist: str) -> str | None:
    """The installed version of a distribution (None: not installed). Read
    once per process: a lookup parses the package's METADATA (~10 ms), and
    every step's key asks for several, per variant."""
    return _version_of(dist)


@functools.lru_cache(maxsize=None)
def _version_of(dist: str) -> str | None:
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


def detect_gpu() -> tuple[Optional[str], str]:
    """(this machine's GPU as sm_XY, or None; how that was found out). CUDA's
    device 0 as torch sees it where torch is already loaded, else
    `nvidia-smi` (its first GPU), else torch (imported for this)."""
    if "torch" not in sys.modules and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"nvidia-smi failed ({e.__class__.__name__})"
        lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
        if out.returncode != 0 or not lines:
            return None, "nvidia-smi found no GPU"
        major, _, minor = lines[0].partition(".")
        if not (major.isdigit() and minor.isdigit()):
            return None, f"nvidia-smi said {lines[0]!r}, not a compute capability"
        return f"sm_{major}{minor}", "nvidia-smi"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return None, "CUDA_VISIBLE_DEVICES is empty"
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}", "torch.cuda"
    except Exception as e:  # a broken CUDA install says all sorts
        return None, f"torch.cuda failed ({e.__class__.__name__})"
    return None, "no nvidia-smi, and torch.cuda sees no GPU"


@dataclass(frozen=True)
class BuildRequest:
    """What the build step asks of a backend: one engine for `component`
    (`llm` or `visual`) from `src_dir` (a converted checkpoint, or an export
    for a visual component) into `out_dir`."""

    component: str
    src_dir: Path
    out_dir: Path
    variant: "Variant"
    limits: dict[str, Any]
    # the recipe's `components.<c>.aoti` (the aoti backend's engine-form options), or None
    options: Optional["AotiOptions"] = None
    # a TensorRT timing cache from earlier builds of the same flavour, version and GPU target
    timing_cache: Optional[bytes] = None
    progress: Optional[Callable[[str], None]] = None


@dataclass(frozen=True)
class BuildResult:
    """A built engine: its sidecar (also written to out_dir/engine.json) and,
    where the backend keeps one, the timing cache to store for later builds
    (never an engine file)."""

    sidecar: dict[str, Any]
    timing_cache: Optional[bytes] = None


class Backend(ABC):
    name: str = ""
    components: tuple[str, ...] = ()
    install_hint: str = ""
    max_tp: int = 8  # the largest tensor-parallel size it builds engines for

    def __init__(self, name: str):
        self.name = name

    @abstractmethod
    def usable(self, component: str, target: str) -> tuple[bool, str]:
        """(True, '') or (False, why-with-install-hint), cheap, no heavy imports if avoidable."""

    @abstractmethod
    def toolchain(self, target: str) -> dict[str, Any]:
        """Versions that shape this backend's output (part of the build step's cache key)."""

    @abstractmethod
    def build(self, req: BuildRequest) -> BuildResult:
        """Build the engine `req` asks for; write `engine.json` (the sidecar) into req.out_dir."""

    def timing_cache_name(self, target: str) -> Optional[str]:
        """The store name of this backend's timing cache for `target`, or None
        where it keeps none (the build step then passes and stores none)."""
        return None

    def cannot_run(self, sidecar: dict, gpu: Optional[str] = None) -> Optional[str]:
        """Why an engine with this sidecar cannot run on this machine (or on
        `gpu`, sm_XY), or None when it can. Engines of the backends that
        build for the machine they build on run wherever they were built."""
        return None

    def load(self, engine_dir: Path, device: str = "cpu"):
        """A runnable engine from a built engine directory."""
        raise NotImplementedError

    def triton_model(self, name: str, sidecar: dict) -> tuple[str, dict[str, str]]:
        """How Triton serves this backend's engine: (config.pbtxt text, {file
        name: text} to add to the version folder beside the engine files)."""
        from ..errors import NotAvailable

        raise NotAvailable(f"the {self.name} backend has no Triton model layout in this version")
