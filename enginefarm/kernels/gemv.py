"""Skinny matrix products for decode: y[M, N] = x[M, K] @ W^T with M (the
batch at decode time) at most BLOCK_M = 16, and W in fp16/bf16, int8 or
packed int4, dequantized in registers (the integer weights never touch
device memory as floats).

Engine layout (built once from the checkpoint's plain layout by
`pack_weight`; the checkpoint format does not change):

- float: [N, K], as `F.linear` takes it;
- int8:  [N, K] uint8 holding q + 128 (q the signed value);
- int4:  [N, K // 2] uint8, byte j of row n holding k = 2j in the low and
  k = 2j + 1 in the high nibble, each as q + 8.

The offset encodings let the kernel turn a byte into an fp16 value with a
bit trick instead of integer-to-float conversions, whose throughput on
Hopper is a fraction of the memory system's: for u in [0, 1024),
bits(0x6400 | u) is the fp16 value 1024 + u, so q = that - 1024 - offset.

Scales: per output channel ([N]: applied once to the fp32 sum) or per group
of G input channels ([N, K // G]: applied to each group's partial sum, so
the products inside the dot stay exact small integers times x).

The kernel splits K over SPLIT_K programs per column block and returns fp32
partial sums [SPLIT_K, M, N]; the caller's `.sum(0)`, scale and cast fuse
into the next Inductor kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # CPU-only installs have no triton: the engine then uses the torch fallback
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

BLOCK_M = 16


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    conv: int = 1  # integer -> fp16: 0 plain casts, 1 the bit trick in Triton ops, 2 the bit trick in PTX (pairs)
    swap: bool = False  # weights as the product's first operand (tensor-core M = output channels)


def pack_weight(q: torch.Tensor, scale: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checkpoint layout -> engine layout.

    q: float [N, K] (bits 16), int8 values [K, N] (bits 8 or 4: the unpacked
    signed integers, see quant.int_values); scale: [N] per channel or [K/G, N]
    per group. Returns (weight, scale [N] or [N, K/G])."""
    if bits == 16:
        return q.contiguous(), None
    qt = q.t().contiguous()  # [N, K] int8
    if bits == 8:
        w = (qt.to(torch.int16) + 128).to(torch.uint8)
    elif bits == 4:
        u = (qt.to(torch.int16) + 8).to(torch.uint8)  # [N, K] in [0, 15]
        w = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    else:
        raise ValueError(f"bits must be 16, 8 or 4 (got {bits})")
    s = scale.t().contiguous() if scale.dim() == 2 else scale.contiguous()
    return w, s


