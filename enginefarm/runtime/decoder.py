"""A decoder-only transformer in plain PyTorch that runs a TensorRT-LLM
checkpoint: the graph the `aoti` backend exports (tp 1), and, with a
torch.distributed process group, one rank of a tensor-parallel run (the
all-reduces and the logits all-gather sit where TensorRT-LLM puts them), which
is how the shards of a tp > 1 checkpoint are proven right (runtime/tp.py).

Weight-only quantized checkpoints (W8A16, W4A16; see quant.py) run with
their integer weights and scales as stored. Checkpoints that quantize the
activations too (W8A8_SQ_PER_CHANNEL: SmoothQuant; FP8) run the same
arithmetic as TensorRT-LLM's SmoothQuantLinear / FP8Linear in plain PyTorch
(`ActLin`): the input multiplied by the SmoothQuant scale, quantized with the
static per-tensor activation scale and dequantized, times the dequantized
weight.

What differs between the architectures (OPT, LLaMA/Mistral, GPT-2/GPT-Neo,
GPT-NeoX, GPT-J, BLOOM, ...) is read from config.json into DecoderConfig
fields, plus the traits that the family converting into the architecture
declares (families.decoder_traits: norm, gated MLP, parallel residual, one
all-reduce), so a new family needs no row here: positions (learned table, GPT-NeoX or GPT-J
rotary on the first rotary_dim dims of a head, ALiBi slopes of the rank's
heads), the softmax scale (q_scaling), per-layer attention windows
(max_attention_window_size: GPT-Neo's local layers, Mistral's sliding
window), the parallel residual, and optional tensors (embedding layernorm,
LM head bias) by their presence in the rank file.

One step function serves prefill and decode:

    logits, k_cache, v_cache = model(input_ids[B, T], start_pos[1], k_cache, v_cache[, prompt_table])

with a static KV cache of shape [layers, B, kv_heads, max_seq_len, head_size]
(one tensor, or a sequence of per-layer tensors [B, kv_heads, S, head_size])
written in place at positions start_pos .. start_pos + T - 1; the caches are
returned too, for callers that thread them through. `model.logits(...)` is
the same step without the caches in its outputs: the function the aoti
backend exports (runtime/export.py), with per-layer cache inputs, since
Inductor writes a graph input in place only when it is not a view. Writing
in place matters: a functional update would copy the whole cache on every
step, which at decode time costs more than the step's weights.

Speed-ups are module swaps on this model (runtime/swaps.py): the linear
layers into the weight-only kernels' layout, the gated MLP's two input
projections into one product (`fc_gate`), the lm_head into a linear layer
(`head`).

Multimodal LLMs take a prompt table [rows, hidden] (visual features), in
TensorRT-LLM's convention: a token id >= vocab_size stands for row
id - vocab_size of the table. Both lookups run for every token and a `where`
picks one, so the graph has no data-dependent shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..families import decoder_traits
from ..quant import FP8_MAX, act_quant_of, bits_of, int_values, is_stored_quantized

ACTS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


POSITIONS = ("learned_absolute", "rope_gpt_neox", "rope_gptj", "alibi")


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
    positions: str  # one of POSITIONS
    rotary_base: float
    max_position_embeddings: int
    gated_mlp: bool
    pre_norm: bool
    tp: int = 1
    quant_bits: int = 0  # 0: not quantized; 8 or 4: weight-only
    act_quant: str | None = None  # weights and activations quantized: "int8_sq" or "fp8" (quant.act_quant_of)
    tp_rank: int = 0
    rotary_dim: int = 0  # rotary dims of a head (the first ones); 0: all of it
    q_scaling: float = 1.0  # TensorRT-LLM's: softmax scale = 1 / (sqrt(head_size) * q_scaling)
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x) (ln2 missing: ln1's output)
    allreduce_once: bool = False  # tp: one all-reduce of attn + mlp partial sums (GPT-J)
    windows: tuple = ()  # per layer: attention window in tokens (0: the whole causal past)

    @classmethod
    def from_trtllm(cls, c: dict, rank: int = 0) -> "DecoderConfig":
        arch = c["architecture"]
        a = decoder_traits(arch)  # ValueError for an architecture no family converts into
        if c["position_embedding_type"] not in POSITIONS:
            raise ValueError(f"the aoti decoder does not know position_embedding_type {c['position_embedding_type']}")
        n_layers = c["num_hidden_layers"]
        head = c.get("head_size") or c["hidden_size"] // c["num_attention_heads"]
        windows = c.get("max_attention_window_size") or [0] * n_layers
        return cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=n_layers,
            num_heads=c["num_attention_heads"],
            num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_size=head,
            hidden_act=c["hidden_act"],
            norm=a.norm,
            norm_eps=c.get("norm_epsilon", 1e-5),
            positions=c["position_embedding_type"],
            rotary_base=c.get("rotary_base") or c.get("rotary_emb_base") or 10000.0,
            max_position_embeddings=c["max_position_embeddings"],
            gated_mlp=a.gated_mlp,
            pre_norm=c.get("do_layer_norm_before", True),
            tp=(c.get("mapping") or {}).get("tp_size", 1),
            quant_bits=bits_of(c),
            act_quant=act_quant_of(c),
            tp_rank=rank,
            rotary_dim=c.get("rotary_dim") or int(head * c.get("rotary_pct", 1.0)),
            q_scaling=c.get("q_scaling", 1.0),
            parallel_residual=c.get("use_parallel_residual", a.parallel_residual),
            allreduce_once=a.allreduce_once,
            windows=tuple(int(w or 0) for w in windows),
        )

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        # TensorRT-LLM replicates kv heads when tp exceeds them
        return max(self.num_kv_heads // self.tp, 1)

    @property
    def attn_scale(self) -> float:
        return 1.0 / (math.sqrt(self.head_size) * self.q_scaling)


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


class Lin(nn.Module):
    """A linear layer of the checkpoint: float weight [out, in], or a
    weight-only quantized one (int weight [in, out] + per-channel or
    per-group scales). `row_parallel` layers of a tp > 1 run all-reduce
    their partial products before the (whole) bias is added."""

    def __init__(self, W: dict, name: str, bits: int = 0, row_parallel: bool = False, tp: int = 1):
        super().__init__()
        w = W[name + ".weight"]
        b = W.get(name + ".bias")
        self.bits = bits if is_stored_quantized(W, name, bits) else 0
        self.reduce = row_parallel and tp > 1
        if self.bits:
            q = int_values(w, self.bits)  # [in, out] int8 values
            scale = W.get(name + ".per_channel_scale")
            if scale is None:
                scale = W[name + ".weights_scaling_factor"]
            self.qweight = nn.Parameter(q, requires_grad=False)
            self.scale = nn.Parameter(scale, requires_grad=False)
        else:
            self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False) if b is not None else None
        pqs = W.get(name + ".prequant_scaling_factor") if self.bits else None  # AWQ (quant.py)
        self.pre_quant_scale = nn.Parameter(pqs.reshape(-1), requires_grad=False) if pqs is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:  # AWQ: x * s against the weight smoothed by 1 / s
            x = x * self.pre_quant_scale
        if self.bits and self.scale.dim() == 1:  # per channel: x @ (q * s) == (x @ q) * s
            y = (x @ self.qweight.to(x.dtype)) * self.scale
        elif self.bits:  # per group
            groups = self.scale.shape[0]
            q = self.qweight.to(x.dtype)
            w = (q.view(groups, q.shape[0] // groups, q.shape[1]) * self.scale[:, None, :]).view(q.shape)
            y = x @ w
        else:
            y = F.linear(x, self.weight)
        if self.reduce:
            y = all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class ActLin(nn.Module):
    """A linear layer whose weights and input are both quantized (quant.act_plan):
    int8 SmoothQuant or FP8, weight [out, in], static per-tensor activation
    scale. y = dq(q(x * s)) @ dq(W)^T, computed in float32: for int8 the
    integer products are what TensorRT-LLM's int8 GEMM sums (exactly up to
    float32 rounding of the sums), then scaled by activation scale x weight
    scale as its smooth_quant_gemm does; for fp8 the input is rounded to
    e4m3 as TensorRT-LLM's quantize does before the FP8 GEMM."""

    def __init__(self, W: dict, name: str, kind: str, row_parallel: bool = False, tp: int = 1,
                 per_token: bool = False):
        super().__init__()
        self.kind = kind
        self.per_token = per_token  # int8: each token's own scale, max|x * s| / 127 (dynamic), not the static one
        self.reduce = row_parallel and tp > 1
        w = W[name + ".weight"]
        self.qweight = nn.Parameter(w.view(torch.int8) if kind == "fp8" else w, requires_grad=False)
        self.wscale = nn.Parameter(W[name + ".weights_scaling_factor"].float(), requires_grad=False)
        self.ascale = nn.Parameter(W[name + ".activation_scaling_factor"].float().reshape(()), requires_grad=False)
        pqs = W.get(name + ".prequant_scaling_factor")
        self.pre_quant_scale = nn.Parameter(pqs.reshape(-1), requires_grad=False) if pqs is not None else None
        b = W.get(name + ".bias")
        self.bias = nn.Parameter(b, requires_grad=False) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.pre_quant_scale is not None:  # SmoothQuant: x * s against the weight smoothed by 1 / s
            x = x * self.pre_quant_scale
        xf = x.float()
        if self.per_token:
            ascale = (xf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-12)
        else:
            ascale = self.ascale
        xs = xf / ascale
        if self.kind == "fp8":
            xq = xs.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
            wq = self.qweight.view(torch.float8_e4m3fn).float()
        else:
            xq = torch.round(xs).clamp(-128, 127)
            wq = self.qweight.float()
        y = (xq @ wq.t()) * (ascale * self.wscale)
        y = y.to(dtype)
        if self.reduce:
            y = all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


