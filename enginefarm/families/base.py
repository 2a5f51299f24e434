"""What every family knows: the components a checkpoint splits into, how
many visual features it produces, which limits follow, and which tp sizes
its head counts allow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import BadInput, NotAvailable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..spec import Recipe, Variant


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a TensorRT-LLM checkpoint rank file, produced on demand
    from the source tensors it names (so conversion streams tensor by tensor)."""

    name: str
    sources: tuple[str, ...]
    make: Callable[..., "torch.Tensor"]  # called with the loaded source tensors, in order


class Family:
    name: str = ""
    title: str = ""
    model_types: tuple[str, ...] = ()  # Hugging Face config.json "model_type" values
    kind: str = "decoder"  # decoder | encoder-decoder | multimodal
    components: tuple[str, ...] = ("llm",)
    visual_features: Optional[int] = None  # per image, where fixed
    implemented: bool = False
    backends: tuple[str, ...] = ("aoti", "tensorrt-llm")

    # ----------------------------------------------------------------- recipe checks (no weights)

    def check_recipe(self, recipe: "Recipe") -> None:
        origin = recipe.origin or recipe.name
        for comp in recipe.components:
            if comp not in self.components:
                raise BadInput(
                    f"bad recipe {origin}: components.{comp}: family {self.name!r} has no {comp!r} component "
                    f"(it has: {', '.join(self.components)})"
                )
        lim = recipe.limits
        if self.visual_features is not None and "visual" in recipe.enabled_components:
            derived = lim.max_batch_size * self.visual_features
            if lim.max_multimodal_len is not None and lim.max_multimodal_len != derived:
                raise BadInput(
                    f"bad recipe {origin}: limits.max_multimodal_len is {lim.max_multimodal_len}, but "
                    f"max_batch_size ({lim.max_batch_size}) x visual features per image ({self.visual_features}, "
                    f"family {self.name}) = {derived}; remove it (it is derived) or make them agree"
                )

    def derived_limits(self, recipe: "Recipe", config: Optional[dict] = None) -> dict[str, Any]:
        """The recipe's limits with max_multimodal_len filled in. Families
        whose feature count comes from the checkpoint use `config` (the
        fetched config.json) when given."""
        lim = recipe.limits.model_dump()
        if self.visual_features is not None and "visual" in recipe.enabled_components:
            lim["max_multimodal_len"] = lim["max_batch_size"] * self.visual_features
        return lim

    def require_implemented(self, recipe: "Recipe") -> None:
        if not self.implemented:
            from . import implemented_families

            raise NotAvailable(
                f"recipe {recipe.name}: family {self.name!r} ({self.title}) is not implemented yet, so nothing is "
                f"built for it (implemented families: {', '.join(implemented_families())})"
            )

    # ----------------------------------------------------------------- checks against config.json (after fetch)

    def head_counts(self, config: dict) -> tuple[int, int]:
        heads = config.get("num_attention_heads") or config.get("n_head") or config.get("num_heads")
        kv = config.get("num_key_value_heads") or heads
        if not heads:
            raise BadInput(f"family {self.name}: config.json has no num_attention_heads")
        return int(heads), int(kv)

    def check_config(self, config: dict, variant: "Variant", where: str = "config.json") -> None:
        heads, kv = self.head_counts(config)
        tp = variant.tp
        if heads % tp:
            raise BadInput(
                f"variant {variant.name}: tp size {tp} does not divide the model's {heads} attention heads "
                f"({where}); pick a tp size that divides {heads}"
            )
        # TensorRT-LLM replicates kv heads when tp exceeds them, so tp must be
        # a multiple of the kv head count there, or divide it otherwise.
        if kv % tp and tp % kv:
            raise BadInput(
                f"variant {variant.name}: tp size {tp} neither divides the model's {kv} key/value heads nor is a "
                f"multiple of them ({where})"
            )


class DecoderFamily(Family):
    """A decoder-only language model converted to the TensorRT-LLM checkpoint."""

    implemented = True
    architecture: str = ""

    def trtllm_config(self, hf: dict, variant: "Variant") -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self, hf: dict, names: set[str], variant: "Variant") -> list[OutTensor]:  # pragma: no cover
        raise NotImplementedError

    def check_config(self, config: dict, variant: "Variant", where: str = "config.json") -> None:
        mt = config.get("model_type")
        if self.model_types and mt not in self.model_types:
            raise BadInput(
                f"family {self.name} expects a config.json with model_type in {list(self.model_types)}, got {mt!r} ({where})"
            )
        super().check_config(config, variant, where)


def mapping(tp: int, rank: int = 0) -> dict:
    return {"world_size": tp, "tp_size": tp, "pp_size": 1, "rank": rank}


def quantization(variant: "Variant") -> dict:
    from ..quant import scheme_for

    sch = scheme_for(variant.quant, variant.group_size)
    if sch is None:
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    out = {"quant_algo": sch.quant_algo(), "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    if sch.group_size:
        out.update(group_size=sch.group_size, has_zero_point=False, pre_quant_scale=False)
    return out
