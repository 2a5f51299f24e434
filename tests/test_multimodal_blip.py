"""BLIP image captioning (family `blip`): a ViT whose last hidden state a
BERT-style text decoder cross-attends to. End to end on Prefect's ephemeral
API (fetch, convert of the text decoder into a `decoder/` checkpoint, the
ViT's export, aoti engines, validation against Hugging Face `generate`,
publish) and `enginefarm run` with images, against
BlipForConditionalGeneration in fp32; then a checkpoint of other sizes made
here with transformers' classes, the converted decoder run eagerly, and the
released configs' limits.

The tiny recipe is built once per session (its aoti compiles are the cost);
the other checkpoint's visual engine is onnxruntime's, so it costs the two
LLM packages' compiles only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from enginefarm.cli import main as cli
from enginefarm.errors import BadInput
from enginefarm.families import get_family
from enginefarm.images import write_image
from enginefarm.families import load_recipe
from enginefarm.spec import Variant, parse_recipe
from enginefarm.testing import write_tiny
from helpers import only_manifest, session_builds

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["", "a photo of"]
V32 = Variant(name="x", backend="aoti", dtype="float32", quant="none", tp=1, target="cpu")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """tiny-blip built once into its own store."""
    return session_builds(tmp_path_factory, lambda family: 0)("blip")


def hf_generate(src: Path, image, prompt: str, n: int) -> list[int]:
    """Hugging Face's own caption, from its processor and model classes: the
    tokens `generate` adds after the prompt (which it starts with [DEC])."""
    from transformers import AutoProcessor, BlipForConditionalGeneration

    proc = AutoProcessor.from_pretrained(src)
    model = BlipForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    inputs = proc(images=[image], text=[prompt], return_tensors="pt")
    prefix = inputs["input_ids"].shape[1] - 1  # [CLS] becomes [DEC], the trailing [SEP] is dropped
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, num_beams=1)
    return out[0, prefix:].tolist()


# ----------------------------------------------------------------------------- the tiny recipe, built once


def test_build_converts_exports_and_validates_against_hf(built):
    v = built.variant
    assert v["validation"] is True, v["gates"]
    assert {"fetch", "convert", "export", "build.visual", "build.llm", "validate", "publish"} == set(v["steps"])
    assert {"visual/visual.pt2", "llm/encoder.pt2", "llm/decoder.pt2", "llm/engine.json"} <= set(v["files"])

    # the text decoder only, as decoder/, with what BERT adds recorded in its config
    conv = manifest(built, "convert")["files"]
    assert {"decoder/config.json", "decoder/rank0.safetensors"} <= set(conv) and not any(f.startswith("encoder/") for f in conv)
    hf = json.loads((built.src / "config.json").read_text())
    tok = json.loads((built.src / "tokenizer_config.json").read_text())
    assert tok["bos_token"] == "[DEC]"

    ex = manifest(built, "export")["results"]
    assert ex["features"] == ex["encoder_features"] == 17 and ex["hidden_size"] == 32  # the vision width
    assert ex["image_size"] == 32 and ex["ort_max_abs_diff"] < 1e-3

    val = manifest(built, "validate")["results"]["metrics"]
    assert val["greedy_equal"] and val["greedy_batched_equal"]
    assert val["greedy_equal_to_near_tie"] and all(g["first_divergence"] is None for g in val["greedy"])
    assert val["num_beams"] == 2 and val["beams_equal"] and len(val["beams"]) == len(val["greedy"])  # beams judged
    assert val["visual_max_abs_diff"] < 1e-3 and val["logits_max_abs_diff"] < 1e-3
    assert val["top1_agreement"] == 1.0 and val["perplexity_rel_diff"] < 1e-3 and val["eval_tokens"] > 0
    assert val["visual_features"] == 17 and len(val["greedy"]) == 3
    for g in val["greedy"]:
        assert g["engine"] == g["reference"] == g["batched"] and len(g["engine"]) == 10
    assert len({tuple(g["engine"]) for g in val["greedy"]}) == 3  # the image (and prompt) matter

    eng = manifest(built, "publish")["results"]["components"]["llm"]["engine"]
    assert eng["kind"] == "encoder-decoder" and eng["encoder_input"] == "features" and "prompt_table" not in eng
    assert (eng["encoder_features"], eng["encoder_hidden_size"]) == (17, 32)
    text = hf["text_config"]
    assert eng["decoder_start_token_id"] == text["bos_token_id"] and eng["eos_token_id"] == text["sep_token_id"]

    # its Hugging Face side is the reference step's: generated from [DEC] up to [SEP], as the engines run, and
    # teacher-forced on min(max_input_len 16, max_seq_len 32) decoder tokens at most
    ref = manifest(built, "reference")
    assert manifest(built, "validate")["inputs"]["reference"]["key"] == ref["key"]
    assert ref["params"]["limits"]["max_decoder_tokens"] == 16 and ref["results"]["pairs"] == 3
    assert (ref["results"]["decoder_start_token_id"], ref["results"]["eos_token_id"]) == \
        (text["bos_token_id"], text["sep_token_id"])


def manifest(b, step: str) -> dict:
    return only_manifest(b.store, b.name, step)


def test_run_with_images_equals_hf_generate(built, tmp_path, capsys):
    from PIL import Image

    a = write_image("checker", tmp_path / "a.png", size=40)
    c = write_image("rings", tmp_path / "c.png", size=57, height=75)  # not the model's size
    capsys.readouterr()
    assert cli(["run", built.name, "--store", str(built.store), "--image", str(a), "--image", str(c),
                "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_features"] == 17
    for r, img, p in zip(out["results"], (a, c), PROMPTS):
        assert r["prompt"] == p
        assert r["output_ids"] == hf_generate(built.src, Image.open(img).convert("RGB"), p, 9)
    assert out["results"][0]["output_ids"] != out["results"][1]["output_ids"]
    # one image for every prompt; the text form prints the prompt and its caption
    assert cli(["run", built.name, "--store", str(built.store), "--image", str(c), "--prompt", PROMPTS[1],
                "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(f"[{c}] {PROMPTS[1]}")


def test_requests_over_the_built_limits_exit_2_naming_the_limit(built, tmp_path, capsys):
    img = str(write_image("gradient", tmp_path / "g.png"))
    run = ["run", built.name, "--store", str(built.store)]
    capsys.readouterr()
    assert cli(run + ["--image", img] * 3 + ["--prompt", "a photo of"]) == 2
    err = capsys.readouterr().err
    assert "3 images in one call" in err and "max_batch_size 2 (max_multimodal_len 34 = 2 x 17" in err
    assert cli(run + ["--image", img, "--prompt", " ".join(["engine"] * 30)]) == 2
    assert "max_input_len 16" in capsys.readouterr().err
    assert cli(run + ["--image", img, "--prompt", "a", "--max-new-tokens", "40"]) == 2
    err = capsys.readouterr().err
    assert "max_seq_len 32" in err and "Traceback" not in err
    assert cli(run + ["--prompt", "no image"]) == 2
    assert "is multimodal: give --image" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a checkpoint the fixtures did not make


def _blip_elsewhere(dest: Path) -> Path:
    """A BLIP made here with transformers' classes: 48 px images in 16 px
    patches (9 + 1 = 10 features) through a 3-layer ViT of width 40, a
    3-layer, 6-head text decoder of width 48 with the tanh GELU, 96 positions,
    and an lm_head and lm_head bias of its own (untied)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from enginefarm.testing.tiny import bert_tokenizer, reinit

    tok = bert_tokenizer(vocab_size=280)
    vision = dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4, image_size=48,
                  patch_size=16)
    text = dict(vocab_size=len(tok) + 2, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                num_attention_heads=6, max_position_embeddings=96, hidden_act="gelu_new",
                bos_token_id=tok.bos_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)
    torch.manual_seed(21)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, tie_word_embeddings=False))
    reinit(model.vision_model, seed=21)
    reinit(model.text_decoder, seed=22)
    head = model.text_decoder.cls.predictions
    assert head.decoder.weight.data_ptr() != model.text_decoder.bert.embeddings.word_embeddings.weight.data_ptr()
    assert not torch.equal(head.decoder.bias, head.bias)  # the untied bias is the one the model uses
    model.eval().save_pretrained(dest)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 48, "width": 48}),
                  tokenizer=tok).save_pretrained(dest)
    return dest


