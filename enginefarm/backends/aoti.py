"""`aoti`: torch.export + AOTInductor packages (.pt2).

A decoder-only LLM engine is built by runtime/export.py: a package holding
the step function of `enginefarm.runtime.decoder` with a static KV cache
written in place, dynamic batch (1..max_batch_size) and token count
(1..max_input_len), so one package does prefill and decode (on CUDA, a
decode package with the weight-only kernels beside it). An encoder-decoder LLM (T5, BART) is two
packages (see `enginefarm.runtime.encdec`): the encoder, which also computes
the decoder's cross-attention keys/values once per request, and the decoder
step with its self-attention cache. Runs on CPU here and on CUDA where the
target is a GPU. Built for a multimodal recipe (limits carry
max_multimodal_len), the decoder step also takes a prompt table of
1..max_multimodal_len rows.

The visual engine is the export step's ExportedProgram (the graph its ONNX
was made from) compiled by AOTInductor (runtime/export.py's export_visual):
pixel_values with a dynamic batch (1..max_batch_size) -> features.

The recipe's `components.<c>.aoti` options (spec.AotiOptions) reach the
exporter as they are; engines load through `runtime.engine.load_engine`.

A tp > 1 variant (LLM components) is one engine directory per rank, rank N's
built from the checkpoint's rank N files in rank N of tp processes, the
collectives compiled into the packages (`AOTI._build_tp`); the visual engine
is built once, as at tp 1 (replicated: every rank gets its features).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import BadInput, NotAvailable
from ..runtime.sidecar import write as write_sidecar
from .base import Backend, BuildRequest, BuildResult, torch_toolchain, version_of

ENCODER_FILE = "encoder.pt2"
DECODER_FILE = "decoder.pt2"


class AOTI(Backend):
    components = ("llm", "visual")
    max_tp = 8  # tp > 1: one package set per rank, run as tp processes (see _build_tp)
    install_hint = "pip install 'torch>=2.6'"

    def usable(self, component: str, target: str) -> tuple[bool, str]:
        if component not in self.components:
            return False, f"the aoti backend builds {', '.join(self.components)} components in this version"
        tv = version_of("torch")
        if tv is None:
            return False, f"torch is not installed ({self.install_hint})"
        major_minor = tuple(int(x) for x in tv.split("+")[0].split(".")[:2])
        if major_minor < (2, 6):
            return False, f"this torch ({tv}) has no AOTInductor packaging ({self.install_hint})"
        if target != "cpu":
            import torch

            if not torch.cuda.is_available():
                return False, f"target {target} needs a CUDA GPU; none is visible here"
            major, minor = torch.cuda.get_device_capability()
            if f"sm_{major}{minor}" != target:
                return False, f"target {target} but this machine's GPU is sm_{major}{minor}"
        return True, ""

    def cannot_run(self, sidecar: dict, gpu=None):
        """FP8 engines run only on a GPU with FP8 (quant.engine_cannot_run);
        every other aoti engine runs where it was built."""
        from ..quant import engine_cannot_run

        return engine_cannot_run(sidecar.get("act_quant"), sidecar.get("device") or "cpu", gpu)

    def toolchain(self, target: str) -> dict:
        return {"backend": "aoti", **torch_toolchain(target)}

    def build(self, req: BuildRequest) -> BuildResult:
        return BuildResult(self._build(req.component, Path(req.src_dir), Path(req.out_dir), req.variant, req.limits,
                                       req.progress, req.options))

    def _build(self, component, src_dir, out_dir, variant, limits, progress=None, options=None) -> dict:
        """options: the recipe's `components.<c>.aoti` (spec.AotiOptions) or None (the defaults)."""
        from ..runtime.encdec import is_encdec_checkpoint
        from ..runtime.export import build_llm

        ok, why = self.usable(component, variant.target)
        if not ok:
            raise NotAvailable(why)
        if component == "visual":
            return self._build_visual(src_dir, out_dir, variant, limits, progress, options)
        if variant.tp > self.max_tp:
            raise NotAvailable(f"the aoti backend builds engines up to tp={self.max_tp} (variant {variant.name} has "
                               f"tp={variant.tp})")
        if variant.tp > 1:
            return self._build_tp(component, src_dir, out_dir, variant, limits, progress, options)
        return self._build_llm(component, src_dir, out_dir, variant, limits, progress, options)

    def _build_llm(self, component, src_dir, out_dir, variant, limits, progress=None, options=None, rank: int = 0):
        """The LLM packages of one rank of the checkpoint (tp 1: the only one)."""
        from ..runtime.encdec import is_encdec_checkpoint
        from ..runtime.export import build_llm

        out_dir.mkdir(parents=True, exist_ok=True)
        if is_encdec_checkpoint(src_dir):
            if options is not None:
                raise NotAvailable("aoti options apply to decoder-only LLMs and visual encoders in this version")
            return self._build_encdec(component, src_dir, out_dir, variant, limits, progress, rank)
        return build_llm(Path(src_dir), Path(out_dir), variant, limits, options, progress, rank=rank).dump()

    def _build_tp(self, component, src_dir, out_dir, variant, limits, progress=None, options=None) -> dict:
        """A tp > 1 LLM engine: out_dir/rank{N}/ holds rank N's packages, built
        from the checkpoint's rank{N} files in rank N of tp processes
        (runtime/tp.py's launcher, gloo on CPU, nccl on GPUs), each a whole
        engine directory whose sidecar carries tp_rank; out_dir/engine.json
        names them (`ranks`). The collectives are inside the packages: the
        model's all-reduces and the logits all-gather are torch's functional
        collectives (runtime/decoder.py), which torch.export traces and
        AOTInductor compiles (torch 2.13, CPU with gloo, tried); the compile
        resolves the process group, hence the build in the rank processes.
        The runner (runtime/tp.py's TPEngine) only starts the ranks and hands
        every rank the same call."""
        from ..runtime.tp import checkpoint_tp, run_ranks

        got = checkpoint_tp(src_dir)
        if got != variant.tp:
            raise BadInput(f"{src_dir}: a tp {got} checkpoint, but variant {variant.name} has tp={variant.tp}")
        out_dir.mkdir(parents=True, exist_ok=True)
        if progress:
            progress(f"aoti: tp {variant.tp}: exporting and compiling each rank's packages in its own process")
        args = {"component": component, "src": str(Path(src_dir).resolve()), "out": str(Path(out_dir).resolve()),
                "variant": variant.model_dump(mode="json"), "limits": limits,
                "options": options.model_dump(mode="json") if hasattr(options, "model_dump") else options}
        rank0 = run_ranks(variant.tp, "enginefarm.backends.aoti:build_rank", args,
                          backend="gloo" if variant.target == "cpu" else "nccl", what=f"aoti tp {variant.tp} build")
        top = {k: v for k, v in rank0.items() if k not in ("tp_rank", "file", "files")}
        top["ranks"] = [f"rank{r}" for r in range(variant.tp)]
        return write_sidecar(out_dir, top).dump()

    @staticmethod
    def _compile(model, args, dynamic_shapes, path: Path, what: str, progress) -> dict:
        """torch.export + AOTInductor into one .pt2 package; the seconds each took."""
        import torch

        t0 = time.perf_counter()
        if progress:
            progress(f"aoti: torch.export ({what})")
        with torch.no_grad():
            ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
        return {"export_s": round(time.perf_counter() - t0, 3),
                **AOTI._package(ep, path, what, args[0].device.type, progress)}

    @staticmethod
    def _package(ep, path: Path, what: str, device: str, progress) -> dict:
        """AOTInductor-compile an exported program into one .pt2 package."""
        import torch

        t0 = time.perf_counter()
        if progress:
            progress(f"aoti: AOTInductor compile ({what}, {device})")
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
        return {"compile_s": round(time.perf_counter() - t0, 3)}

    def _build_encdec(self, component, src_dir, out_dir, variant, limits, progress, rank: int = 0) -> dict:
        """Two packages: the encoder (with the decoder's cross-attention K/V
        projections of its output, so they are computed once per request) and
        the decoder step (static self-attention cache; cross K/V as inputs).
        Multimodal: with max_multimodal_len in the limits the encoder also
        takes a prompt table; a checkpoint with a decoder only (Nougat, BLIP)
        gets, in place of the encoder, the cross K/V of given encoder features
        (limits' max_encoder_input_len of them per image, of the width the
        decoder's cross-attention takes: its config's encoder_hidden_size)."""
        import torch
        from torch.export import Dim

        from ..runtime.encdec import FeaturesCrossKV, load_encdec

        device = "cpu" if variant.target == "cpu" else "cuda"
        encoder, decoder = load_encdec(src_dir, rank=rank, allow_tp=True)
        encoder, decoder = encoder.to(device), decoder.to(device)
        features_in = isinstance(encoder, FeaturesCrossKV)
        c = decoder.cfg
        B, T, S = _rows(limits), limits["max_input_len"], limits["max_seq_len"]
        M = 0 if features_in else (limits.get("max_multimodal_len") or 0)
        # example sizes: the encoder input longer than the decoder's, so
        # that export keeps the two token counts apart
        eb, et, dt = min(2, B), min(3, T), min(2, T, S)
        batch = Dim("batch", min=1, max=B) if B > 1 else None
        enc_len = Dim("enc_len", min=1, max=T) if T > 1 else None
        tokens = Dim("tokens", min=1, max=min(T, S)) if min(T, S) > 1 else None
        lengths = torch.full((eb,), et, dtype=torch.long, device=device)
        if features_in:
            Fe = limits.get("max_encoder_input_len")
            if not Fe:
                raise BadInput("a decoder-only encoder-decoder checkpoint needs limits.max_encoder_input_len "
                               "(the encoder features per input; the family derives it)")
            et, enc_len = Fe, None  # a fixed count of features per image
            lengths = torch.full((eb,), et, dtype=torch.long, device=device)
            enc_in = torch.zeros(eb, et, c.encoder_hidden_size, dtype=decoder.embed.dtype, device=device)
            args, specs = (enc_in, lengths), [{0: batch}, {0: batch}]
        else:
            ids = torch.zeros(eb, et, dtype=torch.long, device=device)
            args, specs = (ids, lengths), [{0: batch, 1: enc_len}, {0: batch}]
            if M:
                H = encoder.encoder.cfg.hidden_size
                args += (torch.zeros(min(2, M), H, dtype=decoder.embed.dtype, device=device),)
                specs.append({0: Dim("prompt_rows", min=1, max=M) if M > 1 else None})
        timings = {"encoder": self._compile(encoder, args, _dims(specs), out_dir / ENCODER_FILE, "encoder", progress)}
        with torch.no_grad():
            _, ck, cv = encoder(*args)
        kc, vc = decoder.new_cache(eb, S)
        kc, vc = kc.to(device), vc.to(device)
        dec_ids = torch.zeros(eb, dt, dtype=torch.long, device=device)
        start = torch.zeros(1, dtype=torch.long, device=device)
        ds = _dims([{0: batch, 1: tokens}, {}, {1: batch}, {1: batch}, {1: batch, 3: enc_len}, {1: batch, 3: enc_len},
                    {0: batch}])
        timings["decoder"] = self._compile(decoder, (dec_ids, start, kc, vc, ck, cv, lengths), ds, out_dir / DECODER_FILE,
                                           "decoder step", progress)
        cache = [c.num_layers, "batch", c.heads_per_rank, S, c.head_size]
        cross = [c.num_layers, "batch", c.heads_per_rank, et if features_in else "enc_len", c.head_size]
        if features_in:
            enc_inputs = [{"name": "encoder_output", "dtype": variant.dtype,
                           "shape": ["batch", et, c.encoder_hidden_size]},
                          {"name": "lengths", "dtype": "int64", "shape": ["batch"]}]
        else:
            enc_inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "enc_len"]},
                          {"name": "lengths", "dtype": "int64", "shape": ["batch"]}]
            if M:
                enc_inputs.append({"name": "prompt_table", "dtype": variant.dtype, "shape": ["rows", H]})
        sidecar = {
            **_sidecar(component, device, variant, limits, c.vocab_size),
            "kind": "encoder-decoder",
            "files": {"encoder": ENCODER_FILE, "decoder": DECODER_FILE},
            "decoder_start_token_id": c.decoder_start_token_id,
            "eos_token_id": c.eos_token_id,
            "cache_shape": cache,
            "encoder_input": "features" if features_in else "tokens",
            "encoder": {
                "inputs": enc_inputs,
                "outputs": [{"name": "encoder_output", "dtype": variant.dtype,
                             "shape": ["batch", et if features_in else "enc_len", c.encoder_hidden_size]},
                            {"name": "cross_k", "dtype": variant.dtype, "shape": cross},
                            {"name": "cross_v", "dtype": variant.dtype, "shape": cross}],
            },
            "decoder": {
                "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                           {"name": "start_pos", "dtype": "int64", "shape": [1]},
                           {"name": "k_cache", "dtype": variant.dtype, "shape": cache},
                           {"name": "v_cache", "dtype": variant.dtype, "shape": cache},
                           {"name": "cross_k", "dtype": variant.dtype, "shape": cross},
                           {"name": "cross_v", "dtype": variant.dtype, "shape": cross},
                           {"name": "lengths", "dtype": "int64", "shape": ["batch"]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "tokens", c.vocab_size]},
                            {"name": "k_cache", "dtype": variant.dtype},
                            {"name": "v_cache", "dtype": variant.dtype}],
            },
            "timings": timings,
        }
        if features_in:
            sidecar["encoder_features"] = et
            sidecar["encoder_hidden_size"] = c.encoder_hidden_size
        if M:
            sidecar["prompt_table"] = {"max_rows": M, "hidden_size": H}
        return write_sidecar(out_dir, sidecar).dump()

    def _build_visual(self, src_dir: Path, out_dir: Path, variant, limits: dict, progress=None, options=None) -> dict:
        """src_dir: the export step's files (visual.ep.pt2, visual.json)."""
        import torch

        from ..runtime.engine import DTYPES
        from ..runtime.export import export_visual

        meta = json.loads((src_dir / "visual.json").read_text())
        B = meta["max_batch_size"]  # encoder inputs per call: images, or tiles (max_batch_size x tiles per image)
        device = "cpu" if variant.target == "cpu" else "cuda"
        ep = torch.export.load(str(src_dir / meta["exported_program"]))
        if device != "cpu":
            from torch.export.passes import move_to_device_pass

            # an indexed device: the program asserts its input's device, and a tensor
            # made on "cuda" is on cuda:0 (a bare "cuda" failed that check on an H100)
            ep = move_to_device_pass(ep, f"cuda:{torch.cuda.current_device()}")
        # Re-traced before compiling (export_visual exports the module again):
        # with torch 2.13, AOTInductor compiling the deserialized program of
        # the CLIP tower gave NaN at batch 1 (batch 2 was right); compiling a
        # fresh trace of its module is right at every batch size
        # (tests/test_multimodal.py checks batch 1 and max).
        side = export_visual(ep.module(), out_dir, B, meta["image_size"], device, DTYPES[meta["dtype"]], options,
                             progress, visual=meta, target=variant.target, names=(meta["input"], meta["output"]))
        if meta.get("extras"):
            shutil.copyfile(src_dir / meta["extras"], out_dir / meta["extras"])
        return side.dump()

    def load(self, engine_dir: Path, device: str = "cpu", cuda_graphs: bool | None = None):
        """The engine's runtime (runtime.engine.load_engine). cuda_graphs (on
        CUDA): capture decode steps / visual batches as CUDA graphs (default:
        as the recipe built it)."""
        from ..runtime.engine import load_engine

        return load_engine(engine_dir, cuda_graphs)

    def triton_model(self, name: str, sidecar: dict) -> tuple[str, dict[str, str]]:
        """Triton has no backend for AOTInductor packages: the engine is served
        by Triton's Python backend (`model.py` in the version folder, which
        needs enginefarm and torch in Triton's Python environment): token ids
        in, greedy continuation out, a batch of up to max_batch_size prompts
        of equal length per request. A tp > 1 engine is refused (its model
        would have to start and drive its rank processes)."""
        if int(sidecar.get("tp") or 1) > 1:
            raise BadInput(f"a tp {sidecar['tp']} aoti engine has no Triton layout in this version: its ranks run "
                           f"as {sidecar['tp']} processes, which the Python-backend model.py would have to start "
                           f"and drive (runtime/tp.py's TPEngine); pull it with --layout plain")
        gpu = sidecar.get("device") == "cuda"
        config = "\n".join([
            f'name: "{name}"',
            'backend: "python"',
            f"max_batch_size: {int(sidecar['max_batch_size'])}",
            "input [",
            '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },',
            '  { name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }',
            "]",
            "output [",
            '  { name: "output_ids" data_type: TYPE_INT64 dims: [ -1 ] }',
            "]",
            f"instance_group [ {{ count: 1 kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]",
            f'parameters {{ key: "engine_file" value: {{ string_value: "{sidecar["file"]}" }} }}',
            f'parameters {{ key: "max_input_len" value: {{ string_value: "{int(sidecar["max_input_len"])}" }} }}',
            f'parameters {{ key: "max_seq_len" value: {{ string_value: "{int(sidecar["max_seq_len"])}" }} }}',
            "",
        ])
        return config, {"model.py": TRITON_MODEL_PY}


