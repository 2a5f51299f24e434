"""The multimodal pipeline: images and prompts in, token ids out, through
two built engines (no Hugging Face model code on this path; the model's own
processor does the preprocessing).

    pixel_values = processor(images)               [N, 3, S, S]
    features     = visual engine(pixel_values)     [N, F, hidden]
    prompt table = features as [N * F, hidden]
    token ids    = the processor's ids, with image i's placeholder tokens
                   replaced by vocab_size + i * F + 0 .. F - 1
    output       = LLM engine greedy generation with the prompt table
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import BadInput
from .engine import LLMEngine
from .visual import VisualEngine


class MultimodalPipeline:
    def __init__(self, visual: VisualEngine, llm: LLMEngine, processor):
        self.visual, self.llm, self.processor = visual, llm, processor
        self.meta = visual.visual
        if not llm.table:
            raise BadInput("the LLM engine was built without a prompt table; rebuild it with the visual component enabled")
        if llm.table["hidden_size"] != self.meta["hidden_size"] or llm.vocab_size != self.meta["vocab_size"]:
            raise BadInput(
                f"the visual engine makes features for an LLM of hidden size {self.meta['hidden_size']} and vocab "
                f"{self.meta['vocab_size']}, but the LLM engine has {llm.table['hidden_size']} and {llm.vocab_size}"
            )
        from ..families import get_family

        self.family = get_family(self.meta["family"])
        tok = getattr(processor, "image_token", None) or "<image>"
        self.image_token = getattr(tok, "content", None) or str(tok)

    @classmethod
    def load(cls, root: str | Path) -> "MultimodalPipeline":
        """root/visual and root/llm: engine directories; root/source: the
        processor's files (preprocessing and tokenizer configs)."""
        from transformers import AutoProcessor

        root = Path(root)
        processor = AutoProcessor.from_pretrained(root / "source", trust_remote_code=False)
        return cls(VisualEngine.load(root / "visual"), LLMEngine.load(root / "llm"), processor)

    # ----------------------------------------------------------------- limits

    @property
    def features(self) -> int:
        return self.meta["features"]

    @property
    def max_batch_size(self) -> int:
        return min(self.visual.max_batch_size, self.llm.max_batch_size)

    def check_request(self, n_images: int) -> None:
        B = self.max_batch_size
        if n_images > B:
            raise BadInput(
                f"{n_images} images in one call, but the engines were built for max_batch_size {B} "
                f"(max_multimodal_len {self.llm.max_multimodal_len} = {B} x {self.features} visual features per image)"
            )

    # ----------------------------------------------------------------- inputs

    def prepare(self, images: Sequence, prompts: Sequence[str]) -> tuple[torch.Tensor, list[list[int]]]:
        """pixel_values [N, 3, S, S] and the processor's token ids, one image per prompt."""
        if len(images) != len(prompts):
            raise BadInput(f"{len(images)} images for {len(prompts)} prompts; give one image per prompt")
        pixels, ids = [], []
        for image, prompt in zip(images, prompts):
            text = self.family.prompt_text(prompt, self.image_token)
            enc = self.processor(images=[image], text=[text], return_tensors="pt")
            pixels.append(enc["pixel_values"])
            ids.append(enc["input_ids"][0].tolist())
        return torch.cat(pixels), ids

    def engine_ids(self, ids: list[int], image_index: int) -> list[int]:
        return engine_ids(ids, image_index, self.meta, self.image_token)

    # ----------------------------------------------------------------- running

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.check_request(pixel_values.shape[0])
        return self.visual(pixel_values)

    def inputs(self, images: Sequence, prompts: Sequence[str]) -> tuple[list[list[int]], torch.Tensor]:
        """Engine token ids and the prompt table for a batch."""
        self.check_request(len(images))
        pixels, proc_ids = self.prepare(images, prompts)
        feats = self.image_features(pixels)
        table = feats.reshape(-1, feats.shape[-1])
        return [self.engine_ids(p, i) for i, p in enumerate(proc_ids)], table

    def generate(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[list[int]]:
        ids, table = self.inputs(images, prompts)
        return self.llm.generate(ids, max_new_tokens, eos_token_id=eos_token_id, prompt_table=table)

    @property
    def eos_token_id(self):
        return getattr(self.processor, "tokenizer", self.processor).eos_token_id

    def decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)


def engine_ids(ids: list[int], image_index: int, meta: dict, image_token: str = "<image>") -> list[int]:
    """The processor's ids with image `image_index`'s placeholders turned
    into prompt-table ids (vocab_size + image_index * F + k). A processor
    that wrote one placeholder (older LLaVA processors) or none (older
    BLIP-2 ones, whose features go first) is expanded here."""
    F, tok, V = meta["features"], meta["image_token_id"], meta["vocab_size"]
    rows = list(range(V + image_index * F, V + (image_index + 1) * F))
    at = [i for i, t in enumerate(ids) if t == tok]
    if len(at) == F:
        out = list(ids)
        for i, r in zip(at, rows):
            out[i] = r
        return out
    if len(at) == 1:
        return ids[: at[0]] + rows + ids[at[0] + 1 :]
    if not at and meta["image_placement"] == "prepend":
        return rows + list(ids)
    raise BadInput(
        f"a prompt with {len(at)} image placeholders ({image_token}); each prompt takes exactly one image "
        f"({F} visual features)"
    )