def test_a_checkpoint_the_fixtures_did_not_make_builds_and_matches(tmp_path, capsys):
    from PIL import Image

    src = _blip_elsewhere(tmp_path / "other-blip")
    capsys.readouterr()
    assert cli(["recipe", "new", "other-blip", "--source", str(src)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["family"] == "blip"
    data.update(components={"visual": {"backend": "onnxruntime"}, "llm": {}},
                limits={"max_batch_size": 2, "max_input_len": 12, "max_seq_len": 40},
                validation={"prompts": ["a picture of"], "max_new_tokens": 8, "max_eval_tokens": 40,
                            "images": ["builtin:checker", "builtin:rings"],
                            "gates": {**data["validation"]["gates"], "greedy_equal": True}})
    p = tmp_path / "other-blip.yaml"
    p.write_text(yaml.safe_dump(data))
    store = str(tmp_path / "store")
    assert cli(["build", str(p), "--store", store, "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]["validation"] is True
    val = only_manifest(tmp_path / "store", "other-blip", "validate")["results"]["metrics"]
    assert val["visual_features"] == 10 and val["greedy_equal"] and len(val["greedy"]) == 2
    assert val["logits_max_abs_diff"] < 1e-3 and val["visual_max_abs_diff"] < 1e-3
    img = write_image("gradient", tmp_path / "g.png", size=50, height=70)
    for prompt in ("", "the engine"):
        assert cli(["run", "other-blip", "--store", store, "--image", str(img), "--prompt", prompt,
                    "--max-new-tokens", "6", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
        assert got == hf_generate(src, Image.open(img).convert("RGB"), prompt, 6)


# ----------------------------------------------------------------------------- the converted checkpoint, eager


def test_blip_decoder_checkpoint_runs_as_hugging_face(tmp_path):
    """The text decoder's decoder/ checkpoint (eager modules, no compile)
    fed Hugging Face's ViT output: its logits, its greedy tokens for prompts
    of different lengths in one call, and the stop token as generate's."""
    from transformers import BlipForConditionalGeneration

    from enginefarm.checkpoint import convert_checkpoint, load_rank
    from enginefarm.runtime.encdec import EncDecConfig, EncDecEngine, FeaturesCrossKV, load_encdec

    src = write_tiny("blip", tmp_path / "src", seed=1)
    convert_checkpoint(get_family("blip"), src, tmp_path / "ck", V32)
    assert (tmp_path / "ck" / "decoder" / "config.json").is_file() and not (tmp_path / "ck" / "encoder").exists()
    cfg, W = load_rank(tmp_path / "ck" / "decoder")
    hf = BlipForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    text = hf.config.text_config
    assert (cfg["hidden_size"], cfg["encoder_hidden_size"], cfg["cross_attention_layout"]) == (64, 32, "q_kv")
    assert cfg["layernorm_position"] == 1 and cfg["has_embedding_layernorm"] and not cfg["has_model_final_layernorm"]
    assert cfg["has_lm_head_transform"] and cfg["norm_epsilon"] == text.layer_norm_eps == 1e-12
    assert (cfg["decoder_start_token_id"], cfg["eos_token_id"]) == (text.bos_token_id, text.sep_token_id)
    n = "transformer.layers.1.cross_attention."
    assert W[n + "q.weight"].shape == (64, 64) and W[n + "kv.weight"].shape == (128, 32) and n + "qkv.weight" not in W
    assert W["transformer.position_embedding.weight"].shape == (128, 64)  # BERT's positions from 0: all rows
    assert torch.equal(W["lm_head.weight"], W["transformer.vocab_embedding.weight"])  # tied
    # a fused cross-attention qkv cannot take the vision width: such a config is refused, not guessed
    with pytest.raises(ValueError, match="fused cross-attention qkv cannot take an encoder output of width 32"):
        EncDecConfig.from_trtllm({**cfg, "cross_attention_layout": "fused_qkv"})

    enc, dec = load_encdec(tmp_path / "ck")
    assert isinstance(enc, FeaturesCrossKV)
    eng = EncDecEngine.from_modules(enc, dec, {"max_batch_size": 2, "max_input_len": 16, "max_seq_len": 32,
                                               "encoder_features": 17})
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    start, sep = text.bos_token_id, text.sep_token_id
    with torch.no_grad():
        feats = hf.vision_model(pixel_values=pixels).last_hidden_state
        want = hf(pixel_values=pixels[:1], input_ids=torch.tensor([[start, 7, 22, 44]])).logits[0]
    assert feats.shape == (2, 17, 32)
    assert float((eng.logits_from_features(feats[:1], [start, 7, 22, 44]) - want).abs().max()) < 1e-4

    def reference(i: int, prefix: list[int], n: int) -> list[int]:
        ids = torch.tensor([[2] + prefix + [sep]])  # as the processor writes them: [CLS] ... [SEP]
        with torch.no_grad():
            out = hf.generate(pixel_values=pixels[i : i + 1], input_ids=ids, max_new_tokens=n, do_sample=False)
        return out[0, 1 + len(prefix):].tolist()

    prefixes = [[], [7, 22]]
    got = eng.generate_from_features(feats, prefixes, 8, eos_token_id=sep)
    ref = [reference(i, p, 8) for i, p in enumerate(prefixes)]
    assert got == ref and got[0] != got[1]
    # the stop token: generate stops at text_config.sep_token_id; made a token it emits, both stop there
    j = next(j for j in range(1, len(ref[0])) if ref[0][j] not in ref[0][:j])
    text.sep_token_id = ref[0][j]
    assert reference(0, [], 8) == ref[0][: j + 1] == eng.generate_from_features(feats[:1], [[]], 8,
                                                                                 eos_token_id=ref[0][j])[0]
    with pytest.raises(BadInput, match="encoder features of width 16, but the decoder's cross-attention takes 32"):
        eng.generate_from_features(feats[:1, :, :16], [[]], 3)
    with pytest.raises(BadInput, match="takes images, not a text prompt"):
        eng.generate([[5, 6]], 3)


def test_tp_splits_the_cross_attention_keys_and_values_by_heads(tmp_path):
    """tp 2: each rank's cross_attention.kv is its half of the keys' heads,
    then its half of the values' (the layout CrossKV views as [2, heads])."""
    from enginefarm.checkpoint import convert_checkpoint, load_rank

    src = write_tiny("blip", tmp_path / "src", seed=2)
    fam = get_family("blip")
    tp2 = Variant(name="x", backend="tensorrt-llm", dtype="float32", quant="none", tp=2, target="cpu")
    convert_checkpoint(fam, src, tmp_path / "tp1", V32)
    convert_checkpoint(fam, src, tmp_path / "tp2", tp2)
    w1 = load_rank(tmp_path / "tp1" / "decoder")[1]
    ranks = [load_rank(tmp_path / "tp2" / "decoder", r)[1] for r in range(2)]
    n = "transformer.layers.0.cross_attention."
    k, v = w1[n + "kv.weight"].split(64)
    for r, w in enumerate(ranks):
        assert torch.equal(w[n + "kv.weight"], torch.cat([k[32 * r : 32 * (r + 1)], v[32 * r : 32 * (r + 1)]]))
        assert torch.equal(w[n + "q.weight"], w1[n + "q.weight"][32 * r : 32 * (r + 1)])
        assert torch.equal(w[n + "dense.weight"], w1[n + "dense.weight"][:, 32 * r : 32 * (r + 1)])
        assert torch.equal(w["lm_head_transform.dense.weight"], w1["lm_head_transform.dense.weight"])
    assert torch.equal(torch.cat([w["lm_head.bias"] for w in ranks])[:321], w1["lm_head.bias"])
    with pytest.raises(BadInput, match="tp size 8 does not divide the model's 4 decoder attention heads"):
        fam.check_config(json.loads((src / "config.json").read_text()),
                         Variant(name="t", backend="aoti", dtype="float16", quant="none", tp=8, target="cpu"))


# ----------------------------------------------------------------------------- the catalog, no engine builds


# The released checkpoints' facts, as their config.json states them: ViT-B/16
# (768 wide) or ViT-L/16 (1024 wide) on 384 px images; a 12-layer, 12-head
# BERT decoder of width 768 whose cross-attention takes the vision width.
def _released(vision_width: int, vision_layers: int, vision_heads: int) -> dict:
    return {"model_type": "blip",
            "vision_config": {"model_type": "blip_vision_model", "hidden_size": vision_width, "image_size": 384,
                              "patch_size": 16, "num_hidden_layers": vision_layers,
                              "num_attention_heads": vision_heads, "intermediate_size": 4 * vision_width},
            "text_config": {"model_type": "blip_text_model", "hidden_size": 768, "num_attention_heads": 12,
                            "num_hidden_layers": 12, "intermediate_size": 3072, "vocab_size": 30524,
                            "encoder_hidden_size": vision_width, "max_position_embeddings": 512,
                            "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0}}


@pytest.mark.parametrize("size", ["base", "large"])
def test_released_configs_give_577_features_and_the_decoder_checkpoint(size, tmp_path, capsys):
    width = {"base": 768, "large": 1024}[size]
    config = _released(width, *{"base": (12, 12), "large": (24, 16)}[size])
    fam = get_family("blip")
    assert fam.features(config) == 577 and fam.image_size(config) == 384
    assert fam.visual_meta(config)["hidden_size"] == width and fam.visual_meta(config)["encoder_output"]
    r = load_recipe(str(ROOT / "models" / f"blip-captioning-{size}.yaml"))
    assert r.component_backend("llm", r.variant(None)) == "aoti"
    lim = fam.derived_limits(r, config)
    assert (lim["max_multimodal_len"], lim["max_encoder_input_len"], lim["max_input_len"]) == (8 * 577, 577, 32)
    (part,) = fam.checkpoint_parts(config, {"text_decoder.bert.embeddings.word_embeddings.weight"}, r.variant(None))
    c = part.config
    assert part.subdir == "decoder" and c["architecture"] == "DecoderModel" and c["dtype"] == "float16"
    assert (c["hidden_size"], c["encoder_hidden_size"], c["num_attention_heads"]) == (768, width, 12)
    assert (c["decoder_start_token_id"], c["eos_token_id"], c["vocab_size"]) == (30522, 102, 30524)
    for tp in (1, 2, 4):
        fam.check_config(config, Variant(name="t", backend="aoti", dtype="float16", quant="none", tp=tp, target="cpu"))
    with pytest.raises(BadInput, match="limits.max_seq_len \\(600\\) exceeds the text decoder's 512 positions"):
        data = yaml.safe_load((ROOT / "models" / f"blip-captioning-{size}.yaml").read_text())
        data["limits"]["max_seq_len"] = 600
        fam.derived_limits(parse_recipe(data, "x.yaml"), config)
    store = str(tmp_path / "store")
    capsys.readouterr()
    assert cli(["plan", f"blip-captioning-{size}", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "recipe blip-captioning-" + size + " (blip)" in out and "build[llm]     fp16-tp1" in out
    assert "build[llm]: not here: target sm_90 needs a CUDA GPU" in out  # aoti, for an sm_90 worker


def test_tensorrt_llm_for_the_text_decoder_is_refused(tmp_path, capsys):
    data = yaml.safe_load((ROOT / "models" / "blip-captioning-base.yaml").read_text())
    data["matrix"]["backend"] = ["tensorrt-llm"]
    p = tmp_path / "trtllm-blip.yaml"
    p.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert cli(["plan", str(p), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "not a model TensorRT-LLM's DecoderModel computes; build components.llm with the aoti backend" in err
    assert "Traceback" not in err
