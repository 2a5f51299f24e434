"""`tensorrt` and `tensorrt-rtx`: one module, two flavours.

The flavours share every line of code through a small import shim: the
datacenter TensorRT (`import tensorrt`) and TensorRT for RTX (`import
tensorrt_rtx`) expose the same Builder / OnnxParser / Runtime API. The
variant's backend names the flavour.

A build parses the component's ONNX export, adds one optimization profile per
input from the recipe's limits (batch 1..max_batch_size; other dynamic axes
from the export's `profiles`, e.g. LLaVA-NeXT tilings), sets the precision
where the flavour allows it (datacenter TensorRT: FP16/BF16 builder flags on
a weakly typed network; TensorRT for RTX is strongly typed, so the precision
is the ONNX's own), targets the compute capabilities of the variant, and
writes `engine.plan` plus `engine.json`: I/O tensor names, shapes and dtypes,
the flavour and its version, the compute capabilities the engine runs on, the
builder flags and the profiles.

A timing cache is kept per (flavour, version, GPU target) in the store and
handed to the build (`timing_cache`): a rebuild of an unchanged-shape network
after a weight change reuses it. TensorRT for RTX uses none (it picks kernels
when the engine first runs), which its sidecar says.

Engines run only on a GPU whose compute capability is among the engine's
targets: `check_runs_here` refuses anything else, naming both.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import BadInput, NotAvailable
from ..runtime.sidecar import read as read_sidecar
from ..runtime.sidecar import write as write_sidecar
from .base import Backend, BuildRequest, BuildResult, detect_gpu, version_of

FLAVOURS = {
    # name: (module, distribution, install hint)
    "tensorrt": ("tensorrt", "tensorrt", "pip install tensorrt (NVIDIA's index; a datacenter GPU machine)"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx", "pip install tensorrt-rtx"),
}
# compute capabilities each flavour builds for (TensorRT for RTX: Turing and
# newer consumer/workstation parts, Ampere A100 included; no Hopper)
TARGETS = {
    "tensorrt": None,  # whatever the installed TensorRT supports; checked by the build
    "tensorrt-rtx": ("sm_75", "sm_80", "sm_86", "sm_89", "sm_120", "sm_121"),
}
ENGINE_FILE = "engine.plan"


def import_flavour(name: str):
    module, _, hint = FLAVOURS[name]
    try:
        return importlib.import_module(module)
    except Exception as e:  # an import of a stub wheel raises all sorts
        raise NotAvailable(f"{name} is not installed ({hint}): {e.__class__.__name__}") from None


def local_gpu() -> Optional[str]:
    """This machine's GPU as sm_XY, or None."""
    return detect_gpu()[0]


def why_not_runs(meta: dict, gpu: Optional[str] = None) -> Optional[str]:
    """Why an engine (its sidecar) cannot run on `gpu` (default: this
    machine's GPU), naming the engine's targets and the GPU; None if it can."""
    how = "given"
    if gpu is None:
        gpu, how = detect_gpu()
    targets = meta.get("compute_capabilities") or []
    what = f"a {meta.get('flavour')} engine for {', '.join(targets) or '?'}"
    if gpu is None:
        return f"{what}; this machine has no CUDA GPU ({how})"
    if gpu not in targets:
        return f"{what}; it does not run on this GPU ({gpu})"
    return None


def check_runs_here(meta: dict, gpu: Optional[str] = None, what: str = "engine") -> None:
    """Refuse an engine whose targets do not include the GPU it would run on."""
    why = why_not_runs(meta, gpu)
    if why:
        raise BadInput(f"{what} is {why}")


def find_onnx(src_dir: Path) -> tuple[Path, dict]:
    """The export's ONNX file and its sidecar (export.json), if any."""
    # the export step's sidecar (visual.json), or a hand-made export.json
    meta_path = next((src_dir / n for n in ("visual.json", "export.json") if (src_dir / n).is_file()), src_dir / "export.json")
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise BadInput(f"{meta_path}: not JSON ({e})") from None
    if meta.get("onnx"):
        p = src_dir / meta["onnx"]
        if not p.is_file():
            raise BadInput(f"{meta_path} names {meta['onnx']}, which is not there")
        return p, meta
    found = sorted(src_dir.rglob("*.onnx"))
    if len(found) != 1:
        raise BadInput(f"{src_dir}: expected one .onnx export, found {len(found)}")
    return found[0], meta


def _dims(shape) -> list[int]:
    return [int(d) for d in shape]


