"""Issue 3's last seed systems end to end on Prefect's ephemeral API:
LLaVA-NeXT with a Mistral LLM, and LLaVA-NeXT-Video (frames sampled from a
video, each through CLIP + pooling + projector, video tokens in the prompt;
and images, as LLaVA-NeXT tiles them: issue 18).
Real engines (aoti LLMs; visual encoders on aoti or onnxruntime) against
Hugging Face `generate` on the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from enginefarm.cli import main as cli
from enginefarm.images import write_image
from enginefarm.store import open_store
from enginefarm.testing import write_tiny
from helpers import only_manifest

ROOT = Path(__file__).resolve().parent.parent


def _recipe(dest: Path, name: str, template: str, src: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "models" / "tiny" / f"{template}.yaml").read_text())
    data.update(name=name, source={"path": str(src)}, **changes)
    p = dest / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


_manifest = only_manifest


# ----------------------------------------------------------------------------- LLaVA-NeXT with Mistral


def test_llava_next_with_mistral_builds_runs_and_equals_hf_generate(tmp_path, capsys):
    import transformers
    from PIL import Image

    src = write_tiny("llava-next-mistral", tmp_path / "src", seed=5)
    assert json.loads((src / "config.json").read_text())["text_config"]["model_type"] == "mistral"
    # the visual engine on onnxruntime (no second compile); the LLM on aoti
    validation = yaml.safe_load((ROOT / "models" / "tiny" / "tiny-llava-next.yaml").read_text())["validation"]
    validation["gates"]["visual_max_abs_diff"] = 1e-3  # fp32 rounding of this seed's larger features
    p = _recipe(tmp_path, "mm-next-mistral", "tiny-llava-next", src, validation=validation,
                components={"visual": {"backend": "onnxruntime"}, "llm": {}})
    store = tmp_path / "store"
    assert cli(["build", str(p), "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]["validation"] is True

    # converted by the mistral family: its architecture, and its 24-token window
    # (which the 36 to 88 image features make bind)
    f = _manifest(store, "mm-next-mistral", "convert")["files"]["config.json"]
    open_store(str(store)).get_blob_file(f["sha256"], tmp_path / "ckpt.json", size=f["size"])
    cfg = json.loads((tmp_path / "ckpt.json").read_text())
    assert cfg["architecture"] == "MistralForCausalLM" and cfg["max_attention_window_size"] == [24, 24]
    val = _manifest(store, "mm-next-mistral", "validate")["results"]["metrics"]
    assert val["greedy_equal"] and val["greedy_batched_equal"] and val["logits_max_abs_diff"] < 1e-3
    assert val["visual_max_abs_diff"] < 1e-3 and len(set(val["visual_features_by_image"])) == 3

    img = write_image("rings", tmp_path / "wide.png", size=90, height=40)
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert cli(["run", "mm-next-mistral", "--store", str(store), "--image", str(img), "--prompt", prompt,
                "--max-new-tokens", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
    proc = transformers.AutoProcessor.from_pretrained(src)
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    enc = proc(images=[Image.open(img).convert("RGB")], text=[prompt], return_tensors="pt")
    assert enc["input_ids"].shape[1] > 24  # the window binds
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=1)
    assert got == want[0, enc["input_ids"].shape[1]:].tolist()


# ----------------------------------------------------------------------------- LLaVA-NeXT-Video

VIDEO_PROMPT = "USER: <video>\nWhat happens in the video? ASSISTANT:"


def hf_video_generate(src: Path, video, prompt: str, n: int, frames: int) -> list[int]:
    """Hugging Face's LlavaNextVideoForConditionalGeneration.generate on the
    frames and prompt as the family prepares them (transformers' own video
    processor needs torchvision, which is not installed here)."""
    import transformers

    from enginefarm.families import get_family

    fam = get_family("llava-next-video")
    cfg = json.loads((src / "config.json").read_text())
    meta = fam.visual_meta({**cfg, "num_frames": frames})
    enc = fam.encode(fam.load_processor(src, meta), video, prompt, "<video>")
    model = transformers.LlavaNextVideoForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=1)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def video_build(tmp_path_factory):
    """The tiny LLaVA-NeXT-Video recipe (aoti visual and llm engines), built once."""
    from types import SimpleNamespace

    from enginefarm.flows.build import build

    root = tmp_path_factory.mktemp("mm-video")
    src = write_tiny("llava-next-video", root / "src", seed=3)
    recipe = _recipe(root, "mm-video", "tiny-llava-next-video", src)
    out = build(recipe=str(recipe), store=str(root / "store"))
    return SimpleNamespace(root=root, src=src, store=root / "store", out=out["variants"]["fp32-tp1"])


def test_llava_next_video_builds_validates_and_runs_equal_to_hf_generate(video_build, tmp_path, capsys):
    import numpy as np

    from enginefarm.videos import load_video, write_video

    b = video_build
    assert b.out["validation"] is True, b.out["gates"]
    ex = _manifest(b.store, "mm-video", "export")
    r = ex["results"]
    # 8 frames x (4 x 4 patches pooled by 2: 4 features) = 32 features a video; an image: 16 + 8 x (4 + 1) = 56
    # at most. One visual engine: 16 patch rows (a tile) then 4 pooled rows (a frame) per input; 2 x 8 inputs
    assert (r["features"], r["encoder_features"], r["num_frames"], r["media"]) == (56, 20, 8, "video")
    assert (r["tile_features"], r["frame_features"], r["takes"]) == (16, 4, ["video", "image"])
    assert r["features_by_kind"] == {"video": 32, "image": 56} and r["extras"]  # image_newline beside the engine
    assert r["max_batch_size"] == 16 and set(r["ort_max_abs_diff_by_batch"]) == {"1", "16"}
    assert ex["params"]["num_frames"] == 8
    pub = _manifest(b.store, "mm-video", "publish")["results"]["components"]
    assert pub["llm"]["engine"]["prompt_table"] == {"max_rows": 112, "hidden_size": 64}  # max_multimodal_len 2 x 56
    val = _manifest(b.store, "mm-video", "validate")["results"]["metrics"]
    assert val["greedy_equal"] and val["greedy_batched_equal"] and val["logits_max_abs_diff"] < 1e-3
    assert val["num_beams"] == 2 and val["beams_equal"] and len(val["beams"]) == 5  # beams judged
    assert val["visual_max_abs_diff"] < 1e-4 and val["visual_features"] == 56
    # three videos of 12, 8 and 20 frames, sampled to 8 each; then a wide image (1 x 2 tiles) and a tall one (2 x 1)
    assert val["visual_features_by_image"] == [32, 32, 32, 52, 56] and len(val["greedy"]) == 5
    assert [g["image"] for g in val["greedy"]][3:] == ["builtin:rings@120x60", "builtin:checker@50x90"]
    assert len({tuple(g["engine"]) for g in val["greedy"]}) > 1  # the video matters

    # enginefarm run --video: a directory of frames and a .npy array, against HF generate
    frames_dir = write_video("builtin:orbit@50x36x10", tmp_path / "orbit")
    npy = write_video("builtin:pan@40x44x30", tmp_path / "pan.npy")
    assert len(list(frames_dir.iterdir())) == 10 and np.load(npy).shape == (30, 44, 40, 3)
    run = ["run", "mm-video", "--store", str(b.store)]
    capsys.readouterr()
    assert cli(run + ["--video", str(frames_dir), "--video", str(npy), "--prompt", VIDEO_PROMPT,
                      "--prompt", "Describe the motion.", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_features"] == 32 and out["num_frames"] == 8
    res = out["results"]
    assert [x["video"] for x in res] == [str(frames_dir), str(npy)] and [x["frames"] for x in res] == [8, 8]
    assert res[0]["output_ids"] == hf_video_generate(b.src, load_video(str(frames_dir)), VIDEO_PROMPT, 8, 8)
    assert res[1]["output_ids"] == hf_video_generate(b.src, np.load(npy), "Describe the motion.", 8, 8)
    assert res[0]["output_ids"] != res[1]["output_ids"]
    # fewer frames than built for (--frames 3): 12 features, still as HF computes them
    assert cli(run + ["--video", "builtin:pulse", "--prompt", VIDEO_PROMPT, "--frames", "3", "--max-new-tokens", "6",
                      "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]
    assert got["frames"] == 3
    assert got["output_ids"] == hf_video_generate(b.src, load_video("builtin:pulse"), VIDEO_PROMPT, 6, 3)


def hf_image_generate(src: Path, image, prompt: str, n: int) -> list[int]:
    """Hugging Face's LlavaNextVideoForConditionalGeneration.generate on an
    image, its inputs made by transformers' LlavaNextProcessor from the
    checkpoint's image processor and tokenizer (the image path of
    LlavaNextVideoProcessor, which cannot be built without torchvision)."""
    import transformers

    pc = json.loads((src / "processor_config.json").read_text())
    proc = transformers.LlavaNextProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(src),
        tokenizer=transformers.AutoTokenizer.from_pretrained(src), patch_size=pc["patch_size"],
        vision_feature_select_strategy=pc["vision_feature_select_strategy"],
        num_additional_image_tokens=pc["num_additional_image_tokens"])
    enc = proc(images=[image], text=[prompt], return_tensors="pt")
    model = transformers.LlavaNextVideoForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=1)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_llava_next_video_runs_images_equal_to_hf_generate(video_build, tmp_path, capsys):
    """`enginefarm run --image` on the NeXT-Video engines: a wide and a tall
    image (1 x 2 and 2 x 1 tiles, unpadded, a newline a row), each equal to
    Hugging Face's greedy `generate` with `pixel_values`; a prompt without a
    placeholder gets the image first, one written with <video> gets it there."""
    from PIL import Image

    b = video_build
    wide = write_image("rings", tmp_path / "wide.png", size=90, height=40)
    tall = write_image("checker", tmp_path / "tall.png", size=36, height=80)
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    capsys.readouterr()
    assert cli(["run", "mm-video", "--store", str(b.store), "--image", str(wide), "--image", str(tall),
                "--prompt", prompt, "--prompt", "Describe it.", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_features"] == 56 and "num_frames" not in out  # an image's at most
    res = out["results"]
    assert [r["image"] for r in res] == [str(wide), str(tall)]
    img = [Image.open(p).convert("RGB") for p in (wide, tall)]
    assert res[0]["output_ids"] == hf_image_generate(b.src, img[0], prompt, 8)
    assert res[1]["output_ids"] == hf_image_generate(b.src, img[1], "<image>\nDescribe it.", 8)
    assert res[0]["output_ids"] != res[1]["output_ids"]
    assert cli(["run", "mm-video", "--store", str(b.store), "--image", str(wide), "--prompt",
                "USER: <video>\nWhat is in the picture? ASSISTANT:", "--max-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["output_ids"] == res[0]["output_ids"]


def test_chat_about_a_video_through_a_terminal(video_build):
    """`enginefarm chat --video --compare hf` in a pty: answers equal
    Hugging Face's and its `generate` on the conversation as llava-hf's chat
    template writes it ("USER: <video>\\n... ASSISTANT: ... USER: ..."), the
    second turn carrying the first (they fit max_input_len 96); then /image
    starts a conversation about an image ("USER: <image>\\n...")."""
    from enginefarm.chat import shown
    from enginefarm.families import get_family
    from enginefarm.images import load_image
    from enginefarm.videos import load_video
    from helpers import Terminal, answers, enginefarm_exe

    b = video_build
    fam = get_family("llava-next-video")
    meta = fam.visual_meta({**json.loads((b.src / "config.json").read_text()), "num_frames": 8})
    proc = fam.load_processor(b.src, meta)
    video = load_video("builtin:orbit")

    def hf(prompt):
        assert fam.encode(proc, video, prompt, "<video>")["input_ids"].shape[1] <= 96  # the whole conversation fits
        return proc.tokenizer.decode(hf_video_generate(b.src, video, prompt, 2, 8), skip_special_tokens=True).strip()

    t = Terminal([enginefarm_exe(), "chat", "mm-video", "--store", str(b.store), "--compare", "hf", "--video",
                  "builtin:orbit", "--max-new-tokens", "2"])
    try:
        head = t.until("you> ")
        assert "(a new conversation about video builtin:orbit)" in head
        assert "/video PATH or /image PATH starts a conversation about a video or an image" in head
        first = "USER: <video>\nWhat happens? ASSISTANT:"
        t.type("What happens?")
        got = answers(t.until("you> "))
        want = hf(first)
        assert got["engine"] == got["hf"] == shown(want)
        t.type("Why?")
        got = answers(t.until("you> "))
        assert got["engine"] == got["hf"] == shown(hf(f"{first} {want} USER: Why? ASSISTANT:"))
        t.type("/image builtin:rings")
        assert "(a new conversation about image builtin:rings)" in t.until("you> ")
        t.type("What is it?")
        got = answers(t.until("you> "))
        want = hf_image_generate(b.src, load_image("builtin:rings"), "USER: <image>\nWhat is it? ASSISTANT:", 2)
        assert got["engine"] == got["hf"] == shown(proc.tokenizer.decode(want, skip_special_tokens=True).strip())
        t.type("/quit")
        assert t.p.wait(60) == 0
    finally:
        t.close()


def test_video_requests_over_the_built_limits_exit_2_naming_the_limit(video_build, tmp_path, capsys):
    b = video_build
    run = ["run", "mm-video", "--store", str(b.store), "--prompt", VIDEO_PROMPT]
    capsys.readouterr()
    assert cli(run + ["--video", "builtin:orbit"] * 3) == 2
    err = capsys.readouterr().err
    assert "3 videos in one call" in err and "max_batch_size 2" in err
    assert ("max_multimodal_len 112 = 2 x 56 visual features per image or video, the larger: an image's at most 56, "
            "a video's num_frames 8 x 4 = 32") in err
    assert cli(run + ["--video", "builtin:orbit", "--frames", "9"]) == 2
    err = capsys.readouterr().err
    assert "9 frames per video, but the engines were built for num_frames 8" in err and "Traceback" not in err
    ring = str(write_image("rings", tmp_path / "r.png"))
    assert cli(run + ["--image", ring] * 3) == 2
    assert "3 images in one call" in capsys.readouterr().err
    assert cli(run + ["--image", ring, "--frames", "2"]) == 2
    assert "--frames is for --video" in capsys.readouterr().err
    assert cli(run + ["--image", ring, "--video", "builtin:orbit"]) == 2
    assert "give --image or --video, not both" in capsys.readouterr().err
    assert cli(run[:4] + ["--prompt", "no video"]) == 2
    assert "is multimodal: give --video PATH or --image PATH" in capsys.readouterr().err
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    assert cli(run + ["--video", str(tmp_path / "clip.mp4")]) == 2
    assert "ffmpeg -i clip.mp4 frames/%05d.png" in capsys.readouterr().err
    assert cli(run + ["--video", str(tmp_path / "missing")]) == 2
    assert "no video at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(run + ["--video", str(tmp_path / "empty")]) == 2
    assert "holds no frame images" in capsys.readouterr().err
    import numpy as np

    np.save(tmp_path / "gray.npy", np.zeros((4, 8, 8), dtype=np.uint8))
    assert cli(run + ["--video", str(tmp_path / "gray.npy")]) == 2
    assert "uint8 array [frames, height, width, 3]" in capsys.readouterr().err
    assert cli(run + ["--video", "builtin:orbit", "--video", "builtin:pan", "--prompt", "a", "--prompt", "b"]) == 2
    assert "one video per prompt" in capsys.readouterr().err


def test_a_llava_next_video_of_other_sizes_builds_and_matches(tmp_path, capsys):
    """Another checkpoint through the generator's command line: 48 px frames
    in 8 px patches (6 x 6), max pooling by 3 (2 x 2 = 4 features a frame),
    a 3-layer 6-head Mistral of width 96; 5 frames a video. Its images (48 px
    tiles of 36 features, grids of 1 x 2 and 2 x 1) take up to 36 + 12 x
    (6 + 1) = 120 features, which the limits must hold."""
    import subprocess
    import sys

    from enginefarm.videos import load_video

    src = tmp_path / "other-video"
    subprocess.run([sys.executable, "-m", "enginefarm.testing.tiny", "llava-next-video", str(src), "--seed", "11",
                    "--image-size", "48", "--patch", "8", "--pool-mode", "max", "--pool-stride", "3",
                    "--llm", "mistral", "--layers", "3", "--hidden", "96", "--heads", "6", "--kv-heads", "2",
                    "--vision-hidden", "24"], check=True, capture_output=True)
    capsys.readouterr()
    assert cli(["recipe", "new", "other-video", "--source", str(src)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["family"] == "llava-next-video" and data["components"]["visual"]["num_frames"] == 8
    data["components"] = {"visual": {"backend": "onnxruntime", "num_frames": 5}, "llm": {}}
    data["limits"] = {"max_batch_size": 1, "max_input_len": 140, "max_seq_len": 150}
    data["validation"].update(prompts=["Which way does it move?"], max_new_tokens=8, max_eval_tokens=40,
                              videos=["builtin:pan@60x30x9", "builtin:orbit@30x30x4"], images=["builtin:rings@40x90"])
    p = tmp_path / "other-video.yaml"
    p.write_text(yaml.safe_dump(data))
    store = tmp_path / "store"
    assert cli(["build", str(p), "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"]["fp32-tp1"]["validation"] is True
    val = _manifest(store, "other-video", "validate")["results"]["metrics"]
    # 5 frames x 4 = 20 features; the 4-frame video gives 16; the tall image 36 + 12 x (6 + 1)
    assert val["visual_features"] == 120 and val["visual_features_by_image"] == [20, 16, 120]
    assert val["greedy_equal"] and val["visual_max_abs_diff"] < 1e-3
    eng = _manifest(store, "other-video", "publish")["results"]["components"]
    assert eng["llm"]["engine"]["prompt_table"]["max_rows"] == 120 and eng["visual"]["engine"]["format"] == "onnx"
    assert cli(["run", "other-video", "--store", str(store), "--video", "builtin:pulse@64x48x7",
                "--prompt", "What changes?", "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]["output_ids"]
    assert got == hf_video_generate(src, load_video("builtin:pulse@64x48x7"), "What changes?", 6, 5)


def test_video_recipes_need_frames_and_image_recipes_refuse_them(tmp_path, capsys):
    src = write_tiny("llava-next-video", tmp_path / "src", seed=1)
    p = _recipe(tmp_path, "no-frames", "tiny-llava-next-video", src, components={"visual": {}, "llm": {}})
    assert cli(["plan", str(p)]) == 2
    assert "components.visual.num_frames: family llava-next-video needs the frames" in capsys.readouterr().err
    p = _recipe(tmp_path, "frames-on-llava", "tiny-llava-next", src, components={"visual": {"num_frames": 4}, "llm": {}})
    assert cli(["plan", str(p)]) == 2
    assert "family llava-next takes images, not videos" in capsys.readouterr().err
    p = _recipe(tmp_path, "videos-on-llava", "tiny-llava-next", src, validation={"videos": ["builtin:orbit"]})
    assert cli(["plan", str(p)]) == 2
    assert "validation.videos: family llava-next takes images" in capsys.readouterr().err
    # the limits follow from the frames and the checkpoint's pooling (what the
    # build flow checks right after fetch): 2 videos x 8 frames x 4 features
    from enginefarm.errors import BadInput
    from enginefarm.families import get_family
    from enginefarm.families import load_recipe

    fam, cfg = get_family("llava-next-video"), json.loads((src / "config.json").read_text())
    ok = load_recipe(str(_recipe(tmp_path, "ok", "tiny-llava-next-video", src)))
    assert fam.derived_limits(ok, cfg)["max_multimodal_len"] == 112  # 2 x an image's 56 (a video's: 32)
    assert fam.derived_limits(ok)["max_multimodal_len"] is None  # before fetch: not known
    short = load_recipe(str(_recipe(tmp_path, "short", "tiny-llava-next-video", src,
                                    components={"visual": {"num_frames": 16}, "llm": {}},
                                    limits={"max_batch_size": 1, "max_input_len": 60, "max_seq_len": 70})))
    with pytest.raises(BadInput, match=r"max_input_len \(60\) must hold a video's or an image's 64 visual features "
                                       r"\(the larger\)"):
        fam.derived_limits(short, cfg)
    wrong = load_recipe(str(_recipe(tmp_path, "wrong", "tiny-llava-next-video", src,
                                    limits={"max_batch_size": 2, "max_input_len": 96, "max_seq_len": 112,
                                            "max_multimodal_len": 50})))
    with pytest.raises(BadInput, match=r"x visual features per video or image, the larger \(56, from the "
                                       r"checkpoint's config.json and components.visual.num_frames\) = 112"):
        fam.derived_limits(wrong, cfg)


def test_builtin_videos_and_frame_sampling(tmp_path):
    import numpy as np

    from enginefarm.errors import BadInput
    from enginefarm.videos import builtin_video, load_video, sample_frames, video_digest, write_video

    v = builtin_video("orbit@40x30x12")
    assert v.shape == (12, 30, 40, 3) and v.dtype == np.uint8 and (v == builtin_video("orbit@40x30x12")).all()
    assert not (v[0] == v[6]).all()  # it moves
    assert load_video("builtin:pan").shape == (16, 96, 96, 3)
    d = write_video("builtin:pulse@20x16x5", tmp_path / "frames")
    assert (load_video(str(d)) == builtin_video("pulse@20x16x5")).all()  # PNG frames are lossless
    assert video_digest(str(d)) != video_digest(str(write_video("builtin:pulse@20x16x6", tmp_path / "f6")))
    idx = sample_frames(np.arange(20)[:, None, None, None], 5)[:, 0, 0, 0].tolist()
    assert idx == [0, 5, 10, 14, 19] and sample_frames(v, 40).shape[0] == 12
    with pytest.raises(BadInput, match="no built-in video 'cat'"):
        builtin_video("cat")
    with pytest.raises(BadInput, match="WIDTHxHEIGHTxFRAMES"):
        builtin_video("orbit@big")


def test_released_configs_give_the_seed_limits():
    """The released checkpoints' config.json facts (no weights): LLaVA-NeXT-Video-7B
    makes 12 x 12 pooled features a 336 px frame, 1152 for the catalog's 8 frames,
    and up to 576 + 48 x 49 = 2928 for an image (its config's default pinpoints,
    the largest 672 x 672): the limits hold the larger; llava-v1.6-mistral-7b
    converts through the mistral family."""
    from enginefarm.families import get_family
    from enginefarm.spec import Variant

    clip = {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
    video = {"model_type": "llava_next_video", "image_token_index": 32001, "video_token_index": 32000,
             "spatial_pool_mode": "average", "spatial_pool_stride": 2, "vision_feature_layer": -2,
             "vision_feature_select_strategy": "default", "vision_config": clip,
             "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096}}
    fam = get_family("llava-next-video")
    frames = {**video, "num_frames": 8}
    assert (fam.frame_features(frames), fam.video_features(frames), fam.features(frames)) == (144, 1152, 2928)
    assert fam.encoder_features(frames) == 576 + 144  # one engine: a tile's rows, then a frame's pooled rows
    assert (fam.image_token_id(frames), fam.video_token_id(frames)) == (32001, 32000)
    assert fam.encoder_inputs_per_image(frames) == 8  # 8 frames; an image takes at most 1 + 2 x 2 tiles
    for tp in (1, 2, 4, 8):
        fam.check_config(video, Variant(name="t", backend="tensorrt-llm", dtype="float16", quant="none", tp=tp,
                                        target="sm_90"))
    mistral = {"model_type": "llava_next", "image_token_index": 32000, "vision_feature_layer": -2,
               "vision_feature_select_strategy": "default", "vision_config": clip,
               "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
               "text_config": {"model_type": "mistral", "vocab_size": 32064, "hidden_size": 4096,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                               "intermediate_size": 14336, "max_position_embeddings": 32768,
                               "rope_theta": 1000000.0, "sliding_window": None}}
    nxt = get_family("llava-next")
    tc = nxt.trtllm_config(mistral, Variant(name="t", backend="tensorrt-llm", dtype="float16", quant="none", tp=1,
                                            target="sm_90"))
    assert tc["architecture"] == "MistralForCausalLM" and tc["num_key_value_heads"] == 8
    assert tc["rotary_base"] == 1e6 and "max_attention_window_size" not in tc  # no window in v0.2-based 1.6
    assert nxt.features(mistral) == 576 + 48 * (48 + 1)  # base + the 672 x 672 grid, a newline a row


@pytest.mark.parametrize("mode,stride,per_frame", [("average", 2, 4), ("max", 3, 1), ("conv", 2, 4)])
def test_each_pooling_mode_makes_hf_features(tmp_path, mode, stride, per_frame):
    """The visual module (what the export traces) against Hugging Face's
    get_video_features for every spatial_pool_mode, and get_image_features
    (no pooling: the same module's other rows); conv's weights load from the
    checkpoint's vision_resampler. No engine is built."""
    from enginefarm.families import get_family
    from enginefarm.images import load_image
    from enginefarm.videos import load_video

    src = write_tiny("llava-next-video", tmp_path / mode, seed=7, pool_mode=mode, pool_stride=stride)
    fam = get_family("llava-next-video")
    cfg = {**json.loads((src / "config.json").read_text()), "num_frames": 3}
    assert fam.frame_features(cfg) == per_frame and fam.video_features(cfg) == 3 * per_frame
    assert fam.encoder_features(cfg) == 16 + per_frame and fam.features(cfg) == 56  # an image's, the larger
    module = fam.load_visual(src, cfg, torch.float32)
    assert any(k.startswith("vision_resampler.") for k in module.state_dict()) == (mode == "conv")
    meta = fam.visual_meta(cfg)
    proc, ref = fam.load_processor(src, meta), fam.reference_model(src)
    extras = fam.visual_extras(src, cfg, torch.float32)
    enc = fam.encode(proc, load_video("builtin:orbit@40x30x9"), "What?", "<video>")
    assert enc["pixel_values_videos"].shape == (1, 3, 3, 32, 32) and enc["input_ids"].shape[1] > 3 * per_frame
    img = fam.encode(proc, load_image("builtin:rings@30x70"), "USER: <video>\nWhat? ASSISTANT:", "<video>")
    assert fam.kind_of(img) == "image" and img["pixel_values"].shape == (1, 3, 3, 32, 32)
    assert int((img["input_ids"] == meta["image_token_id"]).sum()) == 16 + 8 * 5  # <video> written: the image there
    with torch.no_grad():
        got = fam.pack_features([module(fam.encoder_inputs(e)) for e in (enc, img)], [enc, img], meta, extras)
        want = fam.reference_features(ref, [enc, img])
    # fp32 rounding of features up to ~30 (the projector's matmuls take both paths' rows at once): the gate's 1e-4
    assert got[0].shape == want[0].shape == (3 * per_frame, 64) and float((got[0] - want[0]).abs().max()) < 1e-4
    assert got[1].shape == want[1].shape == (56, 64) and float((got[1] - want[1]).abs().max()) < 1e-4
