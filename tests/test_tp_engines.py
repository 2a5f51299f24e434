"""Tensor-parallel aoti engines (issue 20) on the CPU: tp 2 and 4 builds of
tiny recipes through the flow (one package set per rank, built in rank
processes; the all-reduces inside the packages, gloo), validated against
Hugging Face by the validate step with the recipe's gates, and run from the
CLI (`enginefarm run` starts the rank processes) with the greedy text of
Hugging Face's `generate`, which is what the tp 1 engines give (their own
tests). The recipes are test-local copies with the tp sizes in their matrix,
so the shipped tiny catalog (built nightly) keeps tp 1 only. One build per
family, shared by its tests."""

from __future__ import annotations

import json

import pytest
import torch

from enginefarm.cli import main as cli
from enginefarm.errors import BadInput
from enginefarm.testing import write_tiny
from helpers import recipe_for

PROMPTS = ["The build farm", "Engines are rebuilt every night when"]


def _build(tmp_path_factory, family: str, name: str, tps: list[int], seed: int):
    from types import SimpleNamespace

    from enginefarm.flows.build import build

    root = tmp_path_factory.mktemp(name)
    src = write_tiny(family if family != "t5" else "flan-t5", root / "src", seed=seed)
    matrix = {"backend": ["aoti"], "dtype": ["float32"], "quant": ["none"], "tp": tps, "target": ["cpu"]}
    recipe = recipe_for(root, name, family, src, matrix=matrix, default_variant=f"fp32-tp{tps[0]}")
    store = root / "store"
    out = build(recipe=str(recipe), store=str(store))
    return SimpleNamespace(src=src, recipe=recipe, store=str(store), name=name, out=out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build(tmp_path_factory, "llama", "tp-llama", [2, 4], seed=3)


def _hf_greedy_causal(src, prompts, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                            num_beams=1, eos_token_id=None, pad_token_id=tok.eos_token_id)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


def _cli_run(capsys, ref: str, store: str, n: int, prompts=PROMPTS, extra=()) -> list[dict]:
    capsys.readouterr()
    assert cli(["run", ref, "--store", store, "--max-new-tokens", str(n), "--json", *extra]
               + sum([["--prompt", p] for p in prompts], [])) == 0
    return json.loads(capsys.readouterr().out)["results"]


@pytest.mark.parametrize("tp", [2, 4])
def test_decoder_only_tp_engine_builds_validates_and_runs(llama, capsys, tp):
    v = llama.out["variants"][f"fp32-tp{tp}"]
    assert v["validation"] is True, v["gates"]
    assert all(g["passed"] for g in v["gates"].values())
    files = set(v["files"])
    for r in range(tp):  # one package per rank, each a whole engine directory of that rank
        assert {f"llm/rank{r}/llm.pt2", f"llm/rank{r}/engine.json"} <= files
    assert "llm/llm.pt2" not in files
    got = _cli_run(capsys, f"{llama.name}:fp32-tp{tp}", llama.store, 8)
    want = _hf_greedy_causal(llama.src, PROMPTS, 8)
    assert [r["output_ids"] for r in got] == want


def test_tp_engine_limits_and_rank_directories(llama, capsys, tmp_path):
    # a request past the limits is refused by the ranks, one message, exit 2
    assert cli(["run", f"{llama.name}:fp32-tp2", "--store", llama.store, "--prompt", "a",
                "--max-new-tokens", "100"]) == 2
    assert "max_seq_len 64" in capsys.readouterr().err
    # a rank directory alone is not an engine this process can run
    dest = tmp_path / "pulled"
    assert cli(["pull", f"{llama.name}:fp32-tp2", "--store", llama.store, "--dest", str(dest)]) == 0
    from enginefarm.runtime.engine import load_engine

    rank1 = next(dest.rglob("rank1/engine.json")).parent
    with pytest.raises(BadInput, match="rank 1 of a tp 2 engine"):
        load_engine(rank1)
    # Triton's layout is refused, naming what it would need
    capsys.readouterr()
    assert cli(["pull", f"{llama.name}:fp32-tp2", "--store", llama.store, "--dest", str(tmp_path / "t"),
                "--layout", "triton"]) == 2
    assert "no Triton layout" in capsys.readouterr().err


def test_bench_and_streaming_drive_the_ranks(llama, capsys):
    # bench: the sweep through the rank processes, recorded like a tp 1 one
    assert cli(["bench", f"{llama.name}:fp32-tp2", "--store", llama.store, "--batch", "1,2", "--input-len", "4",
                "--output-len", "3", "--warmup", "1", "--iters", "1", "--no-eager", "--json", "--no-record"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {(r["batch"], r["input_len"]) for r in rep["rows"]} == {(1, 4), (2, 4)}
    assert all(r["engine"]["decode_ms_per_token"] > 0 for r in rep["rows"])
    # streaming and a stop string: the callback stays in this process, every rank gets its verdicts
    want = _cli_run(capsys, f"{llama.name}:fp32-tp2", llama.store, 8, prompts=PROMPTS[:1])[0]
    capsys.readouterr()
    assert cli(["run", f"{llama.name}:fp32-tp2", "--store", llama.store, "--max-new-tokens", "8", "--stream",
                "--prompt", PROMPTS[0]]) == 0
    assert want["text"] in capsys.readouterr().out
    stop = want["text"][len(want["text"]) // 2:][:3]
    if stop.strip():
        got = _cli_run(capsys, f"{llama.name}:fp32-tp2", llama.store, 8, prompts=PROMPTS[:1], extra=["--stop", stop])
        assert stop not in got[0]["text"] and want["text"].startswith(got[0]["text"])


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return _build(tmp_path_factory, "t5", "tp-t5", [2], seed=5)


def test_encoder_decoder_tp2_engine_builds_validates_and_runs(t5, capsys):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    v = t5.out["variants"]["fp32-tp2"]
    assert v["validation"] is True, v["gates"]
    assert {"llm/rank0/encoder.pt2", "llm/rank1/decoder.pt2"} <= set(v["files"])
    got = _cli_run(capsys, f"{t5.name}:fp32-tp2", t5.store, 10)
    tok = AutoTokenizer.from_pretrained(t5.src)
    hf = AutoModelForSeq2SeqLM.from_pretrained(t5.src, dtype=torch.float32).eval()
    for p, r in zip(PROMPTS, got):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               num_beams=1, eos_token_id=tok.eos_token_id, pad_token_id=hf.config.pad_token_id)
        assert r["output_ids"] == want[0, 1:].tolist()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return _build(tmp_path_factory, "llava", "tp-llava", [2], seed=3)


def test_multimodal_tp2_engine_builds_validates_and_runs(llava, capsys, tmp_path):
    from PIL import Image

    from enginefarm.images import write_image
    from test_multimodal import hf_generate

    v = llava.out["variants"]["fp32-tp2"]
    assert v["validation"] is True, v["gates"]
    files = set(v["files"])
    assert {"llm/rank0/llm.pt2", "llm/rank1/llm.pt2", "visual/visual.pt2"} <= files  # the visual engine: one, replicated
    img = write_image("rings", tmp_path / "r.png", size=40)
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    got = _cli_run(capsys, f"{llava.name}:fp32-tp2", llava.store, 8, prompts=[prompt], extra=["--image", str(img)])
    assert got[0]["output_ids"] == hf_generate("llava", llava.src, Image.open(img).convert("RGB"), prompt, 8)
