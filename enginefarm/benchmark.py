"""`enginefarm bench REF`: latency and throughput of a built LLM engine over
a sweep, next to eager Hugging Face on the same inputs, in the same run.

For every (batch, input length, output length) point of the sweep, within
the engine's limits: time to first token (prefill + the first greedy
token), decode time per token, tokens/s per user and in total, and the
end-to-end rate (all new tokens / the whole generation). The engine is
timed with CUDA events on a GPU (wall clock on the CPU), after warm-up,
and each figure is the median of the timed repeats. The eager baseline is
the Hugging Face model of the recipe's fetched checkpoint, in the engine's
dtype on the engine's device, through `generate` (greedy, no early stop):
TTFT from `max_new_tokens=1`, decode from the difference to the full run.

The result is printed as a table (or JSON) and recorded in the store as a
manifest of the step `bench` (manifests/<recipe>/bench/<key>.json, one per
run: the published manifest it measured is immutable), whose inputs name
the published engine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .errors import BadInput

SCHEMA = "enginefarm.bench/1"


def _median(xs) -> float:
    return float(statistics.median(xs))


class _Timer:
    """Milliseconds between marks: CUDA events on a GPU, wall clock otherwise."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        import torch

        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


def engine_files(store, value: dict, manifest: dict, cache_root: Optional[Path] = None) -> tuple[Path, Path]:
    """The engine (llm/) and the fetched checkpoint of a published ref, laid
    out in a local cache by digest (verified against their sha256)."""
    root = Path(cache_root or os.environ.get("ENGINEFARM_CACHE", Path(tempfile.gettempdir()) / "enginefarm-cache"))
    cache = root / value["digest"][:16]
    for rel, f in manifest["files"].items():
        if rel.startswith("llm/") and not (cache / rel).exists():
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            store.get_blob_file(f["sha256"], cache / rel, size=f["size"])
    fetch_in = manifest["inputs"]["fetch"]
    fm = store.get_manifest(value["recipe"], "fetch", fetch_in["key"])
    if fm is None:
        raise BadInput(f"the fetch manifest of {value['recipe']}:{value['variant']} is missing from {store.uri}")
    src = cache / "source"
    for rel, f in fm["files"].items():
        if not (src / rel).exists():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            store.get_blob_file(f["sha256"], src / rel, size=f["size"])
    return cache / "llm", src


def sweep_points(batches, input_lens, output_lens, limits: dict) -> tuple[list[tuple[int, int, int]], list[str]]:
    points, skipped = [], []
    for b in batches:
        for t in input_lens:
            for n in output_lens:
                why = None
                if b > limits["max_batch_size"]:
                    why = f"batch {b} > max_batch_size {limits['max_batch_size']}"
                elif t > limits["max_input_len"]:
                    why = f"input {t} > max_input_len {limits['max_input_len']}"
                elif t + n > limits["max_seq_len"]:
                    why = f"input {t} + output {n} > max_seq_len {limits['max_seq_len']}"
                elif n < 2:
                    why = "output length must be at least 2 (one decode step)"
                (skipped.append(f"b{b} in{t} out{n}: {why}") if why else points.append((b, t, n)))
    return points, skipped


def time_engine(eng, ids, n_new: int, warmup: int, iters: int) -> dict:
    """On a GPU: CUDA events around prefill + first token and the decode steps
    of one generation. On the CPU: prefill + first pick timed alone, then the
    whole generation."""
    import torch

    cuda = eng.device == "cuda"
    for _ in range(warmup):
        eng.generate_ids(ids, n_new)
    ttft, dec, total = [], [], []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            ev = {}
            eng.generate_ids(ids, n_new, events=ev)
            ev["end"].synchronize()
            ttft.append(ev["start"].elapsed_time(ev["first"]))
            dec.append(ev["first"].elapsed_time(ev["end"]) / (n_new - 1))
            total.append(ev["start"].elapsed_time(ev["end"]))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            kc, vc = eng.cache(ids.shape[0])
            lg, _, _ = eng.step(ids, 0, kc, vc)
            lg[:, -1].argmax(-1)
            t1 = time.perf_counter()
            eng.generate_ids(ids, n_new)
            t2 = time.perf_counter()
            first, whole = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            ttft.append(first)
            total.append(whole)
            dec.append(max(whole - first, 1e-3) / (n_new - 1))
    return _figures(_median(ttft), _median(dec), _median(total), ids.shape[0], n_new)


