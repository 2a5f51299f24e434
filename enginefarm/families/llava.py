"""LLaVA-1.5 (llava-hf/llava-1.5-*-hf): a CLIP vision tower read at
`vision_feature_layer` (the second to last), the CLS token dropped when
`vision_feature_select_strategy` is "default", then a two-layer GELU
projector into the LLaMA (Vicuna) embedding space. One 336 px image in 14 px
patches gives 24 x 24 = 576 features, placed where the prompt's `<image>`
token is."""

from __future__ import annotations

from ..errors import NotAvailable
from ._multimodal import MultimodalFamily
from .base import register_family


def _visual_class():
    import torch
    from torch import nn
    from transformers import AutoModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    class LlavaVisual(nn.Module):
        """pixel_values [B, 3, S, S] -> [B, F, LLM hidden]. The tower's
        layers past the deepest feature layer are dropped (never used).
        `fast_tower` is the slot of the fused CLIP tower that the export step
        swaps in (runtime/clip.py's fuse_vision_tower); `states` reads it
        where it is set."""

        def __init__(self, cfg):
            super().__init__()
            self.vision_tower = AutoModel.from_config(cfg.vision_config)
            self.multi_modal_projector = LlavaMultiModalProjector(cfg)
            n = cfg.vision_config.num_hidden_layers
            layers = cfg.vision_feature_layer
            layers = [layers] if isinstance(layers, int) else list(layers)
            # hidden_states[i] is the output of the first i layers (0: the embeddings)
            self.layers = [i if i >= 0 else n + 1 + i for i in layers]
            keep = max(self.layers)
            # transformers 5 flattens CLIPVisionModel; earlier versions nest it under vision_model
            enc = getattr(self.vision_tower, "vision_model", self.vision_tower).encoder
            enc.layers = enc.layers[:keep]
            self.drop_cls = cfg.vision_feature_select_strategy == "default"
            self.fast_tower = None

        def states(self, pixel_values: torch.Tensor) -> torch.Tensor:
            """The feature layers' hidden states, concatenated along the features, class token kept."""
            if self.fast_tower is not None:
                return self.fast_tower(pixel_values)
            out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            return torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hs = self.states(pixel_values)
            return self.multi_modal_projector(hs[:, 1:] if self.drop_cls else hs)

    return LlavaVisual


@register_family("llava")
class Llava(MultimodalFamily):
    title = "LLaVA-1.5 (CLIP ViT + projector + LLaMA)"
    model_types = ("llava",)
    visual_features = 576  # CLIP ViT-L/14 at 336 px; a checkpoint's own count wins
    llm_model_types = {"llama": "llama"}
    # legacy layout (what save_pretrained writes) and the newer one
    llm_prefixes = (
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
        ("lm_head.", "lm_head."),
    )
    # CLIP saved nested (vision_model.) or flat, under either layout
    visual_prefixes = (
        ("vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("vision_tower.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    image_placement = "inline"
    reference_class = "LlavaForConditionalGeneration"
    vision_model_types = ("clip_vision_model",)

    def _vision(self, config: dict):
        cfg = self.full_config(config)
        mt = cfg.vision_config.model_type
        if mt not in self.vision_model_types:
            raise NotAvailable(f"family llava: a {mt!r} vision tower is not supported (supported: "
                               f"{', '.join(self.vision_model_types)})")
        if cfg.vision_feature_select_strategy not in ("default", "full"):
            raise NotAvailable(f"family llava: vision_feature_select_strategy "
                               f"{cfg.vision_feature_select_strategy!r} is not supported")
        return cfg

    def features(self, config: dict) -> int:
        v = config.get("vision_config") or {}
        strategy = config.get("vision_feature_select_strategy")
        if not (strategy and {"model_type", "image_size", "patch_size"} <= set(v)):
            # an older config.json leaves out defaults: ask transformers
            cfg = self._vision(config)
            v = cfg.vision_config.to_dict()
            strategy = cfg.vision_feature_select_strategy
        if v["model_type"] not in self.vision_model_types or strategy not in ("default", "full"):
            self._vision(config)  # raises, naming what is not supported
        patches = (v["image_size"] // v["patch_size"]) ** 2
        return patches + (0 if strategy == "default" else 1)  # CLIP: + CLS, dropped by "default"

    def visual_module(self, config: dict):
        return _visual_class()(self._vision(config))

    def reference_features(self, model, encodings):
        import torch

        pixels = torch.cat([e["pixel_values"] for e in encodings])
        return list(model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output)

    conversational = True

    def chat_lines(self, turns, user: str, token: str) -> str:
        """What llava-hf's chat template (llava-1.5's chat_template.json)
        writes: "USER: <image>\\n{message} ASSISTANT: {answer} USER: {message}
        ASSISTANT:" (each role upper-cased with ": ", the image before the
        first message's text, each text followed by a space)."""
        out = ""
        for i, (u, a) in enumerate(list(turns) + [(user, None)]):
            out += "USER: " + (f"{token}\n" if i == 0 else "") + u + " ASSISTANT:"
            if a is not None:
                out += f" {a} "
        return out

    def prompt_text(self, prompt: str, image_token: str) -> str:
        # the image goes where the prompt says; a prompt that does not say, gets it first
        return prompt if image_token in prompt else f"{image_token}\n{prompt}"
