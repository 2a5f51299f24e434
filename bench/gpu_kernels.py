"""Decode kernels on the GPU: achieved bandwidth of each weight format's
skinny product at LLaMA-7B's shapes, against the device's copy bandwidth
and against the library alternatives, in the same run.

Per shape, the product runs over enough distinct weight matrices (one per
layer, as at decode) that nothing is served from L2, inside one CUDA graph
(no launch gaps); time per product and bytes per product give GB/s.

    python bench/gpu_kernels.py --out DIR [--sweep] [--engine-check]

--sweep times a grid of launch configurations of kernels/gemv.py (the
default configuration is always timed); --engine-check (alone) builds small
(2-layer, 7B-wide) engines of each format through the aoti backend and
checks them against the eager model (logits, greedy tokens, CUDA-graph
decode).
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import Results, copy_bandwidth, cuda_time, log, matmul_tflops, median, table  # noqa: E402

SHAPES = {  # name: (N, K) of LLaMA-7B's decode products (engine form: fc and gate fused)
    "qkv": (12288, 4096),
    "dense": (4096, 4096),
    "fc_gate": (22016, 4096),
    "proj": (4096, 11008),
    "lm_head": (32000, 4096),
}


def graph_time(fns, reps: int = 20) -> float:
    """Median ms of one replay of a CUDA graph that runs every fn once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return median(cuda_time(g.replay, warmup=3, iters=reps))


