"""Conformance of the calibrated INT4 AWQ checkpoint (w4a16_awq) with
NVIDIA's own TensorRT-LLM checkpoint writer, ModelOpt 0.47, for every
decoder-only family whose AWQ ModelOpt exports (LLaMA, Mistral: decoder_type
"llama"), at tp 1 and 2.

One ModelOpt calibration (mtq.INT4_AWQ_CFG, AWQ-lite, on a few token
sequences) gives both sides: ModelOpt exports its calibrated model
(`torch_to_tensorrt_llm_checkpoint`, which averages the pre-quant scales of
fused linears, q/k/v, and re-divides their weights, export/quant_utils.py
`preprocess_linear_fusion`); the farm keeps each linear's scale
(calibration.kept_statistics) and converts the untouched Hugging Face
weights with them, averaging over the sources of each fused tensor. Every tensor but the quantized ones is compared exactly
(as tests/test_conformance.py does); for the quantized ones:

- `prequant_scaling_factor` (in,): equal;
- `weights_scaling_factor` and the int4 integers: ModelOpt smooths the
  float16 weight in two roundings (by its own scale, then by the averaged
  one), the farm in one (float32 quotient, rounded once), so a weight whose
  quotient lies within a float16 ulp of a rounding boundary may land one
  step apart: DIFFERENCE "awq_two_roundings", bounded here (integers at most
  one apart, in at most 1% of places; scales within 2 float16 ulps).
"""

from __future__ import annotations


import pytest
import torch

from enginefarm.quant import int_values, is_quantized_weight, unpack_int4

from test_conformance import _compare_float_tensors, calibrated_exports, variant

GROUP = 16
AWQ_FAMILIES = ("llama", "mistral")


@pytest.fixture(scope="module")
def awq_exports(tmp_path_factory):
    runs = [("awq", "int4_awq", GROUP, lambda tp: variant("w4a16_awq", tp, GROUP))]
    got = calibrated_exports(tmp_path_factory.mktemp("awq"), AWQ_FAMILIES, runs)
    return {(fam, tp): v for (fam, _, tp), v in got.items()}


@pytest.mark.parametrize("fam,tp", [(f, t) for f in AWQ_FAMILIES for t in (1, 2)])
def test_awq_checkpoint_equals_modelopts(awq_exports, fam, tp):
    mo, farm, hf, kept = awq_exports[(fam, tp)]
    assert kept["linears"] == 2 * 7  # two layers of q, k, v, o, gate, up, down
    diffs, n = [], 0
    for (part, rank), (mo_cfg, mo_w) in mo.items():
        farm_cfg, farm_w = farm[(part, rank)]
        fq, mq_cfg = farm_cfg["quantization"], mo_cfg["quantization"]
        assert fq["quant_algo"] == mq_cfg["quant_algo"] == "W4A16_AWQ"
        assert fq["group_size"] == mq_cfg["group_size"] == GROUP
        assert fq["pre_quant_scale"] is True and mq_cfg.get("pre_quant_scale", True) is True
        qnames = [k for k in farm_w if is_quantized_weight(k)]
        skip = set(qnames) | {k[: -len("weight")] + s for k in qnames
                              for s in ("weights_scaling_factor", "prequant_scaling_factor")}
        diffs += _compare_float_tensors(fam, tp, part, rank, mo_w, farm_w, hf, skip=skip)
        for k in qnames:
            n += 1
            p = k[: -len("weight")]
            fp, mp = farm_w[p + "prequant_scaling_factor"], mo_w[p + "prequant_scaling_factor"]
            if tuple(fp.shape) != tuple(mp.shape) or not torch.allclose(fp.float(), mp.float(), rtol=1e-3):
                diffs.append(f"rank {rank} {k}: prequant_scaling_factor {tuple(fp.shape)} vs {tuple(mp.shape)}")
                continue
            s, ms = farm_w[p + "weights_scaling_factor"].float(), mo_w[p + "weights_scaling_factor"].float().t()
            if tuple(s.shape) != tuple(ms.shape):
                diffs.append(f"rank {rank} {k}: scales shaped {tuple(s.shape)} vs {tuple(ms.shape)}")
                continue
            # DIFFERENCE "awq_two_roundings"
            if not bool(((s - ms).abs() <= 2 * 2.0 ** -10 * ms.abs() + 1e-7).all()):
                diffs.append(f"rank {rank} {k}: scales differ by {float((s - ms).abs().max())}")
            ints_farm = int_values(farm_w[k], 4).t()  # [out, in]
            ints_mo = unpack_int4(mo_w[k].contiguous().view(torch.int8).t().contiguous()).t()
            off = (ints_farm.int() - ints_mo.int()).abs()
            if int(off.max()) > 1 or float((off > 0).float().mean()) > 0.01:
                diffs.append(f"rank {rank} {k}: integers differ in {int((off > 0).sum())} of {off.numel()} "
                             f"(by up to {int(off.max())})")
    assert n and not diffs, "\n".join(diffs)
