"""TensorRT timing cache: a nightly rebuild after a weight change, with the
cache the first build left in the store, against the same rebuild without it.

Exports a ViT-B/16-shaped encoder (random weights, 224 px, 12 layers) to
ONNX, builds it (flavour from --flavour, default tensorrt-rtx; target from
--target), then changes the weights (same shapes), re-exports and builds it
again with and without the first build's timing cache, alternating, and
prints the median times and the ratio cached / uncached.

    .venv/bin/python bench/timing_cache.py [--flavour tensorrt-rtx] [--target sm_86] [--repeat 3]

TensorRT for RTX on a machine without a GPU times no tactics (kernels are
chosen when the engine first runs), so its cache stays near-empty and the
ratio is expected near 1.0 there; on a GPU machine with datacenter TensorRT
the cache skips the tactic timing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def export(dest: Path, seed: int, layers: int) -> Path:
    import torch

    torch.manual_seed(seed)

    class ViT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 768, 16, 16)
            self.pos = torch.nn.Parameter(torch.randn(1, 196, 768) * 0.02)
            self.enc = torch.nn.TransformerEncoder(
                torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True, norm_first=True), layers)

        def forward(self, pixel_values):
            return self.enc(self.patch(pixel_values).flatten(2).transpose(1, 2) + self.pos)

    dest.mkdir(parents=True, exist_ok=True)
    # (grad enabled: keeps PyTorch's fused encoder fast path, which ONNX cannot export, out of the trace)
    torch.onnx.export(ViT().eval(), (torch.randn(1, 3, 224, 224),), str(dest / "visual.onnx"),
                      input_names=["pixel_values"], output_names=["features"],
                      dynamic_axes={"pixel_values": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavour", default="tensorrt-rtx")
    ap.add_argument("--target", default="sm_86")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    from enginefarm.backends import get_backend
    from enginefarm.backends.base import BuildRequest
    from enginefarm.spec import Variant

    b = get_backend(a.flavour)
    ok, why = b.usable("visual", a.target)
    if not ok:
        raise SystemExit(why)
    v = Variant(name="bench", backend=a.flavour, dtype="float16", quant="none", tp=1, target=a.target)
    limits = {"max_batch_size": 8}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first = export(tmp / "night1", 1, a.layers)
        t0 = time.perf_counter()
        cache = b.build(BuildRequest("visual", first, tmp / "e0", v, limits)).timing_cache or b""
        print(f"first build: {time.perf_counter() - t0:.2f} s, timing cache {len(cache)} bytes"
              + ("" if b.timing_cache_name(a.target) else f" ({a.flavour} keeps none: kernels are chosen at run time)"))
        second = export(tmp / "night2", 2, a.layers)  # new weights, same shapes
        times = {"with cache": [], "without": []}
        for r in range(a.repeat):
            for name, tc in (("with cache", cache), ("without", None)):
                t0 = time.perf_counter()
                b.build(BuildRequest("visual", second, tmp / f"e-{r}-{name[:4]}", v, limits, timing_cache=tc))
                times[name].append(time.perf_counter() - t0)
        w, wo = statistics.median(times["with cache"]), statistics.median(times["without"])
        print(f"rebuild after a weight change ({a.flavour}, {a.target}, median of {a.repeat}): "
              f"with cache {w:.2f} s, without {wo:.2f} s, ratio {w / wo:.2f}")


if __name__ == "__main__":
    main()
