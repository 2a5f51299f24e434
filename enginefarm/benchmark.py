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

A multimodal ref (components visual + llm: LLaVA, LLaVA-NeXT, BLIP-2 with
OPT) is timed in two parts, next to the family's Hugging Face model
(e.g. LlavaForConditionalGeneration) in the engines' dtype on their device:
- `visual_rows`, one per batch size of the sweep: ms per call of the visual
  engine on a batch of images, next to the model's own vision tower and
  projector (`get_image_features`, the family's `reference_features`), with
  the largest difference of their features;
- `rows`, the whole request: B images and prompts of `input_len` text tokens
  with the image placeholder(s), `output_len` new tokens. TTFT covers the
  preprocessed pixels -> visual engine -> prefill with the prompt table ->
  first token; the eager side is `generate` with the same pixel values and
  input ids. The images are the built-in ones (enginefarm/images.py),
  preprocessed by the checkpoint's processor outside the timed region.
Each row says whether the engine's greedy tokens equal eager `generate`'s
(`tokens_equal`; expected in fp32, not promised in half precision). Where
timing noise makes eager's full run no longer than its one-token run, its
decode figure is a floor (1 us over the run) and says so (`decode_floor`).

The result is printed as a table (or JSON) and recorded in the store as a
manifest of the step `bench` (manifests/<recipe>/bench/<key>.json, one per
run: the published manifest it measured is immutable), whose inputs name
the published engine. The JSON (schema enginefarm.bench/1): ref, env,
engine (+ `visual` for a multimodal ref), eager_baseline, settings, rows,
skipped, and for a multimodal ref `visual_rows`, `visual_skipped` and
`inputs` (the images and how the prompts were made).
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
    """The engines (llm/, and visual/ where the ref has one) and the fetched
    checkpoint of a published ref, laid out in a local cache by digest
    (verified against their sha256); returns (the llm/ folder, the checkpoint).
    The cache only reads them: from a local store they are read-only hard links
    of its blobs, so a 7B engine costs no second copy on the worker's disk."""
    root = Path(cache_root or os.environ.get("ENGINEFARM_CACHE", Path(tempfile.gettempdir()) / "enginefarm-cache"))
    cache = root / value["digest"][:16]
    for rel, f in manifest["files"].items():
        if not (cache / rel).exists():
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            store.get_blob_file(f["sha256"], cache / rel, size=f["size"], link=True)
    fetch_in = manifest["inputs"]["fetch"]
    fm = store.get_manifest(value["recipe"], "fetch", fetch_in["key"])
    if fm is None:
        raise BadInput(f"the fetch manifest of {value['recipe']}:{value['variant']} is missing from {store.uri}")
    src = cache / "source"
    for rel, f in fm["files"].items():
        if not (src / rel).exists():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            store.get_blob_file(f["sha256"], src / rel, size=f["size"], link=True)
    return cache / "llm", src


def sweep_points(batches, input_lens, output_lens, limits: dict, extra_in: int = 0,
                 extra_what: str = "") -> tuple[list[tuple[int, int, int]], list[str]]:
    """The (batch, input, output) points within the engine's limits, and why
    the others are skipped; extra_in: prompt positions beside the input
    tokens (a multimodal prompt's visual features)."""
    points, skipped = [], []
    plus = f" + {extra_in} {extra_what}" if extra_in else ""
    for b in batches:
        for t in input_lens:
            for n in output_lens:
                why = None
                if b > limits["max_batch_size"]:
                    why = f"batch {b} > max_batch_size {limits['max_batch_size']}"
                elif t + extra_in > limits["max_input_len"]:
                    why = f"input {t}{plus} > max_input_len {limits['max_input_len']}"
                elif t + extra_in + n > limits["max_seq_len"]:
                    why = f"input {t}{plus} + output {n} > max_seq_len {limits['max_seq_len']}"
                elif n < 2:
                    why = "output length must be at least 2 (one decode step)"
                (skipped.append(f"b{b} in{t} out{n}: {why}") if why else points.append((b, t, n)))
    return points, skipped


def time_engine(eng, ids, n_new: int, warmup: int, iters: int, prompt_table=None, before=None) -> tuple[dict, list]:
    """The marks of one generation (CUDA events on a GPU, the wall clock on
    the CPU): prefill + first token, then the decode steps. `before()`, where
    given, runs first inside the timed region and returns the prompt table
    (the multimodal pipeline: the visual engine on the preprocessed pixels);
    else `prompt_table` is used as given. Returns the figures and the greedy
    tokens of the last timed generation."""
    import torch

    table = before or (lambda: prompt_table)
    timer = _Timer(eng.device == "cuda")
    for _ in range(warmup):
        toks = eng.generate_ids(ids, n_new, prompt_table=table())
    ttft, dec, total = [], [], []
    if timer.cuda:
        torch.cuda.synchronize()
    for _ in range(iters):
        ev = {}
        start = timer.mark()
        toks = eng.generate_ids(ids, n_new, prompt_table=table(), events=ev)
        if "first" not in ev:  # rank processes (runtime/tp.TPEngine): the marks stay in rank 0's process
            first, whole, toks = _by_parts(eng, ids, n_new, table)
            ttft.append(first)
            total.append(whole)
            dec.append(max(whole - first, 1e-3) / max(n_new - 1, 1))
            continue
        ttft.append(timer.ms(start, ev["first"]))
        dec.append(timer.ms(ev["first"], ev["end"]) / max(n_new - 1, 1))
        total.append(timer.ms(start, ev["end"]))
    return _figures(_median(ttft), _median(dec), _median(total), ids.shape[0], n_new), toks.cpu().tolist()


def _by_parts(eng, ids, n_new: int, table) -> tuple[float, float, object]:
    """(prefill + first pick alone, the whole generation) in wall-clock ms,
    and its tokens: for an engine whose calls run in other processes, where
    a generation's own marks cannot be read (every call returns when rank 0
    has its result)."""
    t0 = time.perf_counter()
    kc, vc = eng.cache(ids.shape[0])
    lg, _, _ = eng.step(ids, 0, kc, vc, table())
    lg[:, -1].argmax(-1)
    t1 = time.perf_counter()
    toks = eng.generate_ids(ids, n_new, prompt_table=table())
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, toks


def time_eager(hf, inputs: dict, n_new: int, warmup: int, iters: int, cuda: bool, pad_token_id: int = 0) -> tuple[dict, list]:
    """Hugging Face `generate`, greedy, no early stop, on `inputs` (input_ids,
    attention_mask, and a multimodal model's pixel_values ...): TTFT from
    max_new_tokens=1, decode from the difference to the full run. Returns the
    figures and the new tokens of the last full run."""
    import torch

    timer = _Timer(cuda)
    ids = inputs["input_ids"]

    def gen(n):
        return hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                           eos_token_id=None, pad_token_id=pad_token_id)

    with torch.no_grad():
        for _ in range(warmup):
            gen(n_new)
        t1s, tns = [], []
        for _ in range(iters):
            a = timer.mark()
            gen(1)
            b = timer.mark()
            out = gen(n_new)
            c = timer.mark()
            t1s.append(timer.ms(a, b))
            tns.append(timer.ms(b, c))
    t1 = _median(t1s)
    # per repeat: the full run less its one-token run (paired, so that drift cancels)
    diff = _median([n - o for n, o in zip(tns, t1s)])
    fig = _figures(t1, max(diff, 1e-3) / (n_new - 1), _median(tns), ids.shape[0], n_new)
    if diff <= 0:  # timing noise (a loaded CPU) swamped the decode steps: the figure is the floor, and says so
        fig["decode_floor"] = True
    return fig, out[:, ids.shape[1]:].cpu().tolist()


