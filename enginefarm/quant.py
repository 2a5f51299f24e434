"""Weight-only quantization (W8A16, W4A16) in the TensorRT-LLM checkpoint layout.

A quantized linear layer `P` with a Hugging Face weight of shape [out, in]
becomes, in the rank file:

- per channel (quant_algo W8A16 / W4A16), what TensorRT-LLM's
  `WeightOnlyQuantLinear` declares (tensorrt_llm/quantization/layers.py,
  v0.16.0 .. v0.20.0: `weight` int8 of shape (in, out / weight_only_quant_mode),
  `per_channel_scale` of shape (out,) in the model dtype):
  `P.weight` int8 [in, out] (W8A16) or [in, out // 2] (W4A16: two signed
  4-bit values per byte, the even output column in the low nibble, as
  `torch.ops.trtllm.pack_int8_tensor_to_packed_int4` packs them), and
  `P.per_channel_scale` [out] in the model dtype;
- per group (`group_size` G input channels share a scale; quant_algo
  W8A16_GPTQ / W4A16_GPTQ, symmetric: has_zero_point false), what
  `WeightOnlyGroupwiseQuantLinear` declares (same file): `weight` of shape
  (in, out // pack_ratio) *in the model dtype* (pack_ratio 4 for int4, 2 for
  int8: "INT4*4 -> FP16, INT8*2 -> FP16"), i.e. the same packed bytes as the
  per-channel layout viewed as float16/bfloat16, and
  `P.weights_scaling_factor` [in // G, out] in the model dtype.

The integers are the ones NVIDIA's own tools compute from the same weights:

- per channel: TensorRT-LLM's weight-only quantizer, which trtllm-build
  itself runs on a W8A16/W4A16 checkpoint that holds float weights
  (models/modeling_utils.py `preprocess_weights` -> models/convert_utils.py
  `weight_only_quantize_dict` -> `weight_only_quantize` ->
  `torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix`), and its
  converters call directly (models/llama/convert.py). The C++ loop
  (cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp,
  `symmetric_quantize`): per output column, scale = max|w| (in float32) x
  1 / 2^(bits-1), i.e. / 128 (int8) or / 8 (int4); q = round(w / scale) with
  C's round (half away from zero) on the float32 quotient, clamped to
  [-128, 127] or [-8, 7]; the scale is stored cast to the model dtype (the
  integers are computed against the float32 scale, not the stored one).
- per group: TensorRT-LLM has no group-wise quantizer of its own (its
  group-wise checkpoints come from GPTQ files or from ModelOpt); the farm
  follows ModelOpt's block quantizer (modelopt/torch/export/quant_utils.py
  `get_scaling_factor_from_weight`, `pack_int4_in_uint8`, nvidia-modelopt
  0.47): scale = max|w| / 7 (int4) or / 127 (int8) in float32, q =
  round-half-to-even(w / scale) clamped, the scale stored in the model dtype.

`dequantize` inverts both, so tests and validation compare quantized
weights with the originals.

This is the plain layout. TensorRT-LLM's CUTLASS kernels want the integer
matrix additionally interleaved for the GPU architecture
(`preprocess_weights_for_mixed_gemm`), and trtllm-build does not do it for
an int8 tensor it finds in a checkpoint (`weight_only_quantize_dict` skips
tensors whose dtype is already int8; `preprocess_perlayer_weights` does
nothing for W4A16_GPTQ / W8A16_GPTQ): its own converters store the
interleaved matrix. So the tensorrt_llm backend interleaves a copy with
TensorRT-LLM's own op on the GPU worker just before `trtllm-build`
(backends/tensorrt_llm.py `preprocess_weight_only`); the farm's stored
checkpoint, which the `shards` step validates, holds the same integers in
plain order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import BadInput

BITS = {"w8a16": 8, "w4a16": 4, "w4a16_awq": 4, "w8a8_sq": 8, "fp8": 8}
# calibrated quantizations: a `calibrate` step (tasks/calibrate.py) runs
# ModelOpt on the Hugging Face model first, and the converter applies what it kept
CALIBRATED = {"w4a16_awq": "int4_awq", "w8a8_sq": "int8_sq", "fp8": "fp8"}
# quantizations of weights *and* activations (see `act_plan` below): their
# TensorRT-LLM quant_algo, as ModelOpt's TensorRT-LLM export writes it
# (modelopt/torch/export/quant_utils.py, 0.47: int8_sq -> "W8A8_SQ_PER_CHANNEL",
# fp8 -> "FP8"; TensorRT-LLM reads these back as ModelOpt formats,
# tensorrt_llm/models/modeling_utils.py QuantConfig `_get_modelopt_qformat`)
ACT_QUANT_ALGOS = {"int8_sq": "W8A8_SQ_PER_CHANNEL", "fp8": "FP8"}
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value: ModelOpt's maxbound for (4, 3)
AWQ_GROUPS = (128, 64)
# AWQ's `prequant_scaling_factor` is stored with shape (in,), as ModelOpt's
# TensorRT-LLM export writes it (tests/test_conformance_awq.py holds the two
# equal); TensorRT-LLM's WeightOnlyGroupwiseQuantLinear declares the parameter
# (1, in) (tensorrt_llm/quantization/layers.py) and the runtime takes either.  # the choice: 128, or 64 where 128 does not divide an input width
# the linear layers of a TensorRT-LLM decoder layer that weight-only
# quantization applies to (embeddings, norms and lm_head stay in the model
# dtype): the names trtllm-build's own weight_only_quantize_dict quantizes
# (models/convert_utils.py: 'qkv.weight', 'dense.weight', 'fc.weight',
# 'proj.weight', 'gate.weight')
QUANTIZED_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: Optional[int] = None  # None: per output channel
    awq: bool = False  # activation-aware: a per-input-channel pre-quant scale (prequant_scaling_factor)
    act: Optional[str] = None  # activations quantized too: "int8_sq" (SmoothQuant) or "fp8"

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def divisor(self) -> int:
        """max|w| / divisor = the scale: 2^(bits-1) per channel (TensorRT-LLM's
        quantizer: 128, 8), 2^(bits-1) - 1 per group (ModelOpt's: 127, 7)."""
        return self.qmax if self.group_size else self.qmax + 1

    @property
    def scale_name(self) -> str:
        return "weights_scaling_factor" if self.group_size else "per_channel_scale"

    def shapes(self, shape: tuple[int, ...], name: str = "weight") -> tuple[tuple[int, int], tuple[int, ...]]:
        """Stored shapes (qweight as int8 bytes, scale) for a float weight of
        shape [out, in]; checks it can be done. A group-wise weight is stored
        as these bytes viewed in the model dtype: see `weight_storage`."""
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

    def weight_storage(self, shape: tuple[int, ...], dtype: torch.dtype, name: str = "weight") -> tuple[torch.dtype, tuple[int, int]]:
        """(dtype, shape) of the stored weight: int8 bytes per channel; per
        group the same bytes viewed in the model dtype, as TensorRT-LLM's
        WeightOnlyGroupwiseQuantLinear declares its weight (in, out // pack_ratio)."""
        qs, _ = self.shapes(shape, name)
        if not self.group_size:
            return torch.int8, qs
        width = torch.empty((), dtype=dtype).element_size()
        if qs[1] % width:
            raise BadInput(f"{name}: a group-wise weight is stored in {width}-byte words; its {qs[1]} bytes a row "
                           f"do not fill them (the output channels of this tensor-parallel shard must be even)")
        return dtype, (qs[0], qs[1] // width)

    def quant_algo(self) -> str:
        if self.act:
            return ACT_QUANT_ALGOS[self.act]
        base = {8: "W8A16", 4: "W4A16"}[self.bits]
        if self.awq:
            return base + "_AWQ"
        return base + ("_GPTQ" if self.group_size else "")


def scheme_for(quant: str, group_size: Optional[int] = None) -> Optional[Scheme]:
    if quant == "none":
        return None
    if quant not in BITS:
        raise BadInput(f"unknown quantization {quant!r}; expected none, w8a16, w4a16, w4a16_awq, w8a8_sq or fp8")
    if quant in ("w8a8_sq", "fp8"):
        return Scheme(8, act=CALIBRATED[quant])
    if quant == "w4a16_awq":
        return Scheme(4, group_size or AWQ_GROUPS[0], awq=True)
    return Scheme(BITS[quant], group_size)


def awq_group_size(hf_config: dict, tp: int = 1, asked: Optional[int] = None) -> int:
    """The AWQ group size of a model: the recipe's matrix.group_size, else 128,
    or 64 where 128 does not divide an input width of a quantized linear of a
    tensor-parallel shard (SmolLM2-135M's hidden size 576 = 4.5 x 128)."""
    if asked:
        return asked
    hidden = hf_config.get("hidden_size") or hf_config.get("n_embd") or hf_config.get("d_model") or 0
    inter = hf_config.get("intermediate_size") or hf_config.get("ffn_dim") or hf_config.get("n_inner") or 4 * hidden
    heads = hf_config.get("num_attention_heads") or hf_config.get("n_head") or 1
    head_dim = hf_config.get("head_dim") or (hidden // heads if heads else hidden)
    widths = [hidden, inter // tp, heads * head_dim // tp]
    for g in AWQ_GROUPS:
        if all(w % g == 0 for w in widths if w):
            return g
    raise BadInput(f"AWQ: no group size of {AWQ_GROUPS} divides the input widths {widths} at tp={tp}; "
                   f"set matrix.group_size")


def effective_scheme(variant, hf_config: Optional[dict] = None) -> Optional[Scheme]:
    """scheme_for, with AWQ's group size resolved against the model's widths."""
    if variant.quant == "w4a16_awq" and hf_config is not None:
        return scheme_for(variant.quant, awq_group_size(hf_config, variant.tp, variant.group_size))
    return scheme_for(variant.quant, variant.group_size)


def awq_smooth(t: torch.Tensor, pqs: torch.Tensor) -> torch.Tensor:
    """An AWQ linear's weight [out, in] as it is quantized: divided by the
    pre-quant scale along its inputs (the input is multiplied by it at run
    time, so x @ W^T is unchanged before rounding); ModelOpt's
    `apply_pre_quant_scale_and_smooth` (modelopt/torch/quantization/model_calib.py,
    0.47) does the same in float32."""
    return (t.float() / pqs.float()[None, :]).to(t.dtype)


def block_amax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """max|w| of each block of `group_size` inputs of a weight [out, in], float32 [out, in / G]."""
    out_f, in_f = w.shape
    wf = w.float().reshape(out_f, in_f // group_size, group_size)
    return torch.maximum(wf.amax(dim=-1).abs(), wf.amin(dim=-1).abs())


def fake_quantize_groups(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """The float32 weight [out, in] that `quantize` + `dequantize` give per
    group (ModelOpt's block arithmetic: scale = max|w| / qmax, round half to
    even, clamp), computed without packing: what a calibration search scores."""
    qmax = (1 << (bits - 1)) - 1
    out_f, in_f = w.shape
    wf = w.float().reshape(out_f, in_f // group_size, group_size)
    scale = block_amax(w, group_size) / qmax
    scale[scale == 0] = 1.0
    q = torch.round(wf / scale.unsqueeze(-1)).clamp_(-qmax - 1, qmax)
    return (q * scale.unsqueeze(-1)).reshape(out_f, in_f)


def awq_clip(t: torch.Tensor, ratios: torch.Tensor, group_size: int) -> torch.Tensor:
    """An AWQ linear's smoothed weight [out, in] clipped, block by block, to
    +-ratio x max|w| of its block (ratios [out, in / G], from the calibrate
    step's clip search, calibration.awq_clip_search): the block's scale then
    becomes ratio x max|w| / 7, as ModelOpt's awq_clip sets a block's amax
    to ratio x amax (modelopt/torch/quantization/model_calib.py `awq_clip`,
    0.47). Quantizing the clipped weight gives those scales with the usual
    arithmetic, so the checkpoint's layout does not change."""
    out_f, in_f = t.shape
    lim = (block_amax(t, group_size) * ratios.float()).unsqueeze(-1)  # [out, in/G, 1]
    wf = t.float().reshape(out_f, in_f // group_size, group_size)
    return torch.minimum(torch.maximum(wf, -lim), lim).reshape(out_f, in_f).to(t.dtype)


def is_quantized_weight(name: str) -> bool:
    """Whether a rank-file tensor name is the weight of a quantized linear."""
    return name.endswith(".weight") and any(name.endswith(p + ".weight") for p in QUANTIZED_LINEARS)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's round(): halves away from zero (torch.round rounds them to even).
    On float32 input, computed in float64 so that |x| + 0.5 is exact."""
    d = x.double()
    return (torch.sign(d) * torch.floor(d.abs() + 0.5)).to(x.dtype)


def quantize(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight (in the model dtype) -> (stored weight, scales):
    the weight int8 [in, out] or packed [in, out/2] per channel, those bytes
    viewed in `scale_dtype` per group; scales [out] or [in/G, out]."""
    scheme.shapes(tuple(w.shape), name)
    out_f, in_f = w.shape
    g = scheme.group_size or in_f
    wf = w.float().reshape(out_f, in_f // g, g)
    # max|w| of each output channel (group): exact in float32 from any model dtype
    hi, lo = wf.amax(dim=-1), wf.amin(dim=-1)  # far faster than abs().amax() here
    amax = torch.maximum(hi.abs(), lo.abs())  # [out, in/g]
    if scheme.group_size:
        # ModelOpt: amax / 7 (127); an all-zero group gets scale 1.0
        scale32 = amax / scheme.divisor
        scale32[scale32 == 0] = 1.0
        q = torch.round(wf / scale32.unsqueeze(-1))
    else:
        # TensorRT-LLM: per_col_max *= 1 / 2^(bits-1); round(w / scale) in float32.
        # An all-zero column (scale 0, where TensorRT-LLM divides 0 by 0) gets integers 0.
        scale32 = amax * (1.0 / scheme.divisor)
        q = round_half_away(wf / torch.where(scale32 == 0, 1.0, scale32).unsqueeze(-1))
    q = q.clamp_(-scheme.qmax - 1, scheme.qmax).to(torch.int8).reshape(out_f, in_f).t().contiguous()  # [in, out]
    del wf
    if scheme.bits == 4:
        q = pack_int4(q)
    scale = scale32.to(scale_dtype)
    if scheme.group_size:
        return q.view(scale_dtype), scale.t().contiguous()  # [in/G, out]
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


def as_int8(qweight: torch.Tensor) -> torch.Tensor:
    """The int8 bytes of a stored quantized weight (a group-wise one is
    stored viewed in the model dtype)."""
    return qweight if qweight.dtype == torch.int8 else qweight.contiguous().view(torch.int8)


def int_values(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed integer matrix [in, out] of a stored quantized weight."""
    q = as_int8(qweight)
    return unpack_int4(q) if bits == 4 else q


def is_stored_quantized(W: dict, name: str, bits: int) -> bool:
    """Whether the linear `name` of a rank file holds a quantized weight."""
    if not bits or name + ".weight" not in W:
        return False
    return W[name + ".weight"].dtype == torch.int8 or name + ".weights_scaling_factor" in W


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


def prequant_scale_rows(make, sources: list[torch.Tensor], pqs: list[torch.Tensor]) -> torch.Tensor:
    """The pre-quant scale of one rank's output tensor: each source weight
    replaced by a matrix whose every row is its scale, through the same
    `make` (concatenation, tensor-parallel split) as the weights: the scale
    follows a row-parallel split of the inputs and stays whole for a
    column-parallel one. Returns [in_of_this_rank]."""
    rows = [p.float()[None, :].expand(s.shape[0], -1) for s, p in zip(sources, pqs)]
    return make(*rows)[0].contiguous()


def bits_of(config: dict) -> int:
    algo = ((config.get("quantization") or {}).get("quant_algo") or "").upper()
    if algo.startswith("W8A16"):
        return 8
    if algo.startswith("W4A16"):
        return 4
    return 0


def act_quant_of(config: dict) -> Optional[str]:
    """"int8_sq" or "fp8" for a checkpoint whose activations are quantized too, else None."""
    algo = ((config.get("quantization") or {}).get("quant_algo") or "").upper()
    for act, name in ACT_QUANT_ALGOS.items():
        if algo == name:
            return act
    return None


# Weight-and-activation quantization (w8a8_sq, fp8) in the layout ModelOpt's
# TensorRT-LLM export writes (modelopt/torch/export/model_config_export.py
# `torch_to_tensorrt_llm_checkpoint`, 0.47; read back by TensorRT-LLM's
# SmoothQuantLinear / FP8Linear, tensorrt_llm/quantization/layers.py, whose
# `weight` is (out_features, in_features) int8 or fp8, unlike weight-only's
# (in, out)). Per linear P (tests/test_conformance_sq.py holds the farm's
# equal to ModelOpt's):
#
# - int8_sq (W8A8_SQ_PER_CHANNEL): `P.weight` int8 [out, in] of the smoothed
#   weight (divided by the per-input-channel SmoothQuant scale s), per output
#   channel `P.weights_scaling_factor` float32 [out] = max|w_s| / 127, the
#   integers round-half-to-even(w_s / scale) clamped to [-128, 127]
#   (quant_utils.py `to_quantized_weight`, INT8_SQ); `P.activation_scaling_factor`
#   float32 [1] = the calibrated max|x * s| / 127, static per tensor
#   (`get_scaling_factor`: amax / maxbound); `P.prequant_scaling_factor` [in]
#   in the model dtype = s (the input is multiplied by it at run time).
# - fp8 (FP8): `P.weight` float8_e4m3fn [out, in] = w / scale, per tensor
#   `P.weights_scaling_factor` float32 [1] = max|w| / 448 and
#   `P.activation_scaling_factor` float32 [1] = calibrated max|x| / 448.
#
# Linears that become one tensor share their activation statistics, as
# ModelOpt's exporter makes them (quant_utils.py `preprocess_linear_fusion`:
# the mean of their pre-quant scales, the max of their input amax and, per
# tensor, of their weight amax): q/k/v (attention.qkv); for FP8 also a gated
# MLP's two input projections (mlp.fc and mlp.gate, two tensors), which
# ModelOpt's SmoothQuant export leaves apart.


def act_plan(scheme: Scheme, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple]]:
    """(name suffix, dtype, shape) of the stored tensors of one linear [out, in]."""
    out_f, in_f = shape
    if scheme.act == "int8_sq":
        return [("weight", torch.int8, (out_f, in_f)), ("weights_scaling_factor", torch.float32, (out_f,)),
                ("activation_scaling_factor", torch.float32, (1,)), ("prequant_scaling_factor", dtype, (in_f,))]
    return [("weight", torch.float8_e4m3fn, (out_f, in_f)), ("weights_scaling_factor", torch.float32, (1,)),
            ("activation_scaling_factor", torch.float32, (1,))]


def act_quantize(w: torch.Tensor, scheme: Scheme, input_amax: float, weight_amax=None) -> dict:
    """One linear's stored tensors (w: [out, in] in the model dtype, already
    smoothed for int8_sq) but the pre-quant scale. weight_amax: int8_sq's
    per-output-channel max|w| [out] over the whole (unsplit) weight, which a
    row-parallel shard does not see all of (default: this weight's); fp8's
    per-tensor max|w| shared with the linears of one input (default: this
    weight's)."""
    wf = w.float()
    if scheme.act == "int8_sq":
        amax = torch.maximum(wf.amax(dim=1).abs(), wf.amin(dim=1).abs()) if weight_amax is None else weight_amax
        scale = amax / 127.0
        scale[scale == 0] = 1.0
        q = torch.round(wf / scale[:, None]).clamp_(-128, 127).to(torch.int8)
        return {"weight": q, "weights_scaling_factor": scale,
                "activation_scaling_factor": torch.tensor([float(input_amax) / 127.0], dtype=torch.float32)}
    if weight_amax is None:
        weight_amax = float(wf.abs().max())
    scale = torch.tensor([weight_amax / FP8_MAX if weight_amax > 0 else 1.0], dtype=torch.float32)
    return {"weight": (wf / scale).to(torch.float8_e4m3fn), "weights_scaling_factor": scale,
            "activation_scaling_factor": torch.tensor([float(input_amax) / FP8_MAX], dtype=torch.float32)}


def fp8_capable(gpu: Optional[str] = None) -> Optional[str]:
    """None where this machine (or `gpu`, sm_XY) has FP8 tensor cores
    (compute capability 8.9 or later: Ada, Hopper, Blackwell), else why not."""
    if gpu is None:
        if not torch.cuda.is_available():
            return "FP8 engines need a GPU with FP8 (sm_89 or later); this machine has no CUDA GPU"
        major, minor = torch.cuda.get_device_capability()
        gpu = f"sm_{major}{minor}"
    cc = int(gpu.split("_")[1])
    if cc < 89:
        return f"FP8 engines need a GPU with FP8 (sm_89 or later); this machine's is {gpu}"
    return None


def engine_cannot_run(act_quant: Optional[str], device: str, gpu: Optional[str] = None) -> Optional[str]:
    """Why an engine of this activation quantization cannot run here, or None.
    FP8 engines run only on a GPU with FP8: a package built for the CPU would
    only emulate it, and is never run (its variant stays pending)."""
    if act_quant != "fp8":
        return None
    if device != "cuda":
        return ("an FP8 engine runs only on a GPU with FP8 (sm_89 or later); this one was built for the CPU, "
                "where FP8 would only be emulated")
    return fp8_capable(gpu)
