"""ModelOpt's own TensorRT-LLM checkpoint of a model it calibrated, run by
the farm's runtime decoder: the baseline the farm's calibrated variants are
held to (bench/quant_real.py, tests/test_real_model.py).

ModelOpt's TensorRT-LLM export (`torch_to_tensorrt_llm_checkpoint`, the loop
inside `export_tensorrt_llm_checkpoint`) makes the fused tensors of
TensorRT-LLM's layout: q, k and v become one `attention.qkv` with one
`prequant_scaling_factor`, so it averages the three AWQ scales and re-divides
the weights (modelopt/torch/export/quant_utils.py `preprocess_linear_fusion`,
0.47). Its fake-quantized PyTorch model keeps a scale per linear, which no
TensorRT-LLM checkpoint can hold; this is what a TensorRT-LLM engine built
from ModelOpt's export would compute.

Its W4A16_AWQ tensors come packed [out, in / 2] with scales [out, in / G];
the farm's rank files hold [in, out / 2] and [in / G, out]: the same integers
and scales, transposed (tests/test_conformance_awq.py holds them equal in
that order). Nothing else differs.
"""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import torch

from ..quant import is_quantized_weight, pack_int4, unpack_int4
from ..runtime.decoder import DecoderConfig, DecoderLM


def trtllm_checkpoint(model, decoder_type: str = "llama", dtype=torch.float16) -> tuple[dict, dict]:
    """(config, tensors) of rank 0 of ModelOpt's TensorRT-LLM export of a
    calibrated model, its tensors in the farm's layout (float32 floats)."""
    import modelopt.torch.export.model_config_export as mce

    with redirect_stdout(io.StringIO()):
        ranks = list(mce.torch_to_tensorrt_llm_checkpoint(model, decoder_type=decoder_type, dtype=dtype,
                                                          inference_tensor_parallel=1))
    cfg, weights, _ = ranks[0]
    out = {}
    for k, v in weights.items():
        v = v.contiguous()
        if is_quantized_weight(k) and k[: -len("weight")] + "weights_scaling_factor" in weights:
            out[k] = pack_int4(unpack_int4(v.view(torch.int8).t().contiguous()))
        elif k.endswith(".weights_scaling_factor"):
            out[k] = v.float().t().contiguous()
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return cfg, out


class RuntimeAsHF(torch.nn.Module):
    """The farm's runtime decoder on a rank file, called as a Hugging Face
    causal LM (`model(input_ids).logits`), for evaluation.reference_outputs."""

    def __init__(self, cfg: dict, W: dict):
        super().__init__()
        self.decoder = DecoderLM(DecoderConfig.from_trtllm(cfg), W).eval()

    def forward(self, input_ids, **_):
        kc, vc = self.decoder.new_cache(input_ids.shape[0], input_ids.shape[1])
        logits = self.decoder(input_ids, torch.tensor([0]), kc, vc)[0]
        return type("Out", (), {"logits": logits})()
