"""LLaVA-NeXT-Video (llava-hf/LLaVA-NeXT-Video-*-hf): LLaVA-NeXT trained on
videos; it takes videos and images (the model's `pixel_values_videos` and
`pixel_values`, each with its own placeholder token: `video_token_index`,
`image_token_index`).

A video: its frames are sampled (the recipe's `components.visual.num_frames`,
spread evenly), each frame goes through the CLIP tower read at
`vision_feature_layer` with the CLS token dropped, then through the spatial
pooling of the config (`spatial_pool_mode`: average, max or a strided conv;
`spatial_pool_stride`: 2 in the released models) and the projector. A frame
of 336 px in 14 px patches gives 24 x 24 patches, pooled to 12 x 12 = 144
features; a video gives frames x that many, in frame order, where the
prompt's `<video>` token is (8 frames: 1152 features).

An image: LLaVA-NeXT's any-resolution path (llava_next.py), with no pooling:
the base tile and the grid's tiles through CLIP + projector, the grid
unpadded, `image_newline` at the end of every row, where the prompt's
`<image>` token is (336 px tiles and the released pinpoints: up to 576 +
48 x 49 = 2928 features).

One visual engine serves both (tiles and frames are the same CLIP input):
for each input it makes the projected patch features, then the projected
pooled ones, one after the other ([B, 576 + 144, hidden] at 336 px). An
image's tiles take the first rows, a video's frames the last. Two engines
would build, store and load the tower twice; two outputs would need every
backend (ONNX Runtime, TensorRT, aoti) to carry several; so one output, at
the cost of the projector's two-layer MLP over the other path's rows (about
7% of the tower's work at 336 px). The engine's batch is max_batch_size x
the larger of num_frames and the most tiles an image takes; the limits
cover the larger of an image's features and a video's:
max_multimodal_len = max_batch_size x max(image features at most,
num_frames x pooled features per frame), and max_input_len must hold it.

Preprocessing: the checkpoint's LlavaNextVideoProcessor cannot run without
torchvision (its video processor is built on it), which the farm does not
depend on. `VideoInputs` does its work from the checkpoint's own files: the
frames resized, centre-cropped and normalised with the settings of
`video_preprocessor_config.json` (else `preprocessor_config.json`) by
transformers' PIL CLIP image processor (the same steps, with PIL's
resampling), and the prompt's one `<video>` token expanded to the video's
feature count, which is counted here from the model's config (the
processor's own count assumes a pooling stride of 2). Images go through
transformers' LlavaNextProcessor made of the checkpoint's image processor
(`preprocessor_config.json`, its PIL version) and tokenizer, whose image
path is LlavaNextVideoProcessor's (tiles, and `<image>` expanded to the
image's feature count).

A prompt's placeholder may be written either way: the image (or video)
goes where the prompt's `<image>` or `<video>` is, else before the text; so
one prompt serves both kinds (validation pairs each with every prompt).

Language models: LLaMA-architecture (Vicuna, Nous-Hermes-2-Yi) and Mistral,
through their families' conversion."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import BadInput, NotAvailable
from .base import Family, register_family
from .llava import Llava, _visual_class as _llava_visual_class
from .llava_next import LlavaNext

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
        """tiles or frames [B, 3, S, S] -> [B, patches + pooled patches, LLM
        hidden]: LLaVA's tower, then the projector over the patch features
        (an image's tile) followed by the pooled ones (a video's frame)."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.vision_resampler = LlavaNextVideoPooler(cfg)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hs = self.states(pixel_values)[:, 1:]  # CLS dropped
            # the projector works on each row alone: one call for both paths' rows
            return self.multi_modal_projector(torch.cat([hs, self.vision_resampler(hs)], dim=1))

    return LlavaNextVideoVisual


def is_video(item) -> bool:
    """A video is an array of frames [T, H, W, 3] (enginefarm.videos); an image is a PIL image."""
    return getattr(item, "ndim", None) == 4


