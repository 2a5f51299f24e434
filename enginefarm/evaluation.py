"""Validation arithmetic shared by the validate step, the tp shard check and
the convert command: engine-side and reference-side outputs on the same token
ids, compared side by side (logits max-abs-diff, top-1 agreement, greedy
tokens exactly and up to the first near-tie, and over a text set perplexity
and top-1 / top-5 next-token accuracy), and the recipe's gates applied to the
result. Multimodal pipelines add the
visual features (engine against PyTorch) and run the prompts with images; the
Hugging Face side (multimodal_reference_outputs for a decoder-only LLM,
multimodal_seq2seq_reference_outputs for an encoder-decoder one) is computed
apart from the engines, so the reference step stores it once."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable, Optional

from .errors import BadInput


def builtin_text() -> str:
    """The text set the repo ships (the HF demo's accuracy mode runs over it)."""
    return (Path(__file__).resolve().parent / "data" / "eval.txt").read_text()


def engine_outputs(eng, prompt_ids: list[list[int]], eval_ids: list[int], max_new_tokens: int,
                   eos: int | None, beams: int = 1) -> dict:
    """Everything validation needs from the engine side, from token ids
    alone (so it also runs in the tp rank processes of runtime/tp.py, which
    load neither tokenizer nor reference model). beams > 1: each prompt's
    beam-search output with that many beams, too."""
    if getattr(eng, "seq2seq", False):
        return _engine_outputs_seq2seq(eng, prompt_ids, eval_ids, max_new_tokens, eos, beams)
    prompts = []
    for ids in prompt_ids:
        if not ids:
            raise BadInput("a validation prompt encodes to no tokens")
        n_new = min(max_new_tokens, eng.max_seq_len - len(ids))
        prompts.append({"ids": ids, "n_new": n_new, "logits": eng.logits(ids),
                        "generated": eng.generate([ids], n_new, eos_token_id=eos)[0],
                        **_engine_beams(lambda d: eng.generate([ids], n_new, eos_token_id=eos, decoding=d)[0], beams)})
    win = eng.max_input_len
    chunks = []
    for s in range(0, len(eval_ids) - 1, win):
        chunk = eval_ids[s : s + win + 1]
        if len(chunk) < 2:
            break
        chunks.append({"ids": chunk, "logits": eng.logits(chunk[:-1])})
    return {"prompts": prompts, "eval": chunks}


def _engine_beams(run, beams: int) -> dict:
    """{"beams": the output of run(Decoding with `beams` beams)}, where beams > 1."""
    if beams <= 1:
        return {}
    from .runtime.decoding import Decoding

    return {"beams": run(Decoding(num_beams=beams))}


def beam_config(beams: int, pad: int | None, eos: int | None, **kw):
    """Hugging Face `generate`'s beam search as the engines run it: no early
    stop (every beam runs to max_new_tokens or eos), length penalty 1.0."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=beams, early_stopping=False, length_penalty=1.0,
                            eos_token_id=eos, pad_token_id=pad, **kw)


def unpadded(ids: list[int], pad: int | None, eos: int | None) -> list[int]:
    """A beam's tokens without the pad tokens `generate` writes after its end."""
    ids = list(ids)
    while ids and pad is not None and pad != eos and ids[-1] == pad:
        ids.pop()
    return ids


# At each step of a greedy generation the reference keeps its GREEDY_TOP_K
# largest logits (fp32) and their token ids, best first: the gap between its
# top two (the step's tie margin) and, where an engine's greedy tokens part
# from the reference's, the gap between the reference's token and the
# engine's there (exact where the engine's token is among the k; else at
# least the gap to the k-th). The near-tie rule (greedy_near_tie) reads them.
GREEDY_TOP_K = 8
GREEDY_TOP = ("greedy_top_ids", "greedy_top_logits")  # [steps, k] int32, [steps, k] float32


def greedy_top(step_logits) -> dict:
    """{"greedy_top_ids", "greedy_top_logits"} of a greedy generation's
    logits: `generate(output_logits=True)`'s tuple of [1, vocab] (one a
    step), or a [steps, vocab] tensor (teacher-forced on the greedy tokens)."""
    import torch

    if isinstance(step_logits, torch.Tensor):
        lg = step_logits.float().cpu()
    elif step_logits:
        lg = torch.cat([x.float().cpu().reshape(1, -1) for x in step_logits])
    else:  # no step (no room for a new token)
        return {GREEDY_TOP[0]: torch.zeros(0, GREEDY_TOP_K, dtype=torch.int32),
                GREEDY_TOP[1]: torch.zeros(0, GREEDY_TOP_K)}
    top = lg.topk(min(GREEDY_TOP_K, lg.shape[-1]), -1)
    return {GREEDY_TOP[0]: top.indices.to(torch.int32).contiguous(), GREEDY_TOP[1]: top.values.contiguous()}


def reference_outputs(ref_model, prompt_ids: list[list[int]], eval_ids: list[int], max_new_tokens: int,
                      eos: int | None, pad: int | None, max_seq_len: int, max_input_len: int,
                      beams: int = 1) -> dict:
    """The same as engine_outputs, from the Hugging Face model."""
    import torch

    if getattr(getattr(ref_model, "config", None), "is_encoder_decoder", False):
        return _reference_outputs_seq2seq(ref_model, prompt_ids, eval_ids, max_new_tokens, eos, pad, max_seq_len,
                                          max_input_len, beams)
    dev = model_device(ref_model)
    prompts = []
    for ids in prompt_ids:
        n_new = min(max_new_tokens, max_seq_len - len(ids))
        with torch.no_grad():
            logits = ref_model(torch.tensor([ids], device=dev)).logits[0].float().cpu()
            out = ref_model.generate(
                torch.tensor([ids], device=dev), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                return_dict_in_generate=True, output_logits=True,
            )
        p = {"ids": ids, "n_new": n_new, "logits": logits, "generated": out.sequences[0, len(ids):].tolist(),
             **greedy_top(out.logits)}
        if beams > 1:
            with torch.no_grad():
                out = ref_model.generate(torch.tensor([ids], device=dev),
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                                         generation_config=beam_config(beams, pad, eos, max_new_tokens=n_new))
            p["beams"] = unpadded(out[0, len(ids):].tolist(), pad, eos)
        prompts.append(p)
    chunks = []
    for s in range(0, len(eval_ids) - 1, max_input_len):
        chunk = eval_ids[s : s + max_input_len + 1]
        if len(chunk) < 2:
            break
        with torch.no_grad():
            chunks.append({"ids": chunk, "logits": ref_model(torch.tensor([chunk[:-1]], device=dev)).logits[0].float().cpu()})
    return {"prompts": prompts, "eval": chunks}


# ----------------------------------------------------------------------------- encoder-decoder (T5, BART)
#
# The prompt goes to the encoder; the decoder starts from
# decoder_start_token_id. Greedy output: up to max_new_tokens after the start
# token (the decoder holds max_seq_len tokens). Logits, for a prompt and for
# each chunk of the text set: the encoder reads the tokens and the decoder,
# teacher-forced on [start] + tokens[:-1], predicts the same tokens (BART's
# reconstruction objective; for T5 it is simply a fixed, shared input), so
# perplexity and top-N accuracy are those of reproducing the text.


def seq2seq_chunks(eval_ids: list[int], window: int) -> list[list[int]]:
    chunks = [eval_ids[s : s + window] for s in range(0, len(eval_ids), window)]
    return [c for c in chunks if len(c) >= 2]


def _engine_outputs_seq2seq(eng, prompt_ids, eval_ids, max_new_tokens, eos, beams: int = 1) -> dict:
    start = eng.decoder_start_token_id
    prompts = []
    for ids in prompt_ids:
        if not ids:
            raise BadInput("a validation prompt encodes to no tokens")
        n_new = min(max_new_tokens, eng.max_seq_len)
        prompts.append({"ids": ids, "n_new": n_new, "targets": ids, "logits": eng.logits(ids, [start] + ids[:-1]),
                        "generated": eng.generate([ids], n_new, eos_token_id=eos)[0],
                        **_engine_beams(lambda d: eng.generate([ids], n_new, eos_token_id=eos, decoding=d)[0], beams)})
    chunks = [{"ids": c, "targets": c, "logits": eng.logits(c, [start] + c[:-1])}
              for c in seq2seq_chunks(eval_ids, min(eng.max_input_len, eng.max_seq_len))]
    return {"prompts": prompts, "eval": chunks}


def _reference_outputs_seq2seq(ref_model, prompt_ids, eval_ids, max_new_tokens, eos, pad, max_seq_len,
                               max_input_len, beams: int = 1) -> dict:
    import torch
    from transformers import GenerationConfig

    start = ref_model.config.decoder_start_token_id
    dev = model_device(ref_model)

    def teacher_forced(ids):
        with torch.no_grad():
            return ref_model(input_ids=torch.tensor([ids], device=dev),
                             decoder_input_ids=torch.tensor([[start] + ids[:-1]], device=dev)).logits[0].float().cpu()

    prompts = []
    for ids in prompt_ids:
        n_new = min(max_new_tokens, max_seq_len)
        # plain greedy search: none of the checkpoint's own generation settings
        # (beams, forced BOS/EOS, n-gram blocking) that the engine does not apply
        gc = GenerationConfig(max_new_tokens=n_new, do_sample=False, num_beams=1, decoder_start_token_id=start,
                              eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
        with torch.no_grad():
            out = ref_model.generate(torch.tensor([ids], device=dev),
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                                     generation_config=gc)
        p = {"ids": ids, "n_new": n_new, "targets": ids, "logits": teacher_forced(ids),
             "generated": out.sequences[0, 1:].tolist(), **greedy_top(out.logits)}
        if beams > 1:  # after the decoder start token
            with torch.no_grad():
                out = ref_model.generate(torch.tensor([ids], device=dev),
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                                         generation_config=beam_config(beams, pad, eos, max_new_tokens=n_new,
                                                                       decoder_start_token_id=start))
            p["beams"] = unpadded(out[0, 1:].tolist(), pad, eos)
        prompts.append(p)
    chunks = [{"ids": c, "targets": c, "logits": teacher_forced(c)}
              for c in seq2seq_chunks(eval_ids, min(max_input_len, max_seq_len))]
    return {"prompts": prompts, "eval": chunks}


def reference_device(device: Optional[str] = None) -> str:
    """Where the Hugging Face reference runs: `device`, else ENGINEFARM_REFERENCE_DEVICE, else "auto" (the
    GPUs where there are any, the CPU otherwise)."""
    import os

    d = device or os.environ.get("ENGINEFARM_REFERENCE_DEVICE") or "auto"
    if d not in ("auto", "cpu", "cuda"):
        raise BadInput(f"ENGINEFARM_REFERENCE_DEVICE must be auto, cpu or cuda, got {d!r}")
    return d


def load_reference(src_dir: str | Path, device: str = "cpu", model_class: Optional[str] = None):
    """The Hugging Face model of a checkpoint in fp32: a causal LM, or a
    sequence-to-sequence one for an encoder-decoder config; model_class (a
    transformers class name: a multimodal family's reference_class) loads
    that class instead.

    device "cpu" (the default), or "auto"/"cuda": on the GPUs where there are
    any, through accelerate's big-model placement (`device_map="auto"` with a
    per-GPU budget), so a model larger than one GPU is split over the GPUs and
    what still does not fit stays in host memory, layer by layer; never more
    than the budget on a GPU."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    # One at a time per process: the build flow runs variants in threads, and
    # Hugging Face models loaded concurrently came out wrong (seen with
    # transformers 5 on SmolLM2-135M, tied embeddings: three threads loading
    # it at once, two models' logits off by 30; every quantized variant's
    # shards step then failed against its reference).
    with _LOAD_LOCK:
        cfg = AutoConfig.from_pretrained(src_dir, trust_remote_code=False)
        cls = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
        if model_class:
            import transformers

            cls = getattr(transformers, model_class)
        elif cls is AutoModelForCausalLM and type(cfg) not in AutoModelForCausalLM._model_mapping:
            # a multimodal checkpoint (LLaVA) whose model also runs on text alone:
            # the shards step checks its LLM's rank files against it (BLIP-2's
            # needs pixels in every call: not covered)
            from transformers import AutoModelForImageTextToText as cls
        kw, gpu = {}, reference_device(device) != "cpu" and torch.cuda.is_available()
        if gpu:
            # 90% of each GPU's free memory: room for activations and the engine's own process
            budget = {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(torch.cuda.device_count())}
            if importlib.util.find_spec("accelerate") is not None:
                kw = {"device_map": "auto", "max_memory": {**budget, "cpu": "1024GiB"}}
        model = cls.from_pretrained(src_dir, dtype=torch.float32, trust_remote_code=False, **kw).eval()
        if gpu and not kw:  # no accelerate: onto the first GPU where the whole model fits, else stay on the CPU
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            if size < budget[0]:
                model = model.to("cuda:0")
        return model


_LOAD_LOCK = threading.Lock()


def model_device(model):
    """The device a (possibly split) model takes its inputs on."""
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# ----------------------------------------------------------------------------- stored reference outputs
#
# The reference step (tasks/reference.py) stores reference_outputs once per
# source and validation settings: the logits in one safetensors file, the
# token ids and generated tokens in JSON beside them. Each prompt's greedy
# steps' top-k (GREEDY_TOP) go into the safetensors file too, as
# "prompts.{i}.greedy_top_ids" / "prompts.{i}.greedy_top_logits"; a reference
# stored before them loads without them (the near-tie metric is then absent,
# and its gate unjudged).


def save_outputs(outputs: dict, directory: Path) -> None:
    """Write reference_outputs' result under directory (logits.safetensors + outputs.json)."""
    import json

    from safetensors.torch import save_file

    tensors, meta = {}, {"prompts": [], "eval": []}
    for part in ("prompts", "eval"):
        for i, item in enumerate(outputs[part]):
            tensors[f"{part}.{i}"] = item["logits"].float().contiguous()
            for k in GREEDY_TOP:
                if k in item:
                    tensors[f"{part}.{i}.{k}"] = item[k].contiguous()
            meta[part].append({k: v for k, v in item.items() if k != "logits" and k not in GREEDY_TOP})
    if "features" in outputs:  # a multimodal reference: each (media, prompt) pair's visual features
        for i, f in enumerate(outputs["features"]):
            tensors[f"features.{i}"] = f.float().contiguous()
        meta["features"] = len(outputs["features"])
    save_file(tensors, str(directory / "logits.safetensors"))
    (directory / "outputs.json").write_text(json.dumps(meta))


def load_outputs(directory: Path) -> dict:
    """save_outputs' files back as reference_outputs' result."""
    import json

    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / "outputs.json").read_text())
        tensors = load_file(str(directory / "logits.safetensors"))
        out = {part: [{**item, "logits": tensors[f"{part}.{i}"],
                       **{k: tensors[f"{part}.{i}.{k}"] for k in GREEDY_TOP if f"{part}.{i}.{k}" in tensors}}
                      for i, item in enumerate(meta[part])]
               for part in ("prompts", "eval")}
        if "features" in meta:
            out["features"] = [tensors[f"features.{i}"] for i in range(meta["features"])]
        return out
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{directory}: not a stored reference (outputs.json + logits.safetensors): {e}") from None


