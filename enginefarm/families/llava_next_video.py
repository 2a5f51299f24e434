"""LLaVA-NeXT-Video (llava-hf/LLaVA-NeXT-Video-*-hf): LLaVA-NeXT trained on
videos. A video's frames are sampled (the recipe's
`components.visual.num_frames`, spread evenly), each frame goes through the
CLIP tower read at `vision_feature_layer` with the CLS token dropped, then
through the spatial pooling of the config (`spatial_pool_mode`: average, max
or a strided conv; `spatial_pool_stride`: 2 in the released models) and the
projector. A frame of 336 px in 14 px patches gives 24 x 24 patches, pooled
to 12 x 12 = 144 features; a video gives frames x that many, in frame order,
where the prompt's `<video>` token is (8 frames: 1152 features). So the
limits follow from the recipe: max_multimodal_len = max_batch_size x
num_frames x pooled features per frame.

The visual engine takes frames (dynamic batch: max_batch_size x num_frames)
and makes each frame's pooled, projected features.

Preprocessing: the checkpoint's LlavaNextVideoProcessor cannot run without
torchvision (its video processor is built on it), which the farm does not
depend on. `VideoInputs` does its work from the checkpoint's own files: the
frames resized, centre-cropped and normalised with the settings of
`video_preprocessor_config.json` (else `preprocessor_config.json`) by
transformers' PIL CLIP image processor (the same steps, with PIL's
resampling), and the prompt's one `<video>` token expanded to the video's
feature count, which is counted here from the model's config (the
processor's own count assumes a pooling stride of 2).

Language models: LLaMA-architecture (Vicuna, Nous-Hermes-2-Yi) and Mistral,
through their families' conversion. Images (the model's any-resolution
image path) are not built here: a recipe of this family builds a video
engine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import BadInput, NotAvailable
from .base import Family, register_family
from .llava import Llava, _visual_class as _llava_visual_class

if TYPE_CHECKING:  # pragma: no cover
    from ..spec import Recipe

POOL_MODES = ("average", "max", "conv")
# the frame preprocessing settings read from the checkpoint's processor files
FRAME_KEYS = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
              "image_mean", "image_std", "resample", "do_convert_rgb")


def _visual_class():
    import torch
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    class LlavaNextVideoVisual(_llava_visual_class()):
        """frames [B, 3, S, S] -> [B, pooled features, LLM hidden]: LLaVA's
        tower and projector with the model's pooling between them."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.vision_resampler = LlavaNextVideoPooler(cfg)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
            hs = torch.cat([out.hidden_states[i][:, 1:] for i in self.layers], dim=-1)  # CLS dropped
            return self.multi_modal_projector(self.vision_resampler(hs))

    return LlavaNextVideoVisual


