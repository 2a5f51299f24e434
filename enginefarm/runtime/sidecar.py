"""engine.json: the sidecar beside every built engine, written and read here only.

Every backend's build writes it (`write`), every loader reads it (`read`),
and the build step records it in the manifest (`Sidecar.dump()`). The
fields every engine has, and those of the aoti engines (decoder-only LLM,
encoder-decoder LLM, visual encoder), are typed; a backend's own facts
(TensorRT's bindings, TensorRT-LLM's runtime settings) ride along as extra
fields. `version` says which interface the engine's files have: an engine
whose sidecar is of another version (or none: built before there were
versions), or which is not a sidecar at all, is refused with one message
that says to rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import BadInput

FILE = "engine.json"
# 3: one runtime (issue 22): every aoti LLM package takes per-layer caches,
# written in place, and returns the logits only
VERSION = 3

Dim = Union[int, str]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Model):
    """One input or output of a package: name, dtype, shape ("batch", "tokens", ... for dynamic dims)."""

    name: str
    dtype: str
    shape: Optional[list[Dim]] = None
    per_layer: Optional[int] = None  # one tensor per layer, this many
    mutated: bool = False  # written in place by the package


class PromptTable(_Model):
    """A multimodal LLM's prompt table input: visual features, ids >= vocab_size pick its rows."""

    max_rows: int
    hidden_size: int


class Graph(_Model):
    """One package's interface (the encoder-decoder pair's halves)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Sidecar(BaseModel):
    model_config = ConfigDict(extra="allow")  # a backend's own facts

    version: int = VERSION
    format: str  # aoti-pt2 | onnx | tensorrt-plan | tensorrt-llm
    component: str = "llm"  # llm | visual
    kind: Optional[str] = None  # llm components: encoder-decoder, or a decoder-only LLM
    device: str = "cpu"
    target: Optional[str] = None
    dtype: Optional[str] = None
    file: Optional[str] = None  # the one package (or plan, or ONNX file)
    files: dict[str, str] = {}  # role -> file: general, decode, weights; encoder, decoder
    max_batch_size: Optional[int] = None
    max_beam_width: int = 1
    max_input_len: Optional[int] = None
    max_seq_len: Optional[int] = None
    vocab_size: Optional[int] = None
    hidden_size: Optional[int] = None
    quant_bits: int = 0
    act_quant: Optional[str] = None  # activations quantized too: int8_sq, fp8 (quant.act_quant_of)
    cache_shape: Optional[list[Dim]] = None  # [layers, "batch", kv_heads, max_seq_len, head_size]
    prompt_table: Optional[PromptTable] = None
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    options: Optional[dict[str, Any]] = None  # the recipe's aoti options the engine was built with (spec.AotiOptions)
    kernels: list[dict[str, Any]] = []  # the decode kernels' launch configurations
    timings: dict[str, Any] = {}
    # visual components: the export step's facts (features, hidden size, image size, image token ...)
    visual: Optional[dict[str, Any]] = None
    # encoder-decoder LLMs
    decoder_start_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list[int]]] = None
    encoder_input: Optional[str] = None  # tokens | features
    encoder: Optional[Graph] = None
    decoder: Optional[Graph] = None
    encoder_features: Optional[int] = None
    encoder_hidden_size: Optional[int] = None
    # tensor parallelism (aoti, tp > 1): the engine directory's sidecar names
    # its rank directories (`ranks`, each a whole engine of one rank with its
    # own sidecar, which carries `tp_rank`)
    tp: int = 1
    tp_rank: Optional[int] = None
    ranks: list[str] = []

    def dump(self) -> dict:
        """The JSON-able dict (what engine.json holds, and the build manifest
        records): the fields that were given, and the version."""
        return {"version": self.version, **self.model_dump(mode="json", exclude_unset=True)}

    def need(self, *names: str) -> None:
        """Refuse, as a bad sidecar, one that lacks fields this engine's loader needs."""
        missing = [n for n in names if getattr(self, n, None) is None]
        if missing:
            raise BadInput(f"the engine's {FILE} lacks {', '.join(missing)}: rebuild the engine")


def write(out_dir: Union[str, Path], sidecar: Union[Sidecar, dict]) -> Sidecar:
    """out_dir/engine.json from a Sidecar (or the fields of one); returns the Sidecar."""
    s = sidecar if isinstance(sidecar, Sidecar) else Sidecar.model_validate(sidecar)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / FILE).write_text(json.dumps(s.dump(), indent=2))
    return s


def parse(data: dict, where: str = "the engine") -> Sidecar:
    """A sidecar from its dict (engine.json's content, or a manifest's record of it)."""
    if not isinstance(data, dict):
        raise BadInput(f"{where}: {FILE} holds no JSON object: rebuild the engine")
    got = data.get("version")
    if got != VERSION:
        built = f"sidecar version {got}" if got is not None else "a sidecar without a version"
        raise BadInput(f"{where} was built by another enginefarm ({built}; this one runs version {VERSION}): "
                       f"rebuild the engine")
    try:
        return Sidecar.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(str(x) for x in first["loc"]) or "(top)"
        raise BadInput(f"{where}: {FILE} is not a valid engine sidecar ({at}: {first['msg']}): rebuild the engine") \
            from None


def read(engine_dir: Union[str, Path]) -> Sidecar:
    """engine_dir/engine.json; BadInput (one line) if it is missing, unreadable, of another version or invalid."""
    path = Path(engine_dir) / FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{engine_dir} holds no readable {FILE} ({e.__class__.__name__}: {e})") from None
    return parse(data, str(engine_dir))
