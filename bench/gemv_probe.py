"""Batch-1 decode products of a LLaMA-7B layer (fp16, M = 1): cuBLAS (F.linear)
against Inductor's code for the same product with coordinate-descent tuning on
(the setting gpt-fast compiles its decode step with), in one run. Prints each
shape's time and achieved bytes per second against the copy bandwidth measured
in the same run: which lever closes the engine's gap to gpt-fast.

    python bench/gemv_probe.py [--out DIR]
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import Results, copy_bandwidth, cuda_time, log, median, table  # noqa: E402

REPS = 20  # products per CUDA-graph replay: launch costs out of the timing


def graphed(fn):
    """fn() REPS times, captured in one CUDA graph: the replay's time over REPS."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    return median(cuda_time(g.replay, warmup=3, iters=20)) / REPS


SHAPES = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008),
          ("lm_head", 32000, 4096)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    import torch._inductor.config as ic

    res = Results(a.out, "gemv_probe")
    bw = copy_bandwidth()
    rows = []
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        nbytes = n * k * 2
        ms_cublas = graphed(lambda: F.linear(x, w))
        ic.coordinate_descent_tuning = True
        torch._dynamo.reset()
        f = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs")
        f(x, w)
        ms_cdt = graphed(lambda: f(x, w))
        ic.coordinate_descent_tuning = False
        rows.append({"product": name, "n": n, "k": k, "cublas_ms": round(ms_cublas, 4), "cdt_ms": round(ms_cdt, 4),
                     "cublas_of_bw": round(nbytes / (ms_cublas * 1e-3) / 1e9 / bw, 3),
                     "cdt_of_bw": round(nbytes / (ms_cdt * 1e-3) / 1e9 / bw, 3)})
        res["rows"] = rows
        del w, x
    res["copy_bandwidth_GBps"] = round(bw, 1)
    log(f"copy bandwidth {bw:.0f} GB/s")
    log(table(rows, ["product", "n", "k", "cublas_ms", "cdt_ms", "cublas_of_bw", "cdt_of_bw"]))
    log(f"GPU {res['env'].get('gpu')}, {res['env']['date_utc']}")


if __name__ == "__main__":
    main()
