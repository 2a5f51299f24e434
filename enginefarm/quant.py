"""Weight-only quantization (W8A16, W4A16) in the TensorRT-LLM checkpoint layout.

A quantized linear layer `P` with a Hugging Face weight of shape [out, in]
becomes, in the rank file:

- `P.weight`: int8, shape [in, out] (W8A16) or [in, out // 2] (W4A16: two
  signed 4-bit values per byte, the even output column in the low nibble,
  the odd one in the high nibble). The weight is transposed: TensorRT-LLM's
  weight-only GEMMs take (in, out).
- per channel: `P.per_channel_scale`, shape [out], in the model dtype;
- per group (`group_size` G input channels share a scale):
  `P.weights_scaling_factor`, shape [in // G, out], in the model dtype, and
  config.json's quantization says `group_size` (quant_algo W8A16_GPTQ /
  W4A16_GPTQ, symmetric: has_zero_point false).

Quantization is symmetric round-to-nearest: scale = max|w| / qmax over the
channel (or group), q = clamp(round(w / scale), -qmax - 1, qmax), with qmax
127 (int8) or 7 (int4). `dequantize` inverts it, so tests and validation can
compare quantized weights with the originals.

This is the plain layout. TensorRT-LLM's CUTLASS kernels want the int8/int4
matrix additionally interleaved for the GPU architecture
(`preprocess_weights_for_mixed_gemm`, an op of the tensorrt_llm package);
the tensorrt_llm backend applies it where that package is installed, just
before `trtllm-build` (backends/tensorrt_llm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import BadInput

BITS = {"w8a16": 8, "w4a16": 4}
# the linear layers of a TensorRT-LLM decoder layer that weight-only
# quantization applies to (embeddings, norms and lm_head stay in the model dtype)
QUANTIZED_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: Optional[int] = None  # None: per output channel

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def scale_name(self) -> str:
        return "weights_scaling_factor" if self.group_size else "per_channel_scale"

    def shapes(self, shape: tuple[int, ...], name: str = "weight") -> tuple[tuple[int, int], tuple[int, ...]]:
        """Stored shapes (qweight, scale) for a float weight of shape [out, in]; checks it can be done."""
        if len(shape) != 2:
            raise ValueError(f"{name}: weight-only quantization takes a 2-D weight, got shape {tuple(shape)}")
        out_f, in_f = shape
        if self.bits == 4 and out_f % 2:
            raise BadInput(f"{name}: W4A16 packs two output channels per byte; {out_f} output channels is odd")
        if self.group_size and in_f % self.group_size:
            raise BadInput(
                f"{name}: group_size {self.group_size} does not divide the {in_f} input channels of this "
                f"tensor-parallel shard; pick a group size that divides it"
            )
        q = (in_f, out_f // 2 if self.bits == 4 else out_f)
        sc = (in_f // self.group_size, out_f) if self.group_size else (out_f,)
        return q, sc

    def quant_algo(self) -> str:
        base = {8: "W8A16", 4: "W4A16"}[self.bits]
        return base + ("_GPTQ" if self.group_size else "")


def scheme_for(quant: str, group_size: Optional[int] = None) -> Optional[Scheme]:
    if quant == "none":
        return None
    if quant not in BITS:
        raise BadInput(f"unknown quantization {quant!r}; expected none, w8a16 or w4a16")
    return Scheme(BITS[quant], group_size)


def is_quantized_weight(name: str) -> bool:
    """Whether a rank-file tensor name is the weight of a quantized linear."""
    return name.endswith(".weight") and any(name.endswith(p + ".weight") for p in QUANTIZED_LINEARS)


def quantize(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (int8 [in, out] or packed [in, out/2], scales)."""
    scheme.shapes(tuple(w.shape), name)
    out_f, in_f = w.shape
    # Work in the source's [out, in] layout (contiguous reductions), transpose
    # the 1-byte result at the end: cheaper than transposing the floats.
    g = scheme.group_size or in_f
    wg = w.reshape(out_f, in_f // g, g)
    hi, lo = wg.amax(dim=-1), wg.amin(dim=-1)  # [out, in/g]; far faster than aminmax or abs().amax() here
    amax = torch.maximum(hi.float().abs(), lo.float().abs())
    scale = (amax / scheme.qmax).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
    # quantize against the scale as stored (in the model dtype), so dequantize is exact
    wf = w.float().reshape(out_f, in_f // g, g)
    wf.mul_(scale.float().reciprocal().unsqueeze(-1)).round_().clamp_(-scheme.qmax - 1, scheme.qmax)
    q = wf.to(torch.int8).reshape(out_f, in_f).t().contiguous()  # [in, out]
    del wf
    if scheme.bits == 4:
        q = pack_int4(q)
    if scheme.group_size:
        return q, scale.t().contiguous()  # [in/G, out]
    return q, scale.reshape(out_f)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], shape [..., n] -> int8 [..., n // 2], even column in the low nibble."""
    lo = q[..., 0::2].to(torch.int16) & 0xF
    hi = (q[..., 1::2].to(torch.int16) & 0xF) << 4
    return (lo | hi).to(torch.uint8).view(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int8 [..., n // 2] -> int8 [..., n] in [-8, 7]."""
    u = p.view(torch.uint8).to(torch.int16)
    lo, hi = u & 0xF, (u >> 4) & 0xF
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return out.to(torch.int8)


def int_values(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed integer matrix [in, out] of a stored quantized weight."""
    return unpack_int4(qweight) if bits == 4 else qweight


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored (qweight, scale) -> the float weight [out, in] they stand for.
    The scale's shape says per channel ([out]) or per group ([in/G, out])."""
    q = int_values(qweight, bits).float()  # [in, out]
    s = scale.float()
    if s.dim() == 2:
        groups = s.shape[0]
        g = q.shape[0] // groups
        w = (q.reshape(groups, g, -1) * s[:, None, :]).reshape(q.shape)
    else:
        w = q * s[None, :]
    return w.t().contiguous().to(dtype)


def bits_of(config: dict) -> int:
    algo = ((config.get("quantization") or {}).get("quant_algo") or "").upper()
    if algo.startswith("W8A16"):
        return 8
    if algo.startswith("W4A16"):
        return 4
    return 0
