"""A decoder-only transformer in plain PyTorch that runs a TensorRT-LLM
checkpoint: the graph the `aoti` backend exports (tp 1), and, with a
torch.distributed process group, one rank of a tensor-parallel run (the
all-reduces and the logits all-gather sit where TensorRT-LLM puts them), which
is how the shards of a tp > 1 checkpoint are proven right (runtime/tp.py).

Weight-only quantized checkpoints (W8A16, W4A16; see quant.py) run with
their integer weights and scales as stored.

One step function serves prefill and decode:

    logits, k_cache, v_cache = step(input_ids[B, T], start_pos[1], k_cache, v_cache)

with a static KV cache of shape [layers, B, kv_heads, max_seq_len, head_size]
written in place at positions start_pos .. start_pos + T - 1 (the caches
are returned too, for callers that thread them through). Writing in place
matters: a functional update would copy the whole cache on every step,
which at decode time costs more than the step's weights.

`prepare_engine` (gpu/fast.py) turns a model into its engine form:
weights repacked from the checkpoint's plain layout into the kernels'
layout, the MLP's two input projections fused into one product, and, for
the decode graph, the skinny products routed to the weight-only kernels of
`enginefarm.kernels.gemv`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


# the configuration, norms, linear layers (plain and weight-only) and tp
# collectives are the runtime decoder's; this module adds the engine form's
# layers (per-layer caches written in place) for the architectures it covers
from ..runtime.decoder import DecoderConfig, Lin, Norm, _rotate_half, all_gather_last  # noqa: E402


def check_supported(cfg: DecoderConfig) -> None:
    """The engine form covers OPT- and LLaMA-shaped decoders (learned or
    full rotary positions, no windows, no parallel residual); refuse the
    rest rather than run them wrong."""
    why = []
    if cfg.positions not in ("learned_absolute", "rope_gpt_neox"):
        why.append(f"positions {cfg.positions}")
    if cfg.rotary_dim not in (0, cfg.head_size):
        why.append(f"partial rotary ({cfg.rotary_dim} of {cfg.head_size} dims)")
    if cfg.parallel_residual or cfg.allreduce_once:
        why.append("a parallel residual")
    if any(cfg.windows):
        why.append("attention windows")
    if cfg.q_scaling != 1.0:
        why.append(f"q_scaling {cfg.q_scaling}")
    if why:
        raise ValueError("the GPU engine form covers OPT- and LLaMA-shaped decoders; this one has " + ", ".join(why))


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig, W: dict, i: int):
        super().__init__()
        p = f"transformer.layers.{i}."
        self.cfg = cfg
        self.ln1 = Norm(cfg, W[p + "input_layernorm.weight"], W.get(p + "input_layernorm.bias"))
        self.ln2 = Norm(cfg, W[p + "post_layernorm.weight"], W.get(p + "post_layernorm.bias"))
        bits, tp = cfg.quant_bits, cfg.tp
        self.qkv = Lin(W, p + "attention.qkv", bits)
        self.dense = Lin(W, p + "attention.dense", bits, row_parallel=True, tp=tp)
        self.fc = Lin(W, p + "mlp.fc", bits)
        self.gate = Lin(W, p + "mlp.gate", bits) if cfg.gated_mlp else None
        self.proj = Lin(W, p + "mlp.proj", bits, row_parallel=True, tp=tp)
        self.fc_gate = None  # set by prepare_engine
        self.act = ACTS[cfg.hidden_act]

    def attention(self, x, pos, cos, sin, mask, kc, vc):
        cfg = self.cfg
        B, T, _ = x.shape
        H, KV, D = cfg.heads_per_rank, cfg.kv_heads_per_rank, cfg.head_size
        q, k, v = self.qkv(x).split([H * D, KV * D, KV * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, KV, D).transpose(1, 2)
        v = v.view(B, T, KV, D).transpose(1, 2)
        if cos is not None:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        keys, vals = kc, vc
        if KV != H:
            keys = keys.repeat_interleave(H // KV, dim=1)
            vals = vals.repeat_interleave(H // KV, dim=1)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=1.0 / math.sqrt(D))
        out = out.transpose(1, 2).reshape(B, T, H * D)
        return self.dense(out)

    def mlp(self, x):
        if self.fc_gate is not None:  # engine form: [fc; gate] in one product
            y = self.fc_gate(x)
            n = y.shape[-1] // 2
            return self.proj(self.act(y[..., :n]) * y[..., n:])
        h = self.act(self.fc(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.proj(h)

    def forward(self, x, pos, cos, sin, mask, kc, vc):
        if self.cfg.pre_norm:
            x = x + self.attention(self.ln1(x), pos, cos, sin, mask, kc, vc)
            x = x + self.mlp(self.ln2(x))
        else:  # OPT-350m style post-norm
            a = self.attention(x, pos, cos, sin, mask, kc, vc)
            x = self.ln1(x + a)
            x = self.ln2(x + self.mlp(x))
        return x


class DecoderLM(nn.Module):
    def __init__(self, cfg: DecoderConfig, W: dict[str, torch.Tensor]):
        super().__init__()
        check_supported(cfg)
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
        # vocab-parallel for tp > 1 (rows padded to a multiple of tp); all-gathered in forward
        head = W["lm_head.weight"]
        self.lm_head = nn.Parameter(head if cfg.tp > 1 else head[: cfg.vocab_size], requires_grad=False)
        self.head = None  # engine form: the lm_head as a linear layer (prepare_engine)
        if cfg.positions == "rope_gpt_neox":
            d = cfg.head_size
            inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=self.embed.device) / d))
            self.register_buffer("inv_freq", inv, persistent=True)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, rank: int = 0, allow_tp: bool = False) -> "DecoderLM":
        """One rank of a checkpoint. tp > 1 needs an initialised process
        group of tp ranks (allow_tp=True); the aoti backend exports tp 1 only."""
        from ..checkpoint import load_rank

        c, W = load_rank(ckpt_dir, rank)
        if c["mapping"]["tp_size"] != 1 and not allow_tp:
            raise ValueError("the aoti decoder exports tp=1 checkpoints")
        return cls(DecoderConfig.from_trtllm(c), W).eval()

    def new_cache(self, batch: int, max_seq_len: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        shape = (c.num_layers, batch, c.kv_heads_per_rank, max_seq_len, c.head_size)
        dt = dtype or self.embed.dtype
        dev = self.embed.device
        return torch.zeros(shape, dtype=dt, device=dev), torch.zeros(shape, dtype=dt, device=dev)

    def embed_tokens(self, input_ids: torch.Tensor, prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings; with a prompt table (multimodal engines, as
        TensorRT-LLM's prompt tuning), ids >= vocab_size pick its rows
        instead (visual features spliced into the prompt)."""
        if prompt_table is None:
            return F.embedding(input_ids, self.embed)
        V = self.cfg.vocab_size
        text = F.embedding(input_ids.clamp(max=V - 1), self.embed)
        extra = F.embedding((input_ids - V).clamp(min=0), prompt_table.to(self.embed.dtype))
        return torch.where((input_ids >= V)[..., None], extra, text)

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prompt_table: torch.Tensor | None = None):
        logits = self.logits(input_ids, start_pos, k_cache, v_cache, prompt_table)
        return logits, k_cache, v_cache

    def logits(self, input_ids: torch.Tensor, start_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """The step without the caches in its outputs (they are written in
        place): the function the aoti backend exports. The caches are one
        tensor [layers, ...] each, or sequences of per-layer tensors
        [B, kv_heads, S, head_size]: the exported graph takes sequences, since
        Inductor writes a graph input in place only when it is not a view."""
        B, T = input_ids.shape
        S = k_cache[0].shape[-2]
        pos = start_pos + torch.arange(T, dtype=torch.long, device=input_ids.device)  # [T]
        x = self.embed_tokens(input_ids, prompt_table)
        cos = sin = None
        if self.pos_embed is not None:
            x = x + F.embedding(pos, self.pos_embed)[None]
        else:
            f = pos.float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((f, f), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = torch.arange(S, dtype=torch.long, device=input_ids.device)[None, :] <= pos[:, None]  # [T, S]
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, cos, sin, mask, k_cache[i], v_cache[i])
        if self.ln_f is not None:
            x = self.ln_f(x)
        logits = self.head(x) if self.head is not None else x @ self.lm_head.t()
        if self.cfg.tp > 1:
            logits = all_gather_last(logits, self.cfg.tp)[..., : self.cfg.vocab_size]
        return logits.float()