def time_call(fn, warmup: int, iters: int, cuda: bool) -> float:
    """Median ms of fn() (CUDA events on a GPU, wall clock on the CPU)."""
    import torch

    timer = _Timer(cuda)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
        ms = []
        for _ in range(iters):
            a = timer.mark()
            fn()
            b = timer.mark()
            ms.append(timer.ms(a, b))
    return _median(ms)


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


def _sig(x: float) -> float:
    """A ratio to 4 significant digits (a tiny one stays above 0)."""
    return float(f"{x:.4g}")


def _pair(r: dict, eng: dict, eng_toks: list, eager: dict, eager_toks: list) -> dict:
    """A row's eager side, speed-ups and token agreement."""
    r["eager"] = eager
    r["speedup_decode"] = _sig(eager["decode_ms_per_token"] / eng["decode_ms_per_token"])
    r["speedup_ttft"] = _sig(eager["ttft_ms"] / eng["ttft_ms"])
    r["tokens_equal"] = eng_toks == eager_toks
    return r


def run_bench(store, ref_text: str, batches=(1,), input_lens=(32,), output_lens=(32,), warmup: int = 2,
              iters: int = 5, eager: bool = True, record: bool = True, cuda_graphs: Optional[bool] = None,
              seed: int = 0, progress=None) -> dict:
    """The sweep for one published engine (a text LLM, or a multimodal ref's
    visual engine and whole pipeline); returns the report (and records it)."""
    from .backends import get_backend
    from .registry import resolve
    from .hashing import digest_json

    say = progress or (lambda m: None)
    if iters < 1 or warmup < 0:
        raise BadInput(f"--iters must be at least 1 and --warmup at least 0 (got {iters} and {warmup})")
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
    settings = {"warmup": warmup, "iters": iters, "seed": seed,
                "timer": "cuda events" if eng.device == "cuda" else "wall clock"}
    if "visual" in comps:
        body = _multimodal(eng, eng_dir.parent / "visual", src, comps, limits, batches, input_lens, output_lens,
                           warmup, iters, eager, cuda_graphs, seed, say, ref_text)
    else:
        body = _text(eng, src, limits, batches, input_lens, output_lens, warmup, iters, eager, seed, say)
    baseline = body.pop("eager_baseline")
    report = {
        "schema": SCHEMA,
        "ref": {k: value.get(k) for k in ("recipe", "variant", "alias", "digest", "manifest")},
        "env": env_info(eng.device),
        "engine": {"backend": backend, "dtype": meta.dtype, "quant_bits": meta.quant_bits,
                   "cuda_graphs": eng.cuda_graphs, "decode_package": eng.decode_run is not None, "limits": limits,
                   **body.pop("engine", {})},
        "eager_baseline": baseline if eager else None,
        "settings": settings,
        **body,
    }
    if record:
        sweep = [(r["batch"], r["input_len"], r["output_len"]) for r in report["rows"]]
        sweep += [("visual", r["batch"]) for r in report.get("visual_rows", [])]
        key = digest_json({"engine": value["digest"], "env": report["env"], "settings": report["settings"],
                           "sweep": sweep})
        manifest = {"schema": SCHEMA, "step": "bench", "key": key, "created_at": report["env"]["date_utc"],
                    "inputs": {"publish": {"manifest": value["manifest"], "digest": value["digest"]}},
                    "results": report, "files": {}}
        store.put_manifest(value["recipe"], "bench", key, manifest)
        report["recorded"] = store.manifest_path(value["recipe"], "bench", key)
    return report


