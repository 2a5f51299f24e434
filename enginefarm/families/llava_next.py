"""LLaVA-NeXT (llava-hf/llava-v1.6-*-hf): LLaVA with any-resolution tiling.
An image is resized to the best of the config's `image_grid_pinpoints`, cut
into tiles of the vision tower's size, and each tile and a downscaled copy
of the whole image (the base) go through CLIP + projector, as in LLaVA-1.5.
The tile grid's features are then unpadded back to the image's aspect ratio
and get an `image_newline` row at the end of every row; base first. So the
number of features depends on the image's size: the limits use the most any
pinpoint allows (base + grid rows x (grid columns + 1)).

The visual engine encodes tiles (dynamic batch: max_batch_size x the most
tiles an image takes); the packing is plain tensor work done by the runner
(`pack_features`), with image_newline stored next to the engine.

Language models: LLaMA-architecture ones (Vicuna, Nous-Hermes-2-Yi: their
text_config says "llama") through the llama family's conversion, and Mistral
through the mistral family's (the same tensors; its sliding window, where
set, goes into the checkpoint's max_attention_window_size)."""

from __future__ import annotations

from ..errors import BadInput, NotAvailable
from .llava import Llava
from .base import register_family


def best_resolution(height: int, width: int, pinpoints: list) -> tuple[int, int]:
    """The pinpoint (h, w) an image is resized into: the one that keeps the
    most of its pixels once scaled to fit, then the one that wastes least."""
    best, best_kept, best_waste = None, -1, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ph, pw), kept, waste
    return best


def unpad(grid, height: int, width: int):
    """grid [hidden, rows, cols] of a padded, resized image: the part that
    covers the image itself (the padding was split evenly on both sides)."""
    rows, cols = grid.shape[1:]
    if width / height > cols / rows:  # wider than the grid: padded above and below
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return grid[:, pad : rows - pad, :]
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return grid[:, :, pad : cols - pad]


@register_family("llava-next")
class LlavaNext(Llava):
    title = "LLaVA-NeXT (1.6): any-resolution tiles, CLIP + projector + LLaMA or Mistral"
    model_types = ("llava_next",)
    visual_features = None  # depends on the image; derived from the checkpoint's pinpoints
    reference_class = "LlavaNextForConditionalGeneration"
    llm_model_types = {"llama": "llama", "mistral": "mistral"}
    extra_tensors = {"image_newline": ("image_newline", "model.image_newline")}

    def _tiling(self, config: dict) -> tuple[list, int, int]:
        """(pinpoints [[h, w], ...], tile size, features per tile side)"""
        v = config.get("vision_config") or {}
        pins = config.get("image_grid_pinpoints")
        if not (pins and {"image_size", "patch_size"} <= set(v)):
            cfg = self._vision(config)
            pins, v = cfg.image_grid_pinpoints, cfg.vision_config.to_dict()
        tile = int(v["image_size"])
        bad = [p for p in pins if p[0] % tile or p[1] % tile]
        if bad:
            raise BadInput(f"family {self.name}: image_grid_pinpoints {bad} are not multiples of the tile size {tile}")
        return [list(map(int, p)) for p in pins], tile, tile // int(v["patch_size"])

    def _check_strategy(self, config: dict) -> None:
        strategy = config.get("vision_feature_select_strategy") or self._vision(config).vision_feature_select_strategy
        if strategy != "default":
            raise NotAvailable(f"family {self.name}: vision_feature_select_strategy {strategy!r} is not supported "
                               f"(the tile grid needs the CLS token dropped)")

    def encoder_features(self, config: dict) -> int:
        return Llava.features(self, config)

    def encoder_inputs_per_image(self, config: dict) -> int:
        pins, tile, _ = self._tiling(config)
        return 1 + max((h // tile) * (w // tile) for h, w in pins)

    def features(self, config: dict) -> int:
        return self.image_features_at_most(config)

    def image_features_at_most(self, config: dict) -> int:
        """An image's features at most: the base tile's, then the largest grid with a newline a row."""
        self._check_strategy(config)
        pins, tile, side = self._tiling(config)
        grid = max((h // tile) * side * ((w // tile) * side + 1) for h, w in pins)
        return Llava.features(self, config) + grid

    def visual_meta(self, config: dict) -> dict:
        pins, tile, side = self._tiling(config)
        return {**super().visual_meta(config), "image_grid_pinpoints": pins, "tile_size": tile, "tile_side": side}

    def visual_extras(self, src_dir, config: dict, dtype) -> dict:
        from ..tensors import TensorSource

        src = TensorSource(src_dir)
        names = src.names()
        out = {}
        for key, candidates in self.extra_tensors.items():
            found = next((c for c in candidates if c in names), None)
            if found is None:
                raise BadInput(f"family {self.name}: the checkpoint in {src_dir} has no {key} tensor")
            out[key] = src.get(found).to(dtype)
        return out

    # ----------------------------------------------------------------- at run time

    def encoder_inputs(self, encoding):
        return encoding["pixel_values"][0]  # [tiles, 3, S, S]: the base, then the grid row by row

    def pack_features(self, outputs: list, encodings: list, meta: dict, extras: dict) -> list:
        import torch

        newline = extras["image_newline"]
        tile, side, pins = meta["tile_size"], meta["tile_side"], meta["image_grid_pinpoints"]
        packed = []
        for out, enc in zip(outputs, encodings):
            hidden = out.shape[-1]
            nl = newline.to(out.dtype)
            base = out[0]
            if out.shape[0] == 1:
                packed.append(torch.cat([base, nl[None]]))
                continue
            height, width = (int(v) for v in enc["image_sizes"][0])
            ph, pw = best_resolution(height, width, pins)
            gh, gw = ph // tile, pw // tile
            if out.shape[0] != 1 + gh * gw:
                raise BadInput(f"an image of {width} x {height} takes {1 + gh * gw} tiles, the processor made {out.shape[0]}")
            grid = out[1:].reshape(gh, gw, side, side, hidden).permute(4, 0, 2, 1, 3).reshape(hidden, gh * side, gw * side)
            grid = unpad(grid, height, width)
            grid = torch.cat([grid, nl[:, None, None].expand(hidden, grid.shape[1], 1)], dim=2)
            packed.append(torch.cat([base, grid.reshape(hidden, -1).t()]))
        return packed

    def reference_features(self, model, encodings):
        out = []
        for e in encodings:
            feats = model.get_image_features(pixel_values=e["pixel_values"], image_sizes=e["image_sizes"],
                                             return_dict=True).pooler_output
            out.append(feats[0])
        return out
