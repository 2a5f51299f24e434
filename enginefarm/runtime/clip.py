"""A CLIP vision tower in plain PyTorch over Hugging Face CLIPVisionModel
weights, for runtime/export.py's export_visual (bench/gpu_visual.py and
bench/gpu_llava.py measure it): the LLaVA family's encoder, CLIP
ViT-L/14-336, features of the second-to-last layer, patch tokens only,
through the two-layer GELU projector.

Differences from the Hugging Face module are in the graph, not the
function: q, k and v are one product (their weights concatenated at load),
attention is one `scaled_dot_product_attention` call (the backend picks the
kernel, see AotiOptions.attention), and only the layers whose output is
used are run.

`fuse_vision_tower` swaps it in, gpt-fast style, for the Hugging Face CLIP
tower inside a family's visual module (LLaVA's, LLaVA-NeXT's and
NeXT-Video's): the export step (tasks/export.py) calls it, so every backend's
visual engine is built from the fused graph, while validation's reference
stays Hugging Face's own module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    hidden_act: str
    eps: float

    @classmethod
    def from_hf(cls, c: dict) -> "VisionConfig":
        return cls(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["patch_size"],
                   c["image_size"], c.get("hidden_act", "quick_gelu"), c.get("layer_norm_eps", 1e-5))


def _p(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, W: dict, p: str):
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        for ln, name in ((self.ln1, "layer_norm1"), (self.ln2, "layer_norm2")):
            ln.weight = _p(W[p + name + ".weight"])
            ln.bias = _p(W[p + name + ".bias"])
        a = p + "self_attn."
        self.qkv_w = _p(torch.cat([W[a + f"{x}_proj.weight"] for x in "qkv"]))
        self.qkv_b = _p(torch.cat([W[a + f"{x}_proj.bias"] for x in "qkv"]))
        self.out_w, self.out_b = _p(W[a + "out_proj.weight"]), _p(W[a + "out_proj.bias"])
        self.fc1_w, self.fc1_b = _p(W[p + "mlp.fc1.weight"]), _p(W[p + "mlp.fc1.bias"])
        self.fc2_w, self.fc2_b = _p(W[p + "mlp.fc2.weight"]), _p(W[p + "mlp.fc2.bias"])
        self.act = ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.cfg.num_heads
        h = self.ln1(x)
        qkv = F.linear(h, self.qkv_w, self.qkv_b).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + F.linear(o.transpose(1, 2).reshape(B, N, D), self.out_w, self.out_b)
        h = self.act(F.linear(self.ln2(x), self.fc1_w, self.fc1_b))
        return x + F.linear(h, self.fc2_w, self.fc2_b)


class ClipVisionTower(nn.Module):
    """pixels [B, 3, S, S] -> features [B, patches (+1 with the class token), d].

    feature_layer: which hidden state (Hugging Face's hidden_states index:
    0 = embeddings, -1 = last layer, -2 = the one before: LLaVA's), or a list
    of them, whose states are concatenated along the features (d x their
    count); select: 'patch' drops the class token (LLaVA's 'default'), 'full'
    keeps it. projector: weights of a LLaVA mlp2x_gelu projector (linear_1,
    linear_2) or None."""

    def __init__(self, cfg: VisionConfig, W: dict, prefix: str = "vision_model.", feature_layer: "int | list[int]" = -2,
                 select: str = "patch", projector: dict | None = None, projector_act: str = "gelu"):
        super().__init__()
        self.cfg = cfg
        e = prefix + "embeddings."
        self.patch_w = _p(W[e + "patch_embedding.weight"])
        self.cls = _p(W[e + "class_embedding"])
        self.pos = _p(W[e + "position_embedding.weight"])
        self.pre_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.pre_ln.weight = _p(W[prefix + "pre_layrnorm.weight"])
        self.pre_ln.bias = _p(W[prefix + "pre_layrnorm.bias"])
        wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        # hidden-state indices (0: the embeddings), each the count of layers run before it
        self.taps = [cfg.num_layers + 1 + i if i < 0 else i for i in wanted]
        if not wanted or not all(0 <= t <= cfg.num_layers for t in self.taps):
            raise ValueError(f"feature_layer {feature_layer} out of range for {cfg.num_layers} layers")
        self.layers = nn.ModuleList(VisionLayer(cfg, W, f"{prefix}encoder.layers.{i}.") for i in range(max(self.taps)))
        self.select = select
        self.proj = None
        if projector is not None:
            self.proj1_w, self.proj1_b = _p(projector["linear_1.weight"]), _p(projector["linear_1.bias"])
            self.proj2_w, self.proj2_b = _p(projector["linear_2.weight"]), _p(projector["linear_2.bias"])
            self.proj = ACTS[projector_act]

    @classmethod
    def from_hf_vision(cls, vision_model, projector=None, feature_layer: "int | list[int]" = -2,
                       select: str = "patch", projector_act: str = "gelu") -> "ClipVisionTower":
        """From a Hugging Face CLIPVisionModel (and a LLaVA projector module).
        A tower whose encoder was cut short (LLaVA's family drops the layers
        past its deepest feature layer) counts the layers it holds."""
        cfg = VisionConfig.from_hf(vision_model.config.to_dict())
        cfg.num_layers = len(getattr(vision_model, "vision_model", vision_model).encoder.layers)
        W = {k: v.detach() for k, v in vision_model.state_dict().items()}
        P = {k: v.detach() for k, v in projector.state_dict().items()} if projector is not None else None
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in W) else ""  # transformers 4 / 5
        return cls(cfg, W, prefix, feature_layer, select, P, projector_act).eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(pixel_values.to(self.patch_w.dtype), self.patch_w, stride=self.cfg.patch_size)
        x = x.flatten(2).transpose(1, 2)  # [B, n, d]
        cls = self.cls.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos
        x = self.pre_ln(x)
        states = {0: x}  # hidden state i: the output of the first i layers (those tapped kept)
        for i, layer in enumerate(self.layers, 1):
            x = layer(x)
            if i in self.taps:
                states[i] = x
        # in the order asked for (taps may repeat or go downwards)
        x = states[self.taps[0]] if len(self.taps) == 1 else torch.cat([states[t] for t in self.taps], dim=-1)
        if self.select == "patch":
            x = x[:, 1:]
        if self.proj is not None:
            x = F.linear(self.proj(F.linear(x, self.proj1_w, self.proj1_b)), self.proj2_w, self.proj2_b)
        return x


def fuse_vision_tower(module: nn.Module) -> bool:
    """Swap the fused tower in for a visual module's Hugging Face CLIP tower
    (gpt-fast style, in place); True where it did.

    The module takes the swap by declaring the slot: a `fast_tower`
    attribute (None until swapped), the hidden-state indices it reads in
    `layers`, and its tower in `vision_tower`; its own forward then calls the
    fused tower for the concatenated states, class token kept. A tower of
    another kind, or an activation the fused layer lacks, is left as it is."""
    from transformers import CLIPVisionModel

    vt = getattr(module, "vision_tower", None)
    if not hasattr(module, "fast_tower") or not isinstance(vt, CLIPVisionModel) \
            or vt.config.hidden_act not in ACTS:
        return False
    module.fast_tower = ClipVisionTower.from_hf_vision(vt, feature_layer=list(module.layers), select="full")
    module.vision_tower = None  # its weights live in the fused tower alone (concatenated q/k/v)
    return True
