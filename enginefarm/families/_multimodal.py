"""What the multimodal families (blip2, llava, llava-next, nougat, blip) share: a
`visual` component (exported through ONNX) and an `llm` component that is an
ordinary LLM stored under a prefix of the same checkpoint.

The `llm` is converted by the LLM's own family (opt, llama, t5, bart): this
class maps the checkpoint's tensor names onto the names that family expects
and back, so no conversion code is repeated here. The visual features reach
the LLM as a prompt table (TensorRT-LLM's convention: token ids >= vocab_size
pick rows of the table), so the converted checkpoint is a plain LLM
checkpoint; with an encoder-decoder LLM (BLIP-2 with Flan-T5) the table feeds
its encoder. A family whose visual features ARE the encoder output (Nougat,
BLIP: `features_as_encoder_output`) converts only the LLM's decoder
(`encdec_parts`), which cross-attends to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..errors import BadInput, NotAvailable
from .base import CheckpointPart, Family, OutTensor, hf_value

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch

    from ..spec import Recipe, Variant

# keys of a text config that the recipe-time checks read; a config.json
# written by an older transformers omits those equal to their defaults
_HEAD_KEYS = ("num_attention_heads", "hidden_size", "num_hidden_layers")
_A = {"image": "an image", "video": "a video"}


class MultimodalFamily(Family):
    implemented = True
    kind = "multimodal"
    components = ("visual", "llm")
    text_key = "text_config"
    # decoder families the LLM may belong to: text_config model_type -> family name
    llm_model_types: dict[str, str] = {}
    # (checkpoint prefix, LLM family prefix): the first that matches renames a tensor
    llm_prefixes: tuple[tuple[str, str], ...] = ()
    # where the image placeholder tokens sit when the processor does not
    # write them: "prepend" (BLIP-2: before the text) or "inline" (LLaVA)
    image_placement = "inline"
    # what one request item is: "image", or "video" (LLaVA-NeXT-Video: sampled frames)
    media = "image"

    @property
    def media_kinds(self) -> tuple[str, ...]:
        """the kinds of item the engines take (LLaVA-NeXT-Video: videos and images); `media` first"""
        return (self.media,)
    # encoder-decoder LLMs: the TensorRT-LLM checkpoint parts converted (Nougat: its decoder only)
    encdec_parts: tuple[str, ...] = ("encoder", "decoder")
    # the visual features are the LLM decoder's encoder output (Nougat), not prompt-table rows
    features_as_encoder_output = False

    # ----------------------------------------------------------------- configs

    def full_config(self, config: dict):
        """The transformers config object, every default filled in."""
        from transformers import AutoConfig

        from ..concurrency import IMPORTS

        d = {k: v for k, v in config.items() if k != "model_type"}
        try:
            with IMPORTS:  # it imports the model type's configuration module on first use; checks run in threads
                return AutoConfig.for_model(config["model_type"], **d)
        except (KeyError, ValueError, TypeError) as e:
            raise BadInput(f"family {self.name}: cannot read the checkpoint's config.json: {e}") from None

    def text_config(self, config: dict, complete: bool = True) -> dict:
        """The LLM's config. complete=False answers from config.json alone
        when it has the keys the checks need (no transformers import, so a
        cached build imports no torch)."""
        text = config.get(self.text_key)
        if not isinstance(text, dict) or "model_type" not in text:
            raise BadInput(f"family {self.name}: config.json has no {self.text_key} with a model_type")
        if not complete and all(k in text for k in _HEAD_KEYS):
            return text
        return getattr(self.full_config(config), self.text_key).to_dict()

    def llm_parts(self, config: Optional[dict] = None) -> Optional[tuple[str, ...]]:
        """As Family.llm_parts; None where only the fetched config.json can
        tell (BLIP-2: an OPT LLM is one checkpoint, a Flan-T5 one two) and
        none is given: `llm_part_choices` lists the possibilities then."""
        if self.features_as_encoder_output:
            return self.encdec_parts
        if config is not None:
            return self.encdec_parts if self.llm_family(config).kind == "encoder-decoder" else ("",)
        choices = self.llm_part_choices()
        return choices[0][1] if len(choices) == 1 else None

    def llm_part_choices(self) -> list[tuple[str, tuple[str, ...]]]:
        """What the family knows before a fetch: for each kind of LLM it
        takes, (the LLM families of that kind, the checkpoint parts)."""
        from . import get_family

        kinds: dict[tuple[str, ...], list[str]] = {}
        for name in sorted(set(self.llm_model_types.values())):
            parts = self.encdec_parts if get_family(name).kind == "encoder-decoder" else ("",)
            kinds.setdefault(parts, []).append(name)
        return [(", ".join(names) + (" (encoder-decoder)" if parts != ("",) else " (decoder-only)"), parts)
                for parts, names in kinds.items()]

    def code_modules(self) -> list[str]:
        from . import get_family

        mods = set(super().code_modules())
        for name in set(self.llm_model_types.values()):
            mods.update(get_family(name).code_modules())
        return sorted(mods)

    def llm_family(self, config: dict):
        from . import get_family

        mt = (config.get(self.text_key) or {}).get("model_type")
        if mt not in self.llm_model_types:
            raise NotAvailable(
                f"family {self.name}: a {mt!r} language model is not supported (supported: "
                f"{', '.join(self.llm_model_types)})"
            )
        return get_family(self.llm_model_types[mt])

    def features(self, config: dict) -> int:  # pragma: no cover - abstract
        """Visual features (prompt-table rows) per image; at most, where the
        count depends on the image (LLaVA-NeXT's tiling)."""
        raise NotImplementedError

    def encoder_features(self, config: dict) -> int:
        """Features the visual encoder makes per input (an image; LLaVA-NeXT: a tile)."""
        return self.features(config)

    def encoder_inputs_per_image(self, config: dict) -> int:
        """Visual encoder inputs one image takes at most (LLaVA-NeXT: its tiles)."""
        return 1

    def image_size(self, config: dict) -> "int | list[int]":
        """The visual encoder's input size: an int (square) or [height, width]."""
        v = self.full_config(config).vision_config
        return int(v.image_size)

    def llm_config(self, config: dict) -> dict:
        """The LLM's config.json as its own family reads it."""
        return self.text_config(config)

    def visual_meta(self, config: dict) -> dict:
        """What the runner needs to know about the visual component, beside its engine."""
        text = self.text_config(config)
        return {
            "family": self.name,
            "features": self.features(config),
            "encoder_features": self.encoder_features(config),
            "hidden_size": int(hf_value(text, "hidden_size", "d_model")),
            "vocab_size": int(text["vocab_size"]),
            "image_size": self.image_size(config),
            "image_token_id": self.image_token_id(config),
            "image_placement": self.image_placement,
            "media": self.media,
            "encoder_output": self.features_as_encoder_output,
        }

    def kind_of(self, encoding) -> str:
        """What one encoding (the processor's output for one item) holds: "image" or "video"."""
        return self.media

    def placeholder_id(self, encoding, meta: dict) -> Optional[int]:
        """The token id an encoding's placeholders carry (meta: the visual engine's facts)."""
        return meta["image_token_id"]

    def image_token_id(self, config: dict) -> Optional[int]:
        for k in ("image_token_index", "image_token_id"):
            if config.get(k) is not None:
                return int(config[k])
        return None

    # ----------------------------------------------------------------- checks and limits

    def media_config(self, config: dict, recipe: "Recipe") -> dict:
        """config.json with what the recipe adds to the checkpoint's facts
        (video families: the frames per video, under num_frames)."""
        return config

    def check_recipe(self, recipe: "Recipe") -> None:
        super().check_recipe(recipe)
        visual = recipe.components.get("visual")
        if self.media != "video" and visual is not None and visual.num_frames is not None:
            raise BadInput(f"bad recipe {recipe.origin or recipe.name}: components.visual.num_frames: family "
                           f"{self.name} takes images, not videos; remove it")
        if self.media != "video" and recipe.validation.videos:
            raise BadInput(f"bad recipe {recipe.origin or recipe.name}: validation.videos: family {self.name} takes "
                           f"images, not videos; give validation.images")
        missing = [c for c in self.components if c not in recipe.enabled_components]
        if missing:
            raise BadInput(
                f"bad recipe {recipe.origin or recipe.name}: family {self.name} builds its components together "
                f"(visual features feed the llm); enable {', '.join(missing)}"
            )

    def derived_limits(self, recipe: "Recipe", config: Optional[dict] = None) -> dict[str, Any]:
        """With the fetched config.json the feature count is the checkpoint's
        own (BLIP-2's query tokens, LLaVA's patches), not the family's usual one."""
        if config is None:
            return super().derived_limits(recipe)
        config = self.media_config(config, recipe)
        lim = recipe.limits.model_dump()
        f = self.features(config)
        derived = lim["max_batch_size"] * f
        origin = recipe.origin or recipe.name
        if recipe.limits.max_multimodal_len is not None and recipe.limits.max_multimodal_len != derived:
            raise BadInput(
                f"bad recipe {origin}: limits.max_multimodal_len is {recipe.limits.max_multimodal_len}, but "
                f"max_batch_size ({lim['max_batch_size']}) x visual features per {self._per_item()} ({f}, from the "
                f"checkpoint's config.json{self._recipe_part()}) = {derived}; remove it (it is derived) or make "
                f"them agree"
            )
        if self.features_as_encoder_output:
            # the features are the decoder's encoder output; max_input_len bounds the decoder's prompt
            lim["max_multimodal_len"] = derived
            lim["max_encoder_input_len"] = f
            return lim
        if lim["max_input_len"] <= f:
            raise BadInput(
                f"bad recipe {origin}: limits.max_input_len ({lim['max_input_len']}) must hold {self._features_of(f)} "
                f"and the prompt's tokens; raise it above {f}"
            )
        lim["max_multimodal_len"] = derived
        return lim

    def _recipe_part(self) -> str:
        return " and components.visual.num_frames" if self.media == "video" else ""

    def _per_item(self) -> str:
        """what the feature count is per: "image", or "video" (both: "image or video, the larger")"""
        return " or ".join(self.media_kinds) + (", the larger" if len(self.media_kinds) > 1 else "")

    def _features_of(self, f: int) -> str:
        """E.g. "a video's 64 visual features"; with both kinds "a video's or an
        image's 56 visual features (the larger)"."""
        return " or ".join(_A[k] + "'s" for k in self.media_kinds) + f" {f} visual features" + \
            (" (the larger)" if len(self.media_kinds) > 1 else "")

    def head_counts(self, config: dict) -> tuple[int, int]:
        text = self.text_config(config, complete=False)
        return self.llm_family(config).head_counts(text)

    def check_config(self, config: dict, variant: "Variant", where: str = "config.json") -> None:
        mt = config.get("model_type")
        if mt not in self.model_types:
            raise BadInput(f"family {self.name} expects a config.json with model_type in {list(self.model_types)}, got {mt!r} ({where})")
        llm = self.llm_family(config)
        llm.check_config(self.text_config(config, complete=False), variant, f"{where}, {self.text_key}")

    # ----------------------------------------------------------------- llm: the LLM family's conversion, renamed

    def _llm_names(self, names: set[str]) -> dict[str, str]:
        """{name the LLM family knows: name in this checkpoint}"""
        out = {}
        for n in names:
            for outer, inner in self.llm_prefixes:
                if n.startswith(outer):
                    out[inner + n[len(outer):]] = n
                    break
        return out

    def _llm_names_checked(self, names: set[str]) -> dict[str, str]:
        m = self._llm_names(names)
        if not m:
            raise BadInput(
                f"family {self.name}: the checkpoint has no language-model tensors under "
                f"{', '.join(repr(o) for o, _ in self.llm_prefixes)}"
            )
        return m

    @staticmethod
    def _renamed(outs: list[OutTensor], m: dict[str, str]) -> list[OutTensor]:
        return [OutTensor(o.name, tuple(m.get(s, s) for s in o.sources), o.make) for o in outs]

    def trtllm_config(self, hf: dict, variant: "Variant") -> dict:
        return self.llm_family(hf).trtllm_config(self.llm_config(hf), variant)

    def tensors(self, hf: dict, names: set[str], variant: "Variant", rank: int = 0) -> list[OutTensor]:
        m = self._llm_names_checked(names)
        return self._renamed(self.llm_family(hf).tensors(self.llm_config(hf), set(m), variant, rank), m)

    def checkpoint_parts(self, hf: dict, names: set[str], variant: "Variant") -> list[CheckpointPart]:
        """A decoder-only LLM: one checkpoint at the root. An encoder-decoder
        LLM: its family's `encoder/` and `decoder/` parts (those in
        `encdec_parts`), the tensor names mapped as for a decoder-only one."""
        llm = self.llm_family(hf)
        if llm.kind != "encoder-decoder":
            return super().checkpoint_parts(hf, names, variant)
        m = self._llm_names_checked(names)
        parts = [p for p in llm.checkpoint_parts(self.llm_config(hf), set(m), variant) if p.subdir in self.encdec_parts]
        return [CheckpointPart(p.subdir, p.config, lambda rank, p=p: self._renamed(p.tensors(rank), m)) for p in parts]

    # ----------------------------------------------------------------- visual

    # (checkpoint prefix, visual module prefix), tried in order
    visual_prefixes: tuple[tuple[str, str], ...] = ()

    def visual_module(self, config: dict) -> "torch.nn.Module":  # pragma: no cover - abstract
        """An nn.Module pixel_values [B, 3, S, S] -> features [B, F, llm hidden], random weights."""
        raise NotImplementedError

    def load_visual(self, src_dir: "str | Path", config: dict, dtype: "torch.dtype", allow_pickle: bool = False):
        """The visual module with the checkpoint's weights (only those are read)."""
        from ..tensors import TensorSource

        src = TensorSource(src_dir, allow_pickle=allow_pickle)
        module = self.visual_module(config).eval()
        want = module.state_dict()
        state = {}
        for n in src.names():
            # the rules are alternatives (checkpoints of different transformers
            # versions nest the same module differently): the first that names
            # a tensor of the module wins
            for outer, inner in self.visual_prefixes:
                key = inner + n[len(outer):]
                if n.startswith(outer) and key in want:
                    state[key] = src.get(n)
                    break
        missing = sorted(set(want) - set(state))
        if missing:
            raise BadInput(
                f"family {self.name}: the checkpoint in {src_dir} lacks visual tensors, e.g. "
                f"{', '.join(missing[:4])} ({len(missing)} missing)"
            )
        module.load_state_dict(state, strict=True)
        return self.cast_visual(module, dtype).eval()

    def cast_visual(self, module, dtype):
        return module.to(dtype)

    # ----------------------------------------------------------------- the Hugging Face reference (validation)

    reference_class = ""  # transformers class name of the whole model

    def reference_model(self, src_dir, dtype=None):
        """The whole Hugging Face model (fp32 unless dtype says: `enginefarm bench`
        times it in the engine's dtype); NotAvailable where the family names none."""
        import torch
        import transformers

        cls = getattr(transformers, self.reference_class, None) if self.reference_class else None
        if cls is None:
            raise NotAvailable(f"family {self.name}: no Hugging Face model class to run as its reference "
                               f"({self.reference_class or 'none named'})")
        return cls.from_pretrained(src_dir, dtype=dtype or torch.float32, trust_remote_code=False).eval()

    @staticmethod
    def plain_greedy(model):
        """The model with none of its checkpoint's own generation settings
        that the engines do not apply (forced BOS/EOS at the length limit,
        n-gram blocking, banned or suppressed tokens, a minimum length):
        `generate` fills whatever a GenerationConfig leaves unset from the
        model's own, so they are cleared there."""
        gc = model.generation_config
        for k in ("forced_bos_token_id", "forced_eos_token_id", "no_repeat_ngram_size", "bad_words_ids",
                  "suppress_tokens", "begin_suppress_tokens", "min_new_tokens"):
            if hasattr(gc, k):
                setattr(gc, k, None)
        for k, v in (("min_length", 0), ("repetition_penalty", 1.0), ("length_penalty", 1.0), ("early_stopping", False)):
            if hasattr(gc, k):
                setattr(gc, k, v)
        return model

    def reference_features(self, model, encodings: list) -> list["torch.Tensor"]:  # pragma: no cover
        """Hugging Face's features for each image ([F_i, hidden]), from the processor's outputs."""
        raise NotImplementedError

    # ----------------------------------------------------------------- at run time (torch only, no model code)

    PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

    def check_inputs(self, src_dir, where: str) -> None:
        """The tokenizer, and the processor that turns images into the visual engine's inputs."""
        super().check_inputs(src_dir, where)

        def has_image_settings(p) -> bool:  # processor_config.json holds them only in newer transformers
            import json

            try:
                cfg = json.loads(p.read_text())
            except (OSError, ValueError):
                return False
            return p.name == "preprocessor_config.json" or any("image_processor" in k for k in cfg)

        self.require_files(src_dir, where, "image processor", self.PROCESSOR_FILES, has_image_settings)
        try:
            self.load_processor(src_dir, {})
        except Exception as e:  # noqa: BLE001 - transformers' OSError, ValueError, ... for missing or broken files
            raise BadInput(self.missing_inputs(src_dir, where, "image processor", self.PROCESSOR_FILES, e)) from None

    def load_processor(self, src_dir, meta: dict):
        """The preprocessing of the checkpoint (its processor's files in
        src_dir); meta: the visual engine's facts."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(src_dir, trust_remote_code=False)

    def encode(self, processor, item, prompt: str, token: str) -> dict:
        """The model's inputs for one image (or video) and one prompt."""
        return processor(images=[item], text=[self.prompt_text(prompt, token)], return_tensors="pt")

    def encoder_inputs(self, encoding) -> "torch.Tensor":
        """The visual encoder's inputs for one image, from the processor's output."""
        return encoding["pixel_values"]

    def pack_features(self, outputs: list, encodings: list, meta: dict, extras: dict) -> list:
        """Each image's encoder outputs [n_i, F_enc, hidden] -> its prompt-table rows [F_i, hidden]."""
        return [o.reshape(-1, o.shape[-1]) for o in outputs]

    def visual_extras(self, src_dir, config: dict, dtype) -> dict:
        """Tensors the run-time packing needs beside the encoder (LLaVA-NeXT: image_newline)."""
        return {}

    def reference_text_logits(self, model, ids: "torch.Tensor") -> "torch.Tensor":
        return model(input_ids=ids).logits

    def stop_token_id(self, processor, llm_meta: dict) -> Optional[int]:
        """The token greedy generation stops at: the tokenizer's end of
        sequence (llm_meta: the LLM engine's engine.json)."""
        return getattr(processor, "tokenizer", processor).eos_token_id

    def prompt_text(self, prompt: str, image_token: str) -> str:
        """The text given to the processor for one image and one prompt."""
        return prompt

    # ----------------------------------------------------------------- a conversation (enginefarm chat)

    # whether the model takes a conversation: BLIP's captions and Nougat's pages answer each message alone
    conversational = False

    def chat_text(self, processor, turns: list[tuple[str, str]], user: str, token: str,
                  kind: Optional[str] = None) -> str:
        """The prompt of a conversation about one image (or video): turns
        (user, assistant) so far, then the user's message. The image goes with
        the first turn, as Hugging Face's chat templates place it (a content
        list with {"type": "image"} before the text; the later turns are
        text). The checkpoint's chat template where it has one (the
        processor's, else its tokenizer's), else `chat_lines`. kind: the
        item's ("image" or "video"; the family's `media` unless said)."""
        if not self.conversational:
            return self.prompt_text(user, token)
        template = getattr(processor, "chat_template", None)
        if template:
            msgs = []
            for i, (u, a) in enumerate(list(turns) + [(user, None)]):
                msgs.append({"role": "user", "content": ([{"type": kind or self.media}] if i == 0 else [])
                             + [{"type": "text", "text": u}]})
                if a is not None:
                    msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
            if hasattr(processor, "apply_chat_template"):
                return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return processor.tokenizer.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True,
                                                           tokenize=False)
        return self.chat_lines(turns, user, token)

    def chat_lines(self, turns: list[tuple[str, str]], user: str, token: str) -> str:
        """A conversation's prompt where the checkpoint has no chat template."""
        return self.prompt_text(user, token)