def worst(a: float, b: float) -> float:
    """max() that keeps a NaN (max(0.0, nan) is 0.0), so a NaN fails its gate."""
    return b if (b != b or b > a) else a


def tie_margin_of(floor: float, logits_max_abs_diff: float) -> float:
    """The near-tie rule's margin, in absolute logits: the larger of the
    recipe's floor (Gates.greedy_tie_margin) and twice the engine's measured
    logits_max_abs_diff on these inputs (each of two logits may be off by up
    to that much, so the engine can flip a gap of up to twice it). A NaN
    difference gives a NaN margin, which no gap meets."""
    return worst(float(floor), 2.0 * float(logits_max_abs_diff))


def greedy_near_tie(mine: list[int], ref: list[int], top_ids, top_logits, margin: float) -> dict:
    """The near-tie rule for one greedy run (`mine`) against the reference's
    (`ref`, whose steps' top-k are top_ids / top_logits: greedy_top): it
    passes when the tokens are equal, or when at the first step where they
    differ the reference's own gap between its token and mine, its logit of
    its token less its logit of mine, is at most `margin`. The tokens after
    that step are not judged (the two runs go on from different contexts).

    Not a tie, so failing: a run that stops where the other goes on (one is a
    prefix of the other), a step beyond the stored ones, and a token of mine
    outside the reference's top-k there (its gap is only known to be at least
    the gap to the k-th: tie_gap_at_least)."""
    j = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), None)
    if j is None and len(mine) == len(ref):
        return {"first_divergence": None, "tie_gap": None, "near_tie_equal": True}
    out = {"first_divergence": min(len(mine), len(ref)) if j is None else j, "tie_gap": None,
           "near_tie_equal": False}
    if j is None or j >= len(top_ids):
        return out
    ids, vals = [int(t) for t in top_ids[j]], [float(v) for v in top_logits[j]]
    if ref[j] not in ids:  # the reference's own token out of its top-k: not a greedy step
        return out
    mine_logit = vals[ids.index(mine[j])] if mine[j] in ids else None
    if mine_logit is None:
        out["tie_gap"], out["tie_gap_at_least"] = vals[ids.index(ref[j])] - vals[-1], True
        return out
    out["tie_gap"] = vals[ids.index(ref[j])] - mine_logit
    out["near_tie_equal"] = out["tie_gap"] <= margin  # False for a NaN margin or gap
    return out


