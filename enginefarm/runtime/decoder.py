"""A decoder-only transformer in plain PyTorch that runs a TensorRT-LLM
checkpoint (tp 1): the graph the `aoti` backend exports.

One step function serves prefill and decode:

    logits, k_cache, v_cache = step(input_ids[B, T], start_pos[1], k_cache, v_cache)

with a static KV cache of shape [layers, B, kv_heads, max_seq_len, head_size]
written at positions start_pos .. start_pos + T - 1. The caches are returned,
so the exported graph stays functional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


@dataclass
class DecoderConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    hidden_act: str
    norm: str  # layernorm | rmsnorm
    norm_eps: float
    positions: str  # learned_absolute | rope_gpt_neox
    rotary_base: float
    max_position_embeddings: int
    gated_mlp: bool
    pre_norm: bool

    @classmethod
    def from_trtllm(cls, c: dict) -> "DecoderConfig":
        arch = c["architecture"]
        if arch not in ("OPTForCausalLM", "LlamaForCausalLM"):
            raise ValueError(f"the aoti decoder does not know architecture {arch}")
        llama = arch == "LlamaForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_size=c.get("head_size") or c["hidden_size"] // c["num_attention_heads"],
            hidden_act=c["hidden_act"],
            norm="rmsnorm" if llama else "layernorm",
            norm_eps=c.get("norm_epsilon", 1e-5),
            positions=c["position_embedding_type"],
            rotary_base=c.get("rotary_base", 10000.0),
            max_position_embeddings=c["max_position_embeddings"],
            gated_mlp=llama,
            pre_norm=c.get("do_layer_norm_before", True),
        )


class Norm(nn.Module):
    def __init__(self, cfg: DecoderConfig, w: torch.Tensor, b: torch.Tensor | None):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _lin(W: dict, name: str) -> nn.Linear:
    w = W[name + ".weight"]
    b = W.get(name + ".bias")
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device="meta")
    m.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        m.bias = nn.Parameter(b, requires_grad=False)
    return m


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig, W: dict, i: int):
        super().__init__()
        p = f"transformer.layers.{i}."
        self.cfg = cfg
        self.ln1 = Norm(cfg, W[p + "input_layernorm.weight"], W.get(p + "input_layernorm.bias"))
        self.ln2 = Norm(cfg, W[p + "post_layernorm.weight"], W.get(p + "post_layernorm.bias"))
        self.qkv = _lin(W, p + "attention.qkv")
        self.dense = _lin(W, p + "attention.dense")
        self.fc = _lin(W, p + "mlp.fc")
        self.gate = _lin(W, p + "mlp.gate") if cfg.gated_mlp else None
        self.proj = _lin(W, p + "mlp.proj")
        self.act = ACTS[cfg.hidden_act]

    def attention(self, x, pos, cos, sin, mask, kc, vc):
        cfg = self.cfg
        B, T, _ = x.shape
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, KV, D).transpose(1, 2)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if cos is not None:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        kc = kc.index_copy(2, pos, k)
        vc = vc.index_copy(2, pos, v)
        keys, vals = kc, vc
        if KV != H:
            keys = keys.repeat_interleave(H // KV, dim=1)
            vals = vals.repeat_interleave(H // KV, dim=1)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=1.0 / math.sqrt(D))
        out = out.transpose(1, 2).reshape(B, T, H * D)
        return self.dense(out), kc, vc

    def mlp(self, x):
        h = self.act(self.fc(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.proj(h)

    def forward(self, x, pos, cos, sin, mask, kc, vc):
        if self.cfg.pre_norm:
            a, kc, vc = self.attention(self.ln1(x), pos, cos, sin, mask, kc, vc)
            x = x + a
            x = x + self.mlp(self.ln2(x))
        else:  # OPT-350m style post-norm
            a, kc, vc = self.attention(x, pos, cos, sin, mask, kc, vc)
            x = self.ln1(x + a)
            x = self.ln2(x + self.mlp(x))
        return x, kc, vc


class DecoderLM(nn.Module):
    def __init__(self, cfg: DecoderConfig, W: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(W["transformer.vocab_embedding.weight"], requires_grad=False)
        self.pos_embed = (
            nn.Parameter(W["transformer.position_embedding.weight"], requires_grad=False)
            if cfg.positions == "learned_absolute"
            else None
        )
        self.layers = nn.ModuleList(Layer(cfg, W, i) for i in range(cfg.num_layers))
        self.ln_f = (
            Norm(cfg, W["transformer.ln_f.weight"], W.get("transformer.ln_f.bias")) if "transformer.ln_f.weight" in W else None
        )
        self.lm_head = nn.Parameter(W["lm_head.weight"][: cfg.vocab_size], requires_grad=False)
        if cfg.positions == "rope_gpt_neox":
            d = cfg.head_size
            inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
            self.register_buffer("inv_freq", inv, persistent=True)

    @classmethod
    def from_checkpoint(cls, ckpt_dir) -> "DecoderLM":
        from ..checkpoint import load_rank

        c, W = load_rank(ckpt_dir, 0)
        if c["mapping"]["tp_size"] != 1:
            raise ValueError("the aoti decoder runs tp=1 checkpoints")
        return cls(DecoderConfig.from_trtllm(c), W).eval()

    def new_cache(self, batch: int, max_seq_len: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        shape = (c.num_layers, batch, c.num_kv_heads, max_seq_len, c.head_size)
        dt = dtype or self.embed.dtype
        return torch.zeros(shape, dtype=dt), torch.zeros(shape, dtype=dt)

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        B, T = input_ids.shape
        S = k_cache.shape[3]
        pos = start_pos + torch.arange(T, dtype=torch.long)  # [T]
        x = F.embedding(input_ids, self.embed)
        cos = sin = None
        if self.pos_embed is not None:
            x = x + F.embedding(pos, self.pos_embed)[None]
        else:
            f = pos.float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((f, f), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = torch.arange(S, dtype=torch.long)[None, :] <= pos[:, None]  # [T, S]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, kc, vc = layer(x, pos, cos, sin, mask, k_cache[i], v_cache[i])
            ks.append(kc)
            vs.append(vc)
        if self.ln_f is not None:
            x = self.ln_f(x)
        logits = x @ self.lm_head.t()
        return logits.float(), torch.stack(ks), torch.stack(vs)
