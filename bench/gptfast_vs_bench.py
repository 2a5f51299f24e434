"""gpt-fast against the product's own engine, on the same weights, in one run.

The engine's figures come from `enginefarm bench --json` on a published
LLaMA-7B-shaped ref (bench/gpu_product.sh llama7b, then bench7b). This script
writes that ref's source checkpoint in gpt-fast's layout (bench/gpu_gptfast.py
write_checkpoint: its converter's names and q/k permutation, bf16, a
SentencePiece tokenizer trained here), runs gpt-fast's generate.py as its
README does (--compile) with a synthetic prompt of each bench row's input
length and the row's output length, and prints the ratio of the engine's end
to end rate (`e2e_tokens_per_s`: new tokens over the whole generation, prefill
included) to gpt-fast's "Average tokens/sec" (counted the same way).

gpt-fast's sources are not part of this repository (see bench/gpu_gptfast.py).

    python bench/gptfast_vs_bench.py --src CKPT --bench BENCH.json --gptfast DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import Results, log, table  # noqa: E402
from bench.gpu_gptfast import run_gptfast, write_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="the ref's Hugging Face checkpoint directory")
    ap.add_argument("--bench", required=True, help="`enginefarm bench --json` output for that ref")
    ap.add_argument("--gptfast", required=True, help="directory holding gpt-fast's model.py, generate.py, ...")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--ckpt-dir", default=None, help="where gpt-fast's checkpoint is written (default: a temporary "
                    "directory; a 7B model's needs 13.5 GB)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    report = json.loads(Path(a.bench).read_text())
    rows = [r for r in report["rows"] if r["batch"] == 1]
    if not rows:
        raise SystemExit(f"{a.bench}: no batch-1 row (gpt-fast's generate.py runs batch 1)")
    res = Results(a.out, "gptfast_vs_bench")
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.float16).cuda().eval()
    ckpt = write_checkpoint(hf, Path(tempfile.mkdtemp(prefix="gf-ckpt-", dir=a.ckpt_dir)))
    del hf
    torch.cuda.empty_cache()
    log(f"gpt-fast checkpoint written in {time.perf_counter() - t0:.0f}s")
    out = []
    for r in rows:
        g = run_gptfast(Path(a.gptfast).resolve(), ckpt, r["output_len"], a.samples, 400, prompt=r["input_len"])
        e = r["engine"]["e2e_tokens_per_s"]
        row = {"input_len": r["input_len"], "output_len": r["output_len"], "engine_e2e_tok_s": e,
               "engine_decode_tok_s": r["engine"]["tokens_per_s"], "engine_ttft_ms": r["engine"]["ttft_ms"],
               "gptfast_tok_s": g.get("tokens_per_s"), "gptfast_compile_s": g.get("compile_s"), "gptfast_rc": g["rc"]}
        if g.get("tokens_per_s"):
            row["engine_vs_gptfast"] = round(e / g["tokens_per_s"], 3)
        if g.get("tail"):
            log(g["tail"])
        out.append(row)
        res["rows"] = out
    res["engine_ref"] = report["ref"]
    res["engine_env"] = report["env"]
    log(table(out, ["input_len", "output_len", "engine_e2e_tok_s", "engine_decode_tok_s", "engine_ttft_ms",
                    "gptfast_tok_s", "engine_vs_gptfast", "gptfast_compile_s", "gptfast_rc"]))
    log(f"GPU {res['env'].get('gpu')}, {res['env']['date_utc']}; elapsed {res.elapsed():.0f}s")


if __name__ == "__main__":
    main()
