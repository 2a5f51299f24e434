"""What every family knows: the components a checkpoint splits into, how
many visual features it produces, which limits follow, and which tp sizes
its head counts allow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from ..errors import BadInput, NotAvailable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..spec import Recipe, Variant


@dataclass(frozen=True)
class CheckpointPart:
    """One TensorRT-LLM checkpoint that a family writes: `subdir` is '' for
    a decoder-only model (config.json and rank files at the root) and
    'encoder' / 'decoder' for an encoder-decoder model, which TensorRT-LLM
    builds as two engines from two checkpoint directories."""

    subdir: str
    config: dict
    tensors: Callable[[int], list["OutTensor"]]  # rank -> the rank file's tensors


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a TensorRT-LLM checkpoint rank file, produced on demand
    from the source tensors it names (so conversion streams tensor by tensor)."""

    name: str
    sources: tuple[str, ...]
    make: Callable[..., "torch.Tensor"]  # called with the loaded source tensors, in order


# ----------------------------------------------------------------------------- the registry

# name -> the family's one instance, filled by @register_family as the
# families package imports its modules (families/__init__.py finds them)
REGISTRY: dict[str, "Family"] = {}

F = TypeVar("F", bound=type)


def register_family(name: str) -> Callable[[F], F]:
    """Class decorator: the family `name` is this class. A family module
    declares itself this way and nothing else names it:

        @register_family("gptj")
        class GPTJ(DecoderFamily):
            model_types = ("gptj",)
            architecture = "GPTJForCausalLM"
            traits = DecoderTraits(parallel_residual=True, allreduce_once=True)
            tiny_models = {"gptj": dict(layers=2, hidden=64, heads=8, kv_heads=None, tied=False)}
            ...

    (the shape of Optimum's exporters: one small config class per
    architecture, registered by a decorator). A second class registering the
    same name is an error, raised at import."""

    def register(cls: F) -> F:
        cls.name = name
        have = REGISTRY.get(name)
        if have is not None and type(have).__qualname__ != cls.__qualname__:
            raise RuntimeError(f"family {name!r} is registered twice: by {type(have).__module__}.{type(have).__qualname__} "
                               f"and by {cls.__module__}.{cls.__qualname__}")
        REGISTRY[name] = cls()
        return cls

    return register


@dataclass(frozen=True)
class DecoderTraits:
    """What a TensorRT-LLM architecture implies for the runtime's one
    decoder (runtime/decoder.py) beyond the fields of its config.json, which
    say the rest (position_embedding_type: learned / GPT-NeoX or GPT-J rotary
    / ALiBi; rotary_dim or rotary_pct; use_parallel_residual;
    max_attention_window_size; q_scaling; do_layer_norm_before)."""

    norm: str = "layernorm"  # layernorm | rmsnorm
    gated_mlp: bool = False  # act(fc x) * gate x, then proj
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x), unless config.json says use_parallel_residual
    allreduce_once: bool = False  # tp: one all-reduce of the attention + MLP partial sums (GPT-J)


