"""reference: the Hugging Face model's outputs on the recipe's validation
inputs, computed once per source and validation settings, a cached step of
its own.

    fetch -> reference -> (every variant's) shards, validate

The reference is the unquantized model in fp32: its logits on every prompt
and text-set window, its greedy tokens with each step's 8 largest logits and
their token ids (what the near-tie gate, greedy_equal_to_near_tie, reads;
evaluation.greedy_top), and beams, where the recipe's max_beam_width is
above 1. A reference stored before the steps' top-k still loads (the gate is
then not judged); none is read in practice, since the step's key holds
evaluation.py's code and so changed with them. Its key holds the fetched checkpoint, the
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

Multimodal recipes whose LLM is decoder-only (a prompt table: LLaVA,
LLaVA-NeXT, LLaVA-NeXT-Video, BLIP-2 with OPT) have theirs here too: the
family's Hugging Face class (`reference_class`) and its processor, on the
recipe's images (videos) paired with its prompts as validate pairs them:
each pair's visual features, prefill logits, greedy tokens and beams, and the
text set through the LLM (evaluation.multimodal_reference_outputs). Their
key adds the images' and videos' digests, the visual facts the processor is
built from (the family's visual_meta: frames per video, tiling) and
max_batch_size (the features are computed in the engines' batches).

Those with an encoder-decoder LLM (BLIP-2 with Flan-T5, Nougat, BLIP) too
(evaluation.multimodal_seq2seq_reference_outputs): each pair's visual
features, greedy tokens and beams of `generate` from the decoder start token
(the family's decoder_start_token_id: the one the conversion gives the
engines), and its logits with the decoder teacher-forced on the start token,
the prompt's tokens (Nougat, BLIP) and those greedy tokens, cut to
max_decoder_tokens = min(max_input_len, max_seq_len), the decoder tokens the
engines take in one pass; the text set in windows of max_decoder_tokens.
Their key adds max_decoder_tokens to the limits; the manifest records the
decoder start token and the stop token it generated with, which validate
checks against the engines' (`mismatch`), as it checks the limits.
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


def multimodal(ctx: Ctx) -> bool:
    return "visual" in ctx.recipe.enabled_components


def seq2seq(ctx: Ctx, config: dict) -> bool:
    """Whether a multimodal recipe's LLM is an encoder-decoder (BLIP-2 with Flan-T5, Nougat, BLIP)."""
    from ..families import get_family

    fam = get_family(ctx.recipe.family)
    return bool(fam.features_as_encoder_output) or getattr(fam.llm_family(config), "kind", "") == "encoder-decoder"


def needed(ctx: Ctx, fetched: StepResult | None = None) -> bool:
    """Every recipe; a multimodal one once fetched (its key holds facts of the
    fetched checkpoint's config: False without `fetched`)."""
    return not multimodal(ctx) or fetched is not None


def limits(ctx: Ctx, config: dict | None = None) -> dict:
    """The limits that cut the reference (config: the fetched config.json, which says whether a multimodal
    recipe's LLM is an encoder-decoder)."""
    lim = ctx.recipe.limits
    out = {"max_input_len": lim.max_input_len, "max_seq_len": lim.max_seq_len, "max_beam_width": lim.max_beam_width}
    if multimodal(ctx):  # the visual features are computed in batches of the engines' max_batch_size
        out["max_batch_size"] = lim.max_batch_size
        if config is not None and seq2seq(ctx, config):  # the teacher-forced decoder inputs are cut to it
            out["max_decoder_tokens"] = min(lim.max_input_len, lim.max_seq_len)
    return out


DEFAULT_VIDEOS = ["builtin:orbit", "builtin:pan"]


def videos_of(ctx: Ctx) -> list[str]:
    return ctx.recipe.validation.videos or DEFAULT_VIDEOS


def media_digests(ctx: Ctx) -> dict:
    """{"video_digests": [...], "image_digests": [...]}: the recipe's validation videos and images (those its
    family takes), by content (images.image_digest, videos.video_digest)."""
    from ..families import get_family
    from ..images import image_digest

    out = {}
    kinds = get_family(ctx.recipe.family).media_kinds
    if "video" in kinds:
        from ..videos import video_digest

        out["video_digests"] = [video_digest(i, ctx.recipe.recipe_dir()) for i in videos_of(ctx)]
    if "image" in kinds:  # LLaVA-NeXT-Video: both
        out["image_digests"] = [image_digest(i, ctx.recipe.recipe_dir()) for i in ctx.recipe.validation.images]
    return out


def media_of(ctx: Ctx) -> tuple[list[str], list]:
    """The recipe's validation items (videos, then images, those its family takes): their names and contents."""
    from ..families import get_family
    from ..images import load_image

    kinds = get_family(ctx.recipe.family).media_kinds
    names, items = [], []
    if "video" in kinds:
        from ..videos import load_video

        names += videos_of(ctx)
        items += [load_video(i, ctx.recipe.recipe_dir()) for i in videos_of(ctx)]
    if "image" in kinds:  # LLaVA-NeXT-Video takes both: its videos, then its images
        names += ctx.recipe.validation.images
        items += [load_image(i, ctx.recipe.recipe_dir()) for i in ctx.recipe.validation.images]
    return names, items


def visual_meta(ctx: Ctx, config: dict) -> dict:
    """The visual facts the family's processor is built from (the visual engine's, less its build's own)."""
    from ..families import get_family

    fam = get_family(ctx.recipe.family)
    return fam.visual_meta(fam.media_config(config, ctx.recipe))


