"""Tensor-parallel aoti engines (issue 20) on the CPU: tp 2 and 4 engines of
one tiny recipe of each kind the farm builds (decoder-only: LLaMA;
encoder-decoder: Flan-T5; multimodal: LLaVA, whose visual engine stays one
package for every rank), built through the flow (one package set per rank,
built in rank processes; the all-reduces inside the packages, gloo),
validated against Hugging Face by the validate step with the recipe's gates,
and run from the CLI (`enginefarm run` and `enginefarm chat` start the rank
processes) with the greedy tokens of Hugging Face's `generate`, which is what
the tp 1 engines give (their own tests). The recipes are test-local copies
with tp [2, 4] in their matrix, so the shipped tiny catalog (built nightly)
keeps tp 1 only. One build per kind (both tp variants), shared by the
module's tests."""

from __future__ import annotations

import io
import json

import pytest
import torch

from enginefarm.cli import main as cli
from enginefarm.errors import BadInput
from enginefarm.testing import write_tiny
from helpers import answers, recipe_for

PROMPTS = ["The build farm", "Engines are rebuilt every night when"]
TPS = [2, 4]
KINDS = ["llama", "t5", "llava"]  # decoder-only, encoder-decoder, multimodal: the fixtures below
LLAVA_PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def _build(tmp_path_factory, tiny: str, family: str, name: str, seed: int, **fixture):
    """The tiny checkpoint `tiny` (with the fixture options `fixture`) under a
    copy of the family's tiny recipe whose matrix has tp 2 and 4, built
    through the flow into a store of its own."""
    from types import SimpleNamespace

    from enginefarm.flows.build import build

    root = tmp_path_factory.mktemp(name)
    src = write_tiny(tiny, root / "src", seed=seed, **fixture)
    cfg = json.loads((src / "config.json").read_text())
    heads = (cfg.get("text_config") or cfg).get("num_attention_heads") or cfg.get("num_heads")
    assert all(heads % tp == 0 for tp in TPS), f"tiny {tiny}: {heads} heads do not split at tp {TPS}"
    matrix = {"backend": ["aoti"], "dtype": ["float32"], "quant": ["none"], "tp": TPS, "target": ["cpu"]}
    recipe = recipe_for(root, name, family, src, matrix=matrix, default_variant=f"fp32-tp{TPS[0]}")
    store = root / "store"
    out = build(recipe=str(recipe), store=str(store))
    return SimpleNamespace(src=src, recipe=recipe, store=str(store), name=name, out=out, kind=family)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build(tmp_path_factory, "llama", "llama", "tp-llama", seed=3)  # 4 heads, 2 kv heads (replicated at tp 4)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    # the Flan-T5-like fixture (gated GELU, untied, attention width heads x 16 != d_model) with 8 heads, not its
    # default 6 (flan-t5-small's), so that it splits at tp 4 too; 8 x 16 = 128 still differs from d_model 64.
    # Seed 4: greedy continuations of the prompts that are neither </s> at once nor one token repeated
    return _build(tmp_path_factory, "flan-t5", "t5", "tp-t5", seed=4, heads=8)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return _build(tmp_path_factory, "llava", "llava", "tp-llava", seed=3)  # its LLaMA: 4 heads, 2 kv heads


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from enginefarm.images import write_image

    return write_image("rings", tmp_path_factory.mktemp("img") / "r.png", size=40)


def _hf_greedy(b, n: int, image=None) -> list[list[int]]:
    """Hugging Face's greedy new tokens for PROMPTS (LLaVA: LLAVA_PROMPT with image)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if b.kind == "llava":
        from PIL import Image

        from test_multimodal import hf_generate

        return [hf_generate("llava", b.src, Image.open(image).convert("RGB"), LLAVA_PROMPT, n)]
    tok = AutoTokenizer.from_pretrained(b.src)
    seq2seq = b.kind == "t5"
    hf = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(b.src, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, num_beams=1,
                            eos_token_id=tok.eos_token_id if seq2seq else None,
                            pad_token_id=hf.config.pad_token_id if seq2seq else tok.eos_token_id)
        out.append(g[0, 1:].tolist() if seq2seq else g[0, ids.shape[1]:].tolist())
    return out


def _cli_run(capsys, ref: str, store: str, n: int, prompts=PROMPTS, extra=()) -> list[dict]:
    capsys.readouterr()
    assert cli(["run", ref, "--store", store, "--max-new-tokens", str(n), "--json", *extra]
               + sum([["--prompt", p] for p in prompts], [])) == 0
    return json.loads(capsys.readouterr().out)["results"]


_HF: dict = {}


@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("kind", KINDS)
def test_tp_engine_builds_validates_and_runs_from_the_cli(request, kind, tp, image, capsys):
    b = request.getfixturevalue(kind)
    v = b.out["variants"][f"fp32-tp{tp}"]
    assert v["validation"] is True, v["gates"]
    assert v["gates"] and all(g["passed"] for g in v["gates"].values())
    files = set(v["files"])
    # one package set per rank, each a whole engine directory of that rank; exactly tp of them
    packages = ["encoder.pt2", "decoder.pt2"] if kind == "t5" else ["llm.pt2"]
    for r in range(tp):
        assert {f"llm/rank{r}/{p}" for p in packages + ["engine.json"]} <= files, sorted(files)
    assert not any(f.startswith((f"llm/rank{tp}/", "llm/llm.pt2", "llm/decoder.pt2")) for f in files)
    if kind == "llava":  # the visual engine: one package, replicated (its features go to every rank)
        assert "visual/visual.pt2" in files and not any(f.startswith("visual/rank") for f in files)
    if kind not in _HF:
        _HF[kind] = _hf_greedy(b, 8, image)
    if kind == "llava":
        got = _cli_run(capsys, f"{b.name}:fp32-tp{tp}", b.store, 8, prompts=[LLAVA_PROMPT], extra=["--image", str(image)])
    else:
        got = _cli_run(capsys, f"{b.name}:fp32-tp{tp}", b.store, 8)
    assert [r["output_ids"] for r in got] == _HF[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_with_a_tp4_engine_answers_as_hugging_face(request, kind, image, capsys, monkeypatch):
    """`enginefarm chat --compare hf` (its main(), the lines typed on stdin):
    two turns of one conversation (the second carries the first where it
    fits the recipe's max_input_len), each
    answered by the tp 4 engine's ranks and by the Hugging Face model, greedy
    in fp32: the same text."""
    b = request.getfixturevalue(kind)
    args = ["chat", f"{b.name}:fp32-tp4", "--store", b.store, "--compare", "hf", "--max-new-tokens", "6"]
    if kind == "llava":
        args += ["--image", str(image)]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\nand then?\n/quit\n"))
    capsys.readouterr()
    assert cli(args) == 0
    out = capsys.readouterr().out
    turns = [answers(chunk) for chunk in out.split("you> ")[1:] if chunk.strip()]
    assert len(turns) == 2, out
    for got in turns:
        assert set(got) == {"engine", "hf"} and got["engine"] == got["hf"], out
    assert any(got["engine"] for got in turns), out  # not two empty answers, equal for nothing


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