def compare(got: dict, ref: dict, names: tuple[str, str] = ("engine", "reference"),
            tie_margin: Optional[float] = None) -> dict:
    """Metrics of one set of outputs against another, side by side.

    Where every reference prompt holds its greedy steps' top-k (greedy_top),
    also the near-tie rule's verdict, `greedy_equal_to_near_tie`, with the
    margin it used, `greedy_tie_margin_used` (tie_margin_of: tie_margin,
    default DEFAULT_TIE_MARGIN, and the logits_max_abs_diff measured here),
    and each prompt's first_divergence, tie_gap and near_tie_equal in
    `greedy`."""
    import torch

    from .spec import DEFAULT_TIE_MARGIN

    me, other = names
    max_diff = 0.0
    agree = total = 0
    greedy, beams = [], []
    for g, r in zip(got["prompts"], ref["prompts"]):
        max_diff = worst(max_diff, float((g["logits"] - r["logits"]).abs().max()))
        agree += int((g["logits"].argmax(-1) == r["logits"].argmax(-1)).sum())
        total += g["logits"].shape[0]
        greedy.append({"ids": g["ids"], me: g["generated"], other: r["generated"],
                       "equal": g["generated"] == r["generated"]})
        if "beams" in g and "beams" in r:
            beams.append({"ids": g["ids"], me: g["beams"], other: r["beams"], "equal": g["beams"] == r["beams"]})
    nll = {me: 0.0, other: 0.0}
    top1 = {me: 0, other: 0}
    top5 = {me: 0, other: 0}
    n = 0
    for g, r in zip(got["eval"], ref["eval"]):
        tgt = torch.tensor(g["targets"] if "targets" in g else g["ids"][1:])
        e, rr = g["logits"], r["logits"]
        max_diff = worst(max_diff, float((e - rr).abs().max()))
        agree += int((e.argmax(-1) == rr.argmax(-1)).sum())
        total += len(tgt)
        for who, lg in ((me, e), (other, rr)):
            nll[who] += float(torch.nn.functional.cross_entropy(lg, tgt, reduction="sum"))
            top1[who] += int((lg.argmax(-1) == tgt).sum())
            top5[who] += int((lg.topk(5, -1).indices == tgt[:, None]).any(-1).sum())
        n += len(tgt)
    ppl = {k: math.exp(v / max(n, 1)) for k, v in nll.items()}
    more = {}
    if beams:  # the exact-output gate covers beam search as well as greedy
        more = {"beams": beams, "beams_equal": all(x["equal"] for x in beams)}
    refs = ref["prompts"][: len(greedy)]
    if refs and all(GREEDY_TOP[0] in r and GREEDY_TOP[1] in r for r in refs):  # a reference stored before them: absent
        margin = tie_margin_of(DEFAULT_TIE_MARGIN if tie_margin is None else tie_margin, max_diff)
        for x, r in zip(greedy, refs):
            x.update(greedy_near_tie(x[me], x[other], r[GREEDY_TOP[0]], r[GREEDY_TOP[1]], margin))
        more["greedy_equal_to_near_tie"] = all(x["near_tie_equal"] for x in greedy)
        more["greedy_tie_margin_used"] = margin
    return {**more,
        "logits_max_abs_diff": max_diff,
        "top1_agreement": agree / max(total, 1),
        "greedy": greedy,
        "greedy_equal": all(x["equal"] for x in greedy) and all(x["equal"] for x in beams),
        "eval_tokens": n,
        "perplexity": ppl,
        "perplexity_rel_diff": abs(ppl[me] - ppl[other]) / ppl[other],
        "top1_accuracy": {k: v / max(n, 1) for k, v in top1.items()},
        "top5_accuracy": {k: v / max(n, 1) for k, v in top5.items()},
        "top5_accuracy_drop": (top5[other] - top5[me]) / max(n, 1),
    }