def unpack_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Engine layout -> signed integer values [N, K] (int16), for tests and the fallback."""
    if bits == 8:
        return w.to(torch.int16) - 128
    lo = (w & 0xF).to(torch.int16) - 8
    hi = (w >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=-1).reshape(w.shape[0], w.shape[1] * 2)


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bits: int) -> torch.Tensor:
    """What the kernel computes, in fp32 torch ops: [M, K] -> [M, N]."""
    xf = x.float()
    if bits == 16:
        return xf @ w.float().t()
    q = unpack_weight(w, bits).float()  # [N, K]
    if scale.dim() == 1:
        return (xf @ q.t()) * scale.float()
    groups = scale.shape[1]
    g = q.shape[1] // groups
    wq = (q.view(q.shape[0], groups, g) * scale.float()[:, :, None]).view(q.shape)
    return xf @ wq.t()


def default_config(bits: int, n: int, k: int, group: int = 0, sms: int = 132) -> GemvConfig:
    """A launch configuration from the shape, after the sweep of
    bench/gpu_kernels.py on an H100 (LLaMA-7B's shapes, batch 1): fp16 and
    int4 best with the weights as the product's first operand, int8 with them
    second and narrow column blocks; split-K where the column blocks alone
    leave multiprocessors idle. K blocks never cross a scale group."""
    if bits == 16:
        cfg = GemvConfig(64, 256, 1 if n >= 16384 else 2, conv=1, swap=True)
    elif bits == 8:
        cfg = GemvConfig(32, 256, 1 if n >= 8192 else 2, conv=2, swap=False)
    else:
        cfg = GemvConfig(64, 512, 4 if n <= 4096 else 2 if n <= 12288 else 1, conv=2, swap=True)
    if group and cfg.block_k > group:
        cfg = GemvConfig(cfg.block_n, group, cfg.split_k, cfg.num_warps, cfg.num_stages, cfg.conv, cfg.swap)
    while cfg.split_k > 1 and k < cfg.split_k * cfg.block_k * 2:
        cfg = GemvConfig(cfg.block_n, cfg.block_k, cfg.split_k // 2, cfg.num_warps, cfg.num_stages, cfg.conv, cfg.swap)
    return cfg


if HAVE_TRITON:

    @triton.jit
    def _dq8(w, CONV: tl.constexpr):
        """uint8 holding q + 128 -> fp16 q."""
        if CONV == 2:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 k, c;
                mov.b32 k, 0x64646464;
                mov.b32 c, 0x64806480;
                prmt.b32 $0, $2, k, 0x4140;
                prmt.b32 $1, $2, k, 0x4342;
                sub.f16x2 $0, $0, c;
                sub.f16x2 $1, $1, c;
                }""",
                constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4)
        elif CONV == 1:
            u = w.to(tl.uint8, bitcast=True)
            return (u.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
        else:
            return (w.to(tl.uint8, bitcast=True).to(tl.int16) - 128).to(tl.float16)

    @triton.jit
    def _dq4(b, CONV: tl.constexpr):
        """uint8 holding (q_even + 8) | (q_odd + 8) << 4 -> (fp16 q_even, fp16 q_odd)."""
        if CONV == 2:
            return tl.inline_asm_elementwise(
                asm="""{
                .reg .b32 t0, t1, z, ml, mh, e, c1, c2, h;
                mov.b32 z, 0;
                mov.b32 ml, 0x000F000F;
                mov.b32 mh, 0x00F000F0;
                mov.b32 e, 0x64006400;
                mov.b32 c1, 0x64086408;
                mov.b32 c2, 0x2C002C00;
                mov.b32 h, 0xD480D480;
                prmt.b32 t0, $4, z, 0x4140;
                prmt.b32 t1, $4, z, 0x4342;
                lop3.b32 $0, t0, ml, e, 0xEA;
                lop3.b32 $1, t1, ml, e, 0xEA;
                lop3.b32 $2, t0, mh, e, 0xEA;
                lop3.b32 $3, t1, mh, e, 0xEA;
                sub.f16x2 $0, $0, c1;
                sub.f16x2 $1, $1, c1;
                fma.rn.f16x2 $2, $2, c2, h;
                fma.rn.f16x2 $3, $3, c2, h;
                }""",
                constraints="=r,=r,=r,=r,r", args=[b], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            u = b.to(tl.uint8, bitcast=True)
            if CONV == 1:
                lo = ((u & 0xF).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
                hi = ((u >> 4).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
            else:
                lo = ((u & 0xF).to(tl.int16) - 8).to(tl.float16)
                hi = ((u >> 4).to(tl.int16) - 8).to(tl.float16)
            return lo, hi

    @triton.jit
    def _gemv_kernel(
        X, W, S, P,  # x [M, K]; weight (engine layout); scales; partial sums [SPLIT_K, M, N] fp32
        M, N, K, stride_xm, K_PER,
        BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CONV: tl.constexpr,
        SWAP: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        k_lo = pid_k * K_PER  # K_PER: a multiple of BLOCK_K
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_lo + K_PER, BLOCK_K):
            if BITS == 4:
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(W + rn[:, None] * (K // 2) + rb[None, :], mask=n_ok[:, None] & (rb < K // 2)[None, :],
                            other=0)
                lo, hi = _dq4(b, CONV)
                rk = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                if SWAP:
                    xm = m_ok[None, :] & (rk < K)[:, None]
                    xe = tl.load(X + rm[None, :] * stride_xm + rk[:, None], mask=xm, other=0.0)
                    xo = tl.load(X + rm[None, :] * stride_xm + (rk + 1)[:, None], mask=xm, other=0.0)
                    part = tl.dot(lo, xe.to(tl.float16)) + tl.dot(hi, xo.to(tl.float16))
                else:
                    xm = m_ok[:, None] & (rk < K)[None, :]
                    xe = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=xm, other=0.0)
                    xo = tl.load(X + rm[:, None] * stride_xm + (rk + 1)[None, :], mask=xm, other=0.0)
                    part = tl.dot(xe.to(tl.float16), tl.trans(lo)) + tl.dot(xo.to(tl.float16), tl.trans(hi))
            else:
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                w = tl.load(W + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
                if BITS == 8:
                    w = _dq8(w, CONV)
                if SWAP:
                    xt = tl.load(X + rm[None, :] * stride_xm + rk[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
                    part = tl.dot(w, xt.to(w.dtype))
                else:
                    x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                    part = tl.dot(x.to(w.dtype), tl.trans(w))
            if GROUP > 0:
                s = tl.load(S + rn * (K // GROUP) + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                if SWAP:
                    acc += part * s[:, None]
                else:
                    acc += part * s[None, :]
            else:
                acc += part
        if GROUP == 0:
            s = tl.load(S + rn, mask=n_ok, other=0.0).to(tl.float32)
            if SWAP:
                acc = acc * s[:, None]
            else:
                acc = acc * s[None, :]
        if SWAP:
            out = P + pid_k * M * N + rm[None, :] * N + rn[:, None]
            tl.store(out, acc, mask=n_ok[:, None] & m_ok[None, :])
        else:
            out = P + pid_k * M * N + rm[:, None] * N + rn[None, :]
            tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bits: int, cfg: GemvConfig,
           wrap=None) -> torch.Tensor:
    """Partial sums [split_k, M, N] fp32 of x[M, K] against the engine-layout weight.
    `wrap` is torch.library.wrap_triton when called inside a traced op."""
    M, K = x.shape
    N = w.shape[0]
    group = 0
    if bits == 16:
        scale = w  # unused (GROUP = -1)
        group = -1
    elif scale.dim() == 2:
        group = K // scale.shape[1]
    parts = torch.empty((cfg.split_k, M, N), dtype=torch.float32, device=x.device)
    kern = wrap(_gemv_kernel) if wrap is not None else _gemv_kernel
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    kern[grid](
        x, w, scale, parts, M, N, K, x.stride(0), triton.cdiv(K, cfg.split_k * cfg.block_k) * cfg.block_k,
        BITS=bits, GROUP=group, SPLIT_K=cfg.split_k, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        CONV=cfg.conv, SWAP=cfg.swap, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return parts


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bits: int, cfg: GemvConfig | None = None,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eager helper (benchmarks, tests): [M, K] -> [M, N] in x's dtype."""
    K = x.shape[1]
    N = w.shape[0]
    g = (K // scale.shape[1]) if (bits != 16 and scale.dim() == 2) else 0
    cfg = cfg or default_config(bits, N, K, g)
    return launch(x, w, scale, bits, cfg).sum(0).to(out_dtype or x.dtype)