def make_weights(bits, n, k, count, group=0):
    """count engine-layout weights (and scales) of one shape, random."""
    from enginefarm.kernels import gemv as G

    out = []
    for _ in range(count):
        if bits == 16:
            out.append((torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02, None))
        else:
            lim = 127 if bits == 8 else 7
            q = torch.randint(-lim - 1, lim + 1, (k, n), device="cuda", dtype=torch.int8)
            s = torch.rand((k // group, n) if group else (n,), device="cuda", dtype=torch.float16) * 0.01 + 1e-3
            out.append(G.pack_weight(q, s, bits))
    return out


def nbytes(w, s):
    return w.numel() * w.element_size() + (s.numel() * s.element_size() if s is not None else 0)


def check_one(bits, group, cfg, m=1, n=4096, k=4096):
    """Relative error of one configuration against the fp32 reference."""
    from enginefarm.kernels import gemv as G

    (w, s), = make_weights(bits, n, k, 1, group)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = G.reference(x, w, s, bits)
    y = G.launch(x, w, s, bits, cfg).sum(0)
    return ((y - ref).norm() / ref.norm()).item()


def bench_gemv(res, sweep: bool, M: int = 1, deadline: float = 1e9):
    from enginefarm.kernels import gemv as G

    rows = []
    formats = [(16, 0), (8, 0), (4, 0)] + ([(4, 128)] if os.environ.get("GEMV_GROUPS") else [])
    for (bits, group), (name, (n, k)) in itertools.product(formats, SHAPES.items()):
        if name == "lm_head" and bits != 16:
            continue
        per = n * k * bits // 8
        count = max(4, min(32, int(600e6 // per)))
        ws = make_weights(bits, n, k, count, group)
        x = torch.randn(M, k, device="cuda", dtype=torch.float16)
        b = sum(nbytes(w, s) for w, s in ws) / count
        fmt = f"fp16" if bits == 16 else f"int{bits}" + (f"g{group}" if group else "")

        def rec(impl, ms, cfg=None):
            r = {"format": fmt, "shape": name, "n": n, "k": k, "m": M, "impl": impl, "us": round(ms * 1000 / count, 2),
                 "GBps": round(b / (ms * 1e-3 / count) / 1e9, 1), **({"cfg": cfg} if cfg else {})}
            rows.append(r)
            return r

        # the farm's kernel, default configuration
        cfg = G.default_config(bits, n, k, group)
        try:
            ms = graph_time([lambda w=w, s=s: G.launch(x, w, s, bits, cfg) for w, s in ws])
            rec("triton-default", ms, str(cfg))
        except Exception as e:  # noqa: BLE001
            rows.append({"format": fmt, "shape": name, "impl": "triton-default", "error": repr(e)[:300]})
        if sweep and res.elapsed() < deadline:
            # stage 1: the conversion and operand order, at the default blocks; stage 2: the blocks
            variants = [(1, False), (1, True)] if bits == 16 else [(c, sw) for c in (1, 2) for sw in (False, True)]
            stage1 = []
            for conv, swap in variants:
                c = G.GemvConfig(cfg.block_n, cfg.block_k, cfg.split_k, 4, 4, conv, swap)
                try:
                    ms = graph_time([lambda w=w, s=s: G.launch(x, w, s, bits, c) for w, s in ws], reps=10)
                    err = check_one(bits, group, c)
                except Exception as e:  # noqa: BLE001
                    rows.append({"format": fmt, "shape": name, "impl": f"conv{conv} swap{swap}", "error": repr(e)[:300]})
                    continue
                rec(f"triton conv{conv} swap{int(swap)}", ms, str(c))["rel_err"] = err
                if err < 3e-3:
                    stage1.append((ms, c))
            best = min(stage1, key=lambda t: t[0]) if stage1 else None
            if best:
                bns = (32, 64) if bits == 8 else (64, 128)
                bks = (group,) if group else (256, 512) if bits != 4 else (128, 256, 512)
                for bn, bk, split, warps in itertools.product(bns, bks, (1, 2, 4), (4, 8)):
                    c = G.GemvConfig(bn, bk, split, warps, 4, best[1].conv, best[1].swap)
                    try:
                        ms = graph_time([lambda w=w, s=s: G.launch(x, w, s, bits, c) for w, s in ws], reps=10)
                    except Exception:  # noqa: BLE001
                        continue
                    if ms < best[0]:
                        best = (ms, c)
                rec("triton-best", best[0], str(best[1]))
        # library alternatives
        try:
            if bits == 16:
                rec("cublas F.linear", graph_time([lambda w=w: torch.nn.functional.linear(x, w) for w, _ in ws]))
            elif bits == 8 and not group:
                w8 = [(w.to(torch.int16) - 128).to(torch.int8).contiguous() for w, _ in ws]
                sc = [s for _, s in ws]
                rec("aten _weight_int8pack_mm", graph_time(
                    [lambda w=w, s=s: torch._weight_int8pack_mm(x, w, s) for w, s in zip(w8, sc)]))
            elif bits == 4:
                g = group or 128
                xb = x.to(torch.bfloat16)
                packs = []
                for w, s in ws:
                    q = G.unpack_weight(w, 4)  # [n, k] signed
                    u = (q + 8).to(torch.uint8)
                    u8 = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()
                    wp = torch._convert_weight_to_int4pack(u8, 8)
                    sg = (s if s.dim() == 2 else s[:, None].expand(n, k // g)).t().to(torch.bfloat16)  # [k/g, n]
                    sz = torch.stack([sg, torch.zeros_like(sg)], dim=-1).contiguous()  # zero = 0: symmetric
                    packs.append((wp, sz))
                rec(f"aten tinygemm _weight_int4pack_mm (bf16, g{g})", graph_time(
                    [lambda wp=wp, sz=sz: torch._weight_int4pack_mm(xb, wp, g, sz) for wp, sz in packs]))
        except Exception as e:  # noqa: BLE001
            rows.append({"format": fmt, "shape": name, "impl": "library", "error": repr(e)[:300]})
        del ws
        torch.cuda.empty_cache()
        res["gemv"] = rows
        log(f"  {fmt} {name}: " + ", ".join(f"{r['impl']} {r.get('GBps')}" for r in rows if r.get("shape") == name
                                              and r.get("format") == fmt))
    return rows


def check_kernels(res):
    from enginefarm.kernels import gemv as G

    out = []
    for bits, group, M, n, k in [(16, 0, 1, 4096, 4096), (8, 0, 1, 12288, 4096), (8, 0, 7, 4096, 11008),
                                 (4, 0, 1, 22016, 4096), (4, 128, 16, 4096, 11008), (8, 64, 3, 1000, 4096)]:
        (w, s), = make_weights(bits, n, k, 1, group)
        x = torch.randn(M, k, device="cuda", dtype=torch.float16)
        ref = G.reference(x, w, s, bits)
        y = torch.full((M, n), float("nan"), device="cuda")
        try:
            y[:] = G.gemv(x, w, s, bits).float()
        except Exception as e:  # noqa: BLE001
            out.append({"bits": bits, "group": group, "m": M, "n": n, "k": k, "error": repr(e)[:500]})
            log(out[-1])
            continue
        err = ((y - ref).norm() / ref.norm()).item()
        out.append({"bits": bits, "group": group, "m": M, "n": n, "k": k, "rel_err": err,
                    "ok": bool(err < 3e-3 and torch.isfinite(y).all())})
    res["kernel_check"] = out
    log(table(out, ["bits", "group", "m", "n", "k", "rel_err", "ok"]))


def engine_check(res, layers: int = 2):
    """Small engines of every format through the backend, against eager."""
    from bench.models import decoder_from_hf, hf_llama, llama_state
    from enginefarm.runtime.engine import LLMEngine
    from enginefarm.runtime.export import export_llm

    hf = hf_llama(layers=layers)
    state = llama_state(hf)
    cfgd = hf.config.to_dict()
    limits = {"max_batch_size": 8, "max_input_len": 64, "max_seq_len": 128}
    out = []
    prompt = torch.randint(3, 32000, (1, 12), device="cuda")
    for quant in ("none", "w8a16", "w4a16"):
        r = {"quant": quant, "layers": layers}
        try:
            ref = decoder_from_hf(cfgd, state, quant)
            m = decoder_from_hf(cfgd, state, quant)
            with torch.no_grad():  # eager greedy reference (the plain PyTorch decoder)
                kc, vc = ref.new_cache(1, 128)
                lg, _, _ = ref(prompt, torch.tensor([0], device="cuda"), kc, vc)
                ref_logits = lg[0].float()
                toks, pos = [], prompt.shape[1]
                nxt = lg[:, -1].argmax(-1, keepdim=True)
                for _ in range(16):
                    toks.append(int(nxt))
                    lg, _, _ = ref(nxt, torch.tensor([pos], device="cuda"), kc, vc)
                    nxt = lg[:, -1].argmax(-1, keepdim=True)
                    pos += 1
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                sc = export_llm(m, Path(d), limits, "cuda", {"cuda_graphs": True}, log)
                r["build_s"] = round(time.perf_counter() - t0, 1)
                r["timings"] = sc.timings
                del m
                log("  loading the engine")
                eng = LLMEngine.load(d)
                log("  loaded")
                lg_e = eng.logits(prompt[0].tolist()).to("cuda")
                r["prefill_logits_rel_err"] = ((lg_e - ref_logits).norm() / ref_logits.norm()).item()
                # decode package, no graphs, then graphs
                log("  prefill logits ok", r["prefill_logits_rel_err"])
                kc, vc = eng.new_cache(1)
                lg, _, _ = eng.step(prompt, 0, kc, vc)
                lg2, _, _ = eng.step(lg[:, -1].argmax(-1, keepdim=True), prompt.shape[1], kc, vc)
                log("  decode step ok")
                eng.cuda_graphs = False
                g0 = eng.generate_ids(prompt, 16)[0].tolist()
                log("  generate ok")
                eng.cuda_graphs = True
                g1 = eng.generate_ids(prompt, 16)[0].tolist()
                r["greedy_equal_eager"] = g0 == toks
                r["graph_equal_nograph"] = g1 == g0
                r["tokens"] = {"eager": toks, "engine": g0, "engine_graphs": g1}
                # step timings (2 layers: mostly the lm_head and launch costs)
                for graphs in (False, True):
                    eng.cuda_graphs = graphs
                    ms = median(cuda_time(lambda: eng.generate_ids(prompt, 33), warmup=1, iters=3))
                    r[f"gen32_ms_graphs={graphs}"] = round(ms, 2)
                del eng
        except Exception as e:  # noqa: BLE001
            r["error"] = traceback.format_exc()[-2000:]
            log(r["error"])
        out.append(r)
        res["engine_check"] = out
        log({k: v for k, v in r.items() if k not in ("tokens", "error")})
        torch.cuda.empty_cache()
    return out


def main():
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--engine-check", action="store_true")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds into the run after which the sweep stops")
    a = ap.parse_args()
    res = Results(a.out, "engine_check" if a.engine_check else "kernels")
    log(res["env"])
    res["copy_GBps"] = round(copy_bandwidth(), 1)
    res["matmul_fp16_TFLOPs"] = round(matmul_tflops(), 1)
    log(f"copy {res['copy_GBps']} GB/s (read+write), fp16 matmul {res['matmul_fp16_TFLOPs']} TFLOP/s")
    if a.engine_check:  # a separate results file: a crash there must not cost the kernel numbers
        engine_check(res)
        return
    check_kernels(res)
    rows = bench_gemv(res, a.sweep, a.m, deadline=a.deadline)
    cbw = res["copy_GBps"]
    for r in rows:
        if "GBps" in r:
            r["of_copy"] = round(r["GBps"] / cbw, 3)
    res["gemv"] = rows
    log(table([r for r in rows if "GBps" in r], ["format", "shape", "impl", "us", "GBps", "of_copy", "cfg"]))
    log(f"elapsed {res.elapsed():.0f}s")


if __name__ == "__main__":
    main()