def tokenize_inputs(tok, prompts: list[str], text: str, max_eval_tokens: int) -> tuple[list[list[int]], list[int]]:
    ids = []
    for p in prompts:
        t = tok(p).input_ids
        if not t:
            raise BadInput(f"validation prompt {p!r} encodes to no tokens")
        ids.append(t)
    return ids, tok(text).input_ids[:max_eval_tokens]


def evaluate(ref, tok, eng, prompts: list[str], text: str, max_new_tokens: int, max_eval_tokens: int,
             tie_margin: Optional[float] = None) -> dict:
    """The metrics, engine next to reference. `ref`: the Hugging Face model,
    or its outputs on these inputs as the reference step stored them.
    tie_margin: the near-tie rule's floor (the recipe's greedy_tie_margin; compare)."""
    prompt_ids, eval_ids = tokenize_inputs(tok, prompts, text, max_eval_tokens)
    beams = eng.max_beam_width  # the recipe's limits.max_beam_width: beams judged where it is above 1
    got = engine_outputs(eng, prompt_ids, eval_ids, max_new_tokens, tok.eos_token_id, beams)
    if isinstance(ref, dict):
        check_same_inputs(ref, prompt_ids, eval_ids)
    else:
        ref = reference_outputs(ref, prompt_ids, eval_ids, max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                                eng.max_seq_len, eng.max_input_len, beams)
    m = compare(got, ref, tie_margin=tie_margin)
    if beams > 1:
        m["num_beams"] = beams
    for g, p in zip(m["greedy"], prompts):
        g["prompt"] = p
    for g, p in zip(m.get("beams", []), prompts):
        g["prompt"] = p
    return m


def check_same_inputs(ref: dict, prompt_ids: list[list[int]], eval_ids: list[int]) -> None:
    """Stored reference outputs must be of exactly these token ids."""
    from .errors import StepFailed

    first = ref["eval"][0]["ids"] if ref["eval"] else []
    if [p["ids"] for p in ref["prompts"]] != prompt_ids or eval_ids[:len(first)] != first:
        raise StepFailed("the stored reference outputs are of other token ids than this validation's "
                         "(the tokenizer or the prompts changed without a new reference key)")


# Gates' fields that are parameters of a gate, not gates: judge() skips them.
GATE_PARAMETERS = ("greedy_tie_margin",)  # greedy_equal_to_near_tie's, applied by compare()


def judge(metrics: dict, gates: dict) -> dict:
    out = {}
    for name, limit in gates.items():
        if name in GATE_PARAMETERS:
            continue
        if limit is None or limit is False or name not in metrics:  # not set, or not for this kind of model
            continue
        value = metrics[name]
        if name in ("greedy_equal", "greedy_equal_to_near_tie"):
            ok = bool(value)
        elif name == "top1_agreement":
            ok = value >= limit
        else:
            ok = value <= limit
        out[name] = {"value": value, "limit": limit, "passed": ok}
        if name == "greedy_equal_to_near_tie":
            out[name]["margin"] = metrics.get("greedy_tie_margin_used")
    return out



