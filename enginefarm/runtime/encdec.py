"""Encoder-decoder transformers (T5 / Flan-T5, BART / mBART) in plain PyTorch
that run a TensorRT-LLM enc-dec checkpoint (`encoder/` + `decoder/`): the
graphs the `aoti` backend exports, and, with a torch.distributed process
group, one rank of a tensor-parallel run (all-reduce after the row-parallel
layers, all-gather of the vocab-parallel logits, as in runtime/decoder.py,
whose Norm and Lin (float or weight-only quantized) layers are reused).

Two graphs:

    enc_out, cross_k, cross_v = encode(input_ids[B, T], lengths[B][, prompt_table[rows, hidden]])
    logits, k_cache, v_cache = step(input_ids[B, t], start_pos[1], k_cache, v_cache,
                                    cross_k, cross_v, lengths[B])

`encode` runs the encoder over right-padded prompts (`lengths` says how many
tokens of each are real) and then, once per request, the decoder's
cross-attention key/value projections of the encoder output:
cross_k / cross_v [decoder layers, B, heads, T, head_size]. `step` is the
decoder for prefill and decode alike, with a static self-attention cache
[decoder layers, B, heads, max_seq_len, head_size] written at positions
start_pos .. start_pos + t - 1, and the cross-attention keys/values as given.

Multimodal LLMs: built with a prompt table (BLIP-2 with Flan-T5), the encoder
reads ids >= vocab_size as rows of the table (the visual features, used as
they are, as Hugging Face's inputs_embeds). A checkpoint with a `decoder/`
part only (Nougat, BLIP; their visual features ARE the encoder output) has
`encode(encoder_output[B, F, encoder_hidden_size], lengths[B])` instead: the
cross K/V of the features given.

What the config.json fields mean here (TensorRT-LLM's names): layernorm_type
0 LayerNorm / 1 RMS norm (T5: no mean, no bias); layernorm_position 0 pre-norm
/ 1 post-norm (BART); has_embedding_scale: embeddings x sqrt(hidden);
has_embedding_layernorm: `transformer.ln_embed`; relative_attention: T5's
bucketed relative position bias from each layer's `rel_attn_table`
(bidirectional in the encoder, causal in the decoder); q_scaling: attention
scores scaled by 1 / (sqrt(head_size) * q_scaling) (T5: 1); mlp_type 1:
gated MLP (act(fc(x)) * gate(x)); rescale_before_lm_head: decoder output x
hidden**-0.5 (T5 with tied embeddings). In float16, T5's residual stream is
clamped to +-64000 after every residual add, as TensorRT-LLM does.

Fields beyond TensorRT-LLM's (written by the blip family for BLIP's BERT-style
text decoder, whose cross-attention keys/values take the vision width):
encoder_hidden_size: the width of the encoder output the cross-attention
keys/values are projected from (default hidden_size); cross_attention_layout
"fused_qkv" (TensorRT-LLM's: `cross_attention.qkv` [3 x heads x head_size,
hidden], which needs encoder_hidden_size == hidden_size) or "q_kv"
(`cross_attention.q` [heads x head_size, hidden] and `cross_attention.kv`
[2 x heads x head_size, encoder_hidden_size], keys then values, each split by
heads per rank); has_lm_head_transform: the decoder output goes through
`lm_head_transform.dense`, the activation lm_head_transform_act and
`lm_head_transform.layernorm` before lm_head (BERT's prediction head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from ..quant import as_int8, bits_of, is_stored_quantized
from .decoder import ACTS, Lin, Norm, all_gather_last
from .decoding import GREEDY, Decoding, OnToken, decode
from .engine import EngineBase
from .sidecar import Sidecar

ARCHITECTURES = ("EncoderModel", "DecoderModel")
FP16_CLAMP = 64000.0  # TensorRT-LLM's enc-dec layers clamp fp16 T5 to this after each residual add
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class EncDecConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_size: int
    hidden_act: str
    norm: str  # layernorm | rmsnorm (the attribute names decoder.Norm reads)
    norm_eps: float
    pre_norm: bool
    position_embedding: bool
    embedding_layernorm: bool
    embedding_scale: float
    attn_scale: float
    relative_attention: bool
    num_buckets: int
    max_distance: int
    gated_mlp: bool
    final_norm: bool
    rescale_before_lm_head: bool = False
    decoder_start_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    encoder_hidden_size: int = 0  # the cross-attention K/V input width (0: hidden_size)
    cross_kv_split: bool = False  # cross_attention.q + cross_attention.kv, not one fused qkv
    lm_head_transform: bool = False  # dense + act + layernorm before lm_head
    lm_head_transform_act: str = "gelu"
    fp16_clamp: bool = False
    tp: int = 1
    quant_bits: int = 0

    @classmethod
    def from_trtllm(cls, c: dict) -> "EncDecConfig":
        arch = c.get("architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"runtime/encdec runs {' and '.join(ARCHITECTURES)} checkpoints, not {arch}")
        h, heads = c["hidden_size"], c["num_attention_heads"]
        d = c.get("head_size") or h // heads
        norm = {0: "layernorm", 1: "rmsnorm"}.get(c.get("layernorm_type", 0))
        if norm is None:
            raise ValueError(f"layernorm_type {c.get('layernorm_type')} is not supported")
        if c["hidden_act"] not in ACTS:
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported (known: {', '.join(ACTS)})")
        layout = c.get("cross_attention_layout", "fused_qkv")
        if layout not in ("fused_qkv", "q_kv"):
            raise ValueError(f"cross_attention_layout {layout!r} is not supported (known: fused_qkv, q_kv)")
        enc_h = c.get("encoder_hidden_size") or h
        if arch == "DecoderModel" and layout == "fused_qkv" and enc_h != h:
            raise ValueError(f"a fused cross-attention qkv cannot take an encoder output of width {enc_h} (hidden "
                             f"size {h}); such a checkpoint says cross_attention_layout: q_kv")
        head_act = c.get("lm_head_transform_act", c["hidden_act"])
        if c.get("has_lm_head_transform") and head_act not in ACTS:
            raise ValueError(f"lm_head_transform_act {head_act!r} is not supported (known: {', '.join(ACTS)})")
        return cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=h,
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            head_size=d,
            hidden_act=c["hidden_act"],
            norm=norm,
            norm_eps=c.get("norm_epsilon", 1e-5),
            pre_norm=c.get("layernorm_position", 0) == 0,
            position_embedding=bool(c.get("has_position_embedding", False)),
            embedding_layernorm=bool(c.get("has_embedding_layernorm", False)),
            embedding_scale=math.sqrt(h) if c.get("has_embedding_scale") else 1.0,
            attn_scale=1.0 / (math.sqrt(d) * c.get("q_scaling", 1.0)),
            relative_attention=bool(c.get("relative_attention", False)),
            num_buckets=c.get("num_buckets") or 0,
            max_distance=c.get("max_distance") or 0,
            gated_mlp=c.get("mlp_type", 0) == 1,
            final_norm=bool(c.get("has_model_final_layernorm", False)),
            rescale_before_lm_head=bool(c.get("rescale_before_lm_head", False)),
            decoder_start_token_id=c.get("decoder_start_token_id"),
            eos_token_id=c.get("eos_token_id"),
            encoder_hidden_size=enc_h,
            cross_kv_split=layout == "q_kv",
            lm_head_transform=bool(c.get("has_lm_head_transform", False)),
            lm_head_transform_act=head_act,
            # as TensorRT-LLM: fp16 T5 clamps the residual stream, which overflows fp16 otherwise
            fp16_clamp=c.get("dtype") == "float16" and c.get("model_type") == "t5",
            tp=(c.get("mapping") or {}).get("tp_size", 1),
            quant_bits=bits_of(c),
        )

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp


def relative_buckets(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position):
    half the buckets (per direction, when bidirectional) hold exact distances,
    the rest grow logarithmically up to max_distance, beyond which all share
    the last bucket."""
    n = num_buckets
    base = torch.zeros_like(rel)
    if bidirectional:
        n //= 2
        base = base + (rel > 0).long() * n
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = n // 2
    far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (n - exact)).long()
    return base + torch.where(dist < exact, dist, far.clamp(max=n - 1))


