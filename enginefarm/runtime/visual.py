"""Running a built visual engine: pixel_values [B, 3, H, W] -> features
[B, F, LLM hidden], from the engine files alone. Its runner is an aoti
package (.pt2), an ONNX export served by ONNX Runtime, or what another
backend hands it (a TensorRT plan); on CUDA, each batch size's call can be
one CUDA-graph replay (recipe option `aoti.cuda_graphs`). An engine built
with `aoti.static_batches` holds one package per batch size: a call runs
the smallest that holds it, zero-padded, and returns its own rows."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInput
from . import sidecar as sc
from .engine import DTYPES, check_runs_here, load_runner, load_weights


class VisualEngine:
    def __init__(self, runner, sidecar: sc.Sidecar, extras: dict | None = None, cuda_graphs: bool = False,
                 per_batch: dict | None = None):
        """per_batch: {batch size: runner} of an engine built with static_batches (runner: the largest's)."""
        sidecar.need("max_batch_size", "dtype")
        self.run = runner
        self.per_batch = dict(sorted((per_batch or {}).items()))
        self.meta = sidecar
        self.visual = sidecar.visual or {}  # the export's facts: features, hidden size, image size, image token ...
        self.device = sidecar.device
        self.extras = extras or {}  # tensors the packing of features needs (LLaVA-NeXT: image_newline)
        self.cuda_graphs = bool(cuda_graphs) and self.device == "cuda"
        self._graphs: dict[int, tuple] = {}

    @classmethod
    def load(cls, engine_dir: str | Path, meta: sc.Sidecar | None = None, cuda_graphs: bool | None = None) -> "VisualEngine":
        engine_dir = Path(engine_dir)
        meta = meta or sc.read(engine_dir)
        per_batch = {}
        if meta.format == "aoti-pt2":
            check_runs_here(engine_dir, meta)
            per_batch = {int(k[len("batch_"):]): load_runner(engine_dir / f)
                         for k, f in meta.files.items() if k.startswith("batch_")}
            if "weights" in meta.files:  # static packages: one copy of the weights, handed to each
                load_weights(list(per_batch.values()), engine_dir / meta.files["weights"], meta.device)
            runner = per_batch.get(meta.max_batch_size) or load_runner(engine_dir / meta.file)
        elif meta.format == "onnx":
            runner = _OrtRunner(engine_dir / meta.file, meta.inputs[0].name)
        else:
            raise BadInput(f"{engine_dir} holds a {meta.format} engine, which this runner cannot run")
        extras = {}
        if (meta.visual or {}).get("extras"):
            from safetensors.torch import load_file

            extras = load_file(str(engine_dir / meta.visual["extras"]))
        if cuda_graphs is None:
            cuda_graphs = (meta.options or {}).get("cuda_graphs", False)
        return cls(runner, meta, extras, cuda_graphs, per_batch)

    @property
    def max_batch_size(self) -> int:
        return self.meta.max_batch_size

    @property
    def features(self) -> int:
        """per encoder input (an image, or a tile)"""
        return self.visual["encoder_features"]

    @property
    def image_size(self) -> "int | list[int]":
        if "image_size" in self.visual:
            return self.visual["image_size"]
        return list(self.meta.inputs[0].shape[2:])  # [height, width]

    def _call(self, x):
        run = self.per_batch.get(x.shape[0], self.run)
        loader = getattr(run, "loader", None)
        out = loader.boxed_run([x]) if loader is not None else run(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def _padded(self, x):
        """x zero-padded to the smallest batch size a static package is built for (x itself without them)."""
        B = x.shape[0]
        b = next((b for b in self.per_batch if b >= B), B)
        return x if b == B else torch.cat([x, x.new_zeros((b - B, *x.shape[1:]))])

    @torch.no_grad()
    def on_device(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features [B, n, d] where the engine runs, in its dtype. With CUDA
        graphs the result is the graph's output buffer: read it (or clone it)
        before the next call."""
        B = pixel_values.shape[0]
        if B > self.max_batch_size:
            raise BadInput(f"{B} inputs in one call, but the visual engine was built for batches up to {self.max_batch_size}")
        from ..images import image_hw

        want = (3, *image_hw(self.image_size))
        if tuple(pixel_values.shape[1:]) != want:
            raise BadInput(f"pixel_values of shape {tuple(pixel_values.shape[1:])} per image, but the visual engine "
                           f"takes {want}")
        x = self._padded(pixel_values.to(self.device, DTYPES[self.meta.dtype]))
        if not self.cuda_graphs:
            return self._call(x)[:B]
        g = self._graphs.get(x.shape[0])
        if g is None:
            static = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # warm-up outside the capture
                    self._call(static)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._call(static)
            g = self._graphs[x.shape[0]] = (graph, static, out)
        graph, static, out = g
        static.copy_(x)
        graph.replay()
        return out[:B]

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features [B, n, d], float32 on the CPU."""
        return self.on_device(pixel_values).float().cpu()


class _OrtRunner:
    def __init__(self, path: Path, input_name: str):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = input_name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
