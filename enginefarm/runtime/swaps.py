"""Speed-ups of runtime/decoder.py's DecoderLM as module swaps (the way
gpt-fast swaps nn.Linear for its int8 layer in quantize.py): the engine form
the aoti backend exports (runtime/export.py).

`prepare_engine(model)` rewrites a model built from a checkpoint, in place:

- every linear layer of the decoder becomes an `EngineLin` holding its
  weight in the kernels' layout (kernels/gemv.py: repacked once, at build
  time, from the checkpoint's plain layout, which does not change);
- the gated MLP's two input projections (fc, gate) become one product with
  their output channels concatenated (one pass over x, one launch);
- the lm_head becomes an `EngineLin` too.

An `EngineLin` computes one of two ways, chosen when a graph is exported
(`set_mode`):

- "general" (prefill, any number of tokens): float weights through
  `F.linear` (cuBLAS); quantized ones dequantized by one fused elementwise
  kernel, then `F.linear`;
- "decode" (at most 16 rows, on CUDA with Triton): the skinny-product kernel
  of kernels/gemv.py, which reads the integer weights once and dequantizes
  in registers; float weights take it too, or cuBLAS (`fp16_kernel`).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import gemv as G
from ..quant import int_values

_OP = None


def gemv_op():
    """torch.ops.enginefarm.wo_gemv, registered on first use (needs Triton):
    a triton_op, so torch.export sees the kernel and AOTInductor compiles
    it into the package."""
    global _OP
    if _OP is not None:
        return _OP
    if not G.HAVE_TRITON:
        raise RuntimeError("the decode kernels need triton (a CUDA install of torch brings it)")
    from torch.library import triton_op, wrap_triton

    @triton_op("enginefarm::wo_gemv", mutates_args=())
    def wo_gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, bits: int, block_n: int, block_k: int,
                split_k: int, num_warps: int, num_stages: int, conv: int, swap: bool) -> torch.Tensor:
        cfg = G.GemvConfig(block_n, block_k, split_k, num_warps, num_stages, conv, swap)
        return G.launch(x, w, None if bits == 16 else s, bits, cfg, wrap=wrap_triton)

    _OP = torch.ops.enginefarm.wo_gemv
    return _OP


class EngineLin(nn.Module):
    """A linear layer in the kernels' layout (kernels/gemv.py): weight [N, K]
    (uint8 for 8 and 4 bits), per-channel or per-group scales, optional bias,
    and AWQ's pre-quant scale [K] (the input is multiplied by it first, as
    decoder.Lin does)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                 in_features: int, dtype: torch.dtype, pre_quant_scale: torch.Tensor | None = None):
        super().__init__()
        self.pre_quant_scale = (nn.Parameter(pre_quant_scale, requires_grad=False)
                                if pre_quant_scale is not None else None)
        self.bits = bits
        self.in_features = in_features
        self.out_features = weight.shape[0]
        self.dtype = dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False) if scale is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.mode = "general"
        self.fp16_kernel = False
        self.reduce = False  # a row-parallel layer of a tp > 1 rank: all-reduce before the bias, as `Lin` does
        g = in_features // scale.shape[1] if (scale is not None and scale.dim() == 2) else 0
        self.group = g
        self.cfg = G.default_config(bits, self.out_features, in_features, g)

    @classmethod
    def from_lin(cls, lins: list, dtype: torch.dtype) -> "EngineLin":
        """One EngineLin from one or more checkpoint `Lin`s sharing their input
        (outputs concatenated)."""
        ws, ss, bs = [], [], []
        bits = lins[0].bits or 16
        if not same_pre_quant_scale(lins):
            raise ValueError("cannot fuse linears with different pre-quant scales (AWQ)")
        for lin in lins:
            if (lin.bits or 16) != bits:
                raise ValueError("cannot fuse linears of different precisions")
            if bits == 16:
                w, s = G.pack_weight(lin.weight.data, None, 16)
                k = lin.weight.shape[1]
            else:
                w, s = G.pack_weight(lin.qweight.data, lin.scale.data, bits)
                k = lin.qweight.shape[0]
            ws.append(w)
            ss.append(s)
            bs.append(lin.bias.data if lin.bias is not None else None)
        if any(b is not None for b in bs):
            bs = [b if b is not None else torch.zeros(w.shape[0], dtype=dtype, device=w.device) for b, w in zip(bs, ws)]
            bias = torch.cat(bs)
        else:
            bias = None
        w = torch.cat(ws) if len(ws) > 1 else ws[0]
        s = None if bits == 16 else (torch.cat(ss) if len(ss) > 1 else ss[0])
        if len(lins) > 1 and any(lin.reduce for lin in lins):
            raise ValueError("cannot fuse row-parallel linears")
        pqs = getattr(lins[0], "pre_quant_scale", None)  # one for all of them (same_pre_quant_scale)
        out = cls(w, s, bias, bits, k, dtype, pqs.data if pqs is not None else None)
        out.reduce = lins[0].reduce
        return out

    def dequantized(self) -> torch.Tensor:
        """[N, K] weight in the model dtype (the general path's weight)."""
        if self.bits == 16:
            return self.weight
        q = self.weight.to(torch.int16)
        if self.bits == 8:
            q = q - 128
        else:
            lo = (q & 0xF) - 8
            hi = (q >> 4) - 8
            q = torch.stack([lo, hi], dim=-1).reshape(q.shape[0], q.shape[1] * 2)
        qf = q.to(self.dtype)
        if self.scale.dim() == 1:
            return qf * self.scale[:, None]
        n, groups = self.scale.shape
        return (qf.view(n, groups, -1) * self.scale[:, :, None]).view(n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:  # AWQ: x * s against the weight smoothed by 1 / s
            x = x * self.pre_quant_scale
        use_kernel = self.mode == "decode" and (self.bits != 16 or self.fp16_kernel)
        if use_kernel:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            c = self.cfg
            s = self.scale if self.scale is not None else self.weight
            parts = gemv_op()(x2, self.weight, s, self.bits, c.block_n, c.block_k, c.split_k, c.num_warps,
                              c.num_stages, c.conv, c.swap)
            y = parts.sum(0).to(x.dtype).view(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized())
        if self.reduce:
            from .decoder import all_reduce

            y = all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


def same_pre_quant_scale(lins: list) -> bool:
    """Whether linears that read one input can be one product: none has an
    AWQ pre-quant scale, or all have the same (the gated MLP's fc and gate
    each have their own, from calibration)."""
    pqs = [getattr(lin, "pre_quant_scale", None) for lin in lins]
    if all(p is None for p in pqs):
        return True
    return all(p is not None for p in pqs) and all(torch.equal(pqs[0], p) for p in pqs[1:])


def swap_linears(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every checkpoint linear layer (`Lin`) below `module` becomes an
    `EngineLin` in the kernels' layout, in place (the children are walked and
    replaced, as gpt-fast's quantize.py swaps nn.Linear for its int8 layer)."""
    from .decoder import Lin

    for name, child in module.named_children():
        if isinstance(child, Lin):
            setattr(module, name, EngineLin.from_lin([child], dtype))
        else:
            swap_linears(child, dtype)
    return module


def fuse_mlp(model: nn.Module) -> nn.Module:
    """Each gated MLP's two input projections (fc, gate) become one product
    `fc_gate`, their output channels concatenated: one pass over x, one launch."""
    from .decoder import Lin

    for layer in model.layers:
        # weight-and-activation quantized linears (decoder.ActLin) keep their own arithmetic
        if (layer.gate is not None and layer.fc_gate is None and isinstance(layer.fc, Lin)
                and same_pre_quant_scale([layer.fc, layer.gate])):
            layer.fc_gate = EngineLin.from_lin([layer.fc, layer.gate], model.embed.dtype)
            layer.fc = layer.gate = None
    return model


def swap_head(model: nn.Module) -> nn.Module:
    """The lm_head (and its bias, GPT-J's) as an `EngineLin`, so decode can run it through the kernel."""
    w = model.lm_head.data.contiguous()
    b = model.lm_head_bias.data if model.lm_head_bias is not None else None
    model.head = EngineLin(w, None, b, 16, w.shape[1], w.dtype)
    model.lm_head = model.lm_head_bias = None
    return model


def prepare_engine(model, fuse: bool = True, kernel_head: bool = True):
    """A DecoderLM (tp 1, or one rank of tp > 1) in its engine form: the swaps above, in place; returns it."""
    if fuse:
        fuse_mlp(model)
    swap_linears(model, model.embed.dtype)
    if kernel_head:
        swap_head(model)
    return model


def engine_linears(model):
    return [m for m in model.modules() if isinstance(m, EngineLin)]


def set_mode(model, mode: str, fp16_kernel: bool = False) -> None:
    """'general' or 'decode' for every EngineLin (read when a graph is traced)."""
    for m in engine_linears(model):
        m.mode = mode
        m.fp16_kernel = fp16_kernel


def kernel_configs(model) -> list[dict]:
    """The launch configuration of each distinct linear shape (for the sidecar)."""
    seen = {}
    for m in engine_linears(model):
        key = (m.bits, m.out_features, m.in_features, m.group)
        seen[key] = {"bits": m.bits, "n": m.out_features, "k": m.in_features, "group": m.group, **asdict(m.cfg)}
    return list(seen.values())


__all__ = ["EngineLin", "prepare_engine", "set_mode", "gemv_op", "kernel_configs", "int_values"]