def _out_slice(W: dict, name: str, new: str, a: int, b: int, bits: int) -> dict:
    """Output features a..b of a stored linear layer, as the tensors of a new
    one named `new` (float weight [out, in]; quantized [in, out], packed two
    per byte for 4 bits; scales per output feature)."""
    w = W[name + ".weight"]
    out = {}
    if is_stored_quantized(W, name, bits):
        w = as_int8(w)  # a group-wise weight is stored viewed in the model dtype
        if bits == 4 and (a % 2 or b % 2):
            raise ValueError(f"{name}: cannot split packed 4-bit columns at {a}..{b}")
        out[new + ".weight"] = w[:, a // 2 : b // 2] if bits == 4 else w[:, a:b]
        for s in ("per_channel_scale", "weights_scaling_factor"):
            if name + "." + s in W:
                out[new + "." + s] = W[name + "." + s][..., a:b]
    else:
        out[new + ".weight"] = w[a:b]
    if name + ".bias" in W:
        out[new + ".bias"] = W[name + ".bias"][a:b]
    return {k: v.contiguous() for k, v in out.items()}


def _norm(cfg: EncDecConfig, W: dict, name: str) -> Norm:
    return Norm(cfg, W[name + ".weight"], W.get(name + ".bias"))


class Attention(nn.Module):
    """Self-attention (fused qkv) or cross-attention (q from the decoder,
    k/v given: projected once from the encoder output by CrossKV; q is the
    first third of a fused qkv, or its own `q` where the layout splits it)."""

    def __init__(self, cfg: EncDecConfig, W: dict, prefix: str, cross: bool = False):
        super().__init__()
        self.cfg = cfg
        bits, tp = cfg.quant_bits, cfg.tp
        hd = cfg.heads_per_rank * cfg.head_size
        if cross and cfg.cross_kv_split:
            self.q = Lin(W, prefix + ".q", bits)
            self.qkv = None
        elif cross:
            self.q = Lin(_out_slice(W, prefix + ".qkv", "q", 0, hd, bits), "q", bits)
            self.qkv = None
        else:
            self.qkv = Lin(W, prefix + ".qkv", bits)
        self.dense = Lin(W, prefix + ".dense", bits, row_parallel=True, tp=tp)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.cfg.heads_per_rank, self.cfg.head_size).transpose(1, 2)

    def forward(self, x, mask, kc=None, vc=None, pos=None):
        """mask: additive, broadcastable to [B, heads, T, keys]. Self-attention
        with a cache writes k, v at `pos` and attends over the whole cache;
        cross-attention (kc, vc given, pos None) attends over them as they are."""
        cfg = self.cfg
        hd = cfg.heads_per_rank * cfg.head_size
        if self.qkv is None:
            q = self.heads(self.q(x))
            keys, vals = kc, vc
        else:
            q, k, v = (self.heads(t) for t in self.qkv(x).split([hd, hd, hd], dim=-1))
            if kc is None:
                keys, vals = k, v
            else:
                kc = kc.index_copy(2, pos, k)
                vc = vc.index_copy(2, pos, v)
                keys, vals = kc, vc
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=cfg.attn_scale)
        B, _, T, _ = out.shape
        return self.dense(out.transpose(1, 2).reshape(B, T, hd)), kc, vc