def gates_line(gates: dict) -> str:
    """One line of judged gates: name=value, with the limit where it failed."""
    return ", ".join(
        f"{k}={g['value'] if not isinstance(g['value'], float) else round(g['value'], 6)}"
        f"{'' if g['passed'] else ' (limit ' + str(g['limit']) + ')'}"
        f"{' (tie margin ' + format(g['margin'], '.4g') + ')' if g.get('margin') is not None else ''}"
        for k, g in gates.items()
    )


def greedy_line(metrics: dict) -> Optional[str]:
    """One line on the greedy runs against the reference, judged by a gate or
    not: how many prompts gave equal tokens, and the near-tie rule's verdict
    with each divergence (None without greedy runs)."""
    greedy = metrics.get("greedy") or []
    if not greedy:
        return None
    n_eq = sum(1 for x in greedy if x["equal"])
    line = f"greedy: {n_eq} of {len(greedy)} prompt(s) equal to the reference"
    if "greedy_equal_to_near_tie" in metrics:
        div = [f"token {x['first_divergence']} of {len(x.get('reference') or [])}, gap "
               + ("?" if x.get("tie_gap") is None else format(x["tie_gap"], ".4g"))
               for x in greedy if not x["equal"]]
        line += (f"; near-tie rule (margin {metrics['greedy_tie_margin_used']:.4g}): "
                 f"{'held' if metrics['greedy_equal_to_near_tie'] else 'broken'}"
                 + (f" (first divergence: {'; '.join(div)})" if div else ""))
    return line


def check_shards(src_dir: str | Path, ckpt_dirs: list[str | Path], prompts: list[str], text: str,
                 max_new_tokens: int = 8, max_eval_tokens: int = 128, max_input_len: int = 32,
                 max_seq_len: int = 64, baseline: Optional[str | Path] = None,
                 reference: Optional[dict] = None, tie_margin: Optional[float] = None) -> list[dict]:
    """Run each converted checkpoint in its tp processes (runtime/tp.py) and
    compare it with the Hugging Face model in fp32. With `baseline` (a
    checkpoint, e.g. the fp16 conversion) each result also carries
    `vs_baseline`: the same metrics against that checkpoint's outputs, which
    is how a quantized checkpoint is judged next to fp16. tie_margin: the
    near-tie rule's floor (compare)."""
    return check_shard_sets([(src_dir, ckpt_dirs, baseline)], prompts, text, max_new_tokens, max_eval_tokens,
                            max_input_len, max_seq_len, references=[reference], tie_margin=tie_margin)[0]


def check_shard_sets(sets: list[tuple], prompts: list[str], text: str, max_new_tokens: int = 8,
                     max_eval_tokens: int = 128, max_input_len: int = 32, max_seq_len: int = 64,
                     references: Optional[list[Optional[dict]]] = None,
                     tie_margin: Optional[float] = None) -> list[list[dict]]:
    """check_shards for several sources at once: `sets` holds (src_dir,
    ckpt_dirs, baseline or None) tuples, and the result holds check_shards'
    list for each. The checkpoints of all sources whose tokenizers give the
    same token ids run together, in one launch of tp processes per tp size
    (so several models cost one process start-up per tp size, not one each)."""
    import json as _json

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .runtime.tp import checkpoint_tp, run_checkpoints

    hf_logging.disable_progress_bar()

    inputs, refs = [], []
    for (src_dir, _, _), stored in zip(sets, references or [None] * len(sets)):
        tok = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False)
        prompt_ids, eval_ids = tokenize_inputs(tok, prompts, text, max_eval_tokens)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        if stored is not None:
            check_same_inputs(stored, prompt_ids, eval_ids)
            refs.append(stored)
        else:
            # where no stored reference serves (a multimodal recipe's shards check: its reference step stores
            # image-and-prompt outputs), placed as the reference step places it: on the GPUs where there are any
            # (host memory bounded: a 7B LLaVA's fp32 model made a GPU worker's shards step peak at 42.5 GB)
            ref_model = load_reference(src_dir, device=None)
            refs.append(reference_outputs(ref_model, prompt_ids, eval_ids, max_new_tokens, eos, pad, max_seq_len,
                                          max_input_len))
            del ref_model
        inputs.append((prompt_ids, eval_ids, eos))
    # (token ids, tp) -> the checkpoints that run in one launch
    launches: dict[tuple[str, int], list[Path]] = {}
    for (_, ckpt_dirs, baseline), ids in zip(sets, inputs):
        key = _json.dumps(ids)
        for d in [Path(d) for d in ckpt_dirs] + ([Path(baseline)] if baseline else []):
            group = launches.setdefault((key, checkpoint_tp(d)), [])
            if d not in group:
                group.append(d)
    outs: dict[Path, dict] = {}
    for (key, _), group in sorted(launches.items(), key=lambda kv: kv[0][1]):
        prompt_ids, eval_ids, eos = _json.loads(key)
        for d, o in zip(group, run_checkpoints(group, prompt_ids, eval_ids, max_new_tokens, eos, max_input_len,
                                               max_seq_len, outputs=f"{__name__}:engine_outputs")):
            outs[d] = o
    results = []
    for (_, ckpt_dirs, baseline), ref in zip(sets, refs):
        rs = []
        for d in map(Path, ckpt_dirs):
            m = compare(outs[d], ref, tie_margin=tie_margin)
            m["checkpoint"] = str(d)
            m["tp"] = checkpoint_tp(d)
            if baseline:
                m["vs_baseline"] = compare(outs[d], outs[Path(baseline)], names=("engine", "baseline"))
            rs.append(m)
        results.append(rs)
    return results


# ----------------------------------------------------------------------------- multimodal


class _TextOnly:
    """A multimodal reference model called on text alone, as reference_outputs calls a causal LM."""

    def __init__(self, family, model):
        self.family, self.model = family, model

    def parameters(self):  # model_device: where the ids go
        return self.model.parameters()

    def __call__(self, ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.family.reference_text_logits(self.model, ids))