def _text(eng, src, limits, batches, input_lens, output_lens, warmup, iters, eager, seed, say) -> dict:
    """A text LLM: random prompts of each length."""
    import torch

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
    rows = []
    for b, t, n in points:
        ids = torch.randint(3, eng.meta.vocab_size, (b, t), generator=g).to(device)
        say(f"b{b} in{t} out{n}: engine")
        fig, toks = time_engine(eng, ids, n, warmup, iters)
        r = {"batch": b, "input_len": t, "output_len": n, "engine": fig}
        if hf is not None:
            say(f"b{b} in{t} out{n}: eager")
            e, etoks = time_eager(hf, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, n,
                                  max(1, warmup // 2), max(1, iters // 2 + 1), device == "cuda")
            _pair(r, fig, toks, e, etoks)
        rows.append(r)
    return {"eager_baseline": "transformers generate, greedy, same dtype and device", "rows": rows,
            "skipped": skipped}


def _multimodal(eng, visual_dir, src, comps, limits, batches, input_lens, output_lens, warmup, iters, eager,
                cuda_graphs, seed, say, ref_text) -> dict:
    """A multimodal ref: the visual engine alone per batch size, then the whole
    request (images + prompt -> visual engine -> prefill with the prompt
    table -> tokens), each next to the family's Hugging Face model."""
    import torch

    from .backends import load_engine
    from .families import get_family
    from .images import BUILTIN, builtin_image
    from .runtime.multimodal import engine_ids

    vis = load_engine(visual_dir, cuda_graphs)
    vm = vis.visual
    fam = get_family(vm["family"])
    if vm.get("encoder_output") or getattr(eng, "seq2seq", False) or vm.get("media", "image") != "image":
        raise BadInput(f"{ref_text}: bench times image models whose features reach a decoder-only LLM as a prompt "
                       f"table (LLaVA, LLaVA-NeXT, BLIP-2 with OPT); family {fam.name} is not one in this version")
    if not hasattr(vis, "on_device"):
        raise BadInput(f"{ref_text}: its {comps['visual']['backend']} visual engine cannot be timed here")
    device, cuda = eng.device, eng.device == "cuda"
    if getattr(vis, "device", device) != device:
        raise BadInput(f"{ref_text}: the visual engine runs on {vis.device}, the LLM on {device}; bench times "
                       f"engines on one device")
    processor = fam.load_processor(src, vm)
    tok = getattr(processor, "image_token", None) or "<image>"
    token = getattr(tok, "content", None) or str(tok)
    extras = {k: v.to(device) for k, v in vis.extras.items()}
    dtype = eng.dtype

    hf = None
    if eager:
        say(f"loading the eager baseline (Hugging Face {fam.reference_class or fam.name}, {eng.meta.dtype})")
        try:
            hf = fam.plain_greedy(fam.reference_model(src, dtype=dtype).to(device))
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - transformers' OSError, ValueError, safetensors' errors ... for bad files
            raise BadInput(f"{ref_text}: the eager baseline (family {fam.name}'s Hugging Face model) cannot be "
                           f"built: {e}".splitlines()[0]) from None

    # the images, preprocessed outside every timed region (one prompt text for all: "" with the placeholder)
    n_img = max(max(batches), 1)
    names = [f"builtin:{BUILTIN[i % len(BUILTIN)]}" for i in range(n_img)]
    encs = [fam.encode(processor, builtin_image(n[len("builtin:"):]), "", token) for n in names]

    def on_device(e: dict) -> dict:
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
                for k, v in e.items()}

    encs_dev = [on_device(e) for e in encs]
    inputs_of = [fam.encoder_inputs(e) for e in encs_dev]  # per image: its encoder inputs (LLaVA-NeXT: tiles)
    sizes = [x.shape[0] for x in inputs_of]
    B_vis = vis.max_batch_size

    def run(x: torch.Tensor) -> torch.Tensor:
        """The visual engine on encoder inputs, in the batches it takes."""
        if x.shape[0] <= B_vis:
            return vis.on_device(x)
        return torch.cat([vis.on_device(x[s:s + B_vis]) for s in range(0, x.shape[0], B_vis)])

    def features(k: int) -> torch.Tensor:
        """The prompt table of the first k images: the visual engine, packed by the family."""
        parts = list(run(torch.cat(inputs_of[:k])).split(sizes[:k]))
        return torch.cat(fam.pack_features(parts, encs[:k], vm, extras))

    # 1. the visual engine alone, per batch size
    visual_rows, visual_skipped = [], []
    with torch.no_grad():
        for b in batches:
            n_in = sum(sizes[:b])
            if n_in > B_vis:
                visual_skipped.append(f"visual b{b}: {n_in} encoder inputs > the visual engine's max_batch_size {B_vis}")
                continue
            x = torch.cat(inputs_of[:b])
            say(f"visual b{b}: engine")
            ms = time_call(lambda: vis.on_device(x), warmup, iters, cuda)
            r = {"batch": b, "encoder_inputs": n_in, "engine": {"ms": round(ms, 4), "images_per_s": round(b * 1e3 / ms, 2)}}
            if hf is not None:
                say(f"visual b{b}: eager")
                ref = lambda: fam.reference_features(hf, encs_dev[:b])  # noqa: E731
                ems = time_call(ref, max(1, warmup // 2), max(1, iters // 2 + 1), cuda)
                r["eager"] = {"ms": round(ems, 4), "images_per_s": round(b * 1e3 / ems, 2)}
                r["speedup"] = _sig(ems / ms)
                got = features(b).float()  # packed as the prompt table, as the family's reference packs them
                want = torch.cat([f.reshape(-1, f.shape[-1]) for f in ref()]).float()
                r["features_max_abs_diff"] = float((got - want).abs().max()) if got.shape == want.shape else None
            visual_rows.append(r)

    # 2. the whole request
    with torch.no_grad():  # prompt-table rows each image gives (LLaVA-NeXT: by its size), from one untimed run
        per_image = [fam.pack_features([run(x)], [e], vm, extras)[0].shape[0] for x, e in zip(inputs_of, encs)]
    F = max(per_image[: max(batches)])
    points, skipped = sweep_points(batches, input_lens, output_lens, limits, extra_in=F, extra_what="visual features")
    if not points:
        raise BadInput(f"no point of the sweep fits the engines' limits {limits} with {F} visual features per "
                       f"image: " + "; ".join(skipped + visual_skipped))
    g = torch.Generator().manual_seed(seed)
    img_id = vm["image_token_id"]
    V = eng.meta.vocab_size
    pad = getattr(processor.tokenizer, "pad_token_id", None) or 0
    rows = []
    for b, t, n in points:
        base = [e["input_ids"][0].tolist() for e in encs[:b]]
        n_text = [sum(1 for i in ids if i != img_id) for ids in base]
        if max(n_text) > t:
            skipped.append(f"b{b} in{t} out{n}: the processor's prompt alone has {max(n_text)} text tokens")
            continue
        hf_ids = []
        for ids, k in zip(base, n_text):  # random text tokens (never the image placeholder) to t text tokens
            r = torch.randint(3, V - 1, (t - k,), generator=g)
            r[r >= img_id] += 1
            hf_ids.append(ids + r.tolist())
        eng_ids, first = [], 0
        for ids, f in zip(hf_ids, per_image[:b]):
            eng_ids.append(engine_ids(ids, first, f, vm, token))
            first += f
        if len({len(x) for x in eng_ids}) != 1:
            skipped.append(f"b{b} in{t} out{n}: the images give prompts of different lengths")
            continue
        ids_t = torch.tensor(eng_ids, dtype=torch.long, device=device)
        if ids_t.shape[1] + n > limits["max_seq_len"] or ids_t.shape[1] > limits["max_input_len"]:
            skipped.append(f"b{b} in{t} out{n}: {ids_t.shape[1]} prompt positions (with the visual features) + {n} "
                           f"exceed the engine's limits {limits}")
            continue
        say(f"b{b} in{t} out{n}: visual engine + LLM engine")
        fig, toks = time_engine(eng, ids_t, n, warmup, iters, before=lambda b=b: features(b))
        r = {"batch": b, "input_len": t, "output_len": n, "prompt_positions": ids_t.shape[1], "engine": fig}
        if hf is not None:
            say(f"b{b} in{t} out{n}: eager")
            x = torch.tensor(hf_ids, dtype=torch.long, device=device)
            inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
            for k in encs_dev[0]:
                if k not in inputs and torch.is_tensor(encs_dev[0][k]):
                    inputs[k] = torch.cat([e[k] for e in encs_dev[:b]])
            e, etoks = time_eager(hf, inputs, n, max(1, warmup // 2), max(1, iters // 2 + 1), cuda, pad)
            _pair(r, fig, toks, e, etoks)
        rows.append(r)
    return {
        "engine": {"visual": {"backend": comps["visual"]["backend"], "dtype": vis.meta.dtype,
                              "cuda_graphs": bool(getattr(vis, "cuda_graphs", False)), "max_batch_size": B_vis,
                              "features_per_image": F, "family": fam.name}},
        "eager_baseline": (f"transformers {fam.reference_class}: generate (greedy) and the vision tower + projector "
                           f"(reference_features), same dtype and device"),
        "inputs": {"images": names, "preprocessing": f"{type(processor).__name__}, outside the timed region",
                   "prompt": f"the processor's ids for an empty prompt with the image placeholder ({token}), then "
                             f"random text tokens up to input_len text tokens (seed {seed})"},
        "rows": rows,
        "skipped": skipped,
        "visual_rows": visual_rows,
        "visual_skipped": visual_skipped,
    }


def format_table(report: dict) -> str:
    cols = ["batch", "in", "out", "TTFT ms", "ms/token", "tok/s/user", "tok/s", "e2e tok/s",
            "eager TTFT", "eager ms/tok", "eager tok/s", "x decode", "x TTFT", "=tokens"]
    lines = []
    for r in report["rows"]:
        e, h = r["engine"], r.get("eager") or {}
        lines.append([r["batch"], r["input_len"], r["output_len"], e["ttft_ms"], e["decode_ms_per_token"],
                      e["tokens_per_s_per_user"], e["tokens_per_s"], e["e2e_tokens_per_s"], h.get("ttft_ms"),
                      h.get("decode_ms_per_token"), h.get("tokens_per_s"), r.get("speedup_decode"),
                      r.get("speedup_ttft"), r.get("tokens_equal")])
    ref, env, eng = report["ref"], report["env"], report["engine"]
    head = (f"{ref['recipe']}:{ref['variant']}@{ref['alias']} ({eng['dtype']}, {eng['backend']}, "
            f"cuda graphs {'on' if eng['cuda_graphs'] else 'off'}) on {env.get('gpu') or env.get('cpu')}, "
            f"{env['date_utc']}; {report['settings']['timer']}, median of {report['settings']['iters']}")
    out = [head]
    if "visual_rows" in report:
        v = eng["visual"]
        out.append(f"visual engine ({v['backend']}, {v['dtype']}, {v['features_per_image']} features per image): ms "
                   f"per call on a batch of images, eager = the Hugging Face vision tower + projector")
        out += _table(["batch", "ms", "images/s", "eager ms", "eager images/s", "x", "max |diff|"],
                      [[r["batch"], r["engine"]["ms"], r["engine"]["images_per_s"], (r.get("eager") or {}).get("ms"),
                        (r.get("eager") or {}).get("images_per_s"), r.get("speedup"), r.get("features_max_abs_diff")]
                       for r in report["visual_rows"]])
        if report.get("visual_skipped"):
            out.append("skipped: " + "; ".join(report["visual_skipped"]))
        out.append("pipeline (images + prompt of `in` text tokens; TTFT: visual engine + prefill + first token)")
    out += _table(cols, lines)
    floor = [f"b{r['batch']} in{r['input_len']} out{r['output_len']}" for r in report["rows"]
             if (r.get("eager") or {}).get("decode_floor")]
    if floor:
        out.append("eager ms/tok is a floor (its full run took no longer than its one-token run: timing noise): "
                   + ", ".join(floor))
    if report.get("skipped"):
        out.append("skipped: " + "; ".join(report["skipped"]))
    if report.get("recorded"):
        out.append(f"recorded: {report['recorded']}")
    return "\n".join(out)


def _table(cols: list[str], lines: list[list]) -> list[str]:
    def fmt(v):
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    w = [max(len(c), *(len(fmt(x[i])) for x in lines)) if lines else len(c) for i, c in enumerate(cols)]
    return (["  ".join(c.rjust(w[i]) for i, c in enumerate(cols))]
            + ["  ".join(fmt(x[i]).rjust(w[i]) for i in range(len(cols))) for x in lines])


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