class TensorRT(Backend):
    components = ("visual",)
    max_tp = 1

    @property
    def flavour(self) -> str:
        return self.name

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        try:
            import_flavour(self.name)
        except NotAvailable as e:
            return False, str(e)
        if component not in self.components:
            return False, f"{self.name} builds visual components (ONNX exports); LLMs build with tensorrt-llm"
        allowed = TARGETS[self.name]
        if allowed is not None and target not in allowed:
            return False, (f"{self.name} builds engines for {', '.join(allowed)}; target {target} is not one of "
                           f"them")
        return True, ""

    def toolchain(self, target: str) -> dict:
        _, dist, _ = FLAVOURS[self.name]
        return {"backend": self.name, dist: version_of(dist), "gpu_arch": target}

    @property
    def uses_timing_cache(self) -> bool:
        # TensorRT for RTX chooses kernels when the engine first runs on its
        # GPU; its builder says "the timing cache will not be used" and cannot
        # read back the (empty) cache it writes. Datacenter TensorRT times
        # tactics at build time, which is what the cache saves.
        return self.name != "tensorrt-rtx"

    def timing_cache_name(self, target: str) -> Optional[str]:
        if not self.uses_timing_cache:
            return None
        _, dist, _ = FLAVOURS[self.name]
        return f"timing-cache/{self.name}/{version_of(dist)}/{target}"

    # ------------------------------------------------------------------ build

    def profiles(self, network, export_meta: dict, limits: dict) -> dict[str, list[list[int]]]:
        """min/opt/max shape per input: batch from the limits, every other
        dynamic axis from the export's `profiles` (no guessing)."""
        given = export_meta.get("profiles") or {}
        # encoder inputs per call: the export's own bound (images, or tiles of them) where it gives one
        max_b = int(export_meta.get("max_batch_size") or limits.get("max_batch_size", 1))
        out = {}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = _dims(t.shape)
            if t.name in given:
                mn, opt, mx = (list(map(int, s)) for s in given[t.name])
            else:
                mn, opt, mx = list(shape), list(shape), list(shape)
                for ax, d in enumerate(shape):
                    if d != -1:
                        continue
                    if ax != 0:
                        raise BadInput(
                            f"ONNX input {t.name!r} has dynamic axis {ax} and the export gives no profile for it "
                            f"(export.json 'profiles': {{name: [min, opt, max]}})"
                        )
                    mn[ax], opt[ax], mx[ax] = 1, max(1, (max_b + 1) // 2), max_b
            out[t.name] = [mn, opt, mx]
        return out

    def build(self, req: BuildRequest) -> BuildResult:
        with tempfile.TemporaryDirectory(prefix="enginefarm-trt-") as tmp:
            out = Path(tmp) / "timing.cache"
            sidecar = self._build(req.component, Path(req.src_dir), Path(req.out_dir), req.variant, req.limits,
                                  req.progress, timing_cache=req.timing_cache, timing_cache_out=out)
            return BuildResult(sidecar, out.read_bytes() if out.is_file() else None)

    def _build(self, component: str, src_dir: Path, out_dir: Path, variant, limits: dict, progress=None,
              timing_cache: Optional[bytes] = None, timing_cache_out: Optional[Path] = None) -> dict:
        ok, why = self.usable(component, variant.target)
        if not ok:
            raise NotAvailable(why)
        trt = import_flavour(self.name)
        onnx_path, export_meta = find_onnx(Path(src_dir))
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        rtx = self.name == "tensorrt-rtx"
        strongly_typed = rtx or variant.dtype == "float32"
        flags = 0
        if hasattr(trt, "NetworkDefinitionCreationFlag") and strongly_typed and not rtx:
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BadInput(f"{onnx_path}: TensorRT ({self.name}) cannot parse this ONNX: {errs}")
        config = builder.create_builder_config()
        builder_flags: list[str] = []
        if not strongly_typed:
            flag = {"float16": "FP16", "bfloat16": "BF16"}.get(variant.dtype)
            if flag and hasattr(trt.BuilderFlag, flag):
                config.set_flag(getattr(trt.BuilderFlag, flag))
                builder_flags.append(flag)
        ccs: list[str] = []
        if rtx:
            cc = getattr(trt.ComputeCapability, "SM" + variant.target.removeprefix("sm_"))
            config.num_compute_capabilities = 1
            config.set_compute_capability(cc, 0)
            ccs = [variant.target]
        else:
            ccs = [variant.target]  # datacenter TensorRT builds for the GPU it runs on
        profile = builder.create_optimization_profile()
        shapes = self.profiles(network, export_meta, limits)
        for name, (mn, opt, mx) in shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
        if self.uses_timing_cache:
            config.set_timing_cache(config.create_timing_cache(timing_cache or b""), True)
        else:
            timing_cache = None
        if progress:
            progress(f"{self.name}: building {onnx_path.name} for {', '.join(ccs)} "
                     f"({'with' if timing_cache else 'without'} a timing cache)")
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if plan is None:
            raise BadInput(f"{self.name} could not build an engine from {onnx_path.name} (see the log above)")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ENGINE_FILE).write_bytes(bytes(plan))
        new_cache = bytes(config.get_timing_cache().serialize()) if self.uses_timing_cache else b""

        def io(t, kind):
            return {"name": t.name, "kind": kind, "shape": _dims(t.shape), "dtype": str(t.dtype).split(".")[-1]}

        _, dist, _ = FLAVOURS[self.name]
        meta: dict[str, Any] = {
            "format": "tensorrt-plan",
            "file": ENGINE_FILE,
            "device": "cuda",
            "target": variant.target,
            "flavour": self.name,
            "tensorrt_version": getattr(trt, "__version__", version_of(dist)),
            "compute_capabilities": ccs,
            "component": component,
            "dtype": export_meta.get("dtype") or variant.dtype,  # strongly typed (RTX): the export's own
            "strongly_typed": strongly_typed,
            "builder_flags": builder_flags,
            "profiles": shapes,
            "io": [io(network.get_input(i), "input") for i in range(network.num_inputs)]
            + [io(network.get_output(i), "output") for i in range(network.num_outputs)],
            "onnx": onnx_path.name,
            "build_seconds": round(seconds, 3),
            "timing_cache": ({"given_bytes": len(timing_cache or b""), "bytes": len(new_cache)}
                             if self.uses_timing_cache else "not used by tensorrt-rtx (kernels chosen at run time)"),
        }
        if export_meta.get("encoder_features"):  # the export step's facts: what a visual runner needs
            meta["visual"] = export_meta
            meta["max_batch_size"] = shapes[network.get_input(0).name][2][0]
            if export_meta.get("extras"):  # tensors the packing of features needs (LLaVA-NeXT: image_newline)
                shutil.copyfile(onnx_path.parent / export_meta["extras"], out_dir / export_meta["extras"])
        meta = write_sidecar(out_dir, meta).dump()
        if timing_cache_out is not None and self.uses_timing_cache:  # for the build step to keep in the store (not an engine file)
            Path(timing_cache_out).write_bytes(new_cache)
        return meta

    # ------------------------------------------------------------------ run

    def cannot_run(self, sidecar: dict, gpu: Optional[str] = None) -> Optional[str]:
        return why_not_runs(sidecar, gpu)

    def load(self, engine_dir: Path, device: str = "cuda", gpu: Optional[str] = None):
        """The engine, refused (naming its targets and the GPU) where it
        cannot run. A visual engine built from the export step comes as a
        `runtime.visual.VisualEngine` (what the multimodal pipeline takes);
        anything else as the bare TRTEngine (named tensors in and out)."""
        engine_dir = Path(engine_dir)
        side = read_sidecar(engine_dir)
        meta = side.dump()
        check_runs_here(meta, gpu, what=str(engine_dir))
        engine = TRTEngine(self.name, engine_dir / meta["file"], meta)
        if not meta.get("visual"):
            return engine
        from ..runtime.visual import VisualEngine

        extras = {}
        if meta["visual"].get("extras"):
            from safetensors.torch import load_file

            extras = load_file(str(engine_dir / meta["visual"]["extras"]))
        name_in, name_out = meta["visual"]["input"], meta["visual"]["output"]
        return VisualEngine(lambda x: engine(**{name_in: x})[name_out], side, extras)


class TRTEngine:
    """A deserialised engine run with torch CUDA tensors (one profile)."""

    def __init__(self, flavour: str, plan: Path, meta: dict):
        trt = import_flavour(flavour)
        self.meta = meta
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BadInput(f"{plan}: {flavour} could not deserialize this engine on this GPU")
        self.context = self.engine.create_execution_context()

    def __call__(self, **inputs):
        import torch

        stream = torch.cuda.current_stream()
        outs = {}
        for name, t in inputs.items():
            t = t.contiguous().cuda()
            inputs[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        dt = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
              "INT64": torch.int64}
        for io in self.meta["io"]:
            if io["kind"] != "output":
                continue
            shape = tuple(self.context.get_tensor_shape(io["name"]))
            outs[io["name"]] = torch.empty(shape, dtype=dt[io["dtype"]], device="cuda")
            self.context.set_tensor_address(io["name"], outs[io["name"]].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outs


def backend(name: str) -> TensorRT:
    return TensorRT(name)
