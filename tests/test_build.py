"""The build flow end to end on Prefect's ephemeral API: real conversion,
real AOTInductor engines, real validation, against the local store and the
S3 test server."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from enginefarm.cli import main as cli
from enginefarm.flows.build import build
from enginefarm.store import open_store
from enginefarm.testing import write_tiny
from helpers import SPY as _SPY
from helpers import recipe_for


def test_build_validates_and_second_build_is_all_cached_reading_no_weights(tmp_path, capsys):
    src = write_tiny("opt", tmp_path / "src", seed=3)
    store_dir = tmp_path / "store"
    recipe = recipe_for(tmp_path, "cache-opt", "opt", src)

    first = build(recipe=str(recipe), store=str(store_dir))
    v = first["variants"]["fp32-tp1"]
    assert set(v["steps"].values()) == {"built"} and not first["all_cached"]
    assert v["validation"] is True
    assert all(g["passed"] for g in v["gates"].values())
    st = open_store(str(store_dir))
    assert st.get_ref("cache-opt", "fp32-tp1", "latest")[0]["digest"] == v["digest"]
    assert st.get_ref("cache-opt", "fp32-tp1", "validated")[0]["digest"] == v["digest"]
    assert "llm/llm.pt2" in v["files"]

    # make every weight unreadable in content (same size and mtime, so the
    # stat-based fetch key is unchanged): the source, and every store blob.
    weights = src / "model.safetensors"
    st_ = weights.stat()
    weights.write_bytes(b"\0" * st_.st_size)
    os.utime(weights, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    for blob in (store_dir / "blobs").rglob("*"):
        if blob.is_file():
            os.chmod(blob, 0o644)
            blob.write_bytes(b"\0" * blob.stat().st_size)

    _SPY.roots = [str(src.resolve()), str((store_dir / "blobs").resolve())]
    _SPY.hits.clear()
    _SPY.on = True
    try:
        second = build(recipe=str(recipe), store=str(store_dir))  # a real (cached) flow run
        assert cli(["build", str(recipe), "--store", str(store_dir), "--json"]) == 0  # answered from the store
    finally:
        _SPY.on = False
    third = json.loads(capsys.readouterr().out)
    assert third["all_cached"] and third["flow_run"] is None and third["variants"]["fp32-tp1"]["digest"] == v["digest"]
    assert second["all_cached"] and second["flow_run"]
    assert set(second["variants"]["fp32-tp1"]["steps"].values()) == {"cached"}
    assert second["variants"]["fp32-tp1"]["digest"] == v["digest"]
    assert _SPY.hits == [], f"a cached build opened {_SPY.hits}"


def test_llama_on_s3_store_then_cli_show_ls_run(tmp_path, s3_store_uri, capsys):
    src = write_tiny("llama", tmp_path / "src", seed=5)
    recipe = recipe_for(tmp_path, "s3-llama", "llama", src)
    out = build(recipe=str(recipe), store=s3_store_uri)
    v = out["variants"]["fp32-tp1"]
    assert v["validation"] is True
    st = open_store(s3_store_uri)
    ref, _ = st.get_ref("s3-llama", "fp32-tp1", "validated")
    assert ref["digest"] == v["digest"]

    capsys.readouterr()
    assert cli(["ls", "--store", s3_store_uri, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["variant"], r["alias"]) for r in rows} == {("fp32-tp1", "latest"), ("fp32-tp1", "validated")}
    assert cli(["show", "s3-llama:fp32-tp1@validated", "--store", s3_store_uri, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["results"]["validation"]["passed"] is True
    assert shown["ref"]["digest"] == v["digest"]

    # run: engine from the store, greedy tokens equal Hugging Face generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    prompts = ["The night shift", "Every file that leaves"]
    assert cli(["run", "s3-llama:fp32-tp1", "--store", s3_store_uri, "--max-new-tokens", "10", "--json"]
               + sum([["--prompt", p] for p in prompts], [])) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    for p, r in zip(prompts, got):
        ids = tok(p, return_tensors="pt").input_ids
        ref_ids = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert r["output_ids"] == ref_ids

    # over the built limits: a clear message and exit 2
    long_prompt = " ".join(["engine"] * 200)
    assert cli(["run", "s3-llama:fp32-tp1", "--store", s3_store_uri, "--prompt", long_prompt]) == 2
    assert "max_input_len 32" in capsys.readouterr().err
    assert cli(["run", "s3-llama:fp32-tp1", "--store", s3_store_uri] + ["--prompt", "a b"] * 3) == 2
    assert "max_batch_size 2" in capsys.readouterr().err


def test_tp_that_does_not_divide_heads_exits_2_before_convert(tmp_path, capsys):
    src = write_tiny("llama-tied", tmp_path / "src")  # 6 heads, 3 kv heads
    recipe = recipe_for(tmp_path, "bad-tp", "llama", src,
                        matrix={"backend": ["tensorrt-llm"], "dtype": ["float16"], "tp": [4], "target": ["cpu"]}, default_variant=None)
    store_dir = tmp_path / "store"
    # tensorrt-llm is not installed here: reported before anything runs
    assert cli(["build", str(recipe), "--store", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert "tensorrt-llm is not installed" in err and "Traceback" not in err

    recipe = recipe_for(tmp_path, "bad-tp", "llama", src,
                        matrix={"backend": ["aoti"], "dtype": ["float32"], "tp": [4], "target": ["cpu"]}, default_variant=None)
    assert cli(["build", str(recipe), "--store", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert "tp size 4 does not divide the model's 6 attention heads" in err
    assert "Traceback" not in err
    st = open_store(str(store_dir))
    steps = {s for _, s, _ in st.list_manifests("bad-tp")}
    assert steps == {"fetch"}, steps  # fetched, checked, nothing converted


def test_malformed_recipe_exits_2_with_one_message(tmp_path, capsys):
    p = tmp_path / "broken.yaml"
    p.write_text("name: broken\nfamily: opt\nsource: {tiny: opt}\nlimits:\n  max_batch_size: -1\n  max_input_len: 64\n  max_seq_len: 32\n")
    assert cli(["build", str(p), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "limits.max_batch_size" in err and "Traceback" not in err
    p.write_text("name: broken\nfamily: opt\n  source: [\n")
    assert cli(["build", str(p)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_unimplemented_family_exits_2(tmp_path, capsys, monkeypatch):
    from enginefarm import families

    monkeypatch.setitem(families._PLANNED, "whisper", families._planned(
        "whisper", "Whisper speech recognition", ("whisper",), "encoder-decoder", missing="its audio encoder"))
    p = tmp_path / "b.yaml"
    p.write_text("name: b\nfamily: whisper\nsource: {tiny: opt}\n")
    assert cli(["build", str(p), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "family 'whisper'" in err and "not implemented yet: its audio encoder" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_recipe_new_for_an_unseen_checkpoint_builds_as_printed(tmp_path, capsys):
    # a checkpoint the tiny recipes do not use: other seed, sizes, GQA, tied embeddings
    import subprocess

    src = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "enginefarm.testing.tiny", "llama", str(src), "--seed", "11",
                    "--layers", "3", "--hidden", "96", "--heads", "6", "--kv-heads", "2"], check=True,
                   capture_output=True)
    assert cli(["recipe", "new", "other-llama", "--source", str(src)]) == 0
    text = capsys.readouterr().out
    assert "family: llama" in text
    p = tmp_path / "other-llama.yaml"
    p.write_text(text)
    store = str(tmp_path / "store")
    assert cli(["plan", str(p), "--store", store, "--json"]) == 0
    assert {r["status"] for r in json.loads(capsys.readouterr().out)} == {"will run"}
    assert cli(["build", str(p), "--store", store, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["variants"]["fp32-tp1"]["validation"] is True
    assert cli(["plan", str(p), "--store", store, "--json"]) == 0
    assert {r["status"] for r in json.loads(capsys.readouterr().out)} == {"cached"}