def make_lin(cfg: "DecoderConfig", W: dict, name: str, row_parallel: bool = False, tp: int = 1) -> nn.Module:
    """The checkpoint's linear layer `name`: weight-only (`Lin`) or, in a
    weight-and-activation quantized checkpoint, `ActLin`."""
    if cfg.act_quant and W[name + ".weight"].dtype in (torch.int8, torch.float8_e4m3fn) \
            and name + ".activation_scaling_factor" in W:
        return ActLin(W, name, cfg.act_quant, row_parallel=row_parallel, tp=tp)
    return Lin(W, name, cfg.quant_bits, row_parallel=row_parallel, tp=tp)


def group_name() -> str:
    """The name of the default process group (what the functional collectives take)."""
    import torch.distributed as dist

    return dist.group.WORLD.group_name


# The collectives are torch's functional ones (_c10d_functional.*, each with
# its wait_tensor), not dist.all_reduce: torch.export traces them into the
# graph and AOTInductor compiles them into a package (tried with torch 2.13 on
# CPU, gloo), so a tp > 1 engine's rank packages carry their own all-reduces
# and all-gather (runtime/export.py); eagerly they run the same collectives.
def all_reduce(t: torch.Tensor) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce(t.contiguous(), "sum", group_name()))


def all_gather_last(t: torch.Tensor, tp: int) -> torch.Tensor:
    """The ranks' tensors side by side along the last dim (vocab-parallel
    logits): each rank's part padded with zeros into its place, then summed
    by an all-reduce. Not all_gather_into_tensor: compiled by AOTInductor
    (torch 2.13, CPU, gloo) it runs through the proxy executor, and a rank
    package with it hung in the step after it (seen twice, never with the
    all-reduce alone). The rank is this process's, a constant of its package."""
    import torch.distributed as dist

    rank, n = dist.get_rank(), t.shape[-1]
    return all_reduce(F.pad(t, (rank * n, (tp - 1 - rank) * n)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotation: each (even, odd) pair of dims (a, b) becomes (-b, a)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary positions on the first cos.shape[-1] dims of each head (partial
    rotary: the rest pass through)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    rot = rot * cos + (_rotate_pairs(rot) if interleaved else _rotate_half(rot)) * sin
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (BLOOM's: a geometric series over the closest power
    of two, then every other slope of the next power of two)."""
    p = 2 ** math.floor(math.log2(n_heads))
    slopes = [2.0 ** (-8.0 * (i + 1) / p) for i in range(p)]
    slopes += [2.0 ** (-4.0 * (2 * i + 1) / p) for i in range(min(p, n_heads - p))]
    return torch.tensor(slopes, dtype=torch.float32)


def _norm_or_none(cfg: DecoderConfig, W: dict, prefix: str, names: tuple[str, ...]):
    for n in names:
        if prefix + n + ".weight" in W:
            return Norm(cfg, W[prefix + n + ".weight"], W.get(prefix + n + ".bias"))
    return None


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig, W: dict, i: int):
        super().__init__()
        p = f"transformer.layers.{i}."
        self.cfg = cfg
        self.window = cfg.windows[i % len(cfg.windows)] if cfg.windows else 0
        self.ln1 = Norm(cfg, W[p + "input_layernorm.weight"], W.get(p + "input_layernorm.bias"))
        # GPT-NeoX's checkpoint names it post_attention_layernorm; GPT-J has none
        self.ln2 = _norm_or_none(cfg, W, p, ("post_layernorm", "post_attention_layernorm"))
        tp = cfg.tp
        reduce_each = not cfg.allreduce_once
        self.qkv = make_lin(cfg, W, p + "attention.qkv")
        self.dense = make_lin(cfg, W, p + "attention.dense", row_parallel=reduce_each, tp=tp)
        self.fc = make_lin(cfg, W, p + "mlp.fc")
        self.gate = make_lin(cfg, W, p + "mlp.gate") if cfg.gated_mlp else None
        self.proj = make_lin(cfg, W, p + "mlp.proj", row_parallel=reduce_each, tp=tp)
        self.fc_gate = None
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
            interleaved = cfg.positions == "rope_gptj"
            q = _rope(q, cos, sin, interleaved)
            k = _rope(k, cos, sin, interleaved)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        keys, vals = kc, vc
        if KV != H:
            keys = keys.repeat_interleave(H // KV, dim=1)
            vals = vals.repeat_interleave(H // KV, dim=1)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=cfg.attn_scale)
        out = out.transpose(1, 2).reshape(B, T, H * D)
        return self.dense(out)

    def mlp(self, x):
        if self.fc_gate is not None:  # swapped in (runtime/swaps.py): [fc; gate] in one product
            y = self.fc_gate(x)
            n = y.shape[-1] // 2
            return self.proj(self.act(y[..., :n]) * y[..., n:])
        h = self.act(self.fc(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.proj(h)

    def forward(self, x, pos, cos, sin, masks, kc, vc):
        """The layer's output; kc, vc (this layer's caches) are written in place."""
        mask = masks[self.window]
        cfg = self.cfg
        if cfg.parallel_residual:  # GPT-NeoX, GPT-J: both branches read x
            h = self.ln1(x)
            a = self.attention(h, pos, cos, sin, mask, kc, vc)
            m = self.mlp(self.ln2(x) if self.ln2 is not None else h)
            if cfg.allreduce_once and cfg.tp > 1:
                return x + all_reduce(a + m)
            return x + a + m
        if cfg.pre_norm:
            x = x + self.attention(self.ln1(x), pos, cos, sin, mask, kc, vc)
            x = x + self.mlp(self.ln2(x))
        else:  # OPT-350m style post-norm
            x = self.ln1(x + self.attention(x, pos, cos, sin, mask, kc, vc))
            x = self.ln2(x + self.mlp(x))
        return x


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
        # BLOOM normalises the embeddings before the first layer
        self.ln_embed = _norm_or_none(cfg, W, "transformer.", ("ln_embed",))
        self.layers = nn.ModuleList(Layer(cfg, W, i) for i in range(cfg.num_layers))
        self.ln_f = _norm_or_none(cfg, W, "transformer.", ("ln_f",))
        # vocab-parallel for tp > 1 (rows padded to a multiple of tp); all-gathered in forward
        head = W["lm_head.weight"]
        self.lm_head = nn.Parameter(head if cfg.tp > 1 else head[: cfg.vocab_size], requires_grad=False)
        bias = W.get("lm_head.bias")  # GPT-J
        self.lm_head_bias = (
            nn.Parameter(bias if cfg.tp > 1 else bias[: cfg.vocab_size], requires_grad=False) if bias is not None else None
        )
        self.head = None  # swapped in (runtime/swaps.py): the lm_head (and its bias) as one linear layer
        if cfg.positions.startswith("rope"):
            d = cfg.rotary_dim or cfg.head_size
            inv = 1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32, device=self.embed.device) / d))
            self.register_buffer("inv_freq", inv, persistent=True)
        if cfg.positions == "alibi":  # this rank's heads of the model's slopes
            h = cfg.heads_per_rank
            slopes = alibi_slopes(cfg.num_heads)[cfg.tp_rank * h : (cfg.tp_rank + 1) * h]
            self.register_buffer("alibi", slopes.to(self.embed.device), persistent=True)

    @classmethod
    def from_checkpoint(cls, ckpt_dir, rank: int = 0, allow_tp: bool = False) -> "DecoderLM":
        """One rank of a checkpoint. tp > 1 needs an initialised process
        group of tp ranks (allow_tp=True); the aoti backend exports tp 1 only."""
        from ..checkpoint import load_rank

        c, W = load_rank(ckpt_dir, rank)
        if c["mapping"]["tp_size"] != 1 and not allow_tp:
            raise ValueError("the aoti decoder exports tp=1 checkpoints")
        return cls(DecoderConfig.from_trtllm(c, rank), W).eval()

    def new_cache(self, batch: int, max_seq_len: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        shape = (c.num_layers, batch, c.kv_heads_per_rank, max_seq_len, c.head_size)
        dt, dev = dtype or self.embed.dtype, self.embed.device
        return torch.zeros(shape, dtype=dt, device=dev), torch.zeros(shape, dtype=dt, device=dev)

    def embed_tokens(self, input_ids: torch.Tensor, prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings; with a prompt table (multimodal engines, as
        TensorRT-LLM's prompt tuning), ids >= vocab_size pick its rows
        instead (visual features spliced into the prompt). Both lookups are
        clamped into their tables: the graph has no data-dependent branch,
        and an id past the table reads its last row rather than memory
        outside it (the engine refuses such ids before they get here)."""
        if prompt_table is None:
            return F.embedding(input_ids, self.embed)
        V = self.cfg.vocab_size
        is_prompt = input_ids >= V
        x = F.embedding(torch.where(is_prompt, 0, input_ids), self.embed)
        rows = (input_ids - V).clamp(0, prompt_table.shape[0] - 1)
        return torch.where(is_prompt[..., None], F.embedding(rows, prompt_table.to(x.dtype)), x)

    def _masks(self, pos: torch.Tensor, S: int, dtype: torch.dtype) -> dict:
        """The attention mask of each window size the layers use: causal, the
        last `window` tokens only where a window is set; with ALiBi, a float
        mask carrying each head's linear distance bias."""
        keys = torch.arange(S, dtype=torch.long, device=pos.device)[None, :]
        causal = keys <= pos[:, None]  # [T, S]
        masks = {}
        for w in sorted({layer.window for layer in self.layers}):
            m = causal & (keys > pos[:, None] - w) if w else causal
            if self.cfg.positions == "alibi":
                dist = (keys - pos[:, None]).to(torch.float32)  # j - i <= 0 where visible
                bias = (self.alibi[:, None, None] * dist[None]).masked_fill(~m[None], float("-inf"))
                m = bias.to(dtype)
            masks[w] = m
        return masks

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, k_cache, v_cache,
                prompt_table: torch.Tensor | None = None):
        """logits [B, T, vocab] (float32) and the caches, written in place."""
        return self.logits(input_ids, start_pos, k_cache, v_cache, prompt_table), k_cache, v_cache

    def logits(self, input_ids: torch.Tensor, start_pos: torch.Tensor, k_cache, v_cache,
               prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """The step without the caches in its outputs (they are written in
        place): the function the aoti backend exports. The caches are one
        tensor [layers, ...] each, or sequences of per-layer tensors."""
        B, T = input_ids.shape
        S = k_cache[0].shape[-2]
        pos = start_pos + torch.arange(T, dtype=torch.long, device=input_ids.device)  # [T]
        x = self.embed_tokens(input_ids, prompt_table)
        cos = sin = None
        if self.pos_embed is not None:
            x = x + F.embedding(pos, self.pos_embed)[None]
        elif self.cfg.positions.startswith("rope"):
            f = pos.float()[:, None] * self.inv_freq[None, :]
            emb = f.repeat_interleave(2, dim=-1) if self.cfg.positions == "rope_gptj" else torch.cat((f, f), dim=-1)
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if self.ln_embed is not None:
            x = self.ln_embed(x)
        masks = self._masks(pos, S, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, pos, cos, sin, masks, k_cache[i], v_cache[i])
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.head is not None:
            logits = self.head(x)
        else:
            logits = x @ self.lm_head.t()
            if self.lm_head_bias is not None:
                logits = logits + self.lm_head_bias
        if self.cfg.tp > 1:
            logits = all_gather_last(logits, self.cfg.tp)[..., : self.cfg.vocab_size]
        return logits.float()
