"""Multimodal pipelines (BLIP-2 with OPT, LLaVA and LLaVA-NeXT with LLaMA) end to end on
Prefect's ephemeral API: fetch, convert, the visual export (ONNX checked with
ONNX Runtime), real AOTInductor engines for both components, validation
against Hugging Face `generate`, publish, and `enginefarm run` with images.

Each tiny recipe is built once per session (an aoti compile costs tens of
seconds here); the checkpoints the tests did not otherwise generate build
their visual engine with onnxruntime, so they cost one compile each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from enginefarm.cli import main as cli
from enginefarm.errors import BadInput, NotAvailable
from enginefarm.families import get_family
from enginefarm.images import builtin_image, write_image
from enginefarm.spec import Variant
from enginefarm.store import open_store
from enginefarm.testing import write_tiny
from helpers import build_bf16_beside, count_loads, only_manifest, recipe_for, session_builds, stored_fetch

ROOT = Path(__file__).resolve().parent.parent
V32 = Variant(name="x", backend="aoti", dtype="float32", quant="none", tp=1, target="cpu")
PROMPTS = {  # what a person would type for each model
    "blip2": ["Question: what is in the picture? Answer:", "a photo of"],
    "llava": ["USER: <image>\nWhat is shown here? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"],
}
PROMPTS["llava-next"] = PROMPTS["llava"]
FEATURES = {"blip2": 8, "llava": 16, "llava-next": 88}  # per image (llava-next: at most)
ENCODER_BATCH = {"blip2": 2, "llava": 2, "llava-next": 10}  # images, or tiles: 2 images x (1 + 2 x 2)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """family -> the tiny recipe built once into its own store."""
    return session_builds(tmp_path_factory, lambda family: 3)


manifest = only_manifest


def hf_generate(family: str, src: Path, image, prompt: str, n: int, num_beams: int = 1) -> list[int]:
    """Hugging Face's own answer, from its processor and model classes."""
    import transformers

    proc = transformers.AutoProcessor.from_pretrained(src)
    cls = {"blip2": transformers.Blip2ForConditionalGeneration, "llava": transformers.LlavaForConditionalGeneration,
           "llava-next": transformers.LlavaNextForConditionalGeneration}
    model = cls[family].from_pretrained(src, dtype=torch.float32).eval()
    enc = proc(images=[image], text=[prompt], return_tensors="pt")
    tok = proc.tokenizer
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, num_beams=num_beams, early_stopping=False,
                             length_penalty=1.0)
    return out[0, enc["input_ids"].shape[1]:].tolist()


# ----------------------------------------------------------------------------- the tiny recipes, built once