class Family:
    name: str = ""  # set by @register_family
    title: str = ""
    model_types: tuple[str, ...] = ()  # Hugging Face config.json "model_type" values
    kind: str = "decoder"  # decoder | encoder-decoder | multimodal
    components: tuple[str, ...] = ("llm",)
    visual_features: Optional[int] = None  # per image, where fixed
    implemented: bool = False
    missing: str = ""  # a declared family: what its implementation still lacks (said when a build is refused)
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

    def code_modules(self) -> list[str]:
        """The modules whose code shapes this family's conversion: its own
        and every family module it inherits from (Mistral from LLaMA); a
        multimodal family adds the LLM families it converts through. They
        enter the convert step's code version, so editing any of them
        re-keys exactly the conversions that use it."""
        return sorted({c.__module__ for c in type(self).__mro__ if c.__module__.startswith("enginefarm.families")})

    def llm_parts(self, config: Optional[dict] = None) -> tuple[str, ...]:
        """The checkpoint directories the llm component converts into (each
        one trtllm-build run): ("",) for a decoder-only LLM, ("encoder",
        "decoder") for T5 / BART. `config`: the fetched config.json, where
        the answer depends on it (a multimodal family's LLM)."""
        return ("encoder", "decoder") if self.kind == "encoder-decoder" else ("",)

    def require_implemented(self, recipe: "Recipe") -> None:
        if not self.implemented:
            from . import implemented_families

            why = f": {self.missing}" if self.missing else ""
            raise NotAvailable(
                f"recipe {recipe.name}: family {self.name!r} ({self.title}) is not implemented yet{why}; nothing is "
                f"built for it (implemented families: {', '.join(implemented_families())})"
            )

    # ----------------------------------------------------------------- inputs that later steps need (after fetch)

    TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                       "vocab.json + merges.txt", "vocab.txt")

    def check_inputs(self, src_dir, where: str) -> None:
        """Refuse (BadInput) a checkpoint that lacks what a later step loads:
        the tokenizer, for validation and for `run`. Its files must be there,
        and it must load from the checkpoint's small files (no weights), as
        validation will load it."""
        self.require_files(src_dir, where, "tokenizer", self.TOKENIZER_FILES)
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(src_dir), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers' OSError, ValueError, ... for broken files
            raise BadInput(self.missing_inputs(src_dir, where, "tokenizer", self.TOKENIZER_FILES, e)) from None

    def require_files(self, src_dir, where: str, what: str, expected: tuple[str, ...],
                      present: Optional[Callable[[Any], bool]] = None) -> None:
        """BadInput unless one of `expected` ("a.json", or "a.json + b.txt"
        for files that go together) is in src_dir (and passes `present`)."""
        from pathlib import Path

        root = Path(src_dir)
        for alt in expected:
            names = [n.strip() for n in alt.split("+")]
            if all((root / n).is_file() for n in names) and (present is None or present(root / names[0])):
                return
        raise BadInput(self.missing_inputs(src_dir, where, what, expected, None))

    @staticmethod
    def missing_inputs(src_dir, where: str, what: str, expected: tuple[str, ...], e: Optional[BaseException]) -> str:
        from pathlib import Path

        have = sorted(p.name for p in Path(src_dir).iterdir() if p.is_file())
        cause = ""
        if e is not None:  # its first sentence, without the scratch directory the files were read from
            first = " ".join(str(e).replace(str(src_dir), "<checkpoint>").split()).split(". ")[0][:200]
            cause = f" ({type(e).__name__}: {first})"
        return (f"{where} has no usable {what} files (validation and `enginefarm run` load them; expected one of: "
                f"{', '.join(expected)}); it has {', '.join(have) or 'no files'}. Save them beside the weights "
                f"(save_pretrained of the {what}) and run again{cause}")

    # ----------------------------------------------------------------- conversion

    def checkpoint_parts(self, hf: dict, names: set[str], variant: "Variant") -> list[CheckpointPart]:
        """The checkpoint directories to write: one, at the root, from the
        family's `trtllm_config` and `tensors` (decoder-only LLMs, and the llm
        of a multimodal family); encoder-decoder families write two."""
        return [CheckpointPart("", self.trtllm_config(hf, variant), lambda rank: self.tensors(hf, names, variant, rank))]

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
        check_divides_widths(config, variant, where)


# config.json's names of the MLP width, which column-parallel layers split
# over the ranks (TensorRT-LLM's MLP takes ffn_hidden_size // tp_size)
WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim")


def check_divides_widths(config: dict, variant: "Variant", where: str) -> None:
    """The MLP widths must split evenly over the ranks too (the heads are
    checked by the caller); tp need not be a power of two."""
    for k in WIDTH_KEYS:
        n = config.get(k)
        if isinstance(n, int) and n % variant.tp:
            raise BadInput(f"variant {variant.name}: tp size {variant.tp} does not divide the model's {k} {n} "
                           f"({where}); pick a tp size that divides it")


