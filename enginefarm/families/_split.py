"""Tensor-parallel splits shared by the decoder families (TensorRT-LLM's
convention: column-parallel layers split the output dim, row-parallel layers
the input dim; row-parallel biases stay whole on every rank)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _even(t: "torch.Tensor", tp: int, dim: int) -> None:
    """A split must be even (any tp size, not only powers of two, so that a
    9-head model splits at 3); recipes are checked against config.json
    before, this catches a tensor no check names."""
    if t.shape[dim] % tp:
        from ..errors import BadInput

        raise BadInput(f"tp size {tp} does not divide a dimension of {t.shape[dim]} (tensor shape {tuple(t.shape)}); "
                       f"pick a tp size that divides the model's heads and widths")


def column(t: "torch.Tensor", tp: int, rank: int) -> "torch.Tensor":
    if tp == 1:
        return t
    _even(t, tp, 0)
    return t.chunk(tp, dim=0)[rank]


def row(t: "torch.Tensor", tp: int, rank: int) -> "torch.Tensor":
    if tp == 1 or t.dim() == 1:
        return t
    _even(t, tp, 1)
    return t.chunk(tp, dim=1)[rank]


def kv_heads_for_rank(t: "torch.Tensor", n_kv: int, tp: int, rank: int) -> "torch.Tensor":
    """k or v projection rows (weight [n_kv*d, h] or bias [n_kv*d]) for one rank:
    split when tp divides the kv heads, replicate heads when tp exceeds them."""
    if tp == 1:
        return t
    d = t.shape[0] // n_kv
    if n_kv % tp == 0:
        return t.chunk(tp, dim=0)[rank]
    # tp is a multiple of n_kv: rank r gets head r // (tp // n_kv)
    head = rank // (tp // n_kv)
    return t[head * d : (head + 1) * d]


def _torch():
    import torch

    return torch


def cat(ts: list["torch.Tensor"], dim: int = 0) -> "torch.Tensor":
    """torch.cat, except on the meta device (the converter's shape trial),
    where the shape is computed here: torch's meta cat costs a second of
    lazy imports the first time."""
    torch = _torch()
    if ts and ts[0].is_meta:
        shape = list(ts[0].shape)
        shape[dim] = sum(t.shape[dim] for t in ts)
        return torch.empty(shape, dtype=ts[0].dtype, device="meta")
    return torch.cat(ts, dim)


def fused_qkv(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", n_kv: int, tp: int, rank: int) -> "torch.Tensor":
    return cat([column(q, tp, rank), kv_heads_for_rank(k, n_kv, tp, rank), kv_heads_for_rank(v, n_kv, tp, rank)], 0)


def vocab_rows(t: "torch.Tensor", tp: int, rank: int) -> "torch.Tensor":
    """lm_head rows for one rank, the vocab padded to a multiple of tp."""
    if tp == 1:
        return t
    pad = (-t.shape[0]) % tp
    if pad:
        t = cat([t, t.new_zeros(pad, *t.shape[1:])], 0)
    return t.chunk(tp, dim=0)[rank]


def per_head_qkv(t: "torch.Tensor", n_heads: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """q, k, v of a fused projection whose rows are interleaved per head
    ([q_h0; k_h0; v_h0; q_h1; ...], GPT-NeoX's and BLOOM's query_key_value),
    each with its heads in order: TensorRT-LLM wants [q; k; v]."""
    d = t.shape[0] // (3 * n_heads)
    q, k, v = t.reshape(n_heads, 3, d, *t.shape[1:]).unbind(1)
    return tuple(x.reshape(n_heads * d, *t.shape[1:]) for x in (q, k, v))


def stacked_qkv(t: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """q, k, v of a fused projection whose rows are [q; k; v] (GPT-2's c_attn, transposed)."""
    return t.chunk(3, dim=0)


def first_rank_only(t: "torch.Tensor", rank: int) -> "torch.Tensor":
    """A bias added before the all-reduce of partial sums: whole on rank 0,
    zeros on the others, so the reduced sum holds it once (GPT-J's mlp.proj)."""
    return t if rank == 0 else _torch().zeros_like(t)


# --------------------------------------------------------------------------- rank-file tensors
# Builders of the OutTensors a family lists for one rank: `dst` is the
# TensorRT-LLM name without .weight/.bias, `src` the Hugging Face one.


def _same(t):
    return t


def whole(dst: str, src: str, bias: bool = True) -> list:
    """Norms and position tables: the same on every rank."""
    from .base import OutTensor

    return [OutTensor(f"{dst}.{k}", (f"{src}.{k}",), _same) for k in (("weight", "bias") if bias else ("weight",))]


def column_linear(dst: str, src: str, tp: int, rank: int, bias: bool = True, transposed: bool = False) -> list:
    """A column-parallel linear (output rows split); `transposed`: the
    source stores [in, out] (GPT-2's Conv1D)."""
    from .base import OutTensor

    out = [OutTensor(dst + ".weight", (src + ".weight",), lambda t: column(t.t() if transposed else t, tp, rank))]
    if bias:
        out.append(OutTensor(dst + ".bias", (src + ".bias",), lambda t: column(t, tp, rank)))
    return out


def row_linear(dst: str, src: str, tp: int, rank: int, bias: bool = True, transposed: bool = False,
               bias_on_first_rank: bool = False) -> list:
    """A row-parallel linear (input columns split). Its bias is added after
    the all-reduce, so it is whole on every rank; `bias_on_first_rank`: added
    before a reduce (GPT-J), so rank 0 holds it and the others zeros."""
    from .base import OutTensor

    out = [OutTensor(dst + ".weight", (src + ".weight",), lambda t: row(t.t() if transposed else t, tp, rank))]
    if bias:
        out.append(OutTensor(dst + ".bias", (src + ".bias",),
                             (lambda t: first_rank_only(t, rank)) if bias_on_first_rank else _same))
    return out


def fused_qkv_linear(dst: str, src: str, unfuse, n_heads: int, tp: int, rank: int, bias: bool = True,
                     transposed: bool = False) -> list:
    """A source that fuses q, k and v in one projection; `unfuse` gives them
    back ([q; k; v] stacked or per head), and each rank takes its heads."""
    from .base import OutTensor

    def make(t):
        return fused_qkv(*unfuse(t.t() if transposed and t.dim() == 2 else t), n_heads, tp, rank)

    return [OutTensor(f"{dst}.{k}", (f"{src}.{k}",), make) for k in (("weight", "bias") if bias else ("weight",))]


def separate_qkv_linear(dst: str, srcs: tuple[str, str, str], n_kv: int, tp: int, rank: int,
                        bias: bool = True) -> list:
    """Separate q, k, v projections fused into TensorRT-LLM's qkv."""
    from .base import OutTensor

    def make(q, k, v):
        return fused_qkv(q, k, v, n_kv, tp, rank)

    return [OutTensor(f"{dst}.{k}", tuple(f"{s}.{k}" for s in srcs), make)
            for k in (("weight", "bias") if bias else ("weight",))]


def lm_head(names: set, candidates: tuple[str, ...], tp: int, rank: int, bias: bool = False) -> list:
    """The vocab-parallel LM head from the first of `candidates` the
    checkpoint has (the head itself, else the tied input embedding)."""
    from ..errors import BadInput
    from .base import OutTensor

    src = next((c for c in candidates if c + ".weight" in names), None)
    if src is None:
        raise BadInput(f"the checkpoint has none of {', '.join(c + '.weight' for c in candidates)} for the LM head")
    out = [OutTensor("lm_head.weight", (src + ".weight",), lambda t: vocab_rows(t, tp, rank))]
    if bias:
        out.append(OutTensor("lm_head.bias", (src + ".bias",), lambda t: vocab_rows(t, tp, rank)))
    return out
