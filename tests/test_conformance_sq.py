"""Conformance of the weight-and-activation quantized checkpoints (w8a8_sq:
INT8 SmoothQuant; fp8) with NVIDIA's own TensorRT-LLM checkpoint writer,
ModelOpt 0.47, for the decoder-only families whose SmoothQuant and FP8
ModelOpt exports with its decoder_type "llama" (LLaMA, Mistral), at tp 1 and 2.

One ModelOpt calibration per algorithm (mtq.INT8_SMOOTHQUANT_CFG,
mtq.FP8_DEFAULT_CFG, on a few token sequences) gives both sides: ModelOpt
exports its calibrated model (`torch_to_tensorrt_llm_checkpoint`); the farm
keeps each linear's statistics (calibration.kept_statistics: SmoothQuant
scale, input amax) and converts the untouched Hugging Face weights with them
(checkpoint.act_quantize_out). Every tensor but the quantized linears' is
compared exactly (as tests/test_conformance.py does); for those:

- names, shapes and dtypes: equal (int8 / float8_e4m3fn weights [out, in],
  float32 scales);
- `activation_scaling_factor`, `prequant_scaling_factor`: equal (within a
  float16 rounding);
- `weights_scaling_factor`: within 2 float16 ulps, and the quantized values
  at most one step apart in a few places: FP8 in at most 1% (ModelOpt
  rounds to float16 twice where the farm rounds once: the DIFFERENCE
  "awq_two_roundings" of tests/test_conformance_awq.py); SmoothQuant in at
  most 3%, DIFFERENCE "sq_scale_rounding": ModelOpt divides the weight by its
  float32 SmoothQuant scale and stores the scale rounded to float16
  (model_calib.py `apply_pre_quant_scale_and_smooth`), and re-divides q/k/v
  by their mean scale in a second float16 rounding (`_update_pre_quant_scale`);
  the farm keeps the stored scales, the ones the input is multiplied by at
  run time, and divides the weight by their mean once, so an int8 value near
  a rounding boundary may land one step apart (measured here: up to 2.4% of
  the places of a q/k/v tensor, about 1% elsewhere).
- config.json's quantization: the same quant_algo. ModelOpt also writes
  exclude_modules ["lm_head"], which the farm leaves out on purpose
  (families/base.py `quantization`: TensorRT-LLM's default list is the one
  that keeps the embeddings unquantized).
"""

from __future__ import annotations


import pytest
import torch

from enginefarm.quant import is_quantized_weight

from test_conformance import _compare_float_tensors, calibrated_exports, variant

FAMILIES = ("llama", "mistral")
QUANTS = {"w8a8_sq": ("int8_sq", "W8A8_SQ_PER_CHANNEL"), "fp8": ("fp8", "FP8")}
SCALES = ("weights_scaling_factor", "activation_scaling_factor", "prequant_scaling_factor")


@pytest.fixture(scope="module")
def act_exports(tmp_path_factory):
    runs = [(quant, algo, None, lambda tp, q=quant: variant(q, tp)) for quant, (algo, _) in QUANTS.items()]
    return calibrated_exports(tmp_path_factory.mktemp("actq"), FAMILIES, runs)


def _steps(t: torch.Tensor) -> torch.Tensor:
    """Quantized values as integers that are one apart for neighbouring
    representable values: int8 as is; float8_e4m3fn by its bits (sign-magnitude
    made monotone)."""
    if t.dtype == torch.int8:
        return t.int()
    b = t.view(torch.uint8).int()
    mag = b & 0x7F
    return torch.where(b & 0x80 > 0, -mag, mag)


@pytest.mark.parametrize("fam,quant,tp", [(f, q, t) for f in FAMILIES for q in QUANTS for t in (1, 2)])
def test_act_quant_checkpoint_equals_modelopts(act_exports, fam, quant, tp):
    mo, farm, hf, kept = act_exports[(fam, quant, tp)]
    assert kept["linears"] == 2 * 7  # two layers of q, k, v, o, gate, up, down
    assert "input_amax" in kept["statistics"]
    assert ("pre_quant_scale" in kept["statistics"]) == (quant == "w8a8_sq")
    diffs, n = [], 0
    for (part, rank), (mo_cfg, mo_w) in mo.items():
        farm_cfg, farm_w = farm[(part, rank)]
        assert farm_cfg["quantization"]["quant_algo"] == mo_cfg["quantization"]["quant_algo"] == QUANTS[quant][1]
        qnames = [k for k in farm_w if is_quantized_weight(k)]
        skip = set(qnames) | {k[: -len("weight")] + s for k in qnames for s in SCALES}
        diffs += _compare_float_tensors(fam, tp, part, rank, mo_w, farm_w, hf, skip=skip)
        for k in qnames:
            n += 1
            p = k[: -len("weight")]
            names_f = {s for s in SCALES if p + s in farm_w}
            names_m = {s for s in SCALES if p + s in mo_w}
            if names_f != names_m:
                diffs.append(f"rank {rank} {k}: scales {sorted(names_f)} vs ModelOpt's {sorted(names_m)}")
                continue
            for s in sorted(names_f) + ["weight"]:
                a, b = farm_w[p + s], mo_w[p + s]
                if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
                    diffs.append(f"rank {rank} {p + s}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
            if diffs and diffs[-1].startswith(f"rank {rank} {p}"):
                continue
            for s in ("activation_scaling_factor", "prequant_scaling_factor"):
                if s in names_f and not torch.allclose(farm_w[p + s].float(), mo_w[p + s].float(), rtol=1e-3):
                    diffs.append(f"rank {rank} {p + s}: differs by "
                                 f"{float((farm_w[p + s].float() - mo_w[p + s].float()).abs().max())}")
            ws, ms = farm_w[p + "weights_scaling_factor"], mo_w[p + "weights_scaling_factor"]
            # DIFFERENCE "awq_two_roundings"
            if not bool(((ws - ms).abs() <= 2 * 2.0 ** -10 * ms.abs() + 1e-9).all()):
                diffs.append(f"rank {rank} {k}: weight scales differ by {float((ws - ms).abs().max())}")
            off = (_steps(farm_w[k]) - _steps(mo_w[k])).abs()
            share = 0.03 if quant == "w8a8_sq" else 0.01  # DIFFERENCE "sq_scale_rounding"
            if int(off.max()) > 1 or float((off > 0).float().mean()) > share:
                diffs.append(f"rank {rank} {k}: values differ in {int((off > 0).sum())} of {off.numel()} "
                             f"(by up to {int(off.max())} steps)")
    assert n and not diffs, "\n".join(diffs)