TRITON_MODEL_PY = '''"""Triton Python-backend model for an enginefarm aoti engine (written by
`enginefarm pull --layout triton`). The engine files sit beside this file."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from enginefarm.runtime.engine import LLMEngine

        here = os.path.join(args["model_repository"], args["model_version"])
        self.engine = LLMEngine.load(here)
        params = json.loads(args["model_config"]).get("parameters", {})
        budget = int(params.get("max_seq_len", {}).get("string_value", self.engine.max_seq_len))
        self.default_new_tokens = max(1, budget - int(params.get("max_input_len", {}).get("string_value", 0)))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
                n = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
                n = int(n.as_numpy().reshape(-1)[0]) if n is not None else self.default_new_tokens
                outs = self.engine.generate([[int(t) for t in row] for row in ids], n)
                width = max(len(o) for o in outs)
                arr = np.full((len(outs), width), -1, dtype=np.int64)
                for i, o in enumerate(outs):
                    arr[i, : len(o)] = o
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("output_ids", arr)]))
            except Exception as e:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
'''


def build_rank(rank: int, world: int, args: dict) -> dict:
    """Rank `rank` of a tp build (AOTI._build_tp), run in that rank's process
    by runtime/tp.py: its packages into out/rank{rank}/; its sidecar."""
    from ..runtime.sidecar import read as read_sidecar
    from ..spec import AotiOptions, Variant

    variant = Variant.model_validate(args["variant"])
    options = AotiOptions.model_validate(args["options"]) if args["options"] is not None else None
    out = Path(args["out"]) / f"rank{rank}"
    AOTI("aoti")._build_llm(args["component"], Path(args["src"]), out, variant, args["limits"], None, options, rank)
    side = read_sidecar(out).dump()
    side.update(tp=world, tp_rank=rank)
    return write_sidecar(out, side).dump()


def _sidecar(component: str, device: str, variant, limits: dict, vocab_size: int) -> dict:
    """engine.json fields every aoti LLM engine has."""
    return {
        "format": "aoti-pt2",
        "component": component,
        "device": device,
        "target": variant.target,
        "dtype": variant.dtype,
        "max_batch_size": limits["max_batch_size"],
        "max_beam_width": limits.get("max_beam_width") or 1,
        "max_input_len": limits["max_input_len"],
        "max_seq_len": limits["max_seq_len"],
        "vocab_size": vocab_size,
    }


def _rows(limits: dict) -> int:
    """The sequences an LLM package takes at once: requests x beams (beam search runs every beam as a row)."""
    return limits["max_batch_size"] * (limits.get("max_beam_width") or 1)


def _dims(specs: list[dict]):
    """dynamic_shapes for torch.export: per input, its dynamic dims (None
    entries, for a dim of size 1 that is not dynamic, left out)."""
    out = []
    for d in specs:
        d = {k: v for k, v in d.items() if v is not None}
        out.append(d or None)
    return tuple(out)


def backend(name: str) -> AOTI:
    return AOTI(name)
