"""Decoding beyond greedy (runtime/decoding.py): the sampling filters give
the logits Hugging Face's own processors give, a seed reproduces a run, beam
search gives what Hugging Face `generate` gives with the same num_beams, on
real aoti engines of each kind, through `enginefarm run`; stop strings and
streaming; requests over the built beam width exit 2 naming the limit.

(Multimodal engines' beams: tests/test_multimodal.py and
test_multimodal_encdec.py, on the engines those files build.)
"""

from __future__ import annotations

import json

import pytest
import torch

from enginefarm.cli import main as cli
from enginefarm.errors import BadInput
from enginefarm.runtime.decoding import Decoding, TextWatch, decode, options, process
from helpers import session_builds

PROMPTS = ["The build farm", "Engines are rebuilt every night when"]


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    return session_builds(tmp_path_factory, lambda family: 9)


# ----------------------------------------------------------------------------- the filters, against HF's


@pytest.mark.parametrize("opts", [
    dict(repetition_penalty=1.3),
    dict(do_sample=True, temperature=0.7),
    dict(do_sample=True, top_k=5),
    dict(do_sample=True, top_p=0.8),
    dict(do_sample=True, temperature=1.4, top_k=12, top_p=0.9, repetition_penalty=1.2),
    dict(do_sample=True, top_p=0.01),  # keeps one token
])
def test_processed_logits_equal_hugging_faces_processors(opts):
    from transformers import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=g) * 3
    history = [[1, 5, 5, 9], [0, 39], [7]]
    d = Decoding(**opts)
    ours = process(scores, history, d)
    hf = LogitsProcessorList()
    if d.repetition_penalty != 1.0:
        hf.append(RepetitionPenaltyLogitsProcessor(d.repetition_penalty))
    if d.do_sample:  # generate's order: processors, then temperature, top-k, top-p
        if d.temperature != 1.0:
            hf.append(TemperatureLogitsWarper(d.temperature))
        if d.top_k:
            hf.append(TopKLogitsWarper(d.top_k))
        if d.top_p < 1.0:
            hf.append(TopPLogitsWarper(d.top_p))
    ids = torch.tensor([h + [h[-1]] * (4 - len(h)) for h in history])  # padded with a token already seen
    theirs = hf(ids, scores.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-6)


def test_a_seed_reproduces_a_sampled_run_and_another_seed_differs():
    V = 50
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(3))

    def step(tokens, rows):
        return table[tokens[:, 0]]

    first = table[torch.tensor([1, 2])]
    d = Decoding(do_sample=True, temperature=1.5, seed=11)
    a = decode(first, step, [[1], [2]], 20, None, d)
    assert a == decode(first, step, [[1], [2]], 20, None, d)
    assert a != decode(first, step, [[1], [2]], 20, None, Decoding(do_sample=True, temperature=1.5, seed=12))
    assert decode(first, step, [[1], [2]], 20, None) == decode(first, step, [[1], [2]], 20, None)  # greedy


def test_bad_options_and_too_many_beams_are_refused_in_one_line():
    with pytest.raises(BadInput, match="decoding option top_p"):
        options(top_p=1.5)
    with pytest.raises(BadInput, match="num_beams 3, but the engine was built for max_beam_width 2"):
        Decoding(num_beams=3).check(2)


def test_stop_strings_end_an_answer_and_streaming_never_shows_part_of_one():
    words = {1: "a", 2: " b", 3: "c", 4: " d", 5: "END", 6: " e"}

    def feed(stop):
        pieces = []
        w = TextWatch(1, lambda ids: "".join(words[i] for i in ids), stop=stop, stream=lambda r, t: pieces.append(t))
        got = []
        for t in (1, 2, 3, 4, 5, 6):
            got.append(t)
            if w(0, t):
                break
        w.flush()
        return w.text(0, got), w.ids(0, got), pieces

    assert feed(("END",)) == ("a bc d", [1, 2, 3, 4, 5], ["a", " b", "c", " d"])
    # a stop string over several tokens: its first part is held back, never streamed
    assert feed(("c d",)) == ("a b", [1, 2, 3, 4], ["a", " b"])
    # "c" might have begun "c x": held back until " d" shows it did not
    assert feed(("c x",)) == ("a bc dEND e", [1, 2, 3, 4, 5, 6], ["a", " b", "c d", "END", " e"])
    assert feed(()) == ("a bc dEND e", [1, 2, 3, 4, 5, 6], ["a", " b", "c", " d", "END", " e"])


# ----------------------------------------------------------------------------- beams on real engines


