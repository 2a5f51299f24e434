"""The multimodal pipeline: images (or videos) and prompts in, token ids out, through
two built engines (no Hugging Face model code on this path; the model's own
processor does the preprocessing).

    encodings    = processor(image, prompt), one pair at a time
    features     = visual engine(each image's inputs: the image, or its tiles),
                   in batches the engine takes, packed per image by the
                   family (LLaVA-NeXT: unpadded, with a newline row per row)
    prompt table = every image's features, one after the other  [rows, hidden]
    token ids    = the processor's ids, image i's placeholder tokens replaced
                   by vocab_size + (rows before image i) + 0 .. F_i - 1
    output       = LLM engine greedy generation with the prompt table

A video family (LLaVA-NeXT-Video) works the same way with a video for an
image: its frames are the visual engine's inputs, its features the frames'
pooled features one frame after the other, its placeholder `<video>`; the
family supplies the preprocessing (`load_processor`, `encode`). It takes
images too (the engine's `takes`): each item's kind (`family.kind_of` its
encoding) picks its placeholder token and its rows of the visual engine's
output, and one batch may mix both.

An encoder-decoder LLM takes the prompt table in its encoder (BLIP-2 with
Flan-T5). Where the visual features are the encoder output (Nougat, BLIP),
they go to the decoder's cross-attention as they are, and the prompt's tokens
follow the decoder's start token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import BadInput
from .decoding import GREEDY, Decoding, OnToken
from .engine import LLMEngine, load_engine
from .visual import VisualEngine


class MultimodalPipeline:
    def __init__(self, visual: VisualEngine, llm: LLMEngine, processor):
        self.visual, self.llm, self.processor = visual, llm, processor
        self.meta = visual.visual
        from ..families import get_family

        self.family = get_family(self.meta["family"])
        self.image_token = image_token_of(processor)
        self.media = self.meta.get("media", "image")  # what one request item is: an image or a video
        self.takes = tuple(self.meta.get("takes") or (self.media,))  # LLaVA-NeXT-Video: videos and images
        if self.meta.get("encoder_output"):
            if not getattr(llm, "features_in", False):
                raise BadInput("the visual engine makes encoder outputs, but the LLM engine's decoder does not take them")
            want = (_field(llm.meta, "encoder_features"), _field(llm.meta, "encoder_hidden_size"))
            if (self.meta["encoder_features"], self.meta["hidden_size"]) != want:
                raise BadInput(f"the visual engine makes [{self.meta['encoder_features']}, {self.meta['hidden_size']}] "
                               f"features per image, but the LLM's decoder was built for {list(want)}")
            return
        if not llm.table:
            raise BadInput("the LLM engine was built without a prompt table; rebuild it with the visual component enabled")
        hidden = _field(llm.table, "hidden_size")
        if hidden != self.meta["hidden_size"] or llm.vocab_size != self.meta["vocab_size"]:
            raise BadInput(
                f"the visual engine makes features for an LLM of hidden size {self.meta['hidden_size']} and vocab "
                f"{self.meta['vocab_size']}, but the LLM engine has {hidden} and {llm.vocab_size}"
            )

    @classmethod
    def load(cls, root: str | Path, load=load_engine) -> "MultimodalPipeline":
        """root/visual and root/llm: engine directories; root/source: the
        processor's files (preprocessing and tokenizer configs). Each engine
        as its engine.json says (aoti, ONNX or TensorRT visual; decoder-only
        or encoder-decoder LLM), through `load` (enginefarm.backends.load_engine
        for every format, the runtime's own for aoti and ONNX)."""
        from ..families import get_family

        root = Path(root)
        visual = load(root / "visual")
        processor = get_family(visual.visual["family"]).load_processor(root / "source", visual.visual)
        return cls(visual, load(root / "llm"), processor)

    # ----------------------------------------------------------------- limits

    @property
    def features(self) -> int:
        """visual features per image (at most, where they depend on the image)"""
        return self.meta["features"]

    @property
    def max_batch_size(self) -> int:
        return self.llm.max_batch_size

    @property
    def seq2seq(self) -> bool:
        return getattr(self.llm, "seq2seq", False)

    @property
    def encoder_output(self) -> bool:
        """the visual features are the decoder's encoder output (Nougat, BLIP)"""
        return bool(self.meta.get("encoder_output"))

    def features_of(self, kind: str) -> int:
        """visual features per image or per video (at most, where they depend on the image)"""
        return (self.meta.get("features_by_kind") or {}).get(kind, self.features)

    def check_request(self, n_images: int, frames: int | None = None, kind: str | None = None) -> None:
        """n_images images (or videos: kind) in one call; frames: per video, where the request says."""
        B, media = self.max_batch_size, kind or self.media
        if media not in self.takes:
            raise BadInput(f"this engine takes {' and '.join(k + 's' for k in self.takes)}, not {media}s")
        per_frame = self.meta.get("frame_features", self.meta["encoder_features"])
        if len(self.takes) > 1:  # the limit holds the larger kind
            limit = (f"max_multimodal_len {self.llm.max_multimodal_len or B * self.features} = {B} x {self.features}"
                     f" visual features per image or video, the larger: an image's at most "
                     f"{self.features_of('image')}, a video's num_frames {self.meta['num_frames']} x {per_frame} = "
                     f"{self.features_of('video')}")
        else:
            at_most = " at most" if self.meta["encoder_features"] != self.meta["features"] and media == "image" else ""
            limit = (f"max_multimodal_len {self.llm.max_multimodal_len or B * self.features} = {B} x {self.features} "
                     f"visual features per {media}{at_most}")
            if media == "video":
                limit += f": num_frames {self.meta['num_frames']} x {per_frame} per frame"
        if n_images > B:
            raise BadInput(f"{n_images} {media}s in one call, but the engines were built for max_batch_size {B} "
                           f"({limit})")
        if frames is not None:
            if media != "video":
                raise BadInput("frames are for video models; this one takes images")
            if not 1 <= frames <= self.meta["num_frames"]:
                raise BadInput(f"{frames} frames per video, but the engines were built for num_frames "
                               f"{self.meta['num_frames']} (components.visual.num_frames; {limit})")

    # ----------------------------------------------------------------- inputs

    def prepare(self, images: Sequence, prompts: Sequence[str]) -> list:
        """The processor's output for each (image, prompt)."""
        if len(images) != len(prompts):
            raise BadInput(f"{len(images)} {self.media}s for {len(prompts)} prompts; give one {self.media} per prompt")
        return [self.family.encode(self.processor, image, prompt, self.image_token)
                for image, prompt in zip(images, prompts)]

    def image_features(self, encodings: list) -> list[torch.Tensor]:
        """[F_i, hidden] per image, from the visual engine."""
        self.check_request(len(encodings))
        inputs = [self.family.encoder_inputs(e) for e in encodings]
        x = torch.cat(inputs)
        B = self.visual.max_batch_size
        out = torch.cat([self.visual(x[s : s + B]) for s in range(0, x.shape[0], B)])
        parts = list(out.split([i.shape[0] for i in inputs]))
        return self.family.pack_features(parts, encodings, self.meta, self.visual.extras)

    def inputs(self, images: Sequence, prompts: Sequence[str]) -> tuple[list[list[int]], torch.Tensor]:
        """Engine token ids and the prompt table for a batch."""
        self.check_request(len(images))
        encodings = self.prepare(images, prompts)
        feats = self.image_features(encodings)
        ids, first = [], 0
        for e, f in zip(encodings, feats):
            ids.append(engine_ids(e["input_ids"][0].tolist(), first, f.shape[0], self.meta, self.image_token,
                                  self.family.placeholder_id(e, self.meta)))
            first += f.shape[0]
        return ids, torch.cat(feats)

    # ----------------------------------------------------------------- running

    def generate(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int,
                 eos_token_id: int | None = None, decoding: Decoding = GREEDY,
                 on_token: OnToken | None = None) -> list[list[int]]:
        """Each image-and-prompt's output, decoded as `decoding` says (runtime/decoding.py)."""
        if self.encoder_output:
            self.check_request(len(images))
            encodings = self.prepare(images, prompts)
            feats = torch.stack(self.image_features(encodings))
            return self.llm.generate_from_features(feats, [list(e["prompt_ids"]) for e in encodings], max_new_tokens,
                                                   eos_token_id=eos_token_id, decoding=decoding, on_token=on_token)
        ids, table = self.inputs(images, prompts)
        return self.llm.generate(ids, max_new_tokens, eos_token_id=eos_token_id, prompt_table=table,
                                 decoding=decoding, on_token=on_token)

    def seq2seq_logits(self, image, prompt: str, decoder_ids: list[int]) -> tuple[list[int], torch.Tensor]:
        """An encoder-decoder LLM's logits, the decoder teacher-forced on
        decoder_ids, for one image and prompt: (the encoder's ids, or the
        prompt's where the features are the encoder output; [T, vocab])."""
        if self.encoder_output:
            enc = self.prepare([image], [prompt])
            feats = torch.stack(self.image_features(enc))
            return list(enc[0]["prompt_ids"]), self.llm.logits_from_features(feats, decoder_ids)
        ids, table = self.inputs([image], [prompt])
        return ids[0], self.llm.logits(ids[0], decoder_ids, table)

    @property
    def eos_token_id(self):
        """The token greedy generation stops at (the family says which: BLIP's is [SEP])"""
        meta = getattr(self.llm, "meta", None) or {}
        return self.family.stop_token_id(self.processor, meta.dump() if hasattr(meta, "dump") else meta)

    def decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)


