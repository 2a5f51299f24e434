"""Calibrated quantization with NVIDIA ModelOpt (nvidia-modelopt): the
calibration forward passes on the Hugging Face model, and the statistics the
farm keeps from them.

INT4 AWQ (`mtq.INT4_AWQ_CFG`: AWQ-lite, per-block int4 weights): ModelOpt
searches, per linear, the per-input-channel scale s that minimises the output
error of the quantized weight on the calibration activations, then "smooths"
(modelopt/torch/quantization/model_calib.py `apply_pre_quant_scale_and_smooth`,
0.47: the input quantizer multiplies x by pre_quant_scale, the weight is divided
by it). The statistics file holds each Hugging Face linear's own scale.
Linears that become one TensorRT-LLM tensor (q/k/v -> attention.qkv) must
share one: ModelOpt's exporter averages them and re-divides the weights
(modelopt/torch/export/quant_utils.py `preprocess_linear_fusion`,
`_update_pre_quant_scale`), and so does the farm's converter, over the
sources of each fused tensor (checkpoint.quantize_out): gate and up stay
apart, as TensorRT-LLM's mlp.gate / mlp.fc do. The block amax ModelOpt then
takes is max|w| of the smoothed weight per block, which is what the farm's
group quantizer computes from the smoothed weight (quant.quantize).

INT8 SmoothQuant (`mtq.INT8_SMOOTHQUANT_CFG`, algorithm "smoothquant", with
alpha SQ_ALPHA = 0.5 in place of its 1.0): ModelOpt records each linear's per-input-channel max|x| (a_j), sets the
SmoothQuant scale s_j = max_i|w_ij|^(1 - alpha) / a_j^alpha (clamped to
[1e-4, 1e4]), smooths as AWQ does (x * s, w / s) and keeps one per-tensor input
amax, max_j(a_j s_j) (model_calib.py `smoothquant`, `apply_pre_quant_scale_and_smooth`).
The statistics file holds each linear's s (`.pre_quant_scale`) and that input
amax (`.input_amax`); the weight scales are the converter's, per output
channel of the smoothed weight (quant.act_quantize).

FP8 (`mtq.FP8_DEFAULT_CFG`, max calibration): per-tensor amax of each
linear's input (`.input_amax`); the weight's per-tensor amax is max|w|,
which the converter takes from the weights themselves.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch

ALGORITHMS = {"int4_awq": "INT4_AWQ_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "fp8": "FP8_DEFAULT_CFG"}
# SmoothQuant's migration strength: ModelOpt's config uses 1.0 (every
# activation channel scaled to max 1, all the difficulty moved into the
# weights); the SmoothQuant paper's default is 0.5. Measured on SmolLM2-135M
# with static per-tensor activation scales (bench/quant_real.py): alpha 1.0
# +40.1% perplexity, top-1 agreement 0.655; alpha 0.5 +15.6%, 0.737.
SQ_ALPHA = 0.5


def modelopt_version() -> str:
    from importlib.metadata import version

    return version("nvidia-modelopt")


def calibration_ids(tok, text: str, skip: int, max_tokens: int, seq_len: int) -> list[list[int]]:
    """The calibration samples: the text's tokens after the first `skip`
    (the perplexity window), at most max_tokens, cut into seq_len pieces (a
    shorter last piece is kept if it has 8 tokens or more)."""
    ids = tok(text).input_ids[skip: skip + max_tokens]
    out = [ids[i: i + seq_len] for i in range(0, len(ids), seq_len)]
    return [s for s in out if len(s) >= 8]


def quant_config(algorithm: str, group_size: int) -> dict:
    import modelopt.torch.quantization as mtq

    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown calibration algorithm {algorithm!r}")
    cfg = copy.deepcopy(getattr(mtq, ALGORITHMS[algorithm]))
    if not isinstance(cfg.get("quant_cfg"), list):
        raise ValueError(f"ModelOpt {modelopt_version()}: {ALGORITHMS[algorithm]} is not a list of quantizer entries")
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer" and isinstance(entry.get("cfg"), dict):
            bs = entry["cfg"].get("block_sizes")
            if bs:
                entry["cfg"]["block_sizes"] = {**bs, -1: group_size}
    if algorithm == "int8_sq":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": SQ_ALPHA}
    # the LM head (and with it a tied embedding) stays in the model dtype, as TensorRT-LLM leaves it
    cfg["quant_cfg"].append({"quantizer_name": "*lm_head*", "enable": False})
    return cfg


@contextmanager
def _no_attention_rewrite():
    """ModelOpt's Hugging Face plugin rewrites every attention class it meets
    for KV-cache quantization (plugins/huggingface.py
    `register_hf_attentions_on_the_fly`), process-wide: a Hugging Face model
    made later in the same process (the shards and validate steps' reference)
    then fails ("'LlamaAttention' object has no attribute 'q_bmm_quantizer'").
    No farm algorithm quantizes the KV cache, so the hook is left out meanwhile
    (tests/test_conformance.py does the same for its exports)."""
    from modelopt.torch.quantization.plugins import custom, huggingface

    hook = getattr(huggingface, "register_hf_attentions_on_the_fly", None)
    had = hook is not None and hook in custom.CUSTOM_MODEL_PLUGINS
    if had:
        custom.CUSTOM_MODEL_PLUGINS.discard(hook)
    try:
        yield
    finally:
        if had:
            custom.CUSTOM_MODEL_PLUGINS.add(hook)


def run_modelopt(model, samples: list[list[int]], algorithm: str, group_size: int,
                 progress: Optional[Callable[[str], None]] = None):
    """ModelOpt's calibration of `model` (in place: it becomes ModelOpt's
    fake-quantized model) on the samples; returns the model."""
    import modelopt.torch.quantization as mtq

    def loop(m):
        with torch.no_grad():
            for s in samples:
                m(torch.tensor([s]))

    t0 = time.perf_counter()
    with _no_attention_rewrite():
        mtq.quantize(model, quant_config(algorithm, group_size), loop)
    if progress:
        progress(f"calibrate: ModelOpt {algorithm} on {len(samples)} samples in {time.perf_counter() - t0:.1f}s")
    return model


def kept_statistics(model) -> tuple[dict[str, torch.Tensor], dict]:
    """What the farm keeps of a model ModelOpt calibrated:
    ({hf linear name + '.pre_quant_scale': float32 [in] (AWQ, SmoothQuant),
    hf linear name + '.input_amax': float32 [] (SmoothQuant, FP8)}, a summary):
    each linear's own statistics, as ModelOpt found them. Linears that read one
    input (q/k/v; gate/up) share them in the converter (checkpoint.quantize_out,
    act_quantize_out), as ModelOpt's exporter makes them."""
    out: dict[str, torch.Tensor] = {}
    linears, kinds = set(), set()
    for name, mod in model.named_modules():
        iq = getattr(mod, "input_quantizer", None)
        if iq is None:
            continue
        s = getattr(iq, "pre_quant_scale", None)
        if s is not None:
            out[f"{name}.pre_quant_scale"] = s.detach().float().reshape(-1).clone()
            linears.add(name)
            kinds.add("pre_quant_scale")
        if getattr(iq, "is_enabled", False) and getattr(iq, "amax", None) is not None:
            a = iq.amax.detach().float()
            if a.numel() != 1:
                raise ValueError(f"{name}: expected a per-tensor input amax, got shape {tuple(a.shape)}")
            out[f"{name}.input_amax"] = a.reshape(()).clone()
            linears.add(name)
            kinds.add("input_amax")
    stats = {"linears": len(linears), "statistics": sorted(kinds)}
    return dict(sorted(out.items())), stats