def time_eager(hf, ids, n_new: int, warmup: int, iters: int, cuda: bool) -> dict:
    import torch

    timer = _Timer(cuda)
    mask = torch.ones_like(ids)

    def gen(n):
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           use_cache=True, eos_token_id=None, pad_token_id=0)

    with torch.no_grad():
        for _ in range(warmup):
            gen(n_new)
        t1s, tns = [], []
        for _ in range(iters):
            a = timer.mark()
            gen(1)
            b = timer.mark()
            gen(n_new)
            c = timer.mark()
            t1s.append(timer.ms(a, b))
            tns.append(timer.ms(b, c))
    t1 = _median(t1s)
    # per repeat: the full run less its one-token run (paired, so that drift cancels)
    per = _median([max(n - o, 1e-3) for n, o in zip(tns, t1s)]) / (n_new - 1)
    return _figures(t1, per, _median(tns), ids.shape[0], n_new)


def _figures(ttft_ms: float, decode_ms: float, total_ms: float, batch: int, n_new: int) -> dict:
    return {
        "ttft_ms": round(ttft_ms, 3),
        "decode_ms_per_token": round(decode_ms, 6),
        "tokens_per_s_per_user": round(1000.0 / decode_ms, 2),
        "tokens_per_s": round(batch * 1000.0 / decode_ms, 2),
        "e2e_tokens_per_s": round(batch * n_new / (total_ms / 1000.0), 2),
        "total_ms": round(total_ms, 3),
    }


