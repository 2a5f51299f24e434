"""The tensorrt / tensorrt-rtx backend: real engines built from ONNX with
TensorRT for RTX (it builds without a GPU), their sidecars and provenance,
the timing cache in the store, and refusals for GPUs they cannot run on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from enginefarm.backends import get_backend
from enginefarm.backends.tensorrt import check_runs_here
from enginefarm.errors import BadInput, NotAvailable
from enginefarm.spec import Variant

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is part of the dev extra")


class TinyVisual(torch.nn.Module):
    """Patch embedding + a transformer layer: the shape of a ViT encoder."""

    def __init__(self, attention: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, 32, 8, 8)
        # (the traced attention reshapes bake the token count in: no dynamic image size with it)
        self.layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True) if attention else torch.nn.GELU()

    def forward(self, pixel_values):
        return self.layer(self.patch(pixel_values).flatten(2).transpose(1, 2))


def export(dest: Path, dynamic_hw: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    axes = {"pixel_values": {0: "batch", **({2: "h", 3: "w"} if dynamic_hw else {})}, "features": {0: "batch"}}
    torch.onnx.export(TinyVisual(attention=not dynamic_hw).eval(), (torch.randn(2, 3, 32, 32),), str(dest / "visual.onnx"),
                      input_names=["pixel_values"], output_names=["features"], dynamic_axes=axes, dynamo=False)
    return dest


def variant(target="sm_86", dtype="float32") -> Variant:
    return Variant(name="t", backend="tensorrt-rtx", dtype=dtype, quant="none", tp=1, target=target)


def test_rtx_builds_an_engine_with_its_provenance(tmp_path):
    src = export(tmp_path / "export")
    b = get_backend("tensorrt-rtx")
    meta = b.build("visual", src, tmp_path / "engine", variant(), {"max_batch_size": 4},
                   timing_cache_out=tmp_path / "cache")
    plan = tmp_path / "engine" / "engine.plan"
    assert plan.stat().st_size > 10_000
    side = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert side == meta
    assert side["flavour"] == "tensorrt-rtx" and side["tensorrt_version"].startswith("1.")
    assert side["compute_capabilities"] == ["sm_86"] and side["strongly_typed"] is True
    assert side["profiles"] == {"pixel_values": [[1, 3, 32, 32], [2, 3, 32, 32], [4, 3, 32, 32]]}
    ins = [x for x in side["io"] if x["kind"] == "input"]
    outs = [x for x in side["io"] if x["kind"] == "output"]
    assert ins == [{"name": "pixel_values", "kind": "input", "shape": [-1, 3, 32, 32], "dtype": "FLOAT"}]
    assert outs[0]["name"] == "features" and outs[0]["shape"] == [-1, 16, 32]
    assert side["timing_cache"].startswith("not used by tensorrt-rtx")
    assert not (tmp_path / "cache").exists()
    # the engine deserialises in the same flavour's runtime only on a GPU it targets: never here
    with pytest.raises(BadInput, match=r"engine for sm_86; this machine has no CUDA GPU"):
        b.load(tmp_path / "engine")
    with pytest.raises(BadInput, match=r"engine for sm_86; it does not run on this GPU \(sm_90\)"):
        b.load(tmp_path / "engine", gpu="sm_90")
    check_runs_here(side, gpu="sm_86")  # and accepted where it does


def test_rtx_refuses_targets_it_cannot_build_for_and_datacenter_reports_missing():
    ok, why = get_backend("tensorrt-rtx").usable("visual", "sm_90")
    assert not ok and "sm_80, sm_86, sm_89" in why and "sm_90" in why
    ok, why = get_backend("tensorrt-rtx").usable("llm", "sm_86")
    assert not ok and "tensorrt-llm" in why
    ok, why = get_backend("tensorrt").usable("visual", "sm_90")
    assert not ok and "not installed" in why and "pip install tensorrt" in why


def test_dynamic_axes_need_a_profile_from_the_export(tmp_path):
    src = export(tmp_path / "export", dynamic_hw=True)
    b = get_backend("tensorrt-rtx")
    with pytest.raises(BadInput, match="dynamic axis 2 and the export gives no profile"):
        b.build("visual", src, tmp_path / "e1", variant(), {"max_batch_size": 2})
    (src / "export.json").write_text(json.dumps({
        "onnx": "visual.onnx",
        "profiles": {"pixel_values": [[1, 3, 32, 32], [1, 3, 48, 48], [2, 3, 64, 64]]},
    }))
    meta = b.build("visual", src, tmp_path / "e2", variant(), {"max_batch_size": 2})
    assert meta["profiles"]["pixel_values"][2] == [2, 3, 64, 64]


def test_a_corrupt_onnx_is_bad_input(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "visual.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(BadInput, match="cannot parse this ONNX"):
        get_backend("tensorrt-rtx").build("visual", d, tmp_path / "e", variant(), {"max_batch_size": 1})
    (d / "second.onnx").write_bytes(b"x")
    with pytest.raises(BadInput, match="expected one .onnx export, found 2"):
        get_backend("tensorrt-rtx").build("visual", d, tmp_path / "e", variant(), {"max_batch_size": 1})


def test_timing_cache_lives_in_the_store(store):
    assert get_backend("tensorrt-rtx").timing_cache_name("sm_86") is None  # RTX times nothing at build time
    name = "timing-cache/tensorrt/10.13.0/sm_90"  # what the datacenter flavour's name looks like
    assert store.get_cache(name) is None
    store.put_cache(name, b"cache-1")
    store.put_cache(name, b"cache-2")  # the last writer wins
    assert store.get_cache(name) == b"cache-2"
    with pytest.raises(BadInput):
        store.put_cache("../escape", b"x")


def test_gc_keeps_the_timing_caches(store):
    from enginefarm.flows.gc import gc

    name = "timing-cache/tensorrt/10.13.0/sm_90"
    store.put_cache(name, b"tactics")
    orphan = store.put_blob_bytes(b"nobody points here")
    out = gc(store, keep=0)
    assert out["blobs"]["deleted"] == 1 and not store.has_blob(orphan)
    assert store.get_cache(name) == b"tactics"