class Block(nn.Module):
    def __init__(self, cfg: EncDecConfig, W: dict, i: int):
        super().__init__()
        p = f"transformer.layers.{i}."
        self.cfg = cfg
        self.decoder = cfg.architecture == "DecoderModel"
        attn = p + ("self_attention" if self.decoder else "attention")
        self.ln_attn = _norm(cfg, W, attn + "_layernorm")
        self.attn = Attention(cfg, W, attn)
        self.table = nn.Parameter(W[attn + ".rel_attn_table"], requires_grad=False) if cfg.relative_attention else None
        if self.decoder:
            self.ln_cross = _norm(cfg, W, p + "cross_attention_layernorm")
            self.cross = Attention(cfg, W, p + "cross_attention", cross=True)
        self.ln_mlp = _norm(cfg, W, p + "mlp_layernorm")
        bits, tp = cfg.quant_bits, cfg.tp
        self.fc = Lin(W, p + "mlp.fc", bits)
        self.gate = Lin(W, p + "mlp.gate", bits) if cfg.gated_mlp else None
        self.proj = Lin(W, p + "mlp.proj", bits, row_parallel=True, tp=tp)
        self.act = ACTS[cfg.hidden_act]

    def mlp(self, x):
        h = self.act(self.fc(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.proj(h)

    def residual(self, x, norm, fn):
        """x + fn(norm(x)) (pre-norm) or norm(x + fn(x)) (post-norm)."""
        if self.cfg.pre_norm:
            return self.clamp(x + fn(norm(x)))
        return norm(self.clamp(x + fn(x)))

    def clamp(self, x):
        return x.clamp(-FP16_CLAMP, FP16_CLAMP) if self.cfg.fp16_clamp else x

    def position_bias(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.table[:, buckets]  # [heads, T, keys]

    def forward(self, x, mask, buckets=None, kc=None, vc=None, pos=None, cross_k=None, cross_v=None, cross_mask=None):
        if self.table is not None:
            mask = mask + self.position_bias(buckets)
        kv = {}

        def self_attn(h):
            out, kv["k"], kv["v"] = self.attn(h, mask, kc, vc, pos)
            return out

        x = self.residual(x, self.ln_attn, self_attn)
        if self.decoder:
            x = self.residual(x, self.ln_cross, lambda h: self.cross(h, cross_mask, cross_k, cross_v)[0])
        x = self.residual(x, self.ln_mlp, self.mlp)
        return x, kv["k"], kv["v"]


class _Stack(nn.Module):
    """Embeddings, layers and final norm of one side."""

    def __init__(self, cfg: EncDecConfig, W: dict):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(W["transformer.vocab_embedding.weight"], requires_grad=False)
        self.pos_embed = (nn.Parameter(W["transformer.position_embedding.weight"], requires_grad=False)
                          if cfg.position_embedding else None)
        self.ln_embed = _norm(cfg, W, "transformer.ln_embed") if cfg.embedding_layernorm else None
        self.layers = nn.ModuleList(Block(cfg, W, i) for i in range(cfg.num_layers))
        self.ln_f = _norm(cfg, W, "transformer.ln_f") if cfg.final_norm else None

    def embed_tokens(self, ids: torch.Tensor, pos: torch.Tensor, prompt_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        if prompt_table is None:
            x = F.embedding(ids, self.embed)
        else:
            is_row = ids >= self.cfg.vocab_size
            x = F.embedding(torch.where(is_row, 0, ids), self.embed)
        if self.cfg.embedding_scale != 1.0:
            x = x * self.cfg.embedding_scale
        if prompt_table is not None:  # table rows are embeddings already (not scaled)
            rows = (ids - self.cfg.vocab_size).clamp(0, prompt_table.shape[0] - 1)
            x = torch.where(is_row[..., None], F.embedding(rows, prompt_table.to(x.dtype)), x)
        if self.pos_embed is not None:
            x = x + F.embedding(pos, self.pos_embed)[None]
        if self.ln_embed is not None:
            x = self.ln_embed(x)
        return x


def _key_mask(lengths: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, n] additive mask: 0 for the first lengths[b] keys, -inf after."""
    valid = torch.arange(n, dtype=torch.long, device=lengths.device)[None, :] < lengths[:, None]
    zero = torch.zeros((), dtype=dtype, device=lengths.device)
    return torch.where(valid, zero, torch.full((), float("-inf"), dtype=dtype, device=lengths.device))[:, None, None, :]


class Encoder(_Stack):
    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                prompt_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = input_ids.shape
        pos = torch.arange(T, dtype=torch.long, device=input_ids.device)
        x = self.embed_tokens(input_ids, pos, prompt_table)
        mask = _key_mask(lengths, T, x.dtype)
        buckets = None
        if self.cfg.relative_attention:
            buckets = relative_buckets(pos[None, :] - pos[:, None], True, self.cfg.num_buckets, self.cfg.max_distance)
        for layer in self.layers:
            x, _, _ = layer(x, mask, buckets)
        return self.ln_f(x) if self.ln_f is not None else x


class CrossKV(nn.Module):
    """The decoder's cross-attention keys and values of an encoder output,
    for every decoder layer: computed once per request, then cached. The
    projection is the last two thirds of a fused qkv, or (cross_kv_split) its
    own `kv` linear, which may take another width than the decoder's."""

    def __init__(self, cfg: EncDecConfig, W: dict):
        super().__init__()
        self.cfg = cfg
        hd = cfg.heads_per_rank * cfg.head_size
        bits = cfg.quant_bits

        def kv(i: int) -> Lin:
            name = f"transformer.layers.{i}.cross_attention"
            if cfg.cross_kv_split:
                return Lin(W, name + ".kv", bits)
            return Lin(_out_slice(W, name + ".qkv", "kv", hd, 3 * hd, bits), "kv", bits)

        self.kv = nn.ModuleList(kv(i) for i in range(cfg.num_layers))

    def forward(self, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = enc.shape
        H, D = self.cfg.heads_per_rank, self.cfg.head_size
        ks, vs = [], []
        for lin in self.kv:
            k, v = lin(enc).view(B, T, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 x [B, H, T, D]
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)


class Decoder(_Stack):
    def __init__(self, cfg: EncDecConfig, W: dict):
        super().__init__(cfg, W)
        head = W["lm_head.weight"]
        bias = W.get("lm_head.bias")
        # vocab-parallel for tp > 1 (rows padded to a multiple of tp); all-gathered in forward
        keep = slice(None) if cfg.tp > 1 else slice(0, cfg.vocab_size)
        self.lm_head = nn.Parameter(head[keep], requires_grad=False)
        self.lm_bias = nn.Parameter(bias[keep], requires_grad=False) if bias is not None else None
        if cfg.lm_head_transform:  # BERT's prediction head: whole on every rank
            self.head_dense = Lin(W, "lm_head_transform.dense")
            self.head_act = ACTS[cfg.lm_head_transform_act]
            self.head_norm = _norm(cfg, W, "lm_head_transform.layernorm")

    def new_cache(self, batch: int, max_seq_len: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        shape = (c.num_layers, batch, c.heads_per_rank, max_seq_len, c.head_size)
        dt = dtype or self.embed.dtype
        return torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)

    def forward(self, input_ids, start_pos, k_cache, v_cache, cross_k, cross_v, enc_lengths):
        B, T = input_ids.shape
        S = k_cache.shape[3]
        dev = input_ids.device
        pos = start_pos + torch.arange(T, dtype=torch.long, device=dev)  # [T]
        x = self.embed_tokens(input_ids, pos)
        keys = torch.arange(S, dtype=torch.long, device=dev)
        zero = torch.zeros((), dtype=x.dtype, device=dev)
        mask = torch.where(keys[None, :] <= pos[:, None], zero, torch.full((), float("-inf"), dtype=x.dtype, device=dev))
        buckets = None
        if self.cfg.relative_attention:
            buckets = relative_buckets(keys[None, :] - pos[:, None], False, self.cfg.num_buckets, self.cfg.max_distance)
        cross_mask = _key_mask(enc_lengths, cross_k.shape[3], x.dtype)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, kc, vc = layer(x, mask, buckets, k_cache[i], v_cache[i], pos, cross_k[i], cross_v[i], cross_mask)
            ks.append(kc)
            vs.append(vc)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.cfg.rescale_before_lm_head:
            x = x * (self.cfg.hidden_size ** -0.5)
        if self.cfg.lm_head_transform:
            x = self.head_norm(self.head_act(self.head_dense(x)))
        logits = x @ self.lm_head.t()
        if self.lm_bias is not None:
            logits = logits + self.lm_bias
        if self.cfg.tp > 1:
            logits = all_gather_last(logits, self.cfg.tp)[..., : self.cfg.vocab_size]
        return logits.float(), torch.stack(ks), torch.stack(vs)


class EncoderWithCrossKV(nn.Module):
    """What the encoder package runs: the encoder, then the decoder's
    cross-attention keys/values of its output."""

    def __init__(self, encoder: Encoder, cross_kv: CrossKV):
        super().__init__()
        self.encoder = encoder
        self.cross_kv = cross_kv

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, prompt_table: Optional[torch.Tensor] = None):
        enc = self.encoder(input_ids, lengths, prompt_table)
        k, v = self.cross_kv(enc)
        return enc, k, v


class FeaturesCrossKV(nn.Module):
    """What the encoder package runs when the encoder output comes from
    elsewhere (Nougat's and BLIP's visual engines): the decoder's
    cross-attention keys/values of the given features."""

    def __init__(self, cross_kv: CrossKV):
        super().__init__()
        self.cross_kv = cross_kv

    def forward(self, encoder_output: torch.Tensor, lengths: torch.Tensor):
        k, v = self.cross_kv(encoder_output)
        return encoder_output, k, v


def is_encdec_checkpoint(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / "decoder" / "config.json").is_file()


def load_encdec(ckpt_dir: str | Path, rank: int = 0, allow_tp: bool = False):
    """One rank of an enc-dec checkpoint: (encoder + cross K/V, decoder step);
    a decoder-only one (no `encoder/`): (cross K/V of given features, decoder step).
    tp > 1 needs an initialised process group of tp ranks (allow_tp=True)."""
    from ..checkpoint import load_rank

    cd, Wd = load_rank(Path(ckpt_dir) / "decoder", rank)
    if cd["mapping"]["tp_size"] != 1 and not allow_tp:
        raise ValueError("the aoti backend exports tp=1 checkpoints")
    dec_cfg = EncDecConfig.from_trtllm(cd)
    if not (Path(ckpt_dir) / "encoder" / "config.json").is_file():
        return FeaturesCrossKV(CrossKV(dec_cfg, Wd)).eval(), Decoder(dec_cfg, Wd).eval()
    ce, We = load_rank(Path(ckpt_dir) / "encoder", rank)
    encoder = EncoderWithCrossKV(Encoder(EncDecConfig.from_trtllm(ce), We), CrossKV(dec_cfg, Wd)).eval()
    return encoder, Decoder(dec_cfg, Wd).eval()


class EncDecEngine(EngineBase):
    """Greedy generation and scoring with an encoder and a decoder step:
    the aoti packages, or (tp check) the eager modules of one rank.

    The encoder package takes token ids (with a prompt table where the
    engine was built with one: meta `prompt_table`), or, where meta
    `encoder_input` is "features" (Nougat), the encoder output itself."""

    seq2seq = True

    def __init__(self, encode: Callable, step: Callable, meta: Sidecar):
        meta.need("dtype", "cache_shape", "max_batch_size", "max_input_len", "max_seq_len", "vocab_size",
                  "decoder_start_token_id")
        self.encode_fn, self.step_fn = encode, step
        self.meta = meta
        self.device = meta.device
        self.dtype = {v: k for k, v in DTYPE_NAMES.items()}[meta.dtype]
        L, _, H, S, D = meta.cache_shape
        self.cache_dims = (L, H, S, D)
        self.table = meta.prompt_table
        self.features_in = meta.encoder_input == "features"

    @classmethod
    def load(cls, engine_dir: str | Path, meta: Sidecar) -> "EncDecEngine":
        engine_dir = Path(engine_dir)
        from .engine import load_runner

        files = meta.files
        if meta.tp > 1 and meta.device == "cpu":  # a tp rank's packages, their all-reduces inside (engine.GilFreeRunner)
            enc, dec = load_runner(engine_dir / files["encoder"], True), load_runner(engine_dir / files["decoder"], True)
        else:
            enc = torch._inductor.aoti_load_package(str(engine_dir / files["encoder"]))
            dec = torch._inductor.aoti_load_package(str(engine_dir / files["decoder"]))
        return cls(enc, dec, meta)

    @classmethod
    def from_modules(cls, encoder: EncoderWithCrossKV, decoder: Decoder, meta: dict) -> "EncDecEngine":
        """The eager modules of one rank (tp check); meta: the limits (and device) to run them under."""
        c = decoder.cfg
        meta = {"format": "aoti-pt2", "kind": "encoder-decoder", "dtype": DTYPE_NAMES[decoder.embed.dtype],
                "cache_shape": [c.num_layers, "batch", c.heads_per_rank, meta["max_seq_len"], c.head_size],
                "decoder_start_token_id": c.decoder_start_token_id, "eos_token_id": c.eos_token_id,
                "vocab_size": c.vocab_size, "encoder_hidden_size": c.encoder_hidden_size,
                "encoder_input": "features" if isinstance(encoder, FeaturesCrossKV) else "tokens", **meta}
        return cls(encoder, decoder, Sidecar.model_validate(meta))

    decoder_start_token_id = property(lambda self: self.meta.decoder_start_token_id)
    @property
    def max_decoder_tokens(self) -> int:
        """decoder tokens one step takes (a prefill of the decoder's prompt)"""
        return min(self.max_input_len, self.max_seq_len)

    def _check(self, batch: int, n_in: int, n_dec: int, what: str = "decoder tokens") -> None:
        self._check_batch_and_input(batch, n_in)
        if n_dec > self.max_seq_len:
            raise BadInput(f"{n_dec} {what} exceed the decoder's max_seq_len {self.max_seq_len}")

    def encode(self, prompts: list[list[int]], prompt_table: torch.Tensor | None = None):
        """Right-padded prompts through the encoder: (cross_k, cross_v, lengths)."""
        if self.features_in:
            raise BadInput("this decoder cross-attends to visual features: it takes images, not a text prompt")
        if any(not p for p in prompts):
            raise BadInput("an empty prompt (no tokens)")
        n = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (n - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        args = [ids, lengths]
        if self.table:  # the package always takes one; text alone gets a row of zeros
            if prompt_table is None:
                prompt_table = torch.zeros(1, self.table.hidden_size)
            args.append(prompt_table.to(self.device, self.dtype))
        _, ck, cv = self.encode_fn(*args)
        return ck, cv, lengths

    def encode_features(self, features: torch.Tensor):
        """Encoder output [B, F, encoder_hidden_size] given (Nougat's, BLIP's
        visual features): (cross_k, cross_v, lengths)."""
        if not self.features_in:
            raise BadInput("this engine's encoder reads token ids, not encoder features")
        B, n, width = features.shape
        if B > self.max_batch_size:
            raise BadInput(f"{B} images in one call, but the engine was built for max_batch_size {self.max_batch_size}")
        want = self.meta.encoder_features
        if n != want:
            raise BadInput(f"{n} encoder features per image, but the decoder was built for {want}")
        if width != self.meta.encoder_hidden_size:
            raise BadInput(f"encoder features of width {width}, but the decoder's cross-attention takes "
                           f"{self.meta.encoder_hidden_size}")
        lengths = torch.full((B,), n, dtype=torch.long, device=self.device)
        _, ck, cv = self.encode_fn(features.to(self.device, self.dtype), lengths)
        return ck, cv, lengths

    def step(self, ids: torch.Tensor, start: int, kc, vc, ck, cv, lengths):
        out = self.step_fn(ids.to(self.device), torch.tensor([start], dtype=torch.long, device=self.device), kc, vc,
                           ck, cv, lengths)
        return out[0], out[1], out[2]

    @torch.no_grad()
    def logits(self, enc_ids: list[int], dec_ids: list[int], prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """[len(dec_ids), vocab] decoder logits, teacher-forced on dec_ids, for encoder input enc_ids."""
        self._check(1, len(enc_ids), len(dec_ids))
        self._check_table([enc_ids], prompt_table)
        ck, cv, lengths = self.encode([enc_ids], prompt_table)
        return self._teacher_forced(dec_ids, ck, cv, lengths)

    @torch.no_grad()
    def logits_from_features(self, features: torch.Tensor, dec_ids: list[int]) -> torch.Tensor:
        """The same for a decoder whose encoder output is given ([1, F, hidden])."""
        self._check(1, 0, len(dec_ids))
        return self._teacher_forced(dec_ids, *self.encode_features(features))

    def _teacher_forced(self, dec_ids, ck, cv, lengths) -> torch.Tensor:
        if len(dec_ids) > self.max_decoder_tokens:
            raise BadInput(f"{len(dec_ids)} decoder tokens in one pass, but the engine was built for max_input_len "
                           f"{self.max_input_len}")
        kc, vc = self.new_cache(1)
        lg, _, _ = self.step(torch.tensor([dec_ids], dtype=torch.long), 0, kc, vc, ck, cv, lengths)
        return lg[0].float().cpu()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None,
                 prompt_table: torch.Tensor | None = None, decoding: Decoding = GREEDY,
                 on_token: OnToken | None = None) -> list[list[int]]:
        """The output of each prompt (greedy unless `decoding` says otherwise) (the decoder starts from
        decoder_start_token_id, which is not part of the output). All prompts
        run as one batch: the encoder input is right-padded and masked. Ids >=
        vocab_size pick rows of prompt_table (shared by the whole call)."""
        if not prompts:
            return []
        # the decoder is fed its start token and every new token but the last
        self._check(len(prompts), max(len(p) for p in prompts), max_new_tokens, "new tokens")
        self._check_table(prompts, prompt_table)
        ck, cv, lengths = self.encode(prompts, prompt_table)
        return self._decode(ck, cv, lengths, [[] for _ in prompts], max_new_tokens, eos_token_id, decoding, on_token)

    @torch.no_grad()
    def generate_from_features(self, features: torch.Tensor, prefixes: list[list[int]], max_new_tokens: int,
                               eos_token_id: int | None = None, decoding: Decoding = GREEDY,
                               on_token: OnToken | None = None) -> list[list[int]]:
        """The output (greedy unless `decoding` says otherwise) for each encoder output features[i] ([B, F, hidden]),
        the decoder started from its start token and then prefixes[i] (the
        prompt's tokens; output follows them)."""
        if len(prefixes) != features.shape[0]:
            raise BadInput(f"{features.shape[0]} images for {len(prefixes)} prompts")
        longest = max((len(p) for p in prefixes), default=0)
        if 1 + longest > self.max_decoder_tokens:
            raise BadInput(f"a prompt of {longest} tokens (+ the start token), but the engine was built for "
                           f"max_input_len {self.max_input_len}")
        self._check(len(prefixes), 0, longest + max_new_tokens, "prompt and new tokens")
        ck, cv, lengths = self.encode_features(features)
        return self._decode(ck, cv, lengths, prefixes, max_new_tokens, eos_token_id, decoding, on_token)

    def _decode(self, ck, cv, lengths, prefixes: list[list[int]], max_new_tokens: int, eos,
                decoding: Decoding = GREEDY, on_token: OnToken | None = None) -> list[list[int]]:
        """Decoding of each row from [start] + prefixes[i] (greedy unless
        `decoding` says otherwise); rows whose prefixes have the same length
        run as one batch."""
        decoding.check(self.max_beam_width)
        groups = self._by_length(prefixes)
        out: list[list[int]] = [[] for _ in prefixes]
        for n, idx in groups.items():
            sel = torch.tensor(idx, device=ck.device)
            gk, gv, gl = ck.index_select(1, sel), cv.index_select(1, sel), lengths.index_select(0, sel)
            kc, vc = self.new_cache(len(idx))
            first = torch.tensor([[self.decoder_start_token_id] + prefixes[i] for i in idx], dtype=torch.long)
            lg, kc, vc = self.step(first, 0, kc, vc, gk, gv, gl)
            state = {"kc": kc, "vc": vc, "ck": gk, "cv": gv, "len": gl, "pos": first.shape[1]}

            def step(tokens: torch.Tensor, rows: torch.Tensor, state=state) -> torch.Tensor:
                for k in ("kc", "vc", "ck", "cv"):
                    state[k] = self.reorder(state[k], rows)
                state["len"] = self.reorder(state["len"], rows, dim=0)
                lg, state["kc"], state["vc"] = self.step(tokens, state["pos"], state["kc"], state["vc"],
                                                         state["ck"], state["cv"], state["len"])
                state["pos"] += 1
                return lg[:, -1]

            tell = (lambda r, t, idx=idx: on_token(idx[r], t)) if on_token else None
            seen = [[self.decoder_start_token_id] + prefixes[i] for i in idx]
            got = decode(lg[:, -1], step, seen, max_new_tokens, eos, decoding, tell)
            for j, i in enumerate(idx):
                out[i] = got[j]
        return out