def calibrate(model, samples: list[list[int]], algorithm: str, group_size: int,
              progress: Optional[Callable[[str], None]] = None,
              fused: Optional[list[list[str]]] = None, joint: bool = True,
              clip: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """ModelOpt's calibration on the samples, and what the farm keeps of it
    (kept_statistics). The model is left fake-quantized by ModelOpt.

    INT4 AWQ then refines ModelOpt's scales for the TensorRT-LLM layout
    (awq_refine): `fused` lists the linears that become one tensor (q/k/v),
    which get one scale searched for them together (joint), and every linear
    gets a clip search (clip). The inputs both searches score on are the
    unquantized model's, taken before ModelOpt changes it."""
    refine = algorithm == "int4_awq" and (clip or (joint and fused))
    captured = linear_inputs(model, samples) if refine else None
    run_modelopt(model, samples, algorithm, group_size, progress)
    tensors, stats = kept_statistics(model)
    if refine:
        t0 = time.perf_counter()
        tensors, extra = awq_refine(tensors, *captured, group_size, fused if joint else None, clip)
        stats.update(extra)
        stats["statistics"] = sorted({k.rsplit(".", 1)[1] for k in tensors})
        if progress:
            progress(f"calibrate: AWQ joint scales / clip search in {time.perf_counter() - t0:.1f}s")
    stats.update(samples=len(samples), tokens=sum(len(s) for s in samples))
    return tensors, stats


# --- INT4 AWQ for TensorRT-LLM's fused layout -------------------------------
#
# ModelOpt's AWQ-lite (model_calib.py `awq_lite`, 0.47) searches one scale per
# linear: s = act^alpha / w^(1 - alpha), normalised by sqrt(max s * min s),
# alpha on a grid of step 0.1, scored by the linear's output error. A fused
# TensorRT-LLM tensor (attention.qkv) has one input, so one pre-quant scale;
# ModelOpt's exporter and the converter average the three (preprocess_linear_fusion),
# a scale none of the three was scored with. The original AWQ searches the
# scale of q/k/v together (llm-awq's auto_scale: one scale for the linears
# after input_layernorm); awq_joint_search does that with AWQ-lite's formulas
# and grid, on the group's weights concatenated, scored by the summed output
# error of the group through the farm's own quantizer arithmetic.
# awq_clip_search is ModelOpt's awq_clip (model_calib.py `awq_clip`: per
# block of G inputs of each output channel, amax x ratio for ratio in
# 0.5, 0.55, ..., 0.95, 1.0, scored by the block's output error) on the
# smoothed weight the converter quantizes; INT4_AWQ_CFG (awq_lite) does not run it.

AWQ_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # awq_lite's alpha_step 0.1
AWQ_CLIP_RATIOS = (1.0,) + tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # awq_clip's; 1.0 first: kept on ties
_TINY = torch.finfo(torch.float32).tiny


def linear_inputs(model, samples: list[list[int]]) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """({linear name: its inputs, float32 [tokens, in] per sample}, {linear name:
    its weight, float32}) of every linear but the LM head, on the unquantized model."""
    lins = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    got: dict[str, list[torch.Tensor]] = {n: [] for n in lins}
    # q/k/v (gate/up) read one tensor: kept once. The tensor itself is held
    # until the pass ends, so that its id is not reused by a later one.
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def f(_mod, args):
            x = args[0]
            if id(x) not in seen or seen[id(x)][0] is not x:
                seen[id(x)] = (x, x.detach().float().reshape(-1, x.shape[-1]).clone())
            got[name].append(seen[id(x)][1])
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in lins.items()]
    try:
        with torch.no_grad():
            for s in samples:
                seen.clear()
                model(torch.tensor([s]))
    finally:
        for h in hs:
            h.remove()
    weights = {n: m.weight.detach().float().clone() for n, m in lins.items()}
    return got, weights


