"""Weight-only quantized engines against the fp16 engine of the same model,
in the same run (issue 19: W8A16 and W4A16 decode vs fp16 at batch 1).

Every figure is `enginefarm bench --json`'s: one report for the fp16 variant
and one per quantized variant of the same recipe, benched on the same machine
minutes apart with the same sweep. The ratio is the fp16 engine's decode
ms/token over the quantized engine's (and likewise TTFT), row by row.

    python bench/quant_vs_fp16.py --fp16 FP16.json QUANT.json [QUANT.json ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Results, log, table  # noqa: E402


def point(r: dict) -> tuple:
    return r["batch"], r["input_len"], r["output_len"]


def ratios(fp16: dict, quant: dict) -> list[dict]:
    """One row per sweep point both reports hold."""
    base = {point(r): r["engine"] for r in fp16["rows"]}
    ref = quant.get("ref") or {}
    name = f"{ref.get('recipe')}:{ref.get('variant')}"
    rows = []
    for r in quant["rows"]:
        b = base.get(point(r))
        if b is None:
            continue
        e = r["engine"]
        rows.append({"variant": name, "batch": r["batch"], "input_len": r["input_len"], "output_len": r["output_len"],
                     "fp16_decode_ms": b["decode_ms_per_token"], "decode_ms": e["decode_ms_per_token"],
                     "decode_x": round(b["decode_ms_per_token"] / e["decode_ms_per_token"], 3),
                     "fp16_ttft_ms": b["ttft_ms"], "ttft_ms": e["ttft_ms"],
                     "ttft_x": round(b["ttft_ms"] / e["ttft_ms"], 3)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp16", required=True, help="`enginefarm bench --json` of the fp16 variant")
    ap.add_argument("quant", nargs="+", help="`enginefarm bench --json` of quantized variants of the same recipe")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    fp16 = json.loads(Path(a.fp16).read_text())
    quants = []
    for f in a.quant:  # a variant whose build or bench failed left no report: said, and the others still set out
        try:
            quants.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as e:
            log(f"{f}: no bench report ({e})")
    res = Results(a.out, "quant_vs_fp16")
    rows = [r for q in quants for r in ratios(fp16, q)]
    res["fp16_ref"] = fp16.get("ref")
    res["gpus"] = sorted({str(x.get("env", {}).get("gpu")) for x in [fp16, *quants]})  # one, for a fair ratio
    res["rows"] = rows
    if not rows:
        log("no sweep point is in both the fp16 report and a quantized one")
        sys.exit(1)
    log(table(rows, ["variant", "batch", "input_len", "output_len", "fp16_decode_ms", "decode_ms", "decode_x",
                     "fp16_ttft_ms", "ttft_ms", "ttft_x"]))
    log(f"GPU {', '.join(res['gpus'])}, {res['env']['date_utc']}")


if __name__ == "__main__":
    main()