def env_info(device: str) -> dict:
    import torch

    info = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def run_bench(store, ref_text: str, batches=(1,), input_lens=(32,), output_lens=(32,), warmup: int = 2,
              iters: int = 5, eager: bool = True, record: bool = True, cuda_graphs: Optional[bool] = None,
              seed: int = 0, progress=None) -> dict:
    """The sweep for one published engine; returns the report (and records it)."""
    import torch

    from .backends import get_backend
    from .registry import resolve
    from .hashing import digest_json

    say = progress or (lambda m: None)
    value, m = resolve(store, ref_text)
    comps = (m.get("results") or {}).get("components") or {}
    if "llm" not in comps:
        raise BadInput(f"{ref_text}: no llm engine in this manifest (bench times LLM engines)")
    backend = comps["llm"]["backend"]
    if backend != "aoti":
        raise BadInput(f"{ref_text}: a {backend} engine; bench runs aoti engines in this version")
    eng_dir, src = engine_files(store, value, m)
    kw = {} if cuda_graphs is None else {"cuda_graphs": cuda_graphs}
    eng = get_backend(backend).load(eng_dir, **kw)
    meta = eng.meta
    limits = {k: getattr(meta, k) for k in ("max_batch_size", "max_input_len", "max_seq_len")}
    points, skipped = sweep_points(batches, input_lens, output_lens, limits)
    if not points:
        raise BadInput(f"no point of the sweep fits the engine's limits {limits}: " + "; ".join(skipped))
    device = eng.device
    hf = None
    if eager:
        from transformers import AutoModelForCausalLM

        say("loading the eager baseline (Hugging Face)")
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=eng.dtype, trust_remote_code=False).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    vocab = meta.vocab_size
    rows = []
    for b, t, n in points:
        ids = torch.randint(3, vocab, (b, t), generator=g).to(device)
        say(f"b{b} in{t} out{n}: engine")
        r = {"batch": b, "input_len": t, "output_len": n, "engine": time_engine(eng, ids, n, warmup, iters)}
        if hf is not None:
            say(f"b{b} in{t} out{n}: eager")
            r["eager"] = time_eager(hf, ids, n, max(1, warmup // 2), max(1, iters // 2 + 1), device == "cuda")
            r["speedup_decode"] = round(r["eager"]["decode_ms_per_token"] / r["engine"]["decode_ms_per_token"], 2)
            r["speedup_ttft"] = round(r["eager"]["ttft_ms"] / r["engine"]["ttft_ms"], 2)
        rows.append(r)
    report = {
        "schema": SCHEMA,
        "ref": {k: value.get(k) for k in ("recipe", "variant", "alias", "digest", "manifest")},
        "env": env_info(device),
        "engine": {"backend": backend, "dtype": meta.dtype, "quant_bits": meta.quant_bits,
                   "cuda_graphs": eng.cuda_graphs, "decode_package": eng.decode_run is not None, "limits": limits},
        "eager_baseline": "transformers generate, greedy, same dtype and device" if eager else None,
        "settings": {"warmup": warmup, "iters": iters, "seed": seed, "timer": "cuda events" if device == "cuda" else "wall clock"},
        "rows": rows,
        "skipped": skipped,
    }
    if record:
        key = digest_json({"engine": value["digest"], "env": report["env"], "settings": report["settings"],
                           "sweep": [(r["batch"], r["input_len"], r["output_len"]) for r in rows]})
        manifest = {"schema": SCHEMA, "step": "bench", "key": key, "created_at": report["env"]["date_utc"],
                    "inputs": {"publish": {"manifest": value["manifest"], "digest": value["digest"]}},
                    "results": report, "files": {}}
        store.put_manifest(value["recipe"], "bench", key, manifest)
        report["recorded"] = store.manifest_path(value["recipe"], "bench", key)
    return report


def format_table(report: dict) -> str:
    cols = ["batch", "in", "out", "TTFT ms", "ms/token", "tok/s/user", "tok/s", "e2e tok/s",
            "eager TTFT", "eager ms/tok", "eager tok/s", "x decode", "x TTFT"]
    lines = []
    for r in report["rows"]:
        e, h = r["engine"], r.get("eager") or {}
        lines.append([r["batch"], r["input_len"], r["output_len"], e["ttft_ms"], e["decode_ms_per_token"],
                      e["tokens_per_s_per_user"], e["tokens_per_s"], e["e2e_tokens_per_s"], h.get("ttft_ms"),
                      h.get("decode_ms_per_token"), h.get("tokens_per_s"), r.get("speedup_decode"), r.get("speedup_ttft")])

    def fmt(v):
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    w = [max(len(c), *(len(fmt(x[i])) for x in lines)) for i, c in enumerate(cols)]
    ref, env, eng = report["ref"], report["env"], report["engine"]
    head = (f"{ref['recipe']}:{ref['variant']}@{ref['alias']} ({eng['dtype']}, {eng['backend']}, "
            f"cuda graphs {'on' if eng['cuda_graphs'] else 'off'}) on {env.get('gpu') or env.get('cpu')}, "
            f"{env['date_utc']}; {report['settings']['timer']}, median of {report['settings']['iters']}")
    out = [head, "  ".join(c.rjust(w[i]) for i, c in enumerate(cols))]
    out += ["  ".join(fmt(x[i]).rjust(w[i]) for i in range(len(cols))) for x in lines]
    if report.get("skipped"):
        out.append("skipped: " + "; ".join(report["skipped"]))
    if report.get("recorded"):
        out.append(f"recorded: {report['recorded']}")
    return "\n".join(out)


def parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise BadInput(f"--{what}: expected positive integers, got {text!r}")
    return vals


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2)