def _act_scale(xs: list[torch.Tensor]) -> torch.Tensor:
    # awq_lite get_act_scale: mean |x| per input channel, averaged over the forward passes
    return torch.stack([x.abs().mean(0) for x in xs]).mean(0)


def _weight_scale(w: torch.Tensor, g: int) -> torch.Tensor:
    # awq_lite get_weight_scale: |w| / max|w| of its block, averaged over the output channels
    wa = w.abs().reshape(-1, g)
    return (wa / (wa.amax(dim=1, keepdim=True) + _TINY)).reshape(w.shape).mean(0)


def _awq_scale(act: torch.Tensor, wscale: torch.Tensor, alpha: float) -> torch.Tensor:
    # awq_lite get_scale
    s = (act.pow(alpha) / (wscale.pow(1 - alpha) + _TINY)).clamp(min=1e-4, max=1e4)
    return s / (s.max() * s.min()).sqrt()


def awq_joint_search(xs: list[torch.Tensor], weights: list[torch.Tensor], g: int) -> tuple[torch.Tensor, float]:
    """One AWQ scale for linears that read the same input: (pre-quant scale
    [in] = 1 / s, the best alpha), the alpha minimising the mean squared
    output error of the concatenated linears, quantized per block of g as
    the converter quantizes them."""
    from .quant import fake_quantize_groups

    x = torch.cat(xs)
    w = torch.cat(weights)
    act, wscale = _act_scale(xs), _weight_scale(w, g)
    ref = x @ w.t()
    best = None
    for alpha in AWQ_ALPHAS:
        s = _awq_scale(act, wscale, alpha)
        out = (x / s) @ fake_quantize_groups(w * s, g).t()
        loss = float((out - ref).pow(2).mean())
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    return 1.0 / best[2], best[1]


