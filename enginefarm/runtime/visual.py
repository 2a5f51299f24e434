"""Running a built visual engine: pixel_values [B, 3, S, S] -> features
[B, F, LLM hidden], from the engine files alone. Two formats: an aoti
package (.pt2) and an ONNX export served by ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BadInput
from .engine import DTYPES, load_aoti


class VisualEngine:
    def __init__(self, runner, sidecar: dict, extras: dict | None = None):
        self.run = runner
        self.meta = sidecar
        self.visual = sidecar["visual"]  # the export's facts: features, hidden size, image size, image token ...
        self.device = sidecar.get("device", "cpu")
        self.extras = extras or {}  # tensors the packing of features needs (LLaVA-NeXT: image_newline)

    @classmethod
    def load(cls, engine_dir: str | Path) -> "VisualEngine":
        engine_dir = Path(engine_dir)
        meta = json.loads((engine_dir / "engine.json").read_text())
        fmt = meta.get("format")
        if fmt == "aoti-pt2":
            runner = load_aoti(engine_dir, meta)
        elif fmt == "tensorrt-plan":  # its backend runs it, or refuses naming the engine's GPUs and this one
            from ..backends import get_backend

            return get_backend(meta.get("flavour", "tensorrt")).load(engine_dir)
        elif fmt == "onnx":
            runner = _OrtRunner(engine_dir / meta["file"], meta["inputs"][0]["name"])
        else:
            raise BadInput(f"{engine_dir} holds a {fmt} engine, which this runner cannot run")
        extras = {}
        if meta["visual"].get("extras"):
            from safetensors.torch import load_file

            extras = load_file(str(engine_dir / meta["visual"]["extras"]))
        return cls(runner, meta, extras)

    @property
    def max_batch_size(self) -> int:
        return self.meta["max_batch_size"]

    @property
    def features(self) -> int:
        """per encoder input (an image, or a tile)"""
        return self.visual["encoder_features"]

    @property
    def image_size(self) -> "int | list[int]":
        return self.visual["image_size"]

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        if B > self.max_batch_size:
            raise BadInput(f"{B} inputs in one call, but the visual engine was built for batches up to {self.max_batch_size}")
        from ..images import image_hw

        want = (3, *image_hw(self.image_size))
        if tuple(pixel_values.shape[1:]) != want:
            raise BadInput(f"pixel_values of shape {tuple(pixel_values.shape[1:])} per image, but the visual engine "
                           f"takes {want}")
        x = pixel_values.to(self.device, DTYPES[self.meta["dtype"]])
        out = self.run(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float().cpu()


class _OrtRunner:
    def __init__(self, path: Path, input_name: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = input_name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
