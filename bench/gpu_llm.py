"""LLM decode engines on the GPU: a LLaMA-7B-shaped decoder with random fp16
weights made on the device, batch-1 decode tokens/s of the aoti engines
(fp16, W8A16, W4A16) against eager Hugging Face `generate` and the HBM
roofline (weight bytes per token / measured copy bandwidth), in one run.

    python bench/gpu_llm.py --out DIR [--layers 32] [--new-tokens 128] [--batches 1,2,4,8]

The engines' packages are compiled in parallel child processes (they need
the weights' shapes only, so each child makes uninitialised tensors of the
right shapes); the weights, converted and quantized by the farm's code from
the Hugging Face model's, are handed to the loaded packages in memory.
Timing starts once every compile has finished (the eager baseline is
launch-bound: compiles running beside it would slow it down).
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

from bench.common import Results, copy_bandwidth, cuda_time, log, median, table  # noqa: E402

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # cpu: a smoke test of the plumbing only
JOBS = [("none", "general"), ("none", "decode"), ("w8a16", "decode"), ("w4a16", "decode")]
QNAME = {"none": "fp16", "w8a16": "W8A16", "w4a16": "W4A16"}


def empty_decoder(layers: int, quant: str, vocab: int | None = None):
    """A DecoderLM of LLaMA-7B's shapes with uninitialised weights (shapes are
    all a compile needs), in the checkpoint layout the converter writes."""
    from bench.models import LLAMA_7B
    from enginefarm.quant import QUANTIZED_LINEARS, Scheme, scheme_for
    from enginefarm.runtime.decoder import DecoderConfig, DecoderLM

    h, inter, V = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"], vocab or LLAMA_7B["vocab_size"]
    nh = LLAMA_7B["num_attention_heads"]
    cfg = {"architecture": "LlamaForCausalLM", "vocab_size": V, "hidden_size": h, "num_hidden_layers": layers,
           "num_attention_heads": nh, "num_key_value_heads": nh, "head_size": h // nh, "hidden_act": "silu",
           "norm_epsilon": 1e-5, "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0,
           "max_position_embeddings": 4096, "mapping": {"tp_size": 1},
           "quantization": {"quant_algo": {"none": None, "w8a16": "W8A16", "w4a16": "W4A16"}[quant]}}
    sch = scheme_for(quant)
    dev, f16 = DEVICE, torch.float16
    W = {"transformer.vocab_embedding.weight": torch.empty(V, h, device=dev, dtype=f16),
         "transformer.ln_f.weight": torch.ones(h, device=dev, dtype=f16),
         "lm_head.weight": torch.empty(V, h, device=dev, dtype=f16)}
    shapes = {"attention.qkv": (3 * h, h), "attention.dense": (h, h), "mlp.fc": (inter, h), "mlp.gate": (inter, h),
              "mlp.proj": (h, inter)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        W[p + "input_layernorm.weight"] = torch.ones(h, device=dev, dtype=f16)
        W[p + "post_layernorm.weight"] = torch.ones(h, device=dev, dtype=f16)
        for name in QUANTIZED_LINEARS:
            shp = shapes[name]
            if sch is None:
                W[p + name + ".weight"] = torch.empty(shp, device=dev, dtype=f16)
            else:
                qs, ss = Scheme(sch.bits).shapes(shp)
                W[p + name + ".weight"] = torch.zeros(qs, device=dev, dtype=torch.int8)
                W[p + name + ".per_channel_scale"] = torch.empty(ss, device=dev, dtype=f16)
    return DecoderLM(DecoderConfig.from_trtllm(cfg), W).eval()


def child(quant: str, which: str, out: str, layers: int, limits: dict) -> None:
    from enginefarm.runtime.export import export_llm

    faulthandler.enable()
    t0 = time.perf_counter()
    m = empty_decoder(layers, quant, limits.get("vocab"))
    sc = export_llm(m, Path(out), limits, DEVICE, {"cuda_graphs": True}, log, packages=(which,), write_weights=False,
                    prompt_table_rows=limits.get("table_rows", 0)).dump()
    sc["child_s"] = round(time.perf_counter() - t0, 1)
    Path(out, f"engine.{which}.json").write_text(json.dumps(sc, indent=2))
    log(f"child {quant}/{which} done in {sc['child_s']}s")


def start_children(work: Path, layers: int, limits: dict, jobs) -> list:
    procs = []
    for quant, which in jobs:
        d = work / quant
        d.mkdir(parents=True, exist_ok=True)
        logf = open(work / f"child-{quant}-{which}.log", "w")
        p = subprocess.Popen([sys.executable, __file__, "--child", quant, which, str(d), str(layers), json.dumps(limits)],
                             stdout=logf, stderr=subprocess.STDOUT, env=os.environ.copy())
        procs.append((quant, which, p, logf))
    return procs


def compile_all(work: Path, layers: int, limits: dict, jobs, parallel: int, timeout: float) -> dict:
    """Compile the jobs' packages in child processes, at most `parallel` at a time,
    each killed past the common deadline; {job: return code}."""
    deadline = time.time() + timeout
    pending, running, rcs = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            running += start_children(work, layers, limits, [pending.pop(0)])
        time.sleep(1)
        for item in list(running):
            quant, which, p, logf = item
            if p.poll() is None and time.time() < deadline:
                continue
            if p.poll() is None:
                p.kill()
                p.wait()
            logf.close()
            running.remove(item)
            rcs[(quant, which)] = p.returncode
            log(f"child {quant}/{which}: rc {p.returncode} at {time.time() - deadline + timeout:.0f}s")
            if p.returncode:
                log(open(work / f"child-{quant}-{which}.log").read()[-3000:])
    return rcs


def engine_from_parts(d: Path, model, quant: str):
    """An LLMEngine from the packages compiled in `d` and the weights of `model` (engine form)."""
    from enginefarm.runtime.engine import LLMEngine, load_runner
    from enginefarm.runtime.export import engine_constants
    from enginefarm.runtime.sidecar import parse

    metas = {w: json.loads((d / f"engine.{w}.json").read_text()) for w in ("general", "decode")
             if (d / f"engine.{w}.json").exists()}
    meta = dict(next(iter(metas.values())))
    files = {}
    for w, m in metas.items():
        files.update({k: v for k, v in m["files"].items() if k != "weights"})
    meta["files"] = files
    meta["timings"] = {k: v for m in metas.values() for k, v in m["timings"].items()}
    general = load_runner(d / files["general"]) if "general" in files else None
    decode = load_runner(d / files["decode"]) if "decode" in files else None
    consts = engine_constants(model)
    for r in (general, decode):
        if r is not None:
            need = set(r.get_constant_fqns())
            r.load_constants({k: consts[k] for k in need}, check_full_update=True, user_managed=True)
    return LLMEngine(general, parse(meta, str(d)), decode, cuda_graphs=True, weights=consts)


def time_engine(eng, prompt, n_new: int, iters: int = 3) -> dict:
    """TTFT (prefill + first token) and decode ms/token from CUDA events, medians."""
    eng.generate_ids(prompt, n_new)  # warm-up: graph capture for this batch size
    torch.cuda.synchronize()
    ttft, per_tok, toks = [], [], None
    for _ in range(iters):
        ev = {}
        toks = eng.generate_ids(prompt, n_new, events=ev)
        ev["end"].synchronize()
        ttft.append(ev["start"].elapsed_time(ev["first"]))
        per_tok.append(ev["first"].elapsed_time(ev["end"]) / (n_new - 1))
    return {"ttft_ms": round(median(ttft), 3), "decode_ms_per_token": round(median(per_tok), 4),
            "tokens": toks[0].tolist()}


def hf_generate_timing(hf, prompt, n_new: int, iters: int = 2) -> dict:
    def gen(n):
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)

    with torch.no_grad():
        gen(4)
        t1 = median(cuda_time(lambda: gen(1), warmup=1, iters=iters))
        tn = median(cuda_time(lambda: gen(n_new), warmup=0, iters=iters))
        out = gen(n_new)
    return {"ttft_ms": round(t1, 3), "decode_ms_per_token": round((tn - t1) / (n_new - 1), 4),
            "tokens": out[0, prompt.shape[1]:].tolist()}


def main():
    faulthandler.enable()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--quants", default="none,w8a16,w4a16")
    ap.add_argument("--child-timeout", type=float, default=330)
    ap.add_argument("--parallel", type=int, default=2, help="compile processes at a time")
    ap.add_argument("--no-prefill", action="store_true", help="decode packages only (the prompt runs token by token)")
    ap.add_argument("--gptfast", help="a directory holding gpt-fast's scripts: run it on the same weights (bench/gpu_gptfast.py)")
    ap.add_argument("--gptfast-deadline", type=float, default=330, help="skip gpt-fast if the run is older than this (s)")
    ap.add_argument("--child", nargs=5)
    a = ap.parse_args()
    if a.child:
        quant, which, out, layers, limits = a.child
        child(quant, which, out, int(layers), json.loads(limits))
        return
    from bench.models import decoder_from_hf, hf_llama, llama_state, weight_bytes
    from enginefarm.runtime.swaps import prepare_engine

    res = Results(a.out, "llm")
    log(res["env"])
    limits = {"max_batch_size": 8, "max_input_len": 128, "max_seq_len": 256}
    quants = a.quants.split(",")
    work = Path(tempfile.mkdtemp(prefix="llm-engines-"))
    jobs = [j for j in JOBS if j[0] in quants and not (a.no_prefill and j[1] == "general")]
    log(f"compiling {len(jobs)} packages, {a.parallel} at a time, under {work}")
    compile_all(work, a.layers, limits, jobs, a.parallel, a.child_timeout)
    res["compile"] = {f"{q}/{w}": json.loads((work / q / f"engine.{w}.json").read_text())["timings"]
                      for q, w in jobs if (work / q / f"engine.{w}.json").exists()}
    # the model (random fp16, made on the GPU) and each variant's engine-form weights, after the
    # compiles (their processes hold weight-shaped tensors too: both at once may not fit)
    hf = hf_llama(layers=a.layers)
    cfgd = hf.config.to_dict()
    state = llama_state(hf)
    models = {}
    for q in quants:
        models[q] = prepare_engine(decoder_from_hf(cfgd, state, q))
    res["model"] = {"shape": "LLaMA-7B", "layers": a.layers, "params_b": round(sum(p.numel() for p in hf.parameters()) / 1e9, 3),
                    "limits": limits, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}
    # ---------------------------------------------------------------- measurements (nothing else running)
    bw = copy_bandwidth()
    res["copy_GBps"] = round(bw, 1)
    torch.manual_seed(123)
    prompt = torch.randint(3, 32000, (1, a.prompt_len), device="cuda")
    rows = []
    base = hf_generate_timing(hf, prompt, a.new_tokens)
    rows.append({"engine": "eager HF generate (fp16)", "batch": 1, **{k: v for k, v in base.items() if k != "tokens"}})
    res["rows"] = rows
    log(rows[-1])
    S = limits["max_seq_len"]
    for q in quants:
        try:
            m = models[q]
            wbytes = weight_bytes(m)
            cbytes = 2 * m.cfg.num_layers * m.cfg.kv_heads_per_rank * S * m.cfg.head_size * 2  # both caches, batch 1
            eng = engine_from_parts(work / q, m, q)
            r = time_engine(eng, prompt, a.new_tokens)
            toks = r.pop("tokens")
            roof_ms = wbytes / (bw * 1e9) * 1e3
            row = {"engine": f"aoti {QNAME[q]}", "batch": 1, **r,
                   "tokens_per_s": round(1000 / r["decode_ms_per_token"], 1),
                   "weight_GB_per_token": round(wbytes / 1e9, 3), "kv_GB_per_token": round(cbytes / 1e9, 3),
                   "roofline_tokens_per_s": round(1000 / roof_ms, 1),
                   "of_roofline": round(roof_ms / r["decode_ms_per_token"], 3),
                   "speedup_vs_eager": round(base["decode_ms_per_token"] / r["decode_ms_per_token"], 2),
                   "has_prefill_package": eng.run is not None}
            if q == "none":
                same = sum(1 for x, y in zip(toks, base["tokens"]) if x == y)
                first_diff = next((i for i, (x, y) in enumerate(zip(toks, base["tokens"])) if x != y), None)
                row["greedy_equal_eager"] = toks == base["tokens"]
                row["greedy_match"] = f"{same}/{len(toks)}" + ("" if first_diff is None else f" (first diff at {first_diff})")
            rows.append(row)
            res["rows"] = rows
            log(row)
            if q == "none":  # batch sweep
                for b in [int(x) for x in a.batches.split(",") if int(x) > 1]:
                    pb = torch.randint(3, 32000, (b, a.prompt_len), device="cuda")
                    rb = time_engine(eng, pb, a.new_tokens)
                    rb.pop("tokens")
                    rows.append({"engine": f"aoti {QNAME[q]}", "batch": b, **rb,
                                 "tokens_per_s": round(b * 1000 / rb["decode_ms_per_token"], 1),
                                 "tokens_per_s_per_user": round(1000 / rb["decode_ms_per_token"], 1)})
                    res["rows"] = rows
                    log(rows[-1])
            del eng
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            err = traceback.format_exc()
            log(err)
            rows.append({"engine": f"aoti {QNAME[q]}", "error": err[-2000:]})
            res["rows"] = rows
    fp16 = next((r for r in rows if r.get("engine") == "aoti fp16" and r.get("batch") == 1 and "tokens_per_s" in r), None)
    for r in rows:
        if fp16 and r.get("batch") == 1 and "tokens_per_s" in r:
            r["vs_fp16_engine"] = round(r["tokens_per_s"] / fp16["tokens_per_s"], 2)
    res["rows"] = rows
    eager_tps = 1000 / base["decode_ms_per_token"]
    for r in rows:
        if r.get("batch") == 1 and "engine" in r and r["engine"].startswith("eager"):
            r["tokens_per_s"] = round(eager_tps, 1)
    log(table(rows, ["engine", "batch", "ttft_ms", "decode_ms_per_token", "tokens_per_s", "tokens_per_s_per_user",
                     "of_roofline", "roofline_tokens_per_s", "speedup_vs_eager", "vs_fp16_engine", "greedy_match"]))
    goal = {"none": ("of_roofline", 0.75), "w8a16": ("vs_fp16_engine", 1.6), "w4a16": ("vs_fp16_engine", 2.5)}
    for q in quants:
        r = next((x for x in rows if x.get("engine") == f"aoti {QNAME[q]}" and x.get("batch") == 1 and "tokens_per_s" in x), None)
        if r:
            k, g = goal[q]
            log(f"goal {QNAME[q]}: {k} {r.get(k)} (goal >= {g}: {'met' if (r.get(k) or 0) >= g else 'missed'})")
    if a.gptfast:
        if res.elapsed() > a.gptfast_deadline:
            log(f"skipping gpt-fast: the run is {res.elapsed():.0f}s old (deadline {a.gptfast_deadline}s)")
        else:
            gptfast_stage(a, res, hf, models, work)
    log(f"GPU {res['env'].get('gpu')}, copy {bw:.0f} GB/s, {res['env']['date_utc']}; elapsed {res.elapsed():.0f}s")



def gptfast_stage(a, res, hf, models, work):
    """gpt-fast (bf16, --compile, as its README runs it) on the same random weights,
    next to the fp16 engine counted the same way (new tokens over the whole generation)."""
    from bench.gpu_gptfast import engine_rate, run_gptfast, write_checkpoint

    rows = []
    try:
        t0 = time.perf_counter()
        ckpt = write_checkpoint(hf, Path(tempfile.mkdtemp(prefix="gf-ckpt-")))
        log(f"gpt-fast checkpoint written in {time.perf_counter() - t0:.0f}s")
        new, samples = 200, 5
        r = run_gptfast(Path(a.gptfast).resolve(), ckpt, new, samples, timeout=max(60, 590 - res.elapsed()),
                        prompt=a.prompt_len)
        rows.append({"engine": "gpt-fast bf16 (compile)", **r})
        res["gptfast"] = rows
        log(rows[-1])
        prompt = torch.randint(3, 32000, (1, r.get("prompt_len") or a.prompt_len), device="cuda")
        eng = engine_from_parts(work / "none", models["none"], "none")
        e = engine_rate(eng, prompt, new, samples)
        e["engine"] = "aoti fp16"
        if r.get("tokens_per_s"):
            e["vs_gptfast"] = round(e["tokens_per_s"] / r["tokens_per_s"], 2)
        rows.append(e)
        res["gptfast"] = rows
        log(table(rows, ["engine", "prompt_len", "tokens_per_s", "decode_tokens_per_s", "vs_gptfast", "compile_s",
                         "bandwidth_GBps_reported", "rc"]))
    except Exception:  # noqa: BLE001
        rows.append({"error": traceback.format_exc()[-2000:]})
        res["gptfast"] = rows
        log(rows[-1]["error"])


if __name__ == "__main__":
    main()