@register_family("llava-next-video")
class LlavaNextVideo(LlavaNext):
    title = ("LLaVA-NeXT-Video: videos (sampled frames through CLIP + spatial pooling + projector) and images "
             "(any-resolution tiles), LLaMA or Mistral")
    model_types = ("llava_next_video",)
    visual_features = None  # from the recipe's num_frames and the checkpoint's config
    media = "video"  # what the recipe describes (num_frames, validation.videos); images are taken too
    media_kinds = ("video", "image")
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

    def tile_features(self, config: dict) -> int:
        """Features per image tile: the patch grid, CLS dropped."""
        self._check_strategy(config)
        return Llava.features(self, config)

    def frame_features(self, config: dict) -> int:
        """Pooled features per frame: the patch grid (CLS dropped) pooled by the stride."""
        side = math.isqrt(self.tile_features(config))
        _, stride = self._pooling(config)
        if side < stride:
            raise BadInput(f"family {self.name}: a {side} x {side} patch grid is smaller than "
                           f"spatial_pool_stride {stride}")
        return (side // stride) ** 2  # floor: pooling without padding

    def encoder_features(self, config: dict) -> int:
        """The visual engine's rows per input: a tile's patch features, then a frame's pooled ones."""
        return self.tile_features(config) + self.frame_features(config)

    def video_features(self, config: dict) -> int:
        return self.num_frames(config) * self.frame_features(config)

    def features_by_kind(self, config: dict) -> dict[str, int]:
        return {"video": self.video_features(config), "image": self.image_features_at_most(config)}

    def features(self, config: dict) -> int:
        """The larger of a video's features and an image's at most: what the limits must hold."""
        return max(self.features_by_kind(config).values())

    def encoder_inputs_per_image(self, config: dict) -> int:
        return max(self.num_frames(config), LlavaNext.encoder_inputs_per_image(self, config))

    def image_token_id(self, config: dict) -> Optional[int]:
        return self._token_id(config, "image")

    def video_token_id(self, config: dict) -> int:
        return self._token_id(config, "video")

    def _token_id(self, config: dict, kind: str) -> int:
        for k in (f"{kind}_token_index", f"{kind}_token_id"):
            if config.get(k) is not None:
                return int(config[k])
        return int(getattr(self.full_config(config), f"{kind}_token_index"))

    def visual_meta(self, config: dict) -> dict:
        mode, stride = self._pooling(config)
        return {**super().visual_meta(config), "num_frames": self.num_frames(config), "spatial_pool_mode": mode,
                "spatial_pool_stride": stride, "takes": list(self.media_kinds),
                "features_by_kind": self.features_by_kind(config), "video_token_id": self.video_token_id(config),
                "tile_features": self.tile_features(config), "frame_features": self.frame_features(config)}

    def visual_module(self, config: dict):
        return _visual_class()(self._vision(config))

    # ----------------------------------------------------------------- at run time

    PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")

    def check_inputs(self, src_dir, where: str) -> None:
        Family.check_inputs(self, src_dir, where)  # the tokenizer; the frames' and images' settings below
        self.require_files(src_dir, where, "video processor", self.PROCESSOR_FILES)
        self.require_files(src_dir, where, "image processor", ("preprocessor_config.json",))

    def load_processor(self, src_dir, meta: dict):
        return VideoInputs.load(src_dir, meta)

    def kind_of(self, encoding) -> str:
        return "video" if "pixel_values_videos" in encoding else "image"

    def placeholder_id(self, encoding, meta: dict) -> int:
        if self.kind_of(encoding) == "video":
            return int(meta.get("video_token_id", meta["image_token_id"]))  # engines of before images: one token
        return int(meta["image_token_id"])

    def encode(self, processor, item, prompt: str, token: str) -> dict:
        kind = "video" if is_video(item) else "image"
        return processor(item, processor.placed(prompt, kind, self.prompt_text))

    def encoder_inputs(self, encoding):
        if self.kind_of(encoding) == "video":
            return encoding["pixel_values_videos"][0]  # [frames, 3, S, S]
        return encoding["pixel_values"][0]  # [tiles, 3, S, S]: the base, then the grid row by row

    def pack_features(self, outputs: list, encodings: list, meta: dict, extras: dict) -> list:
        """A video's frames: their pooled rows, frame after frame. An image's
        tiles: their patch rows, packed as LLaVA-NeXT packs them."""
        T = meta.get("tile_features")
        out = []
        for o, e in zip(outputs, encodings):
            if self.kind_of(e) == "video":
                out.append((o[:, T:] if T is not None else o).reshape(-1, o.shape[-1]))
            else:
                out += LlavaNext.pack_features(self, [o[:, :T]], [e], meta, extras)
        return out

    def reference_features(self, model, encodings):
        cfg = model.config
        out = []
        for e in encodings:
            if self.kind_of(e) == "video":
                out.append(model.get_video_features(pixel_values_videos=e["pixel_values_videos"],
                                                    vision_feature_layer=cfg.vision_feature_layer,
                                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                    return_dict=True).pooler_output[0])
            else:
                out.append(model.get_image_features(pixel_values=e["pixel_values"], image_sizes=e["image_sizes"],
                                                    return_dict=True).pooler_output[0])
        return out


class VideoInputs:
    """One video (or image) and one prompt -> what the model takes. A video:
    input_ids with the `<video>` token expanded to the video's features, an
    attention mask, and pixel_values_videos [1, frames, 3, S, S] (see the
    module's doc). An image: what transformers' LlavaNextProcessor makes of
    it (input_ids with `<image>` expanded, pixel_values [1, tiles, 3, S, S],
    image_sizes)."""

    def __init__(self, tokenizer, frames_processor, video_token: str, video_token_id: int, features_per_frame: int,
                 num_frames: int, images=None, image_token: Optional[str] = None, image_token_id: Optional[int] = None):
        self.tokenizer, self.frames_processor = tokenizer, frames_processor
        self.video_token, self.video_token_id = video_token, video_token_id
        self.features_per_frame, self.num_frames = features_per_frame, num_frames
        self.images, self.image_token, self.image_token_id = images, image_token, image_token_id

    def placeholder_token(self, kind: str) -> str:
        return self.video_token if kind == "video" else self.image_token or "<image>"

    def placed(self, prompt: str, kind: str, prompt_text) -> str:
        """The prompt with the item's own placeholder where the prompt has
        either (prompt_text: the family's, which puts it first where there is none)."""
        other = self.placeholder_token("image" if kind == "video" else "video")
        if other in prompt and self.placeholder_token(kind) not in prompt:
            prompt = prompt.replace(other, self.placeholder_token(kind))
        return prompt_text(prompt, self.placeholder_token(kind))

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
        want = meta.get("video_token_id", meta.get("image_token_id"))
        if want is not None and tid != want:
            raise BadInput(f"the tokenizer in {src} gives {token} the id {tid}, the model's config "
                           f"video_token_index is {want}")
        images = image_token = image_tid = None
        if "tile_features" in meta or not meta:  # engines of before images (no tile_features) take videos only
            images, image_token, image_tid = cls._images(src, tok, proc_cfg, meta)
        return cls(tok, frames, token, tid, meta.get("frame_features", meta.get("encoder_features")),
                   meta.get("num_frames"), images, image_token, image_tid)

    @staticmethod
    def _images(src: Path, tok, proc_cfg: dict, meta: dict):
        from transformers import AutoImageProcessor, LlavaNextProcessor

        if not (src / "preprocessor_config.json").is_file():
            raise BadInput(f"{src} has no preprocessor_config.json: the image processor's settings are not known")
        token = proc_cfg.get("image_token") or "<image>"
        tid = tok.convert_tokens_to_ids(token)
        if meta.get("image_token_id") is not None and tid != meta["image_token_id"]:
            raise BadInput(f"the tokenizer in {src} gives {token} the id {tid}, the model's config "
                           f"image_token_index is {meta['image_token_id']}")
        proc = LlavaNextProcessor(image_processor=AutoImageProcessor.from_pretrained(src), tokenizer=tok,
                                  patch_size=proc_cfg.get("patch_size"), image_token=token,
                                  vision_feature_select_strategy=proc_cfg.get("vision_feature_select_strategy"),
                                  num_additional_image_tokens=proc_cfg.get("num_additional_image_tokens", 0))
        return proc, token, tid

    def __call__(self, item, text: str) -> dict:
        if not is_video(item):
            return self.image(item, text)
        import torch

        from ..videos import sample_frames

        frames = sample_frames(item, self.num_frames)
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

    def image(self, image, text: str) -> dict:
        if self.images is None:
            raise BadInput("this LLaVA-NeXT-Video engine was built for videos only (before the family took "
                           "images); rebuild it to give it images")
        n = self.tokenizer(text).input_ids.count(self.image_token_id)
        if n != 1:
            raise BadInput(f"a prompt with {n} image placeholders ({self.image_token}); each prompt takes exactly "
                           f"one image")
        return dict(self.images(images=[image], text=[text], return_tensors="pt"))