@pytest.mark.parametrize("family", ["blip2", "llava", "llava-next"])
def test_build_exports_checks_and_validates_against_hf(built, family):
    b = built(family)
    v = b.variant
    assert v["validation"] is True, v["gates"]
    assert {"fetch", "convert", "export", "build.visual", "build.llm", "validate", "publish"} == set(v["steps"])
    assert {"visual/visual.pt2", "visual/engine.json", "llm/llm.pt2", "llm/engine.json"} <= set(v["files"])

    # the export: ONNX with a batch axis, checked by ONNX Runtime at batch 1 and max_batch_size
    ex = manifest(b.store, b.name, "export")
    r = ex["results"]
    assert r["features"] == FEATURES[family] and r["hidden_size"] == 64 and r["image_size"] == 32
    assert set(r["ort_max_abs_diff_by_batch"]) == {"1", str(ENCODER_BATCH[family])} and r["ort_max_abs_diff"] < 1e-4
    assert {"visual.onnx", "visual.onnx.data", "visual.ep.pt2", "visual.json"} <= set(ex["files"])

    # independently of the export's own check: ONNX Runtime on the stored file,
    # fed the processor's output for a real image, against Hugging Face's
    # get_image_features
    import onnx
    import onnxruntime as ort
    from transformers import AutoProcessor

    st = open_store(str(b.store))
    d = b.root / "export-files"
    for rel, f in ex["files"].items():
        st.get_blob_file(f["sha256"], d / rel, size=f["size"])
    m = onnx.load(str(d / "visual.onnx"), load_external_data=False)
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    fam = get_family(family)
    hf = fam.reference_model(b.src)
    proc = AutoProcessor.from_pretrained(b.src)
    enc = proc(images=[builtin_image("rings", 80, 50)], text=[PROMPTS[family][0]], return_tensors="pt")
    x = fam.encoder_inputs(enc)
    got = ort.InferenceSession(str(d / "visual.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})[0]
    extras = {}
    if r.get("extras"):
        from safetensors.torch import load_file

        extras = load_file(str(d / r["extras"]))
    got = fam.pack_features([torch.from_numpy(got)], [enc], r, extras)[0]
    with torch.no_grad():
        want = fam.reference_features(hf, [enc])[0]
    assert got.shape == want.shape and got.shape[1] == 64
    assert float((got - want).abs().max()) < 1e-4

    # validation: engines against HF generate, one pair at a time and batched
    val = manifest(b.store, b.name, "validate")["results"]["metrics"]
    assert val["greedy_equal"] and val["greedy_batched_equal"]
    assert val["greedy_equal_to_near_tie"] and all(g["first_divergence"] is None for g in val["greedy"])
    # beams (the tiny recipes' limits.max_beam_width 2): each pair's beam-search tokens, as `generate` gives them
    assert val["num_beams"] == 2 and val["beams_equal"] and len(val["beams"]) == len(val["greedy"])
    from enginefarm.images import load_image
    from enginefarm.families import load_recipe

    first = val["beams"][0]
    n = load_recipe(str(b.recipe)).validation.max_new_tokens
    assert first["engine"] == hf_generate(family, b.src, load_image(first["image"]), first["prompt"], n, num_beams=2)
    assert val["visual_max_abs_diff"] < 1e-4 and val["logits_max_abs_diff"] < 1e-3
    assert val["visual_features"] == FEATURES[family]
    if family == "llava-next":  # three aspect ratios: three different counts, each as Hugging Face's
        assert len(set(val["visual_features_by_image"])) == 3 and max(val["visual_features_by_image"]) <= 88
    assert len(val["greedy"]) == 3  # three images, two prompts, paired in turn
    for g in val["greedy"]:
        assert g["engine"] == g["reference"] == g["batched"] and len(g["engine"]) == 10
    # the image matters: different images, different answers
    assert len({tuple(g["engine"]) for g in val["greedy"]}) > 1
    # the manifest of the release carries the visual engine's facts
    pub = manifest(b.store, b.name, "publish")["results"]["components"]
    assert pub["visual"]["engine"]["visual"]["features"] == FEATURES[family]
    assert pub["llm"]["engine"]["prompt_table"] == {"max_rows": 2 * FEATURES[family], "hidden_size": 64}


@pytest.mark.parametrize("family", ["blip2", "llava", "llava-next"])
def test_run_with_images_equals_hf_generate(built, family, tmp_path, capsys):
    b = built(family)
    a = write_image("checker", tmp_path / "a.png", size=40)
    c = write_image("rings", tmp_path / "c.png", size=57, height=35)  # not the model's size, nor square
    prompts = PROMPTS[family]
    capsys.readouterr()
    assert cli(["run", b.name, "--store", str(b.store), "--image", str(a), "--image", str(c),
                "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_features"] == FEATURES[family]
    from PIL import Image

    for r, img, p in zip(out["results"], (a, c), prompts):
        assert r["image"] == str(img) and r["prompt"] == p
        assert r["output_ids"] == hf_generate(family, b.src, Image.open(img).convert("RGB"), p, 9)
    assert out["results"][0]["output_ids"] != out["results"][1]["output_ids"]

    # one prompt for two images
    assert cli(["run", b.name, "--store", str(b.store), "--image", str(c), "--image", str(a),
                "--prompt", prompts[1], "--max-new-tokens", "5", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)["results"]
    assert [r["image"] for r in two] == [str(c), str(a)]
    assert two[0]["output_ids"] == hf_generate(family, b.src, Image.open(c).convert("RGB"), prompts[1], 5)


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_beam_search_with_images_equals_hf_generate(built, family, tmp_path, capsys):
    """Beams through the LLM engine with a prompt table, as `generate` runs them with num_beams 2."""
    from PIL import Image

    b = built(family)
    img = write_image("checker", tmp_path / "a.png", size=40)
    capsys.readouterr()
    for p in PROMPTS[family]:
        assert cli(["run", b.name, "--store", str(b.store), "--image", str(img), "--prompt", p,
                    "--max-new-tokens", "8", "--num-beams", "2", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
        assert got == hf_generate(family, b.src, Image.open(img).convert("RGB"), p, 8, num_beams=2)


def test_requests_over_the_built_limits_exit_2_naming_the_limit(built, tmp_path, capsys):
    b = built("llava")
    img = str(write_image("gradient", tmp_path / "g.png"))
    run = ["run", b.name, "--store", str(b.store)]
    capsys.readouterr()
    assert cli(run + ["--image", img] * 3 + ["--prompt", "What is it?"]) == 2
    err = capsys.readouterr().err
    assert "3 images in one call" in err and "max_batch_size 2" in err and "max_multimodal_len 32 = 2 x 16" in err
    long_prompt = "USER: <image>\n" + " ".join(["engine"] * 60)
    assert cli(run + ["--image", img, "--prompt", long_prompt]) == 2
    assert "max_input_len 64" in capsys.readouterr().err
    assert cli(run + ["--image", img, "--prompt", "Describe it.", "--max-new-tokens", "70"]) == 2
    assert "max_seq_len 80" in capsys.readouterr().err
    assert cli(run + ["--prompt", "no image"]) == 2
    assert "is multimodal: give --image" in capsys.readouterr().err
    assert cli(run + ["--image", img, "--image", img, "--prompt", "a", "--prompt", "b", "--prompt", "c"]) == 2
    assert "one image per prompt" in capsys.readouterr().err
    assert cli(run + ["--image", str(tmp_path / "missing.png"), "--prompt", "a"]) == 2
    assert "no image file at" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert cli(run + ["--image", str(tmp_path / "bad.png"), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "Traceback" not in err


def test_bench_times_the_visual_engine_and_the_pipeline_next_to_hf(built, tmp_path, monkeypatch, capsys):
    """`enginefarm bench` of a multimodal ref: a visual row (the engine vs the
    Hugging Face vision tower + projector) and a pipeline row (image + prompt
    -> tokens vs LlavaForConditionalGeneration.generate), the engines' greedy
    tokens equal to eager's in fp32; over-limit points skipped saying why; a
    checkpoint the eager baseline cannot load from: one line, exit 2."""
    from enginefarm.store import open_store

    b = built("llava")
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENGINEFARM_CACHE", str(cache))  # the test corrupts a file of its own copy below
    bench = ["bench", f"{b.name}:fp32-tp1", "--store", str(b.store)]
    capsys.readouterr()
    assert cli(bench + ["--batch", "1", "--input-len", "8", "--output-len", "4", "--iters", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["schema"] == "enginefarm.bench/1" and rep["env"]["device"] == "cpu" and rep["settings"]["timer"] == "wall clock"
    assert rep["engine"]["visual"]["features_per_image"] == FEATURES["llava"] == 16
    assert rep["inputs"]["images"] == ["builtin:gradient"] and "outside the timed region" in rep["inputs"]["preprocessing"]
    (v,) = rep["visual_rows"]
    assert v["batch"] == 1 and v["engine"]["ms"] > 0 and v["eager"]["ms"] > 0 and v["speedup"] > 0
    assert v["features_max_abs_diff"] < 1e-4  # the same features as Hugging Face's, to float rounding
    (r,) = rep["rows"]
    assert (r["batch"], r["input_len"], r["output_len"], r["prompt_positions"]) == (1, 8, 4, 8 + 16)
    for side in ("engine", "eager"):
        f = r[side]
        assert f["ttft_ms"] > 0 and f["decode_ms_per_token"] > 0 and f["tokens_per_s"] > 0 and f["e2e_tokens_per_s"] > 0
    assert r["speedup_ttft"] > 0 and r["speedup_decode"] > 0
    assert r["tokens_equal"] is True  # fp32: the engines' greedy tokens are generate's
    recorded = open_store(str(b.store)).get_manifest_by_path(rep["recorded"])
    assert recorded["results"]["visual_rows"] == rep["visual_rows"] and recorded["results"]["rows"] == rep["rows"]

    # a table; the points over the engines' limits are skipped, each saying why
    assert cli(bench + ["--batch", "1,4", "--input-len", "8,60", "--output-len", "4", "--iters", "1", "--warmup", "0",
                        "--no-eager", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "visual engine (aoti, float32, 16 features per image)" in out and "TTFT" in out
    assert "input 60 + 16 visual features > max_input_len 64" in out and "batch 4 > max_batch_size 2" in out
    assert "visual b4: 4 encoder inputs > the visual engine's max_batch_size 2" in out

    assert cli(bench + ["--iters", "0"]) == 2 and "--iters must be at least 1" in capsys.readouterr().err

    # the checkpoint's weights broken in the cache: no baseline can be made, and none is faked
    (weights,) = cache.glob("*/source/model.safetensors")
    weights.unlink()  # a new file: the cached one is a hard link of the store's blob, which must stay intact
    weights.write_bytes(b"not safetensors")
    assert cli(bench + ["--batch", "1", "--input-len", "8", "--output-len", "4", "--iters", "1", "--json"]) == 2
    err = capsys.readouterr().err
    assert "eager baseline" in err and "cannot be built" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["blip2", "llava-next"])
def test_bench_of_prepended_and_tiled_features(built, family, capsys):
    """The same bench where the features go before the text (BLIP-2 with OPT)
    and where an image is several tiles packed with newline rows (LLaVA-NeXT)."""
    b = built(family)
    capsys.readouterr()
    assert cli(["bench", b.name, "--store", str(b.store), "--batch", "1", "--input-len", "12", "--output-len", "3",
                "--iters", "1", "--no-record", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    (v,) = rep["visual_rows"]
    assert v["engine"]["ms"] > 0 and v["eager"]["ms"] > 0 and v["features_max_abs_diff"] < 1e-4
    (r,) = rep["rows"]
    assert r["engine"]["ttft_ms"] > 0 and r["eager"]["decode_ms_per_token"] > 0 and r["tokens_equal"] is True
    assert r["prompt_positions"] == 12 + rep["engine"]["visual"]["features_per_image"] <= 12 + FEATURES[family]


CHAT = {  # the prompt a conversation about one image makes: each family's own format (families' chat_lines)
    "llava": lambda turns, user: "".join(f"USER: {'<image>' + chr(10) if i == 0 else ''}{u} ASSISTANT:"
                                         + (f" {a} " if a is not None else "")
                                         for i, (u, a) in enumerate(turns + [(user, None)])),
    "blip2": lambda turns, user: " ".join([f"Question: {u} Answer: {a}." for u, a in turns]
                                          + [f"Question: {user} Answer:"]),
}


@pytest.mark.parametrize("family", ["llava", "blip2"])
def test_chat_about_images_through_a_terminal(built, family, tmp_path):
    """`enginefarm chat --image --compare hf` in a pty: each answer equals
    Hugging Face's (fp32, greedy) and its own `generate` on the
    conversation written in the family's format, the second turn carrying
    the first where the two fit max_input_len (LLaVA's 64) and alone where
    they do not (BLIP-2's 48); a bad path is one line and the conversation
    goes on; /image starts a new one."""
    from PIL import Image
    from transformers import AutoProcessor

    from enginefarm.chat import shown
    from enginefarm.families import load_recipe
    from helpers import Terminal, answers, enginefarm_exe

    b = built(family)
    a = write_image("checker", tmp_path / "a.png", size=40)
    c = write_image("rings", tmp_path / "c.png", size=57, height=35)
    proc = AutoProcessor.from_pretrained(b.src)
    limit = load_recipe(str(b.recipe)).limits.max_input_len

    def hf(img, prompt):
        return proc.tokenizer.decode(hf_generate(family, b.src, Image.open(img).convert("RGB"), prompt, 2),
                                     skip_special_tokens=True).strip()

    def fits(img, prompt) -> bool:  # the processor's ids: the prompt's tokens and the image's placeholders
        return proc(images=[Image.open(img).convert("RGB")], text=[prompt], return_tensors="pt")["input_ids"].shape[1] <= limit

    t = Terminal([enginefarm_exe(), "chat", b.name, "--store", str(b.store), "--compare", "hf", "--image", str(a),
                  "--max-new-tokens", "2"])
    try:
        head = t.until("you> ")
        assert f"(a new conversation about image {a})" in head and "/image PATH starts a conversation" in head
        turns: list = []
        kept = []
        for msg in ("What?", "Why?"):
            t.type(msg)
            got = answers(t.until("you> "))
            assert set(got) == {"engine", "hf"} and got["engine"] == got["hf"]
            prompt = CHAT[family](turns, msg)
            kept.append(fits(a, prompt))
            if not kept[-1]:  # the oldest turn dropped
                prompt = CHAT[family](turns[1:], msg)
            want = hf(a, prompt)
            assert got["engine"] == shown(want)
            turns.append((msg, want))
        assert kept == [True, family == "llava"]  # the tiny recipes' max_input_len: see the docstring
        t.type(f"/image {tmp_path / 'missing.png'}")
        out = t.until("you> ")
        assert "enginefarm: no image file at" in out and "Traceback" not in out
        (tmp_path / "bad.png").write_bytes(b"not an image")
        t.type(f"/image {tmp_path / 'bad.png'}")
        out = t.until("you> ")
        assert "enginefarm: cannot read image" in out and "Traceback" not in out
        t.type("What?")  # the conversation about the first image goes on
        got = answers(t.until("you> "))
        assert got["engine"] == got["hf"]
        t.type("/video clip.mp4")
        assert "this engine takes images, not videos: /image PATH" in t.until("you> ")
        t.type(f"/image {c}")
        assert f"(a new conversation about image {c})" in t.until("you> ")
        t.type("Describe it.")
        got = answers(t.until("you> "))
        assert got["engine"] == got["hf"] == shown(hf(c, CHAT[family]([], "Describe it.")))
        t.type("/quit")
        assert t.p.wait(60) == 0
    finally:
        t.close()


def test_chat_refuses_bad_one_shot_input_in_one_line(built, tmp_path, capsys):
    b = built("llava")
    chat = ["chat", b.name, "--store", str(b.store)]
    capsys.readouterr()
    assert cli(chat + ["--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no image file at" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert cli(chat + ["--image", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read image" in err
    assert cli(chat + ["--video", "builtin:orbit"]) == 2
    assert "takes images, not videos: give --image PATH" in capsys.readouterr().err


def test_llava_next_limits_come_from_the_largest_tiling(built, tmp_path, capsys):
    b = built("llava-next")
    img = str(write_image("checker", tmp_path / "wide.png", size=200, height=40))
    capsys.readouterr()
    assert cli(["run", b.name, "--store", str(b.store), "--prompt", "What is it?"] + ["--image", img] * 3) == 2
    assert "max_multimodal_len 176 = 2 x 88 visual features per image at most" in capsys.readouterr().err
    # two images of the largest tiling fill the table exactly
    big = str(write_image("gradient", tmp_path / "big.png", size=100))
    assert cli(["run", b.name, "--store", str(b.store), "--prompt", "a", "--image", big, "--image", img,
                "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2


def test_second_build_is_all_cached(built):
    from enginefarm.flows.build import answer_from_store

    b = built("blip2")
    again = answer_from_store(str(b.recipe), None, str(b.store))
    assert again is not None and again["all_cached"]
    assert again["variants"]["fp32-tp1"]["digest"] == b.variant["digest"]


def test_a_second_variant_validates_against_the_stored_reference(built, tmp_path, monkeypatch):
    """The Hugging Face reference of a multimodal recipe is the reference step's,
    computed once: a second variant (a bf16 LLM) built into the same store
    finds it cached, its validate reads it (the Hugging Face class is not
    loaded anywhere in that build) and judges its engines against it."""
    import transformers

    b = built("llava")
    st = open_store(str(b.store))
    (first_ref,) = [st.get_manifest(*r) for r in st.list_manifests(b.name, "reference")]
    assert first_ref["results"]["pairs"] == 3 and first_ref["results"]["devices"]
    assert first_ref["results"]["peak_host_mb"] > 0 and "peak_gpu_mb" in first_ref["results"]
    assert {"logits.safetensors", "outputs.json"} <= set(first_ref["files"])
    (val1,) = [st.get_manifest(*r) for r in st.list_manifests(b.name, "validate")]
    assert val1["inputs"]["reference"]["key"] == first_ref["key"]

    loads = count_loads(monkeypatch, transformers.LlavaForConditionalGeneration)  # the real loader, counted
    val2 = build_bf16_beside(b, tmp_path, loads, first_ref["key"], val1["key"])
    # one visual engine serves both variants: it runs in the component's own dtype (float32 here), whatever the
    # LLM's, so the bf16 variant's visual build is the fp32 one's
    builds = [st.get_manifest(*r) for r in st.list_manifests(b.name, "build")]
    assert len([m for m in builds if m["params"]["component"] == "visual"]) == 1
    m = val2["results"]["metrics"]
    # judged against the reference: a bf16 LLM next to fp32 Hugging Face, not equal to it; the fp32 visual engine
    assert len(m["greedy"]) == 3 and 0 < m["logits_max_abs_diff"] < float("inf") and m["visual_max_abs_diff"] < 1e-4
    assert [g["reference"] for g in m["greedy"]] == [g["reference"] for g in val1["results"]["metrics"]["greedy"]]


def test_the_reference_key_follows_the_images_contents(built, tmp_path):
    """An image file whose bytes change under the same name changes the
    multimodal reference's key; the variant does not enter it."""
    from enginefarm.families import load_recipe
    from enginefarm.tasks import reference as reference_step
    from enginefarm.tasks.base import Ctx

    b = built("llava")
    st, fetched = stored_fetch(b)
    img = tmp_path / "picture.png"
    data = yaml.safe_load(b.recipe.read_text())
    data["validation"]["images"] = [str(img), "builtin:rings"]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))

    def key():
        ctx = Ctx(store=st, recipe=load_recipe(str(p)))
        assert reference_step.needed(ctx, fetched)
        return reference_step.spec(ctx, fetched).key()

    write_image("rings", img)
    k1 = key()
    assert key() == k1
    write_image("checker", img)
    k2 = key()
    assert k2 != k1
    data["matrix"]["dtype"] = ["float32", "bfloat16"]
    p.write_text(yaml.safe_dump(data))
    assert key() == k2
    data["limits"]["max_batch_size"] = 1  # the features are computed in the engines' batches
    p.write_text(yaml.safe_dump(data))
    assert key() not in (k1, k2)


# ----------------------------------------------------------------------------- checkpoints the fixtures did not make


def _blip2_elsewhere(dest: Path) -> Path:
    """A BLIP-2 made here with transformers' classes and save_pretrained:
    48 px images in 16 px patches, 5 query tokens, a 3-layer 6-head OPT of
    width 48, a wider ViT and Q-Former."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from enginefarm.testing.tiny import IMAGE_TOKEN_ID, MM_VOCAB, image_tokenizer, reinit

    text = OPTConfig(vocab_size=MM_VOCAB, hidden_size=48, num_hidden_layers=3, ffn_dim=80, num_attention_heads=6,
                     max_position_embeddings=128, word_embed_proj_dim=48, pad_token_id=1, bos_token_id=2,
                     eos_token_id=2)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                           image_size=48, patch_size=16),
        qformer_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3,
                            encoder_hidden_size=40, cross_attention_frequency=1),
        text_config=text.to_dict(), num_query_tokens=5, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(21)
    model = Blip2ForConditionalGeneration(cfg)
    reinit(model, seed=21)
    model.eval().save_pretrained(dest)
    Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 48, "width": 48}),
                   tokenizer=image_tokenizer(), num_query_tokens=5).save_pretrained(dest)
    return dest


def _recipe_new(name: str, src: Path, tmp_path: Path, capsys, **changes) -> Path:
    capsys.readouterr()
    assert cli(["recipe", "new", name, "--source", str(src)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    for k, v in changes.items():
        data[k] = v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_blip2_the_fixtures_did_not_make_builds_and_matches(tmp_path, capsys):
    src = _blip2_elsewhere(tmp_path / "other-blip2")
    p = _recipe_new("other-blip2", src, tmp_path, capsys,
                    components={"visual": {"backend": "onnxruntime"}, "llm": {}},
                    limits={"max_batch_size": 2, "max_input_len": 40, "max_seq_len": 64},
                    validation={"prompts": ["Question: which colour? Answer:"], "max_new_tokens": 8,
                                "images": ["builtin:checker", "builtin:gradient"]})
    assert "family: blip2" in (tmp_path / "other-blip2.yaml").read_text()
    store = str(tmp_path / "store")
    assert cli(["build", str(p), "--store", store, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]
    assert out["validation"] is True
    val = manifest(tmp_path / "store", "other-blip2", "validate")["results"]["metrics"]
    assert val["visual_features"] == 5 and val["greedy_equal"] and len(val["greedy"]) == 2
    eng = manifest(tmp_path / "store", "other-blip2", "publish")["results"]["components"]
    assert eng["visual"]["backend"] == "onnxruntime" and eng["visual"]["engine"]["format"] == "onnx"
    assert eng["llm"]["engine"]["prompt_table"]["max_rows"] == 10  # 2 x 5 query tokens
    img = write_image("rings", tmp_path / "r.png")
    assert cli(["run", "other-blip2", "--store", store, "--image", str(img), "--prompt", "a photo of",
                "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
    from PIL import Image

    assert got == hf_generate("blip2", src, Image.open(img).convert("RGB"), "a photo of", 6)


def test_a_llava_of_other_sizes_and_feature_layers_builds_and_matches(tmp_path, capsys):
    # another seed and sizes through the generator's command line, then the
    # config changed the way a different LLaVA would be: two feature layers,
    # CLS kept ("full"), so 9 patches + 1 = 10 features of two layers each
    src = tmp_path / "other-llava"
    subprocess.run([sys.executable, "-m", "enginefarm.testing.tiny", "llava", str(src), "--seed", "11",
                    "--image-size", "36", "--patch", "12", "--vision-layers", "3", "--vision-hidden", "24",
                    "--layers", "3", "--hidden", "96", "--heads", "6", "--kv-heads", "2"],
                   check=True, capture_output=True)
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    cfg = LlavaConfig.from_pretrained(src)
    cfg.vision_feature_layer = [-3, -1]
    cfg.vision_feature_select_strategy = "full"
    torch.manual_seed(11)
    model = LlavaForConditionalGeneration(cfg)
    from enginefarm.testing.tiny import reinit

    reinit(model, seed=12)
    model.eval().save_pretrained(src)
    proc = LlavaProcessor.from_pretrained(src)
    proc.vision_feature_select_strategy = "full"
    proc.save_pretrained(src)

    p = _recipe_new("other-llava", src, tmp_path, capsys, components={"visual": {"backend": "onnxruntime"}, "llm": {}},
                    limits={"max_batch_size": 2, "max_input_len": 48, "max_seq_len": 64},
                    validation={"prompts": ["Which colour is it?"], "max_new_tokens": 8,
                                "images": ["builtin:rings", "builtin:checker", "builtin:gradient"]})
    store = str(tmp_path / "store")
    assert cli(["build", str(p), "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]["validation"] is True
    val = manifest(tmp_path / "store", "other-llava", "validate")["results"]["metrics"]
    assert val["visual_features"] == 10 and val["greedy_equal"] and val["visual_max_abs_diff"] < 1e-3
    assert len({tuple(g["engine"]) for g in val["greedy"]}) > 1


# ----------------------------------------------------------------------------- no engine builds


def test_prompt_table_rows_replace_ids_past_the_vocab(tmp_path):
    """DecoderLM with a prompt table equals Hugging Face fed the same embeddings."""
    from transformers import LlavaForConditionalGeneration

    from enginefarm.checkpoint import convert_checkpoint
    from enginefarm.runtime.decoder import DecoderLM

    src = write_tiny("llava", tmp_path / "src", seed=4)
    convert_checkpoint(get_family("llava"), src, tmp_path / "ckpt", V32)
    model = DecoderLM.from_checkpoint(tmp_path / "ckpt")
    hf = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    Vs = model.cfg.vocab_size
    table = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, Vs + 2, Vs + 3, Vs + 4, 17, 42], [Vs, Vs + 1, 9, 8, 7, Vs + 5]])
    emb = hf.get_input_embeddings()(ids.clamp(max=Vs - 1))
    emb = torch.where((ids >= Vs)[..., None], table[(ids - Vs).clamp(min=0)], emb)
    kc, vc = model.new_cache(2, 16)
    with torch.no_grad():
        lg, kc, vc = model(ids, torch.tensor([0]), kc, vc, table)
        want = hf(inputs_embeds=emb).logits
        assert (lg - want).abs().max() < 1e-4
        # text-only ids: the table changes nothing
        text = torch.tensor([[5, 17, 42]])
        k2, v2 = model.new_cache(1, 8)
        a, _, _ = model(text, torch.tensor([0]), k2, v2)
        b, _, _ = model(text, torch.tensor([0]), k2, v2, table)
        assert torch.equal(a, b)


def test_engine_ids_place_the_features():
    from enginefarm.runtime.multimodal import engine_ids

    inline = {"image_token_id": 9, "vocab_size": 100, "image_placement": "inline"}
    assert engine_ids([1, 9, 9, 9, 2], 3, 3, inline) == [1, 103, 104, 105, 2]  # the processor expanded <image>
    assert engine_ids([1, 9, 2], 0, 3, inline) == [1, 100, 101, 102, 2]  # an older processor did not
    with pytest.raises(BadInput, match="2 image placeholders"):
        engine_ids([9, 1, 9], 0, 3, inline)
    with pytest.raises(BadInput, match="0 image placeholders"):
        engine_ids([1, 2], 0, 3, inline)
    prepend = {**inline, "image_placement": "prepend"}
    assert engine_ids([1, 2], 3, 3, prepend) == [103, 104, 105, 1, 2]  # BLIP-2 without image tokens
    assert engine_ids([9] * 5 + [7], 10, 5, inline) == [110, 111, 112, 113, 114, 7]  # rows after earlier images


def test_both_llava_checkpoint_layouts_convert_alike(tmp_path):
    """The newer layout (model.language_model., model.vision_tower., lm_head.)
    converts to the same LLM checkpoint and loads the same visual weights."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from enginefarm.checkpoint import convert_checkpoint, load_rank

    fam = get_family("llava")
    old = write_tiny("llava", tmp_path / "old", seed=6)
    new = tmp_path / "new"
    shutil.copytree(old, new)
    renamed = {}
    with safe_open(str(old / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.startswith("language_model.model."):
                n = "model.language_model." + k[len("language_model.model."):]
            elif k.startswith("language_model.lm_head."):
                n = "lm_head." + k[len("language_model.lm_head."):]
            else:  # vision_tower.*, multi_modal_projector.*; CLIP nested as in older checkpoints
                n = "model." + k.replace("vision_tower.", "vision_tower.vision_model.", 1)
            renamed[n] = f.get_tensor(k)
    assert not any(k.startswith("language_model.") for k in renamed)
    save_file(renamed, str(new / "model.safetensors"), metadata={"format": "pt"})
    for d in (old, new):
        convert_checkpoint(fam, d, tmp_path / f"ckpt-{d.name}", V32)
    (_, a), (_, b) = load_rank(tmp_path / "ckpt-old"), load_rank(tmp_path / "ckpt-new")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((old / "config.json").read_text())
    va = fam.load_visual(old, cfg, torch.float32).state_dict()
    vb = fam.load_visual(new, cfg, torch.float32).state_dict()
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


def test_unsupported_language_and_vision_models_are_named():
    fam = get_family("blip2")
    gpt2 = {"model_type": "blip-2", "num_query_tokens": 32,
            "text_config": {"model_type": "gpt2", "n_head": 12, "n_embd": 768, "n_layer": 12}}
    with pytest.raises(NotAvailable, match="'gpt2' language model is not supported"):
        fam.check_config(gpt2, V32)
    llava = get_family("llava")
    with pytest.raises(NotAvailable, match="'mistral' language model"):
        llava.check_config({"model_type": "llava", "text_config": {"model_type": "mistral"}}, V32)
    siglip = {"model_type": "llava", "vision_feature_select_strategy": "default",
              "vision_config": {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 14},
              "text_config": {"model_type": "llama"}}
    with pytest.raises(NotAvailable, match="siglip_vision_model"):
        llava.features(siglip)
    # the released LLaVA-1.5 config.json (transformers 4.x) leaves text defaults out: filled in, 576 features
    released = {"model_type": "llava", "image_token_index": 32000, "vision_feature_layer": -2,
                "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
                "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                                  "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                                  "patch_size": 14, "projection_dim": 768},
                "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-05,
                                "max_position_embeddings": 4096}}
    assert llava.features(released) == 576
    for tp in (1, 2, 4):
        llava.check_config(released, Variant(name="t", backend="aoti", dtype="float16", quant="none", tp=tp,
                                             target="cpu"))
    tc = llava.trtllm_config(released, V32)
    assert (tc["num_attention_heads"], tc["num_hidden_layers"], tc["hidden_size"], tc["vocab_size"]) == (32, 32, 4096, 32064)


def test_limits_are_checked_against_the_checkpoint_after_fetch(tmp_path, capsys):
    src = write_tiny("llava", tmp_path / "src", seed=2)
    store = str(tmp_path / "store")
    # 2 x 576 agrees with the family's usual count, so the recipe loads; the
    # fetched config.json says 16 features per image
    p = recipe_for(tmp_path, "mm-limits", "llava", src,
                   limits={"max_batch_size": 2, "max_input_len": 64, "max_seq_len": 80, "max_multimodal_len": 1152})
    assert cli(["build", str(p), "--store", store]) == 2
    err = capsys.readouterr().err
    assert "max_multimodal_len is 1152" in err and "(16, from the checkpoint's config.json) = 32" in err
    p = recipe_for(tmp_path, "mm-limits", "llava", src, limits={"max_batch_size": 2, "max_input_len": 12, "max_seq_len": 80})
    assert cli(["build", str(p), "--store", store]) == 2
    assert "max_input_len (12) must hold an image's 16 visual features" in capsys.readouterr().err
    steps = {s for _, s, _ in open_store(store).list_manifests("mm-limits")}
    assert steps == {"fetch"}


def test_an_export_over_the_tolerance_builds_no_engine(tmp_path, capsys):
    src = write_tiny("blip2", tmp_path / "src", seed=2)
    data = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-blip2.yaml").read_text())
    data["validation"]["gates"]["visual_max_abs_diff"] = 0.0  # ONNX Runtime is never bit-equal to PyTorch here
    p = recipe_for(tmp_path, "mm-strict", "blip2", src, validation=data["validation"])
    store = str(tmp_path / "store")
    assert cli(["build", str(p), "--store", store]) == 1
    err = capsys.readouterr().err
    assert "ONNX Runtime differs from PyTorch" in err and "no engine is built from this export" in err
    steps = {s for _, s, _ in open_store(store).list_manifests("mm-strict")}
    assert "build" not in steps and "export" not in steps


def test_half_precision_visual_exports(tmp_path):
    """float16 exports pass the ONNX Runtime check with a half-precision-sized
    difference; bfloat16 ones cannot be checked on the CPU and say what to do."""
    from enginefarm.errors import StepFailed
    from enginefarm.tasks.export import export_visual

    src = write_tiny("blip2", tmp_path / "src", seed=2)
    cfg = json.loads((src / "config.json").read_text())
    fam = get_family("blip2")
    (tmp_path / "f16").mkdir()
    meta = export_visual(fam, src, cfg, tmp_path / "f16", "float16", 2, None, 0.5)
    assert meta["dtype"] == "float16" and 0 < meta["ort_max_abs_diff"] < 0.5
    (tmp_path / "bf16").mkdir()
    with pytest.raises(StepFailed, match="set components.visual.dtype to float16 or float32"):
        export_visual(fam, src, cfg, tmp_path / "bf16", "bfloat16", 2, None, 0.5)


def test_builtin_images_are_drawn_not_downloaded(tmp_path):
    import numpy as np

    a, b = np.asarray(builtin_image("rings")), np.asarray(builtin_image("rings"))
    assert a.shape == (96, 96, 3) and (a == b).all() and a.std() > 20
    assert not (np.asarray(builtin_image("checker")) == a).all()
    with pytest.raises(BadInput, match="no built-in image 'cat'"):
        builtin_image("cat")
