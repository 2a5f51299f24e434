"""Visual encoder engines on the GPU: CLIP ViT-L/14-336 (LLaVA-1.5's
encoder), random fp16 weights, against eager Hugging Face and the fp16
matrix-product roofline, in one run.

    python bench/gpu_visual.py --out DIR [--variants default,graphs,tuned] [--batches 1,8]

Variants (each an engine built by the aoti backend with the options the
recipe would give, `components.visual.aoti`):
  default   no options (what an untuned recipe builds)
  graphs    the default package, loaded with CUDA-graph capture
  cudnn     attention through cuDNN's fused kernel (+ graphs)
  tuned     max-autotune (Inductor's Triton templates with fused epilogues,
            autotuned against cuBLAS) + CUDA graphs
Each engine computes what the baseline computes (Hugging Face's
last_hidden_state) and is checked against it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import Results, cuda_time, log, matmul_tflops, median, table  # noqa: E402

VARIANTS = {
    "default": {},
    "graphs": {"cuda_graphs": True},
    "cudnn": {"attention": "cudnn", "cuda_graphs": True},
    "flash": {"attention": "flash", "cuda_graphs": True},
    "tuned": {"max_autotune": True, "cuda_graphs": True},
    "tuned-cudnn": {"max_autotune": True, "attention": "cudnn", "cuda_graphs": True},
}


def clip_flops(cfg, layers: int) -> float:
    """Multiply-adds x 2 of one image through `layers` layers (and the patch embedding)."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, (cfg.image_size // cfg.patch_size) ** 2 + 1
    patch = (n - 1) * d * 3 * cfg.patch_size ** 2 * 2
    per_layer = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * f + 2 * 2 * n * n * d
    return patch + layers * per_layer


def main():
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--variants", default="default,graphs,cudnn,tuned")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--deadline", type=float, default=540, help="skip variants that would start after this many s")
    ap.add_argument("--compile-only", help="only build the variants' engines into this directory")
    ap.add_argument("--prebuilt", help="time engines built earlier by --compile-only into this directory")
    a = ap.parse_args()
    from bench.models import hf_clip_vision
    from enginefarm.runtime.clip import ClipVisionTower
    from enginefarm.runtime.export import export_visual
    from enginefarm.runtime.visual import VisualEngine

    if a.compile_only:
        hf = hf_clip_vision()
        tower = ClipVisionTower.from_hf_vision(hf, feature_layer=-1, select="full").cuda()
        B = max(int(b) for b in a.batches.split(","))
        done = set()
        for name in a.variants.split(","):
            build_opts = {k: v for k, v in VARIANTS[name].items() if k != "cuda_graphs"}
            key = "-".join(f"{k}={v}" for k, v in sorted(build_opts.items())) or "default"
            if key in done:
                continue
            done.add(key)
            t0 = time.perf_counter()
            export_visual(tower, Path(a.compile_only) / key, B, hf.config.image_size, "cuda", torch.float16, build_opts, log)
            log(f"built {key} in {time.perf_counter() - t0:.0f}s")
        return
    res = Results(a.out, "visual")
    log(res["env"])
    peak = matmul_tflops()
    res["matmul_fp16_TFLOPs"] = round(peak, 1)
    batches = [int(b) for b in a.batches.split(",")]
    B = max(batches)
    hf = hf_clip_vision()
    cfg = hf.config
    flops = clip_flops(cfg, cfg.num_hidden_layers)
    res["model"] = {"name": "CLIP ViT-L/14-336 (random fp16)", "layers": cfg.num_hidden_layers,
                    "gflops_per_image": round(flops / 1e9, 1)}
    torch.manual_seed(1)
    pix = {b: torch.randn(b, 3, cfg.image_size, cfg.image_size, device="cuda", dtype=torch.float16) for b in batches}
    rows = []

    def record(variant, b, ms, extra=None):
        r = {"variant": variant, "batch": b, "ms": round(ms, 3),
             "roofline_ms": round(flops * b / (peak * 1e12) * 1e3, 3)}
        r["of_roofline"] = round(r["roofline_ms"] / ms, 3)
        eager = next((x["ms"] for x in rows if x["variant"] == "eager HF" and x["batch"] == b), None)
        if eager:
            r["speedup_vs_eager"] = round(eager / ms, 2)
        r.update(extra or {})
        rows.append(r)
        res["rows"] = rows
        log(r)

    # eager Hugging Face (its default attention: sdpa)
    ref = {}
    with torch.no_grad():
        for b in batches:
            ref[b] = hf(pixel_values=pix[b]).last_hidden_state.float()
            record("eager HF", b, median(cuda_time(lambda: hf(pixel_values=pix[b]), warmup=5, iters=a.iters)))
    tower = ClipVisionTower.from_hf_vision(hf, feature_layer=-1, select="full").cuda()
    with torch.no_grad():
        for b in batches:
            err = ((tower(pix[b]).float() - ref[b]).norm() / ref[b].norm()).item()
            record("eager farm module", b, median(cuda_time(lambda: tower(pix[b]), warmup=5, iters=a.iters)),
                   {"rel_err_vs_hf": err})
    built = {}
    for name in a.variants.split(","):
        opts = VARIANTS[name]
        if res.elapsed() > a.deadline:
            log(f"skipping {name}: past the deadline")
            continue
        try:
            build_opts = {k: v for k, v in opts.items() if k != "cuda_graphs"}
            key = tuple(sorted(build_opts.items()))
            pre = Path(a.prebuilt or "/nonexistent") / ("-".join(f"{k}={v}" for k, v in key) or "default")
            if key not in built and (pre / "engine.json").exists():
                built[key] = (str(pre), json.loads((pre / "engine.json").read_text())["timings"].get("compile_s"), None)
            if key not in built:
                d = tempfile.mkdtemp(prefix=f"visual-{name}-")
                t0 = time.perf_counter()
                sc = export_visual(tower, Path(d), B, cfg.image_size, "cuda", torch.float16, build_opts, log)
                built[key] = (d, round(time.perf_counter() - t0, 1), sc.timings)
            d, build_s, timings = built[key]
            eng = VisualEngine.load(d, cuda_graphs=opts.get("cuda_graphs", False)).on_device
            for b in batches:
                out = eng(pix[b]).float()
                err = ((out - ref[b]).norm() / ref[b].norm()).item()
                ms = median(cuda_time(lambda: eng(pix[b]), warmup=5, iters=a.iters))
                record(name, b, ms, {"rel_err_vs_hf": round(err, 5), "build_s": build_s, "options": opts})
            del eng
        except Exception:  # noqa: BLE001
            err = traceback.format_exc()
            log(err)
            rows.append({"variant": name, "error": err[-1500:]})
            res["rows"] = rows
    log(table([r for r in rows if "ms" in r],
              ["variant", "batch", "ms", "speedup_vs_eager", "roofline_ms", "of_roofline", "rel_err_vs_hf", "build_s"]))
    goals = {1: 3.0, 8: 5.0}
    for b, g in goals.items():
        best = min((r for r in rows if r.get("batch") == b and "ms" in r and not r["variant"].startswith("eager")),
                   key=lambda r: r["ms"], default=None)
        if best:
            log(f"batch {b}: best {best['variant']} {best['ms']} ms (goal {g} ms: {'met' if best['ms'] <= g else 'missed by ' + str(round(best['ms'] - g, 2)) + ' ms'}), "
                f"{best.get('speedup_vs_eager')}x eager, {best['of_roofline']:.0%} of the fp16 roofline")
    res["goals"] = goals
    log(f"elapsed {res.elapsed():.0f}s")


if __name__ == "__main__":
    main()