def _hf_beams(family: str, src, prompts: list[str], n: int, beams: int) -> list[list[int]]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(src)
    seq2seq = family in ("t5", "bart")
    cls = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(src, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        start = {"decoder_start_token_id": model.config.decoder_start_token_id} if seq2seq else {}
        cfg = transformers.GenerationConfig(max_new_tokens=n, num_beams=beams, do_sample=False, early_stopping=False,
                                            length_penalty=1.0, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, **start)
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0].tolist()
        new = seq[1:] if seq2seq else seq[ids.shape[1]:]  # seq2seq: after the decoder start token
        while new and new[-1] == tok.pad_token_id and tok.pad_token_id != tok.eos_token_id:
            new.pop()
        out.append(new)
    return out


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_beam_search_equals_hugging_face_generate(built, family, capsys):
    b = built(family)
    capsys.readouterr()
    run = ["run", b.name, "--store", str(b.store), "--max-new-tokens", "10", "--json"]
    assert cli(run + ["--num-beams", "2", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]) == 0
    got = [r["output_ids"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert got == _hf_beams(family, b.src, PROMPTS, 10, 2)
    assert cli(run + ["--prompt", PROMPTS[0]]) == 0
    greedy = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
    assert greedy == _hf_beams(family, b.src, PROMPTS[:1], 10, 1)[0]

    # over the built beam width (the tiny recipes: 2): exit 2, naming the limit
    assert cli(run + ["--num-beams", "3", "--prompt", PROMPTS[0]]) == 2
    assert "max_beam_width 2" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_validation_judges_beams_equal_to_hugging_face(built, family):
    """Validation of a recipe built with limits.max_beam_width 2 runs each
    prompt with 2 beams through the engine and through `generate`; the
    recorded beams are Hugging Face's own (as this test asks it), and the
    exact-output gate covers them."""
    from enginefarm.families import load_recipe

    from helpers import only_manifest

    b = built(family)
    val = only_manifest(b.store, b.name, "validate")["results"]
    m = val["metrics"]
    assert m["num_beams"] == 2 and m["beams_equal"] is True and val["gates"]["greedy_equal"]["passed"]
    prompts = load_recipe(str(b.recipe)).validation.prompts
    assert [x["prompt"] for x in m["greedy"]] == prompts and len(m["beams"]) == len(prompts)
    want = _hf_beams(family, b.src, prompts, load_recipe(str(b.recipe)).validation.max_new_tokens, 2)
    assert [x["engine"] for x in m["beams"]] == [x["reference"] for x in m["beams"]] == want


def test_a_beam_that_differs_fails_the_exact_output_gate():
    from enginefarm.evaluation import compare, judge

    def outs(beam):
        return {"prompts": [{"ids": [1, 2], "logits": torch.zeros(2, 5), "generated": [3, 4], "beams": beam}],
                "eval": []}

    same = compare(outs([3, 1]), outs([3, 1]))
    assert same["greedy_equal"] and same["beams_equal"]
    m = compare(outs([3, 1]), outs([3, 2]))
    assert m["greedy"][0]["equal"] and not m["beams_equal"] and not m["greedy_equal"]
    assert judge(m, {"greedy_equal": True})["greedy_equal"]["passed"] is False
    plain = {"prompts": [{"ids": [1, 2], "logits": torch.zeros(2, 5), "generated": [3, 4]}], "eval": []}
    assert "beams" not in compare(plain, plain) and "beams_equal" not in compare(plain, plain)


def test_sampling_through_run_is_reproducible_and_streams(built, capsys):
    b = built("llama")
    run = ["run", b.name, "--store", str(b.store), "--max-new-tokens", "12", "--prompt", PROMPTS[0]]
    sample = ["--sample", "--temperature", "1.5", "--top-k", "40", "--seed", "5"]
    capsys.readouterr()
    assert cli(run + sample + ["--json"]) == 0
    a = json.loads(capsys.readouterr().out)["results"][0]
    assert cli(run + sample + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0] == a
    assert cli(run + sample + ["--stream"]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + a["text"] + "\n"
    assert cli(run + ["--stream", "--prompt", "two"]) == 2
    assert "give one prompt" in capsys.readouterr().err


# ----------------------------------------------------------------------------- chat, through a terminal


def test_chat_through_a_terminal_as_a_person_types(built):
    """`enginefarm chat --compare hf` in a pty: a prompt, an answer from the
    engine and one from Hugging Face with their times (fp32, greedy: the
    same text), the conversation kept, /reset, /quit."""
    import os
    import pty
    import re
    import select
    import subprocess
    import sys
    import time
    from pathlib import Path

    b = built("llama")
    master, slave = pty.openpty()
    p = subprocess.Popen([str(Path(sys.executable).parent / "enginefarm"), "chat", b.name, "--store", str(b.store),
                          "--compare", "hf", "--max-new-tokens", "8"], stdin=slave, stdout=slave, stderr=slave,
                         close_fds=True)
    os.close(slave)
    seen = ""

    def until(text: str, timeout: float = 300) -> str:
        nonlocal seen
        end = time.monotonic() + timeout
        while text not in seen:
            left = end - time.monotonic()
            assert left > 0 and p.poll() is None, f"no {text!r} on the terminal; it shows: {seen[-2000:]!r}"
            if select.select([master], [], [], min(left, 1.0))[0]:
                try:
                    seen += os.read(master, 65536).decode(errors="replace")
                except OSError:  # the other end closed: chat exited
                    raise AssertionError(f"chat exited ({p.wait(5)}) before {text!r}; it showed: {seen[-3000:]!r}")
        out, seen = seen[:seen.index(text) + len(text)], seen[seen.index(text) + len(text):]
        return out

    try:
        assert "/reset forgets the conversation" in until("you> ")
        answers = []
        for msg in ("The build farm", "and then?"):
            os.write(master, msg.encode() + b"\r")
            out = until("you> ")
            got = dict(re.findall(r"^(engine|hf)> (.*?)   \(\d+\.\d\d s, \d+ tokens\)\r?$", out, re.M))
            assert set(got) == {"engine", "hf"}, out
            assert got["engine"] == got["hf"]  # fp32 engine, greedy: Hugging Face's own answer
            answers.append(got["engine"])
        os.write(master, b"/reset\r")
        assert "(conversation forgotten)" in until("you> ")
        os.write(master, b"/quit\r")
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
