"""Multimodal end to end on the GPU: a LLaVA-1.5-7B-shaped pipeline (CLIP
ViT-L/14-336 visual engine -> projector -> LLaMA-7B LLM engine with the
visual features in its prompt table), random fp16 weights made on the
device, against eager Hugging Face LlavaForConditionalGeneration.generate
on the same inputs, in one run: time to first token (image encoding +
prefill + first token) and decode tokens/s.

    python bench/gpu_llava.py --out DIR [--batches 1,4] [--new-tokens 64] [--llm-layers 32]

The LLM engine's packages (general step with a prompt table of
batch x 576 rows, decode step) compile in child processes as in
bench/gpu_llm.py; the visual engine is built in this process.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import Results, cuda_time, log, median, table  # noqa: E402

N_IMG = 576  # LLaVA-1.5: (336 / 14)^2 patch features per image


def prompt_ids(batch: int, text_before: int, text_after: int, image_token: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        a = torch.randint(3, 32000, (text_before,), generator=g)
        b = torch.randint(3, 32000, (text_after,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), a, torch.full((N_IMG,), image_token), b]))
    return torch.stack(rows).cuda()


def engine_ids(ids, image_token: int, vocab: int):
    """Image-token positions -> prompt-table rows (ids >= vocab), image i of the batch at rows i*576..."""
    out = ids.clone()
    for i in range(ids.shape[0]):
        pos = (ids[i] == image_token).nonzero().flatten()
        out[i, pos] = vocab + i * N_IMG + torch.arange(len(pos), device=ids.device)
    return out


def main():
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--llm-layers", type=int, default=32)
    ap.add_argument("--attention", default="auto", help="visual engine attention kernel (AotiOptions.attention)")
    ap.add_argument("--child-timeout", type=float, default=420)
    ap.add_argument("--wait-for", help="before timing, wait for this file (a compile running beside this run) ...")
    ap.add_argument("--wait-max", type=float, default=120, help="... at most this many seconds")
    a = ap.parse_args()
    from bench.gpu_llm import engine_from_parts, start_children
    from bench.models import decoder_from_hf, hf_llava, llama_state
    from enginefarm.runtime.clip import ClipVisionTower
    from enginefarm.runtime.export import export_visual
    from enginefarm.runtime.swaps import prepare_engine
    from enginefarm.runtime.visual import VisualEngine

    res = Results(a.out, "llava")
    log(res["env"])
    batches = [int(b) for b in a.batches.split(",")]
    B = max(batches)
    vocab = 32064
    text_before, text_after = 5, 12
    T = 1 + text_before + N_IMG + text_after
    limits = {"max_batch_size": B, "max_input_len": T, "max_seq_len": T + a.new_tokens + 8,
              "vocab": vocab, "table_rows": B * N_IMG}
    work = Path(tempfile.mkdtemp(prefix="llava-engines-"))
    procs = start_children(work, a.llm_layers, limits, [("none", "general"), ("none", "decode")])
    hf = hf_llava(llm_layers=a.llm_layers)
    image_token = hf.config.image_token_index
    t0 = time.perf_counter()
    tower = ClipVisionTower.from_hf_vision(hf.model.vision_tower, hf.model.multi_modal_projector,
                                           feature_layer=hf.config.vision_feature_layer, select="patch").cuda()
    vdir = work / "visual"
    vsc = export_visual(tower, vdir, B, 336, "cuda", torch.float16, {"attention": a.attention}, log)
    res["visual_build_s"] = round(time.perf_counter() - t0, 1)
    deadline = time.time() + a.child_timeout
    for quant, which, p, logf in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
        logf.close()
        log(f"child {which}: rc {p.returncode}")
    if a.wait_for:  # nothing compiles beside the timings
        t_w = time.time()
        while not Path(a.wait_for).exists() and time.time() - t_w < a.wait_max:
            time.sleep(1)
        log(f"waited {time.time() - t_w:.0f}s for {a.wait_for} ({'there' if Path(a.wait_for).exists() else 'not there'})")
    llm = prepare_engine(decoder_from_hf(hf.config.text_config.to_dict(), llama_state(hf), "none"))
    eng = engine_from_parts(work / "none", llm, "none")
    vis = VisualEngine.load(vdir, cuda_graphs=True).on_device
    res["compile"] = {"visual": vsc.timings, "llm": eng.meta.timings}
    rows = []
    for b in batches:
        try:
            ids = prompt_ids(b, text_before, text_after, image_token, vocab, seed=b)
            px = torch.randn(b, 3, 336, 336, device="cuda", dtype=torch.float16)
            mask = torch.ones_like(ids)

            def hf_gen(n):
                return hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False)

            with torch.no_grad():
                hf_gen(2)
                t1 = median(cuda_time(lambda: hf_gen(1), warmup=1, iters=3))
                tn = median(cuda_time(lambda: hf_gen(a.new_tokens), warmup=0, iters=2))
                ref = hf_gen(a.new_tokens)[0, ids.shape[1]:].tolist()
            eager = {"ttft_ms": round(t1, 2), "decode_ms_per_token": round((tn - t1) / (a.new_tokens - 1), 3)}
            eids = engine_ids(ids, image_token, vocab)

            def pipeline(events=None):
                feats = vis(px)  # [b, 576, 4096] (the graph's buffer)
                table_ = feats.reshape(-1, feats.shape[-1])
                return eng.generate_ids(eids, a.new_tokens, prompt_table=table_, events=events)

            pipeline()
            ttft, dec = [], []
            for _ in range(3):
                s0 = torch.cuda.Event(enable_timing=True)
                s0.record()
                ev = {}
                toks = pipeline(ev)
                ev["end"].synchronize()
                ttft.append(s0.elapsed_time(ev["first"]))
                dec.append(ev["first"].elapsed_time(ev["end"]) / (a.new_tokens - 1))
            ours = {"ttft_ms": round(median(ttft), 2), "decode_ms_per_token": round(median(dec), 3)}
            same = sum(int(x == y) for x, y in zip(toks[0].tolist(), ref))
            for name, r in (("eager HF LLaVA generate", eager), ("aoti visual + llm engines", ours)):
                rows.append({"pipeline": name, "batch": b, **r,
                             "tokens_per_s_per_user": round(1000 / r["decode_ms_per_token"], 1),
                             "tokens_per_s": round(b * 1000 / r["decode_ms_per_token"], 1)})
            rows[-1]["ttft_speedup"] = round(eager["ttft_ms"] / ours["ttft_ms"], 2)
            rows[-1]["decode_speedup"] = round(eager["decode_ms_per_token"] / ours["decode_ms_per_token"], 2)
            rows[-1]["greedy_match_first_seq"] = f"{same}/{len(ref)}"
        except Exception:  # noqa: BLE001
            rows.append({"pipeline": "aoti", "batch": b, "error": traceback.format_exc()[-2000:]})
            log(rows[-1]["error"])
        res["rows"] = rows
        log(rows[-2:] if "error" not in rows[-1] else rows[-1])
    log(table(rows, ["pipeline", "batch", "ttft_ms", "decode_ms_per_token", "tokens_per_s_per_user", "tokens_per_s",
                     "ttft_speedup", "decode_speedup", "greedy_match_first_seq"]))
    log(f"GPU {res['env'].get('gpu')}, {res['env']['date_utc']}; elapsed {res.elapsed():.0f}s")


if __name__ == "__main__":
    main()
