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
              progress: Optional[Callable[[str], None]] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """ModelOpt's calibration on the samples, and what the farm keeps of it
    (kept_statistics). The model is left fake-quantized by ModelOpt."""
    run_modelopt(model, samples, algorithm, group_size, progress)
    tensors, stats = kept_statistics(model)
    stats.update(samples=len(samples), tokens=sum(len(s) for s in samples))
    return tensors, stats