def multimodal_pairs(items: list, names: list[str], prompts: list[str]) -> list[tuple]:
    """(item, its name, prompt) for each pair validation runs: item i % n with prompt i % m."""
    if not items or not prompts:
        raise BadInput("multimodal validation needs at least one image and one prompt")
    n = max(len(items), len(prompts))
    return [(items[i % len(items)], names[i % len(items)], prompts[i % len(prompts)]) for i in range(n)]


def _on(enc, dev):
    """A processor output with its tensors on dev (itself where they are there already: the CPU)."""
    import torch

    if str(dev) == "cpu":
        return enc
    return type(enc)({k: v.to(dev) if torch.is_tensor(v) else v for k, v in enc.items()})


def _reference_inputs(family, ref_model, processor, items: list, prompts: list[str], max_batch_size: int):
    """The Hugging Face side's inputs of every (item, prompt) pair: the pairs,
    the family's encodings of them, the visual features of each (the model's
    own, in batches of max_batch_size, fp32 on the CPU), the model's input
    device and the processor's image token."""
    import torch

    from .runtime.multimodal import image_token_of

    pairs = multimodal_pairs(items, [""] * len(items), prompts)
    token = image_token_of(processor)
    dev = model_device(ref_model)
    encodings = [family.encode(processor, item, prompt, token) for item, _, prompt in pairs]
    feats = []
    with torch.no_grad():
        for s in range(0, len(pairs), max_batch_size):
            feats += [f.float().cpu() for f in
                      family.reference_features(ref_model, [_on(e, dev) for e in encodings[s : s + max_batch_size]])]
    return pairs, encodings, feats, dev, token


