"""Tensor-parallel splits shared by the decoder families (TensorRT-LLM's
convention: column-parallel layers split the output dim, row-parallel layers
the input dim; row-parallel biases stay whole on every rank)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def column(t: "torch.Tensor", tp: int, rank: int) -> "torch.Tensor":
    if tp == 1:
        return t
    return t.chunk(tp, dim=0)[rank]


def row(t: "torch.Tensor", tp: int, rank: int) -> "torch.Tensor":
    if tp == 1 or t.dim() == 1:
        return t
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
