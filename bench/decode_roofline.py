"""The decode rate of a published fp16 decoder-only engine against the GPU's
memory roofline, measured in the same run (issue 19: LLaMA-7B-shaped fp16
decode at batch 1, as a share of the HBM roofline).

The engine's figure is `enginefarm bench --json`'s batch-1 decode rate. The
roofline is the bytes one decode step must read (every weight of the model
once: the layers, the final norm and the LM head; one row of the embedding
table, which is left out) over the device-to-device copy bandwidth (bytes read
plus written per second) measured here, in the same run.

    python bench/decode_roofline.py --src CKPT --bench BENCH.json [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Results, copy_bandwidth, log, table  # noqa: E402

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def weight_bytes(src: Path, dtype: str) -> tuple[int, int]:
    """(bytes a decode step reads, parameters) from the checkpoint's safetensors headers."""
    from safetensors import safe_open

    total, params = 0, 0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                n = 1
                for d in s.get_slice(k).get_shape():
                    n *= d
                params += n
                if "embed_tokens" not in k:
                    total += n * DTYPE_BYTES[dtype]
    return total, params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="the ref's Hugging Face checkpoint directory")
    ap.add_argument("--bench", required=True, help="`enginefarm bench --json` output for that ref")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    report = json.loads(Path(a.bench).read_text())
    dtype = report.get("engine", {}).get("dtype") or "float16"
    nbytes, params = weight_bytes(Path(a.src), dtype)
    res = Results(a.out, "decode_roofline")
    bw = copy_bandwidth()
    rows = []
    for r in report["rows"]:
        if r["batch"] != 1:
            continue
        ms = r["engine"]["decode_ms_per_token"]
        floor_ms = nbytes / (bw * 1e9) * 1e3
        rows.append({"input_len": r["input_len"], "output_len": r["output_len"], "decode_ms": ms,
                     "roofline_ms": round(floor_ms, 4), "of_roofline": round(floor_ms / ms, 4)})
    res["weights"] = {"parameters": params, "bytes_per_token": nbytes, "dtype": dtype}
    res["copy_bandwidth_GBps"] = round(bw, 1)
    res["engine_ref"] = report.get("ref")
    res["rows"] = rows
    log(f"{params / 1e9:.3f} B parameters, {nbytes / 1e9:.3f} GB read per token; copy bandwidth {bw:.0f} GB/s")
    log(table(rows, ["input_len", "output_len", "decode_ms", "roofline_ms", "of_roofline"]))
    log(f"GPU {res['env'].get('gpu')}, {res['env']['date_utc']}")


if __name__ == "__main__":
    main()