class DecoderFamily(Family):
    """A decoder-only language model converted to the TensorRT-LLM checkpoint.

    Besides its conversion, a decoder-only family module declares what the
    rest of the farm needs to know of it, so that adding one is that module
    (plus its tiny recipe, models/tiny/tiny-NAME.yaml):
      - `architecture`: the TensorRT-LLM architecture its checkpoints name,
        and `traits`, what that architecture means for the aoti runtime;
      - `tiny_models`: its tiny test checkpoints (name -> the arguments of
        `tiny_config`), which enginefarm.testing.tiny writes;
      - `tiny_config(...)`: the Hugging Face config.json of a tiny one.
    """

    implemented = True
    architecture: str = ""
    traits: DecoderTraits = DecoderTraits()
    # tiny checkpoint name -> tiny_config's arguments (layers, hidden, heads,
    # kv_heads, tied, then the family's own)
    tiny_models: dict[str, dict] = {}
    # a seeded random draw of every bias and norm weight of the tiny model
    # (Hugging Face starts them at 0 and 1, so a converter that dropped or
    # misplaced one would go unnoticed)
    tiny_random_affine: bool = True

    def tiny_config(self, vocab: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool,
                    **extra: Any) -> dict:  # pragma: no cover - abstract
        """The Hugging Face config of a tiny random checkpoint of this
        family: {"model_type": ..., then the arguments of its config class};
        `vocab`: the tiny tokenizer's vocabulary size. No transformers import
        here (enginefarm.testing.tiny builds the model from it)."""
        raise NotImplementedError

    @property
    def tiny_recipe(self) -> str:
        """The catalog name of the family's tiny recipe (models/tiny/)."""
        return f"tiny-{self.name}"

    def trtllm_config(self, hf: dict, variant: "Variant") -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self, hf: dict, names: set[str], variant: "Variant") -> list[OutTensor]:  # pragma: no cover
        raise NotImplementedError

    # config.json's names of the hidden size, layer count and head count (the
    # first one set wins: they differ across families and transformers versions)
    hidden_keys: tuple[str, ...] = ("hidden_size",)
    layer_keys: tuple[str, ...] = ("num_hidden_layers",)
    head_keys: tuple[str, ...] = ("num_attention_heads",)

    def dims(self, hf: dict) -> tuple[int, int, int]:
        """(hidden size, layers, attention heads) of a config.json."""
        return hf_value(hf, *self.hidden_keys), hf_value(hf, *self.layer_keys), hf_value(hf, *self.head_keys)

    def mha_fields(self, hf: dict) -> dict:
        """The size fields of config.json for multi-head attention (as many kv heads as heads)."""
        h, layers, n = self.dims(hf)
        return {"vocab_size": hf["vocab_size"], "hidden_size": h, "num_hidden_layers": layers,
                "num_attention_heads": n, "num_key_value_heads": n, "head_size": h // n}

    def base_config(self, variant: "Variant", **fields) -> dict:
        """A TensorRT-LLM checkpoint config.json: the fields every decoder
        has (architecture, dtype, mapping, quantization, embeddings not
        shared or split), then the family's own."""
        return {
            "architecture": self.architecture,
            "dtype": variant.dtype,
            "share_embedding_table": False,
            "use_parallel_embedding": False,
            "mapping": mapping(variant.tp),
            "quantization": quantization(variant),
            **fields,
        }

    def refuse_for_tensorrt_llm(self, variant: "Variant", why: Optional[str], where: str) -> None:
        """What the aoti runtime computes but TensorRT-LLM's model of this
        architecture does not: refused for tensorrt-llm variants only."""
        if why and variant.backend == "tensorrt-llm":
            raise NotAvailable(f"variant {variant.name}: {self.title} with {why} is not what TensorRT-LLM's "
                               f"{self.architecture} computes; build it with the aoti backend ({where})")

    def check_model_type(self, config: dict, where: str) -> None:
        mt = config.get("model_type")
        if self.model_types and mt not in self.model_types:
            raise BadInput(
                f"family {self.name} expects a config.json with model_type in {list(self.model_types)}, got {mt!r} ({where})"
            )

    def check_config(self, config: dict, variant: "Variant", where: str = "config.json") -> None:
        self.check_model_type(config, where)
        super().check_config(config, variant, where)


def hf_value(hf: dict, *keys: str, default: Any = None) -> Any:
    """The first of `keys` that config.json sets (Hugging Face configs name
    one thing differently across families and versions: n_embd, hidden_size, n_embed)."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    if default is None:
        raise BadInput(f"config.json has none of {', '.join(keys)}")
    return default


def prefix_of(names: set[str], probe: str, prefixes: tuple[str, ...]) -> str:
    """Which of `prefixes` the checkpoint's tensor names carry (a model saved
    from its base class has none: GPT-2's and BLOOM's original files)."""
    for p in prefixes:
        if p + probe in names:
            return p
    raise BadInput(f"the checkpoint has no tensor {probe!r} under any of the prefixes {list(prefixes)}")


# TensorRT-LLM's enums as its enc-dec config.json stores them (integers):
# tensorrt_llm.functional.LayerNormType, LayerNormPositionType, MLPType
LAYERNORM_TYPE = {"LayerNorm": 0, "RmsNorm": 1}
LAYERNORM_POSITION = {"pre_layernorm": 0, "post_layernorm": 1}
MLP_TYPE = {"MLP": 0, "GatedMLP": 1}


class EncoderDecoderFamily(DecoderFamily):
    """An encoder-decoder language model (T5, BART). TensorRT-LLM converts it
    into two checkpoints, `encoder/` (architecture EncoderModel) and
    `decoder/` (DecoderModel: self-attention, cross-attention to the encoder
    output, lm_head), each with its own config.json and rank files; both are
    split for the same tp size."""

    kind = "encoder-decoder"

    def side_heads(self, config: dict) -> dict[str, int]:  # pragma: no cover - abstract
        """{'encoder': heads, 'decoder': heads} from the Hugging Face config.json."""
        raise NotImplementedError

    def head_counts(self, config: dict) -> tuple[int, int]:
        h = self.side_heads(config)["decoder"]
        return h, h

    def check_config(self, config: dict, variant: "Variant", where: str = "config.json") -> None:
        self.check_model_type(config, where)
        try:
            sides = self.side_heads(config)
        except KeyError as e:
            raise BadInput(f"family {self.name}: config.json has no {e.args[0]} ({where})") from None
        for side, heads in sides.items():
            if heads % variant.tp:
                raise BadInput(
                    f"variant {variant.name}: tp size {variant.tp} does not divide the model's {heads} {side} "
                    f"attention heads ({where}); pick a tp size that divides {heads}"
                )
        check_divides_widths(config, variant, where)

    def encoder_config(self, hf: dict, variant: "Variant") -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def decoder_config(self, hf: dict, variant: "Variant") -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def encoder_tensors(self, hf: dict, names: set[str], variant: "Variant", rank: int) -> list[OutTensor]:  # pragma: no cover
        raise NotImplementedError

    def decoder_tensors(self, hf: dict, names: set[str], variant: "Variant", rank: int) -> list[OutTensor]:  # pragma: no cover
        raise NotImplementedError

    def checkpoint_parts(self, hf: dict, names: set[str], variant: "Variant") -> list[CheckpointPart]:
        return [
            CheckpointPart("encoder", self.encoder_config(hf, variant),
                           lambda rank: self.encoder_tensors(hf, names, variant, rank)),
            CheckpointPart("decoder", self.decoder_config(hf, variant),
                           lambda rank: self.decoder_tensors(hf, names, variant, rank)),
        ]


def encdec_config(architecture: str, variant: "Variant", **fields: Any) -> dict:
    """A TensorRT-LLM EncoderModel / DecoderModel config.json: the fields every
    family gives, plus the family's own."""
    return {
        "architecture": architecture,
        "dtype": variant.dtype,
        "logits_dtype": "float32",
        **fields,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": mapping(variant.tp),
        "quantization": quantization(variant),
    }


