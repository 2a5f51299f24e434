"""The fused CLIP tower swapped into LLaVA's visual modules
(runtime/clip.py's fuse_vision_tower, called by the export step): the same
features as the Hugging Face tower it replaces, for one feature layer with
the class token dropped, two layers with it kept, and NeXT-Video's pooled
frames; a module without the slot is left alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from enginefarm.families import get_family
from enginefarm.runtime.clip import ClipVisionTower, fuse_vision_tower
from enginefarm.testing import write_tiny


def _swapped_matches(family: str, src, config: dict, batch: int = 3):
    fam = get_family(family)
    hf = fam.load_visual(src, config, torch.float32)
    fused = copy.deepcopy(hf)
    assert fuse_vision_tower(fused)
    assert isinstance(fused.fast_tower, ClipVisionTower) and fused.vision_tower is None
    # only the layers up to the deepest feature layer are run
    assert len(fused.fast_tower.layers) == max(hf.layers)
    S = config["vision_config"]["image_size"]
    x = torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(x), fused(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    return want


@pytest.mark.parametrize("layers, strategy", [(-2, "default"), ([-3, -1], "full"), ([0, 2], "default")])
def test_llava_fused_tower_gives_hugging_faces_features(tmp_path, layers, strategy):
    # the projector takes the concatenated layers: the checkpoint is written with them
    src = write_tiny("llava", tmp_path / "llava", vision_layers=3, feature_layer=layers)
    config = json.loads((src / "config.json").read_text())
    config["vision_feature_select_strategy"] = strategy
    want = _swapped_matches("llava", src, config)
    patches = (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
    assert want.shape[1] == patches + (strategy == "full")


def test_llava_next_video_fused_tower_gives_the_pooled_features(tmp_path):
    src = write_tiny("llava-next-video", tmp_path / "nv")
    _swapped_matches("llava-next-video", src, json.loads((src / "config.json").read_text()), batch=2)


def test_a_module_without_the_slot_is_left_alone(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert not fuse_vision_tower(m)
    src = write_tiny("llava", tmp_path / "llava")
    hf = get_family("llava").load_visual(src, json.loads((src / "config.json").read_text()), torch.float32)
    hf.vision_tower.config.hidden_act = "silu"  # an activation the fused layer lacks
    assert not fuse_vision_tower(hf) and hf.fast_tower is None and hf.vision_tower is not None