def image_token_of(processor) -> str:
    """The placeholder text of an image in a processor's prompts."""
    tok = getattr(processor, "image_token", None) or "<image>"
    return getattr(tok, "content", None) or str(tok)


def _field(obj, name: str):
    """A field of a sidecar or prompt table (runtime/sidecar.py), or of another backend's dict."""
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def engine_ids(ids: list[int], first_row: int, n_features: int, meta: dict, image_token: str = "<image>",
               token_id: int | None = None) -> list[int]:
    """The processor's ids with one image's placeholders (token_id, else
    meta's image_token_id) turned into prompt-table ids vocab_size +
    first_row + 0 .. n_features - 1. A processor that wrote one placeholder
    (older LLaVA processors) or none (older BLIP-2 ones, whose features go
    first) is expanded here."""
    tok, V = (meta["image_token_id"] if token_id is None else token_id), meta["vocab_size"]
    rows = list(range(V + first_row, V + first_row + n_features))
    at = [i for i, t in enumerate(ids) if t == tok]
    if len(at) == n_features:
        out = list(ids)
        for i, r in zip(at, rows):
            out[i] = r
        return out
    if len(at) == 1:
        return ids[: at[0]] + rows + ids[at[0] + 1 :]
    if not at and meta["image_placement"] == "prepend":
        return rows + list(ids)
    raise BadInput(
        f"a prompt with {len(at)} image placeholders ({image_token}) for an image of {n_features} visual features; "
        f"each prompt takes exactly one image"
    )