def first_present(names: set[str], *candidates: str) -> str:
    """The first of `candidates` the checkpoint has (tied tensors are stored once, under one of their names)."""
    for c in candidates:
        if c in names:
            return c
    raise BadInput(f"the checkpoint has none of the tensors {list(candidates)}")


def mapping(tp: int, rank: int = 0) -> dict:
    return {"world_size": tp, "tp_size": tp, "pp_size": 1, "rank": rank}


def quantization(variant: "Variant") -> dict:
    from ..quant import scheme_for

    sch = scheme_for(variant.quant, variant.group_size)
    if sch is None:
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    # No exclude_modules: TensorRT-LLM reads a list there as the *whole* list of
    # modules it leaves unquantized, replacing its default one
    # (tensorrt_llm/quantization/quantize.py `quantize_layers`: exclude_modules =
    # quant_config.exclude_modules or ['*lm_head', '*router', '*vocab_embedding',
    # '*position_embedding', '*block_embedding', ...]; the same default in both
    # stored versions read: one from before W8A16_GPTQ existed, and the newest),
    # and `weight_only_quantize` maps Embedding to WeightOnlyQuantEmbedding. With
    # ["lm_head"] the vocab embedding became a quantized embedding that wants
    # `transformer.vocab_embedding.per_token_scale` (issue 16). Absent, the
    # default list leaves exactly the embeddings, position tables and lm_head in
    # the model dtype, which is what the farm writes.
    out = {"quant_algo": sch.quant_algo(), "kv_cache_quant_algo": None}
    if sch.group_size:
        # AWQ (W4A16_AWQ): the same group-wise layout plus a prequant_scaling_factor per linear
        out.update(group_size=sch.group_size, has_zero_point=False, pre_quant_scale=sch.awq)
    return out