def multimodal_reference_outputs(family, ref_model, processor, items: list, prompts: list[str], text: str,
                                 max_new_tokens: int, max_eval_tokens: int, max_seq_len: int, max_input_len: int,
                                 max_batch_size: int, beams: int, eos: int | None) -> dict:
    """Everything evaluate_multimodal takes from the Hugging Face model of a
    decoder-only multimodal model (a prompt table: LLaVA, LLaVA-NeXT,
    LLaVA-NeXT-Video, BLIP-2 with OPT), from the model and the family's
    processor alone (no engine): for each (item, prompt) pair
    (multimodal_pairs) its visual features (computed in batches of
    max_batch_size, as the engines take them), prefill logits, greedy tokens
    (and beams where beams > 1), and the text set's logits through the LLM.
    The limits are the engines' (the recipe's): the generation length is
    max_seq_len less the prompt's tokens. `save_outputs` stores it."""
    import torch

    pairs, encodings, feats, dev, token = _reference_inputs(family, ref_model, processor, items, prompts,
                                                           max_batch_size)
    tok = processor.tokenizer
    pad = tok.pad_token_id
    out_p = []
    for enc in encodings:
        ids = enc["input_ids"][0].tolist()
        T = len(ids)
        n_new = min(max_new_tokens, max_seq_len - T)
        e = _on(enc, dev)
        with torch.no_grad():
            logits = ref_model(**e).logits[0].float().cpu()
            out = ref_model.generate(**e, max_new_tokens=n_new, do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
        p = {"ids": ids, "T": T, "n_new": n_new, "logits": logits,
             "generated": out.sequences[0].tolist()[T:],  # generate repeats the prompt
             **greedy_top(out.logits)}
        if beams > 1:
            with torch.no_grad():
                o = ref_model.generate(**e, generation_config=beam_config(beams, pad, eos, max_new_tokens=n_new))
            p["beams"] = unpadded(o[0, T:].tolist(), pad, eos)
        out_p.append(p)
    eval_ids = tok(text).input_ids[:max_eval_tokens]
    ref_eval = reference_outputs(_TextOnly(family, ref_model), [], eval_ids, 0, eos, pad, max_seq_len,
                                 max_input_len)["eval"]
    return {"features": feats, "prompts": out_p, "eval": ref_eval}


def multimodal_seq2seq_reference_outputs(family, ref_model, processor, items: list, prompts: list[str], text: str,
                                         max_new_tokens: int, max_eval_tokens: int, max_seq_len: int,
                                         max_decoder_tokens: int, max_input_len: int, max_batch_size: int, beams: int,
                                         eos: int | None, start: int) -> dict:
    """multimodal_reference_outputs of an encoder-decoder LLM (BLIP-2 with
    Flan-T5, Nougat, BLIP), from the model and the family's processor alone
    (no engine): for each (item, prompt) pair its visual features (in batches
    of max_batch_size), greedy tokens (and beams where beams > 1) of
    `generate` from the decoder start token `start` (Nougat, BLIP: then the
    prompt's tokens), and the logits with the decoder teacher-forced on
    [start] + (Nougat, BLIP: the prompt's tokens) + those greedy tokens, cut
    to max_decoder_tokens (the decoder tokens the engines take in one pass:
    min(max_input_len, max_seq_len)); the text set as seq2seq chunks of
    max_decoder_tokens (Nougat, BLIP: the decoder on the first item's
    features, since they have no text encoder). The generation length is
    max_seq_len less the prefix after the start token. Each pair records the
    decoder_ids its logits are of, which the engines are teacher-forced on."""
    import torch

    pairs, encodings, feats, dev, token = _reference_inputs(family, ref_model, processor, items, prompts,
                                                           max_batch_size)
    tok = processor.tokenizer
    pad = tok.pad_token_id
    encoder_output = bool(family.features_as_encoder_output)
    out_p = []
    for enc in encodings:
        prefix = list(enc["prompt_ids"]) if encoder_output else []
        n_new = min(max_new_tokens, max_seq_len - len(prefix))
        e = _on(enc, dev)
        with torch.no_grad():
            gen = family.reference_generate(ref_model, e, start, n_new, eos, pad)
            dec = ([start] + prefix + gen)[:max_decoder_tokens]
            logits = family.reference_seq2seq_logits(ref_model, e, dec).float().cpu()
        p = {"n_new": n_new, "decoder_ids": dec, "logits": logits, "generated": gen}
        # the decoder's logits at [start] + prefix + the greedy tokens: position len(prefix) + j is the step
        # that chose greedy token j (as many steps as the decoder holds). Kept only where they do choose
        # the greedy tokens; else (a prompt that generate reads and the decoder ids leave out) the near-tie
        # metric is absent
        top = greedy_top(logits[len(prefix) : len(prefix) + len(gen)])
        if top[GREEDY_TOP[0]][:, 0].tolist() == gen[: top[GREEDY_TOP[0]].shape[0]]:
            p.update(top)
        if beams > 1:
            with torch.no_grad():
                p["beams"] = unpadded(family.reference_generate(ref_model, e, start, n_new, eos, pad, num_beams=beams),
                                      pad, eos)
        out_p.append(p)

    eval_ids = tok(text).input_ids[:max_eval_tokens]
    if encoder_output:
        e = _on(family.encode(processor, pairs[0][0], "", token), dev)
        ref_eval = []
        for c in seq2seq_chunks(eval_ids, max_decoder_tokens):
            with torch.no_grad():
                logits = family.reference_seq2seq_logits(ref_model, e, [start] + c[:-1]).float().cpu()
            ref_eval.append({"ids": c, "targets": c, "logits": logits})
    else:
        ref_eval = _reference_outputs_seq2seq(family.reference_text_model(ref_model), [], eval_ids, 0, eos, pad,
                                              max_seq_len, max_input_len)["eval"]
    return {"features": feats, "prompts": out_p, "eval": ref_eval}


def evaluate_multimodal(family, ref_model, pipe, images: list, image_names: list[str], prompts: list[str], text: str,
                        max_new_tokens: int, max_eval_tokens: int, reference: Optional[dict] = None,
                        tie_margin: Optional[float] = None) -> dict:
    """The engines (pipe: runtime.multimodal.MultimodalPipeline) against the
    Hugging Face model in fp32 on the same images and prompts, paired in
    turn (image i % n with prompt i % m): visual features, prefill logits
    and greedy tokens one pair at a time, greedy tokens of all pairs in
    batches of max_batch_size, and the LLM on the text set.

    The Hugging Face side is `reference`, the stored outputs of the same
    inputs and limits (the reference step's: multimodal_reference_outputs
    for a decoder-only LLM, multimodal_seq2seq_reference_outputs for an
    encoder-decoder one), where given; else it is computed here from
    ref_model, by the same function, under the engines' limits. tie_margin:
    the near-tie rule's floor (compare), applied to the batched runs too."""
    import torch

    pairs = multimodal_pairs(images, image_names, prompts)
    n = len(pairs)
    tok = pipe.processor.tokenizer
    eos = pipe.eos_token_id
    B = pipe.max_batch_size
    beams = pipe.llm.max_beam_width  # the recipe's limits.max_beam_width: beams judged where it is above 1

    if reference is None:
        llm = pipe.llm
        if pipe.seq2seq:
            reference = multimodal_seq2seq_reference_outputs(
                family, ref_model, pipe.processor, images, prompts, text, max_new_tokens, max_eval_tokens,
                llm.max_seq_len, llm.max_decoder_tokens, llm.max_input_len, B, beams, eos,
                llm.decoder_start_token_id)
        else:
            reference = multimodal_reference_outputs(family, ref_model, pipe.processor, images, prompts, text,
                                                     max_new_tokens, max_eval_tokens, llm.max_seq_len,
                                                     llm.max_input_len, B, beams, eos)
    if len(reference["prompts"]) != n or len(reference["features"]) != n:
        raise BadInput(f"the stored reference holds {len(reference['prompts'])} pairs, validation {n}")
    encodings = pipe.prepare([p[0] for p in pairs], [p[2] for p in pairs])
    feat_diff = 0.0
    n_feats = []
    with torch.no_grad():
        for s in range(0, n, B):
            got_f = pipe.image_features(encodings[s : s + B])
            for g, r in zip(got_f, reference["features"][s : s + B]):
                if g.shape != r.shape:
                    raise BadInput(f"the engines make {tuple(g.shape)} visual features for an image, Hugging Face "
                                   f"{tuple(r.shape)}")
                feat_diff = worst(feat_diff, float((g - r.float()).abs().max()))
                n_feats.append(g.shape[0])

    if pipe.seq2seq:
        got_p, ref_p, got_eval = _multimodal_seq2seq(pipe, pairs, encodings, reference, text, max_new_tokens,
                                                     max_eval_tokens, eos, beams)
        return _multimodal_metrics(pipe, pairs, got_p, ref_p, got_eval, reference["eval"], feat_diff, n_feats,
                                   max_new_tokens, eos, tie_margin)

    got_p, ref_p = [], []
    for (image, name, prompt), r in zip(pairs, reference["prompts"]):
        eng_ids, table = pipe.inputs([image], [prompt])
        n_new = min(max_new_tokens, pipe.llm.max_seq_len - len(eng_ids[0]))
        got_p.append({"ids": eng_ids[0], "logits": pipe.llm.logits(eng_ids[0], table),
                      "generated": pipe.llm.generate(eng_ids, n_new, eos_token_id=eos, prompt_table=table)[0],
                      **_engine_beams(lambda d: pipe.llm.generate(eng_ids, n_new, eos_token_id=eos, prompt_table=table,
                                                                  decoding=d)[0], beams)})
        T = r["T"]
        if T != len(eng_ids[0]):
            raise BadInput(f"the processor's prompt has {T} tokens, the engine's {len(eng_ids[0])}; the processor "
                           f"does not write the image placeholders the model expects")
        ref_p.append({**r, "ids": eng_ids[0]})

    eval_ids = tok(text).input_ids[:max_eval_tokens]
    got_eval = engine_outputs(pipe.llm, [], eval_ids, 0, eos)["eval"]
    return _multimodal_metrics(pipe, pairs, got_p, ref_p, got_eval, reference["eval"], feat_diff, n_feats,
                               max_new_tokens, eos, tie_margin)


def _multimodal_seq2seq(pipe, pairs, encodings, reference, text, max_new_tokens, max_eval_tokens, eos, beams: int = 1):
    """The engines' side of an encoder-decoder LLM (BLIP-2 with Flan-T5,
    Nougat, BLIP) next to the reference's (multimodal_seq2seq_reference_outputs):
    greedy tokens of each pair; logits with the decoder teacher-forced on the
    reference's decoder_ids ([start] + (Nougat, BLIP: the prompt's tokens) +
    the reference's greedy tokens); the text set as seq2seq chunks (Nougat,
    BLIP: the decoder with the first image's features)."""
    from .errors import StepFailed

    llm = pipe.llm
    start = llm.decoder_start_token_id
    got_p, ref_p = [], []
    for (image, _, prompt), enc, r in zip(pairs, encodings, reference["prompts"]):
        prefix = list(enc["prompt_ids"]) if pipe.encoder_output else []
        n_new = min(max_new_tokens, llm.max_seq_len - len(prefix))
        dec = r["decoder_ids"]
        if (n_new, dec[: 1 + len(prefix)]) != (r["n_new"], ([start] + prefix)[: len(dec)]) or \
                len(dec) > llm.max_decoder_tokens:
            raise StepFailed("the stored reference is of other decoder inputs than this validation's (the decoder "
                             "start token, the prompt's tokens or the limits changed without a new reference key)")
        gen = pipe.generate([image], [prompt], n_new, eos_token_id=eos)[0]
        ids, logits = pipe.seq2seq_logits(image, prompt, dec)
        got_p.append({"ids": ids, "logits": logits, "generated": gen,
                      **_engine_beams(lambda d: pipe.generate([image], [prompt], n_new, eos_token_id=eos,
                                                              decoding=d)[0], beams)})
        ref_p.append({**r, "ids": ids})

    eval_ids = pipe.processor.tokenizer(text).input_ids[:max_eval_tokens]
    if pipe.encoder_output:
        image = pairs[0][0]
        got_eval = [{"ids": c, "targets": c, "logits": pipe.seq2seq_logits(image, "", [start] + c[:-1])[1]}
                    for c in seq2seq_chunks(eval_ids, llm.max_decoder_tokens)]
    else:
        got_eval = _engine_outputs_seq2seq(llm, [], eval_ids, 0, eos)["eval"]
    if [c["ids"] for c in got_eval] != [c["ids"] for c in reference["eval"]]:
        raise StepFailed("the stored reference's text-set windows are of other token ids than this validation's")
    return got_p, ref_p, got_eval


def _multimodal_metrics(pipe, pairs, got_p, ref_p, got_eval, ref_eval, feat_diff, n_feats, max_new_tokens, eos,
                        tie_margin: Optional[float] = None):
    n, B = len(pairs), pipe.max_batch_size
    # all pairs at once, in batches of the engines' max_batch_size
    n_b = min(len(g["generated"]) for g in got_p) if got_p else 0
    n_b = max(1, min(max_new_tokens, n_b))
    batched: list[list[int]] = []
    for s in range(0, n, B):
        chunk = pairs[s : s + B]
        batched += pipe.generate([c[0] for c in chunk], [c[2] for c in chunk], n_b, eos_token_id=eos)

    m = compare({"prompts": got_p, "eval": got_eval}, {"prompts": ref_p, "eval": ref_eval}, tie_margin=tie_margin)
    for g, (_, name, prompt), b, r in zip(m["greedy"], pairs, batched, ref_p):
        g["prompt"], g["image"] = prompt, name
        g["ids"] = [t if t < pipe.meta["vocab_size"] else -1 for t in g["ids"]]  # -1: a visual feature
        g["batched"] = b
        g["batched_equal"] = b == r["generated"][:n_b]  # both stop at eos
        if "greedy_equal_to_near_tie" in m:  # the batched run by the same rule
            t = greedy_near_tie(b, r["generated"][:n_b], r[GREEDY_TOP[0]], r[GREEDY_TOP[1]],
                                m["greedy_tie_margin_used"])
            g["batched_near_tie"] = t
            m["greedy_equal_to_near_tie"] = m["greedy_equal_to_near_tie"] and t["near_tie_equal"]
    m["visual_max_abs_diff"] = feat_diff
    m["visual_features"] = pipe.features
    m["visual_features_by_image"] = n_feats
    m["greedy_batched_equal"] = all(g["batched_equal"] for g in m["greedy"])
    if "beams" in m:
        m["num_beams"] = pipe.llm.max_beam_width
        for g, (_, name, prompt) in zip(m["beams"], pairs):
            g["prompt"], g["image"] = prompt, name
            g["ids"] = [t if t < pipe.meta["vocab_size"] else -1 for t in g["ids"]]
    m["greedy_equal"] = m["greedy_equal"] and m["greedy_batched_equal"]  # the gate covers both ways of running
    return m


def check_conversion(family, src_dir: Path, ckpt_dir: Path, variant, max_input_len: int,
                     progress: Optional[Callable[[str], None]] = None) -> dict:
    """The shards step's check of one converted checkpoint (`enginefarm
    convert --check`): its tp rank processes against the Hugging Face model
    (fp32) on the built-in prompts and text, judged by the default gates of
    its quantization; a quantized checkpoint is judged next to the
    unquantized conversion at the same tp (converted here, then dropped)."""
    import tempfile

    from .checkpoint import convert_checkpoint
    from .spec import Validation

    say = progress or (lambda m: None)
    val = Validation()
    base = None
    with tempfile.TemporaryDirectory(prefix="enginefarm-baseline-") as btmp:
        if variant.quant != "none":
            say(f"check: converting the {variant.dtype} baseline at tp {variant.tp}")
            base = Path(btmp) / "baseline"
            convert_checkpoint(family, Path(src_dir), base,
                               variant.model_copy(update={"quant": "none", "group_size": None}))
        say(f"check: {variant.tp} rank process(es) vs the Hugging Face model (fp32)")
        (m,) = check_shards(src_dir, [ckpt_dir], val.prompts, builtin_text(), 8, 128, max_input_len,
                            max_input_len * 2, baseline=base,
                            tie_margin=val.gates_for(variant.quant).greedy_tie_margin)
    m["gates"] = judge(m, val.gates_for(variant.quant).model_dump())
    m["passed"] = all(g["passed"] for g in m["gates"].values())
    m.pop("checkpoint", None)
    return m

