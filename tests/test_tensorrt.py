"""The tensorrt / tensorrt-rtx backend: real engines built from ONNX with
TensorRT for RTX (it builds without a GPU), their sidecars and provenance,
the timing cache in the store, and refusals for GPUs they cannot run on."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from enginefarm.backends import get_backend
from enginefarm.backends.base import BuildRequest
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


def variant(target="sm_86", dtype="float32", backend="tensorrt-rtx") -> Variant:
    return Variant(name="t", backend=backend, dtype=dtype, quant="none", tp=1, target=target)


def flavour_and_target(flavour: str):
    """The backend of a flavour and the target to build for, or a skip that says why not here."""
    from enginefarm.backends.base import detect_gpu

    b = get_backend(flavour)
    if flavour == "tensorrt-rtx":
        return b, "sm_86"  # builds without a GPU
    gpu, how = detect_gpu()
    ok, why = b.usable("visual", gpu or "sm_90")
    if not ok:
        pytest.skip(f"{flavour}: {why}")
    if gpu is None:
        pytest.skip(f"{flavour} builds on the GPU it targets, and this machine has none ({how})")
    return b, gpu


@pytest.mark.parametrize("flavour", ["tensorrt-rtx", "tensorrt"])
def test_builds_an_engine_with_its_provenance(tmp_path, flavour):
    from enginefarm.backends.base import detect_gpu

    b, target = flavour_and_target(flavour)
    rtx = flavour == "tensorrt-rtx"
    src = export(tmp_path / "export")
    res = b.build(BuildRequest("visual", src, tmp_path / "engine", variant(target, backend=flavour),
                               {"max_batch_size": 4}))
    meta = res.sidecar
    plan = tmp_path / "engine" / "engine.plan"
    assert plan.stat().st_size > 10_000
    side = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert side == meta
    assert side["flavour"] == flavour and side["tensorrt_version"].startswith("1." if rtx else "1")
    assert side["compute_capabilities"] == [target] and side["strongly_typed"] is True
    assert side["profiles"] == {"pixel_values": [[1, 3, 32, 32], [2, 3, 32, 32], [4, 3, 32, 32]]}
    ins = [x for x in side["io"] if x["kind"] == "input"]
    outs = [x for x in side["io"] if x["kind"] == "output"]
    assert ins == [{"name": "pixel_values", "kind": "input", "shape": [-1, 3, 32, 32], "dtype": "FLOAT"}]
    assert outs[0]["name"] == "features" and outs[0]["shape"] == [-1, 16, 32]
    if rtx:
        assert side["timing_cache"].startswith("not used by tensorrt-rtx")
        assert res.timing_cache is None
    else:
        assert side["timing_cache"]["bytes"] > 0 and len(res.timing_cache) == side["timing_cache"]["bytes"]
    # the engine deserialises in the same flavour's runtime only on a GPU it targets
    other = "sm_90" if target != "sm_90" else "sm_86"
    with pytest.raises(BadInput, match=rf"engine for {target}; it does not run on this GPU \({other}\)"):
        b.load(tmp_path / "engine", gpu=other)
    check_runs_here(side, gpu=target)  # and accepted where it does
    here, _ = detect_gpu()
    if here != target:
        with pytest.raises(BadInput, match=rf"engine for {target}; (this machine has no CUDA GPU|it does not run on "
                                           rf"this GPU \({here}\))"):
            b.load(tmp_path / "engine")
        return
    # a GPU among its targets: run it, against PyTorch on the module the ONNX came from
    eng = b.load(tmp_path / "engine")
    x = torch.randn(3, 3, 32, 32)
    got = eng(pixel_values=x.cuda())["features"].float().cpu()
    with torch.no_grad():
        want = TinyVisual().eval()(x)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-2


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
        b.build(BuildRequest("visual", src, tmp_path / "e1", variant(), {"max_batch_size": 2})).sidecar
    (src / "export.json").write_text(json.dumps({
        "onnx": "visual.onnx",
        "profiles": {"pixel_values": [[1, 3, 32, 32], [1, 3, 48, 48], [2, 3, 64, 64]]},
    }))
    meta = b.build(BuildRequest("visual", src, tmp_path / "e2", variant(), {"max_batch_size": 2})).sidecar
    assert meta["profiles"]["pixel_values"][2] == [2, 3, 64, 64]


def test_a_corrupt_onnx_is_bad_input(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "visual.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(BadInput, match="cannot parse this ONNX"):
        get_backend("tensorrt-rtx").build(BuildRequest("visual", d, tmp_path / "e", variant(), {"max_batch_size": 1}))
    (d / "second.onnx").write_bytes(b"x")
    with pytest.raises(BadInput, match="expected one .onnx export, found 2"):
        get_backend("tensorrt-rtx").build(BuildRequest("visual", d, tmp_path / "e", variant(), {"max_batch_size": 1}))


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


# ----------------------------------------------------------------------------- component targets


def run_cli(capsys, *args) -> tuple[int, str, str]:
    from enginefarm.cli import main as cli

    capsys.readouterr()
    try:
        rc = cli([str(a) for a in args])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _recipe_file(tmp_path: Path, family: str = "blip2", **visual) -> Path:
    import yaml

    root = Path(__file__).resolve().parent.parent
    data = yaml.safe_load((root / "models" / "tiny" / f"tiny-{family}-rtx.yaml").read_text())
    data["components"]["visual"] = visual
    p = tmp_path / f"r-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_component_has_its_own_target(tmp_path):
    from enginefarm.flows.build import prepare
    from enginefarm.families import load_recipe
    from enginefarm.tasks import build as build_step
    from enginefarm.tasks.base import Ctx, StepResult

    r, (v,) = prepare(str(_recipe_file(tmp_path, backend="tensorrt-rtx", target="sm_86")))
    assert v.target == "cpu" and v.backend == "aoti" and v.name == "fp32-tp1"
    assert r.component_variant("visual", v).target == "sm_86" and r.component_variant("visual", v).name == v.name
    assert r.component_variant("llm", v) is v and r.component_backend("visual", v) == "tensorrt-rtx"
    # the build step's key and toolchain follow the component's target
    ctx = Ctx(store=None, recipe=r)
    src = StepResult("export", "0" * 64, "1" * 64, {}, cached=True)
    vis = build_step.spec(ctx, src, v, "visual", None)
    assert vis.params["variant"]["target"] == "sm_86" and vis.toolchain["gpu_arch"] == "sm_86"
    llm = build_step.spec(ctx, src.__class__("convert", "0" * 64, "1" * 64, {}, True), v, "llm", None)
    assert llm.params["variant"]["target"] == "cpu" and llm.toolchain["backend"] == "aoti"
    # without a component target the visual engine is for the variant's target (cpu): refused before anything runs
    with pytest.raises(NotAvailable, match=r"tensorrt-rtx \(visual, target cpu\): tensorrt-rtx builds engines for "
                                           r"sm_75, .*; target cpu is not one of them"):
        prepare(str(_recipe_file(tmp_path, backend="tensorrt-rtx")))
    with pytest.raises(NotAvailable, match=r"target sm_90 is not one of them"):
        prepare(str(_recipe_file(tmp_path, backend="tensorrt-rtx", target="sm_90")))
    with pytest.raises(BadInput, match=r"components\.visual\.target: a target is 'cpu' or 'sm_XY' \(got 'ampere'\)"):
        load_recipe(str(_recipe_file(tmp_path, backend="tensorrt-rtx", target="ampere")))


# ----------------------------------------------------------------------------- the tiny multimodal recipes, built


@pytest.fixture(scope="module")
def rtx(tmp_path_factory):
    """tiny-blip2-rtx, tiny-llava-rtx and tiny-nougat-rtx (catalog recipes: the visual engine by
    TensorRT for RTX for sm_86, the LLM by aoti for the CPU) built for real
    into one store by the build flow, once."""
    from enginefarm.flows.build import build

    store = tmp_path_factory.mktemp("rtx") / "store"
    out = {fam: build(recipe=f"tiny-{fam}-rtx", store=str(store)) for fam in ("blip2", "llava", "nougat")}
    return SimpleNamespace(store=str(store), out=out)


def _publish(st, recipe: str) -> dict:
    value, _ = st.get_ref(recipe, "fp32-tp1", "latest")
    return st.get_manifest_by_path(value["manifest"])


@pytest.mark.parametrize("family", ["blip2", "llava", "nougat"])
def test_rtx_visual_and_aoti_llm_in_one_variant(rtx, family):
    from enginefarm.store import open_store
    from enginefarm.tasks.base import validate_manifest

    st = open_store(rtx.store)
    recipe = f"tiny-{family}-rtx"
    summary = rtx.out[family]["variants"]["fp32-tp1"]
    assert summary["validation_status"] == "pending" and summary["validation"] is False
    m = _publish(st, recipe)
    validate_manifest(m)
    res = m["results"]
    vis, llm = res["components"]["visual"], res["components"]["llm"]
    assert (vis["backend"], vis["target"], llm["backend"], llm["target"]) == ("tensorrt-rtx", "sm_86", "aoti", "cpu")
    assert vis["engine"]["compute_capabilities"] == ["sm_86"] and vis["engine"]["flavour"] == "tensorrt-rtx"
    assert vis["toolchain"]["gpu_arch"] == "sm_86" and vis["toolchain"]["tensorrt-rtx"].startswith("1.")
    # the sidecar carries what a runner on an sm_86 GPU needs: the export's facts and the batch bound
    assert vis["engine"]["visual"]["encoder_features"] == {"blip2": 8, "llava": 16, "nougat": 12}[family]
    assert vis["engine"]["max_batch_size"] == 2 and vis["engine"]["profiles"]["pixel_values"][2][0] == 2
    assert m["files"]["visual/engine.plan"]["size"] > 100_000 and st.has_blob(m["files"]["visual/engine.plan"]["sha256"])
    assert res["toolchain"]["tensorrt_flavour"] == "tensorrt-rtx"
    # validation: the visual engine pending (no GPU here), the LLM validated on the PyTorch visual module
    val = res["validation"]
    assert val["status"] == "pending" and val["passed"] is False and val["reason"] == "no compatible GPU"
    assert val["components"]["visual"]["status"] == "pending"
    assert "tensorrt-rtx engine for sm_86" in val["components"]["visual"]["detail"]
    assert val["components"]["llm"]["status"] == "passed" and val["metrics"]["visual_stand_in"] == "pytorch"
    assert "visual_max_abs_diff" not in val["gates"] and "visual_max_abs_diff" not in val["metrics"]
    assert val["gates"]["greedy_equal"]["passed"] and val["gates"]["logits_max_abs_diff"]["value"] < 1e-3
    # which components are pending is part of the validate key: a worker that can run the engine validates anew
    (vkey,) = [k for k in st.list_manifests(recipe, "validate")]
    assert st.get_manifest(*vkey)["params"]["pending"] == ["visual"]
    # latest moved, validated did not
    assert st.get_ref(recipe, "fp32-tp1", "latest") is not None
    assert st.get_ref(recipe, "fp32-tp1", "validated") is None


def test_pending_validation_in_show_ls_build_and_promote(rtx, capsys):
    rc, out, err = run_cli(capsys, "build", "tiny-blip2-rtx", "--store", rtx.store)
    assert rc == 0, err  # pending is not a failure
    assert "fp32-tp1: validation pending (no compatible GPU): visual not run here; validated not moved" in out
    assert "every step cached" in out
    rc, out, _ = run_cli(capsys, "show", "tiny-blip2-rtx", "--store", rtx.store)
    assert rc == 0 and "validation pending (no compatible GPU): visual" in out
    assert "visual     backend tensorrt-rtx for sm_86" in out and "llm        backend aoti for cpu" in out
    assert "    llm: passed" in out
    rc, out, _ = run_cli(capsys, "ls", "--store", rtx.store, "--json")
    assert {(x["recipe"], x["alias"], x["validation"], str(x["gpu_targets"])) for x in json.loads(out)} == {
        ("tiny-blip2-rtx", "latest", "pending", "{'visual': ['sm_86']}"),
        ("tiny-llava-rtx", "latest", "pending", "{'visual': ['sm_86']}"),
        ("tiny-nougat-rtx", "latest", "pending", "{'visual': ['sm_86']}")}
    rc, _, err = run_cli(capsys, "promote", "tiny-blip2-rtx", "prod", "--store", rtx.store)
    assert rc == 1 and "validation is pending (no compatible GPU): visual" in err
    rc, _, err = run_cli(capsys, "promote", "tiny-blip2-rtx", "validated", "--store", rtx.store)
    assert rc == 2 and "pending" in err


def test_publish_never_moves_validated_while_pending(store):
    from enginefarm.hashing import digest_json
    from enginefarm.tasks.base import StepResult
    from enginefarm.tasks.publish import move_aliases

    for status, moved in (("pending", False), ("passed", True)):
        m = {"results": {"validation": {"passed": True, "status": status}}}  # passed=True: only status stops it
        res = StepResult("publish", "a" * 64 if moved else "b" * 64, digest_json(m), m, cached=False)
        move_aliases(store, "r", "v", res)
        assert (store.get_ref("r", "v", "validated") is not None) is moved
    with pytest.raises(Exception, match="components|reason"):  # the schema: a pending record says why and which
        from enginefarm.tasks.base import validate_manifest

        bad = _schema_publish()
        bad["results"]["validation"] = {"passed": False, "status": "pending", "gates": {}, "metrics": {}}
        validate_manifest(bad)


def _schema_publish() -> dict:
    sha = "0" * 64
    return {
        "schema": "enginefarm.manifest/2", "recipe": "r", "recipe_digest": sha, "step": "publish", "key": sha,
        "variant": "v", "params": {}, "inputs": {s: {"step": s, "key": sha, "digest": sha} for s in
                                                  ("fetch", "convert", "validate")},
        "code_version": "x", "toolchain": {}, "files": {"llm/a": {"sha256": sha, "size": 1}},
        "results": {"recipe": {"name": "r", "digest": sha}, "source": {"kind": "tiny", "repo": None, "commit": None},
                    "source_files": {}, "variant": {"name": "v", "backend": "aoti", "dtype": "float32", "quant": "none",
                                                    "tp": 1, "target": "cpu", "components": ["llm"]},
                    "components": {}, "toolchain": {k: None for k in ("torch", "transformers", "tensorrt_flavour",
                                                                      "tensorrt", "tensorrt_llm", "cuda")} | {"python": "3"},
                    "farm": {"version": "0", "commit": None, "code_versions": {}},
                    "build_host": {"host": "h", "platform": "p", "step_hosts": {}}, "timings": {}},
        "created_at": "2026-01-01T00:00:00Z", "host": "h", "user": "u", "duration_s": 0,
    }


# ----------------------------------------------------------------------------- pull --gpu


def test_pull_refuses_a_gpu_the_engine_cannot_run_on(rtx, tmp_path, capsys):
    d = tmp_path / "engines"
    rc, out, err = run_cli(capsys, "pull", "tiny-blip2-rtx", "--gpu", "sm_90", "--dest", d, "--store", rtx.store)
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "sm_86" in lines[0] and "sm_90" in lines[0] and "visual is a tensorrt-rtx engine for sm_86" in lines[0]
    assert not d.exists() and not list(tmp_path.glob(".engines*"))
    rc, out, _ = run_cli(capsys, "pull", "tiny-blip2-rtx", "--gpu", "sm_90", "--dest", d, "--store", rtx.store,
                         "--json")
    got = json.loads(out)
    assert rc == 2 and got["ok"] is False and got["exit_code"] == 2 and "sm_86" in got["error"]
    # where it runs, it is pulled; the pulled engine refuses any other GPU when loaded
    rc, out, _ = run_cli(capsys, "pull", "tiny-blip2-rtx", "--gpu", "sm_86", "--dest", d, "--store", rtx.store,
                         "--json")
    got = json.loads(out)
    assert rc == 0 and got["gpu"] == {"gpu": "sm_86", "source": "--gpu", "targets": {"visual": ["sm_86"]},
                                      "checked": True}
    assert got["validation_status"] == "pending" and (d / "visual" / "engine.plan").is_file()
    with pytest.raises(BadInput, match=r"engine for sm_86; it does not run on this GPU \(sm_89\)"):
        get_backend("tensorrt-rtx").load(d / "visual", gpu="sm_89")


def _pull_here(rtx, dest: Path, smi: str | None, tmp_path: Path):
    """`enginefarm pull` in a fresh process (no torch loaded: the GPU comes
    from nvidia-smi), with `smi` as what nvidia-smi prints (None: no
    nvidia-smi on PATH). A stand-in for a GPU this machine does not have."""
    import os
    import subprocess
    import sys

    bindir = tmp_path / f"bin-{smi}"
    bindir.mkdir()
    if smi is not None:
        (bindir / "nvidia-smi").write_text(f"#!/bin/sh\necho {smi}\n")
        (bindir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "enginefarm.cli", "pull", "tiny-llava-rtx", "--dest", str(dest),
                           "--store", rtx.store, "--json"], capture_output=True, text=True, env=env, timeout=300)


def test_pull_checks_the_gpu_it_finds_and_says_when_it_finds_none(rtx, tmp_path):
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the no-GPU case cannot be shown here")
    d = tmp_path / "here"
    p = _pull_here(rtx, d, "9.0", tmp_path)  # an H100
    got = json.loads(p.stdout)
    assert p.returncode == 2 and got["ok"] is False, p.stderr
    assert "this machine's GPU (sm_90, from nvidia-smi)" in got["error"] and "engine for sm_86" in got["error"]
    assert not d.exists()
    p = _pull_here(rtx, d, None, tmp_path)  # no GPU at all: not refused, and the answer says so
    got = json.loads(p.stdout)
    assert p.returncode == 0 and got["ok"] and got["gpu"]["gpu"] is None and got["gpu"]["checked"] is False
    assert "no GPU detected here" in got["gpu"]["note"] and (d / "visual" / "engine.plan").is_file()
    p = _pull_here(rtx, tmp_path / "ampere", "8.6", tmp_path)  # an RTX 3090 / A10
    got = json.loads(p.stdout)
    assert p.returncode == 0 and got["gpu"] == {"gpu": "sm_86", "source": "nvidia-smi",
                                                "targets": {"visual": ["sm_86"]}, "checked": True}


def test_run_refuses_the_visual_engine_here_naming_its_gpu(rtx, tmp_path, capsys):
    from enginefarm.images import write_image

    img = tmp_path / "rings.png"
    write_image("rings", str(img))
    rc, out, err = run_cli(capsys, "run", "tiny-llava-rtx", "--image", img, "--prompt", "USER: <image>\nWhat? ASSISTANT:",
                           "--store", rtx.store)
    assert rc == 2 and "Traceback" not in err, err
    assert "tensorrt-rtx engine for sm_86; this machine has no CUDA GPU" in err
