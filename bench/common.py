"""Shared helpers of the GPU benchmarks: device facts, timing, result files.

Every benchmark measures its baseline in the same run, on the same GPU,
and writes its numbers (with the GPU's name, the versions and the date) to
a JSON file and a table. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def env_info() -> dict:
    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), capability=f"sm_{p.major}{p.minor}")
    return info


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> list[float]:
    """Milliseconds of each of `iters` calls of fn (CUDA events), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


def copy_bandwidth(gib: float = 2.0, iters: int = 20) -> float:
    """Device-to-device copy, bytes read plus written per second (GB/s)."""
    n = int(gib * 2**30)
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    ms = median(cuda_time(lambda: b.copy_(a), warmup=3, iters=iters))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, iters: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    ms = median(cuda_time(lambda: a @ b, warmup=3, iters=iters))
    del a, b
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


class Results:
    """Results written as they come (a run cut short keeps what it measured)."""

    def __init__(self, out_dir: str | None, name: str):
        self.dir = Path(out_dir or os.environ.get("OUT") or ".")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.json"
        self.data: dict = {"env": env_info()}
        self.t0 = time.perf_counter()
        self.save()

    def __setitem__(self, k, v):
        self.data[k] = v
        self.save()

    def __getitem__(self, k):
        return self.data[k]

    def get(self, k, default=None):
        return self.data.get(k, default)

    def save(self):
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def log(*a):
    print(*a, file=sys.stdout, flush=True)


def table(rows: list[dict], cols: list[str]) -> str:
    w = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(w[c]) for c in cols), "  ".join("-" * w[c] for c in cols)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(w[c]) for c in cols))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