@register_family("llava-next-video")
class LlavaNextVideo(Llava):
    title = "LLaVA-NeXT-Video: sampled frames through CLIP + spatial pooling + projector, LLaMA or Mistral"
    model_types = ("llava_next_video",)
    visual_features = None  # frames x pooled patches: from the recipe's num_frames and the checkpoint's config
    media = "video"
    llm_model_types = {"llama": "llama", "mistral": "mistral"}
    visual_prefixes = Llava.visual_prefixes + (
        ("vision_resampler.", "vision_resampler."),  # a conv pooling's weights (average / max have none)
        ("model.vision_resampler.", "vision_resampler."),
    )
    reference_class = "LlavaNextVideoForConditionalGeneration"

    # ----------------------------------------------------------------- the recipe's frames

    def check_recipe(self, recipe: "Recipe") -> None:
        super().check_recipe(recipe)
        n = recipe.components["visual"].num_frames
        if n is None or n < 1:
            raise BadInput(
                f"bad recipe {recipe.origin or recipe.name}: components.visual.num_frames: family {self.name} needs "
                f"the frames sampled per video (a positive number, e.g. 8 as the released models were trained "
                f"with); the limits follow from it"
            )

    def media_config(self, config: dict, recipe: "Recipe") -> dict:
        return {**config, "num_frames": int(recipe.components["visual"].num_frames)}

    def num_frames(self, config: dict) -> int:
        n = config.get("num_frames")
        if not n:
            raise BadInput(f"family {self.name}: no frame count (components.visual.num_frames) for this checkpoint")
        return int(n)

    # ----------------------------------------------------------------- features

    def _pooling(self, config: dict) -> tuple[str, int]:
        mode, stride = config.get("spatial_pool_mode"), config.get("spatial_pool_stride")
        if mode is None or stride is None:
            cfg = self.full_config(config)
            mode, stride = cfg.spatial_pool_mode, cfg.spatial_pool_stride
        if mode not in POOL_MODES:
            raise NotAvailable(f"family {self.name}: spatial_pool_mode {mode!r} is not supported "
                               f"({', '.join(POOL_MODES)})")
        return mode, int(stride)

    def encoder_features(self, config: dict) -> int:
        """Pooled features per frame: the patch grid (CLS dropped) pooled by the stride."""
        strategy = config.get("vision_feature_select_strategy") or self._vision(config).vision_feature_select_strategy
        if strategy != "default":
            raise NotAvailable(f"family {self.name}: vision_feature_select_strategy {strategy!r} is not supported "
                               f"(the pooling takes the patch grid without the CLS token)")
        side = math.isqrt(Llava.features(self, config))
        _, stride = self._pooling(config)
        if side < stride:
            raise BadInput(f"family {self.name}: a {side} x {side} patch grid is smaller than "
                           f"spatial_pool_stride {stride}")
        return (side // stride) ** 2  # floor: pooling without padding

    def features(self, config: dict) -> int:
        return self.num_frames(config) * self.encoder_features(config)

    def encoder_inputs_per_image(self, config: dict) -> int:
        return self.num_frames(config)

    def image_token_id(self, config: dict) -> Optional[int]:
        for k in ("video_token_index", "video_token_id"):
            if config.get(k) is not None:
                return int(config[k])
        return int(self.full_config(config).video_token_index)

    def visual_meta(self, config: dict) -> dict:
        mode, stride = self._pooling(config)
        return {**super().visual_meta(config), "num_frames": self.num_frames(config), "spatial_pool_mode": mode,
                "spatial_pool_stride": stride}

    def visual_module(self, config: dict):
        return _visual_class()(self._vision(config))

    # ----------------------------------------------------------------- at run time

    PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")

    def check_inputs(self, src_dir, where: str) -> None:
        Family.check_inputs(self, src_dir, where)  # the tokenizer; the frames' settings below
        self.require_files(src_dir, where, "video processor", self.PROCESSOR_FILES)

    def load_processor(self, src_dir, meta: dict):
        return VideoInputs.load(src_dir, meta)

    def encode(self, processor, video, prompt: str, token: str) -> dict:
        return processor(video, self.prompt_text(prompt, token))

    def encoder_inputs(self, encoding):
        return encoding["pixel_values_videos"][0]  # [frames, 3, S, S]

    def reference_features(self, model, encodings):
        cfg = model.config
        return [model.get_video_features(pixel_values_videos=e["pixel_values_videos"],
                                         vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                         return_dict=True).pooler_output[0] for e in encodings]


class VideoInputs:
    """One video and one prompt -> what the model takes: input_ids with the
    `<video>` token expanded to the video's features, an attention mask, and
    pixel_values_videos [1, frames, 3, S, S] (see the module's doc)."""

    def __init__(self, tokenizer, frames_processor, video_token: str, video_token_id: int, features_per_frame: int,
                 num_frames: int):
        self.tokenizer, self.frames_processor = tokenizer, frames_processor
        self.image_token = self.video_token = video_token  # the pipeline's name for the placeholder
        self.video_token_id = video_token_id
        self.features_per_frame, self.num_frames = features_per_frame, num_frames

    @classmethod
    def load(cls, src_dir, meta: dict) -> "VideoInputs":
        from transformers import AutoTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        src = Path(src_dir)
        settings = None
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (src / name).is_file():
                settings = json.loads((src / name).read_text())
                break
        if settings is None:
            raise BadInput(f"{src} has no video_preprocessor_config.json or preprocessor_config.json: the frames' "
                           f"size and normalisation are not known")
        frames = CLIPImageProcessorPil(**{k: settings[k] for k in FRAME_KEYS if k in settings})
        proc_file = src / "processor_config.json"
        proc_cfg = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
        token = proc_cfg.get("video_token") or "<video>"
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
        tid = tok.convert_tokens_to_ids(token)
        if tid != meta["image_token_id"]:
            raise BadInput(f"the tokenizer in {src} gives {token} the id {tid}, the model's config "
                           f"video_token_index is {meta['image_token_id']}")
        return cls(tok, frames, token, tid, meta["encoder_features"], meta["num_frames"])

    def __call__(self, video, text: str) -> dict:
        import torch

        from ..videos import sample_frames

        frames = sample_frames(video, self.num_frames)
        pixels = self.frames_processor(images=list(frames), return_tensors="pt")["pixel_values"]
        ids = self.tokenizer(text).input_ids
        at = [i for i, t in enumerate(ids) if t == self.video_token_id]
        if len(at) != 1:
            raise BadInput(f"a prompt with {len(at)} video placeholders ({self.video_token}); each prompt takes "
                           f"exactly one video")
        n = frames.shape[0] * self.features_per_frame
        ids = ids[: at[0]] + [self.video_token_id] * n + ids[at[0] + 1 :]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "pixel_values_videos": pixels[None]}