def spec(ctx: Ctx, fetched: StepResult) -> StepSpec:
    v = ctx.recipe.validation
    params = {
        "prompts": list(v.prompts),
        "max_new_tokens": v.max_new_tokens,
        "max_eval_tokens": v.max_eval_tokens,
        "text_digest": digest_bytes(text_set(v.text_set, ctx).encode()),
        "limits": limits(ctx, fetched.results["config"]),
    }
    modules = [__name__]
    if multimodal(ctx):  # only then: a text recipe's key stays what it was
        from ..families import get_family

        params.update(media_digests(ctx))
        params["visual_meta"] = visual_meta(ctx, fetched.results["config"])
        modules.append(type(get_family(ctx.recipe.family)).__module__)
    tc = {"torch": version_of("torch"), "transformers": version_of("transformers")}
    return StepSpec("reference", params, {"fetch": fetched}, code_version(*modules), tc)


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
        from ..evaluation import load_reference, model_device, save_outputs

        src = materialize(ctx, fetched, scratch / "src")
        v, lim = ctx.recipe.validation, s.params["limits"]
        if multimodal(ctx):
            from ..families import get_family

            fam = get_family(ctx.recipe.family)
            processor = fam.load_processor(src, s.params["visual_meta"])
            names, items = media_of(ctx)
            what = f"{len(items)} image(s) or video(s), {len(v.prompts)} prompt(s)"
            model_class = fam.reference_class
            eos = fam.stop_token_id(processor, {})
            encdec = "max_decoder_tokens" in lim  # an encoder-decoder LLM (limits)
            start = fam.decoder_start_token_id(fetched.results["config"]) if encdec else None
        else:
            from transformers import AutoTokenizer

            from ..evaluation import tokenize_inputs

            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
            prompt_ids, eval_ids = tokenize_inputs(tok, v.prompts, text_set(v.text_set, ctx), v.max_eval_tokens)
            what = f"{len(prompt_ids)} prompt(s), {len(eval_ids)} text-set token(s)"
            model_class = None
        t0 = time.perf_counter()
        model = load_reference(src, device="auto", model_class=model_class)
        where = str(model_device(model))
        devices = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) or [where]
        t_load = time.perf_counter() - t0
        log(f"reference: the Hugging Face model in fp32 on {', '.join(devices)} (loaded in {t_load:.1f}s); {what}")
        if multimodal(ctx):
            from ..evaluation import multimodal_reference_outputs, multimodal_seq2seq_reference_outputs

            text = text_set(v.text_set, ctx)
            if encdec:
                outputs = multimodal_seq2seq_reference_outputs(
                    fam, model, processor, items, v.prompts, text, v.max_new_tokens, v.max_eval_tokens,
                    lim["max_seq_len"], lim["max_decoder_tokens"], lim["max_input_len"], lim["max_batch_size"],
                    lim["max_beam_width"], eos, start)
            else:
                outputs = multimodal_reference_outputs(
                    fam, model, processor, items, v.prompts, text, v.max_new_tokens, v.max_eval_tokens,
                    lim["max_seq_len"], lim["max_input_len"], lim["max_batch_size"], lim["max_beam_width"], eos)
            counts = {"pairs": len(outputs["prompts"]), "media": len(items), "eval_windows": len(outputs["eval"]),
                      "eos_token_id": eos, **({"decoder_start_token_id": start} if encdec else {})}
        else:
            from ..evaluation import reference_outputs

            outputs = reference_outputs(model, prompt_ids, eval_ids, v.max_new_tokens, tok.eos_token_id,
                                        tok.pad_token_id, lim["max_seq_len"], lim["max_input_len"],
                                        lim["max_beam_width"])
            counts = {"prompts": len(prompt_ids), "eval_tokens": len(eval_ids)}
        save_outputs(outputs, out)
        results = {"devices": devices, "load_s": round(t_load, 2), "run_s": round(time.perf_counter() - t0 - t_load, 2),
                   "peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "peak_gpu_mb": _peak_gpu_mb(), **counts}
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


_UNSAID = object()


def mismatch(referenced: StepResult | None, eng, eos=_UNSAID) -> str | None:
    """Why the reference is not one to judge an engine by, or None: there is
    none (referenced None), its limits are not the ones the reference was cut with (a multimodal recipe's: its
    LLM engine's, max_batch_size too; an encoder-decoder one's also
    max_decoder_tokens), or (multimodal) the engines start their decoder
    from another token, or stop at another one (eos: the pipeline's), than
    the reference generated with."""
    if referenced is None:
        return "no stored reference"
    lim = referenced.manifest["params"]["limits"]
    for name in ("max_input_len", "max_seq_len", "max_beam_width", "max_batch_size", "max_decoder_tokens"):
        # those the reference was cut with (max_batch_size: multimodal; max_decoder_tokens: encoder-decoder)
        if name in lim and lim[name] != getattr(eng, name, None):
            return f"the reference was cut with {name} {lim[name]}, the engine has {getattr(eng, name, None)}"
    got = referenced.results
    if got.get("decoder_start_token_id") is not None and got["decoder_start_token_id"] != eng.decoder_start_token_id:
        return (f"the reference's decoder starts from token {got['decoder_start_token_id']}, the engine's from "
                f"{eng.decoder_start_token_id}")
    if eos is not _UNSAID and "eos_token_id" in got and got["eos_token_id"] != eos:
        return f"the reference generated up to token {got['eos_token_id']}, the engines stop at {eos}"
    return None

