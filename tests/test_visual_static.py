"""The visual engine's static_batches option (runtime/export.py,
runtime/visual.py): one package per batch size, a call padded up to the
smallest that holds it, and the same features as the module and as the
one dynamic-batch package."""

from __future__ import annotations

import json

import torch

from enginefarm.runtime.export import export_visual, static_batch_sizes
from enginefarm.runtime.visual import VisualEngine


class Patches(torch.nn.Module):
    """pixels [B, 3, 8, 8] -> features [B, 4, 6]: 4x4 patches, a projection, a norm."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 6)
        self.norm = torch.nn.LayerNorm(6)

    def forward(self, x):
        B = x.shape[0]
        p = x.reshape(B, 3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(B, 4, 48)
        return self.norm(self.proj(p))


def test_static_batch_sizes():
    assert static_batch_sizes(1) == [1]
    assert static_batch_sizes(3) == [1, 2, 3]
    assert static_batch_sizes(8) == [1, 2, 4, 8]
    assert static_batch_sizes(12) == [1, 2, 4, 8, 12]


def test_static_packages_per_batch_size_give_the_modules_features(tmp_path):
    torch.manual_seed(0)
    m = Patches().eval()
    side = export_visual(m, tmp_path / "static", 3, 8, "cpu", torch.float32, {"static_batches": True})
    assert side.files == {"batch_1": "visual_b1.pt2", "batch_2": "visual_b2.pt2", "batch_3": "visual_b3.pt2",
                          "weights": "weights.safetensors"}
    assert side.file == "visual_b3.pt2" and all((tmp_path / "static" / f).exists() for f in side.files.values())
    assert json.loads((tmp_path / "static" / "engine.json").read_text())["options"]["static_batches"] is True
    dyn = export_visual(m, tmp_path / "dynamic", 3, 8, "cpu", torch.float32, {})
    assert dyn.file == "visual.pt2" and not dyn.files

    eng, one = VisualEngine.load(tmp_path / "static"), VisualEngine.load(tmp_path / "dynamic")
    assert sorted(eng.per_batch) == [1, 2, 3] and not one.per_batch
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = m(x)
    for B in (1, 2, 3):
        got = eng(x[:B])
        assert got.shape == (B, 4, 6)
        assert torch.allclose(got, want[:B], atol=1e-5), B
        assert torch.allclose(one(x[:B]), want[:B], atol=1e-5), B


def test_a_call_is_padded_to_the_next_package(tmp_path):
    """max_batch_size 5: packages 1, 2, 4, 5; three images run the batch-4
    package on three rows and a zero row, and come back as three."""
    torch.manual_seed(1)
    m = Patches().eval()
    export_visual(m, tmp_path, 5, 8, "cpu", torch.float32, {"static_batches": True})
    eng = VisualEngine.load(tmp_path)
    assert sorted(eng.per_batch) == [1, 2, 4, 5]
    x = torch.randn(3, 3, 8, 8)
    assert eng._padded(x).shape[0] == 4 and (eng._padded(x)[3] == 0).all()
    calls = []
    run4 = eng.per_batch[4]
    eng.per_batch[4] = lambda t: calls.append(t.shape[0]) or run4(t)
    with torch.no_grad():
        got, want = eng(x), m(x)
    assert calls == [4] and got.shape == (3, 4, 6) and torch.allclose(got, want, atol=1e-5)


def test_static_batches_on_an_llm_is_refused_in_one_line(tmp_path):
    import pytest
    import yaml

    from enginefarm.errors import BadInput
    from enginefarm.families import load_recipe
    from helpers import ROOT

    data = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-llama.yaml").read_text())
    data["components"] = {"llm": {"aoti": {"static_batches": True}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput, match="components.llm.aoti.static_batches: an option of visual components only"):
        load_recipe(str(path))


def test_static_packages_share_one_copy_of_the_weights(tmp_path):
    """The packages are compiled without the weights: every batch size reads
    them from weights.safetensors (changed there, every package follows)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(2)
    m = Patches().eval()
    export_visual(m, tmp_path, 4, 8, "cpu", torch.float32, {"static_batches": True})
    w = load_file(str(tmp_path / "weights.safetensors"))
    assert sorted(w) == sorted(dict(m.named_parameters()))
    w["proj.bias"] = w["proj.bias"] + 1.0
    save_file(w, str(tmp_path / "weights.safetensors"))
    with torch.no_grad():
        m.proj.bias += 1.0
    eng = VisualEngine.load(tmp_path)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = m(x)
    for B in (1, 2, 3, 4):
        assert torch.allclose(eng(x[:B]), want[:B], atol=1e-5), B