def awq_clip_search(xs: list[torch.Tensor], w: torch.Tensor, pqs: torch.Tensor, g: int) -> torch.Tensor:
    """Clip ratios [out, in / g] of one linear's smoothed weight (w / pqs, its
    input x * pqs): per block, the ratio of AWQ_CLIP_RATIOS whose quantized
    block gives the smallest mean squared error of that block's share of
    the output (quant.awq_clip applies them)."""
    from .quant import awq_clip, fake_quantize_groups

    ws = w / pqs[None, :]
    x = torch.cat(xs) * pqs[None, :]
    out_f, in_f = ws.shape
    nb = in_f // g
    xb = x.reshape(-1, nb, g)  # [n, nb, g]
    best_loss = best = None
    for r in AWQ_CLIP_RATIOS:
        ratios = torch.full((out_f, nb), r)
        err = (ws - fake_quantize_groups(awq_clip(ws, ratios, g), g)).reshape(out_f, nb, g)
        loss = torch.einsum("nbg,obg->bno", xb, err).pow(2).mean(dim=1).t()  # [out, nb]
        if best is None:
            best_loss, best = loss, ratios
        else:
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best = torch.where(better, ratios, best)
    return best.contiguous()


def awq_refine(tensors: dict[str, torch.Tensor], inputs: dict[str, list[torch.Tensor]],
               weights: dict[str, torch.Tensor], g: int, fused: Optional[list[list[str]]],
               clip: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """ModelOpt's AWQ statistics made for TensorRT-LLM's layout: each group
    of `fused` linears gets one searched scale (each member's
    `.pre_quant_scale`, so the converter's mean is that scale), and with
    `clip` every linear gets its clip ratios (`.awq_clip`)."""
    out = dict(tensors)
    alphas = []
    for group in fused or []:
        members = [n for n in group if f"{n}.pre_quant_scale" in out and n in inputs]
        if len(members) < 2:
            continue
        pqs, alpha = awq_joint_search(inputs[members[0]], [weights[n] for n in members], g)
        alphas.append(alpha)
        for n in members:
            out[f"{n}.pre_quant_scale"] = pqs.clone()
    clipped = 0
    if clip:
        for key in [k for k in out if k.endswith(".pre_quant_scale")]:
            n = key[: -len(".pre_quant_scale")]
            if n in inputs and weights[n].shape[1] % g == 0:
                out[f"{n}.awq_clip"] = awq_clip_search(inputs[n], weights[n], out[key].float(), g)
                clipped += 1
    summary = {"awq_joint_groups": len(alphas), "awq_clipped_linears": clipped}
    if alphas:
        summary["awq_joint_alphas"] = alphas
    return dict(sorted(out.items())), summary
