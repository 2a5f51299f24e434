"""reference: the Hugging Face model's outputs on the recipe's validation
inputs, computed once per source and validation settings, a cached step of
its own.

    fetch -> reference -> (every variant's) shards, validate

The reference is the unquantized model in fp32: its logits on every prompt
and text-set window, its greedy tokens (and beams, where the recipe's
max_beam_width is above 1). Its key holds the fetched checkpoint, the
prompts and text set, the limits that cut them (max_input_len, max_seq_len,
max_beam_width) and the torch / transformers versions; not the variant, so
all variants of a recipe (tp sizes, dtypes, quantizations, backends) share
one computation instead of loading the model in fp32 once each.

It runs on the GPUs where the machine has any (a GPU worker: the validate
step's machine), through accelerate's placement: a model larger than one GPU
is split over the GPUs, and what does not fit them stays in host memory. On
a machine without a GPU it runs on the CPU. ENGINEFARM_REFERENCE_DEVICE=cpu
keeps it there. The manifest records where it ran, how long it took and its
peak memory.

Multimodal recipes keep their in-step reference (images and videos go
through the family's processor there).
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

from ..backends.base import version_of
from ..errors import BadInput
from ..evaluation import builtin_text
from ..hashing import code_version, digest_bytes
from .base import Ctx, StepResult, StepSpec, log, materialize, run_step
from .policy import step_task


def text_set(name: str, ctx: Ctx) -> str:
    if name == "builtin:eval":
        return builtin_text()
    p = Path(name)
    if not p.is_absolute():
        p = ctx.recipe.recipe_dir() / p
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"recipe {ctx.recipe.name}: validation.text_set {name}: {e}") from None


def needed(ctx: Ctx) -> bool:
    """Text recipes (multimodal ones compute their reference in validate)."""
    return "visual" not in ctx.recipe.enabled_components


def limits(ctx: Ctx) -> dict:
    lim = ctx.recipe.limits
    return {"max_input_len": lim.max_input_len, "max_seq_len": lim.max_seq_len, "max_beam_width": lim.max_beam_width}


def spec(ctx: Ctx, fetched: StepResult) -> StepSpec:
    v = ctx.recipe.validation
    params = {
        "prompts": list(v.prompts),
        "max_new_tokens": v.max_new_tokens,
        "max_eval_tokens": v.max_eval_tokens,
        "text_digest": digest_bytes(text_set(v.text_set, ctx).encode()),
        "limits": limits(ctx),
    }
    tc = {"torch": version_of("torch"), "transformers": version_of("transformers")}
    return StepSpec("reference", params, {"fetch": fetched}, code_version(__name__), tc)


def _peak_gpu_mb() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return round(sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20, 1)


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()
_FORCED: dict[tuple, StepResult] = {}


@step_task("reference")
def reference_task(ctx: Ctx, fetched: StepResult) -> StepResult:
    s = spec(ctx, fetched)
    with _LOCKS_LOCK:
        lock = _LOCKS.setdefault(s.key(), threading.Lock())
    with lock:  # variants in parallel threads: the first computes, the others find it stored
        if ctx.force:  # a forced build computes it once too, not once per variant
            done = _FORCED.get((s.key(), ctx.force_nonce))
            if done is None:
                done = _FORCED[(s.key(), ctx.force_nonce)] = _run(ctx, fetched, s)
            return done
        return _run(ctx, fetched, s)


def _run(ctx: Ctx, fetched: StepResult, s: StepSpec) -> StepResult:

    def work(out: Path, scratch: Path):
        from transformers import AutoTokenizer

        from ..evaluation import load_reference, model_device, reference_outputs, save_outputs, tokenize_inputs

        src = materialize(ctx, fetched, scratch / "src")
        v, lim = ctx.recipe.validation, s.params["limits"]
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        prompt_ids, eval_ids = tokenize_inputs(tok, v.prompts, text_set(v.text_set, ctx), v.max_eval_tokens)
        t0 = time.perf_counter()
        model = load_reference(src, device="auto")
        where = str(model_device(model))
        devices = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) or [where]
        t_load = time.perf_counter() - t0
        log(f"reference: the Hugging Face model in fp32 on {', '.join(devices)} (loaded in {t_load:.1f}s); "
            f"{len(prompt_ids)} prompt(s), {len(eval_ids)} text-set token(s)")
        outputs = reference_outputs(model, prompt_ids, eval_ids, v.max_new_tokens, tok.eos_token_id,
                                    tok.pad_token_id, lim["max_seq_len"], lim["max_input_len"], lim["max_beam_width"])
        save_outputs(outputs, out)
        results = {"devices": devices, "load_s": round(t_load, 2), "run_s": round(time.perf_counter() - t0 - t_load, 2),
                   "peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "peak_gpu_mb": _peak_gpu_mb(), "prompts": len(prompt_ids), "eval_tokens": len(eval_ids)}
        del model
        import torch

        if torch.cuda.is_available():  # the engines, and rank processes, come next on these GPUs
            torch.cuda.empty_cache()
        return results, {}

    return run_step(ctx, s, work)


def load(ctx: Ctx, referenced: StepResult, scratch: Path) -> dict:
    """The stored outputs of a reference result, as reference_outputs gave them."""
    from ..evaluation import load_outputs

    return load_outputs(materialize(ctx, referenced, scratch / "reference"))


def matches(referenced: StepResult, eng) -> bool:
    """Whether an engine's limits are the ones the reference was cut with."""
    lim = referenced.manifest["params"]["limits"]
    return (lim["max_input_len"], lim["max_seq_len"], lim["max_beam_width"]) == \
        (eng.max_input_len, eng.max_seq_len, eng.max_beam_width)

