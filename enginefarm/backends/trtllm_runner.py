"""A thin adapter that runs a `tensorrt-llm` engine with TensorRT-LLM's own
runtime (`tensorrt_llm.runtime.ModelRunnerCpp`) behind the interface the
validate step and `enginefarm run` use for aoti engines
(runtime/engine.py LLMEngine, runtime/encdec.py EncDecEngine):
`generate`, `logits`, the limits, and for encoder-decoder engines
`seq2seq` / `decoder_start_token_id`.

What it does NOT do: compute anything itself. Tokens come from the runner's
`generate`; teacher-forced logits come from the runner's context logits,
which an engine only returns when it was built with `--gather_context_logits`
(the build adds it; an engine without it gets NotAvailable naming the flag).

NEVER RUN against a real TensorRT-LLM: it cannot be installed where the
farm's CI runs. Every runtime call it makes, with the keywords it passes, is
listed in SIGNATURES with the file and stored commit it was read from;
tests/test_trtllm_runner.py holds the source to that table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import BadInput, NotAvailable
from ..runtime.sidecar import FILE as SIDECAR
from ..runtime.sidecar import read as read_sidecar
from ..runtime.decoding import GREEDY, Decoding, OnToken, replay

# ----------------------------------------------------------------------------- facts
# For each runtime call below: the keyword names this module passes, and where
# they were read (NVIDIA/TensorRT-LLM, stored commit). Sampling keywords go
# through generate(**kwargs): the listed file's generate() picks them out of
# kwargs by name ("accepted_parameters") and renames num_beams -> beam_width,
# random_seed -> seed for the executor's SamplingConfig.
MRC = "tensorrt_llm/runtime/model_runner_cpp.py (stored commit 03832911f05dbe10232949eb3c56aac45578e30a)"
# Read again at tag v0.15.0 (8f91cff2) and on main be178810 of 2024-12-16
# (0.17.0.dev2024121700): from_dir takes engine_dir, rank,
# max_attention_window_size and is_enc_dec (v0.15.0 lines 81-112), generate
# takes encoder_input_ids, max_new_tokens, end_id, pad_id, return_dict,
# output_sequence_lengths, prompt_table, prompt_tasks and **kwargs (lines
# 492-523), whose accepted_parameters hold every sampling name below (lines
# 591-598); commands/build.py has --gather_context_logits (line 228) and
# cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp registers the three-argument
# preprocess_weights_for_mixed_gemm (lines 123-124) at both.
TAGGED = "tag v0.15.0 (8f91cff2) and main be178810 (2024-12-16)"
SIGNATURES = {
    "ModelRunnerCpp.from_dir": {
        "params": ("engine_dir", "rank", "is_enc_dec", "max_attention_window_size"),
        "read": f"{MRC}: classmethod from_dir(cls, engine_dir, *, ..., rank=0, ..., "
                f"max_attention_window_size=None, ..., is_enc_dec=False, ...); is_enc_dec reads "
                f"engine_dir/encoder and engine_dir/decoder; the same at {TAGGED}",
    },
    "ModelRunnerCpp.generate": {
        "params": ("batch_input_ids", "encoder_input_ids", "max_new_tokens", "end_id", "pad_id",
                   "return_dict", "output_sequence_lengths", "prompt_table", "prompt_tasks",
                   # sampling, through **kwargs (accepted_parameters in the same function)
                   "num_beams", "top_k", "top_p", "temperature", "repetition_penalty", "length_penalty",
                   "random_seed"),
        "read": f"{MRC}: generate(self, batch_input_ids, *, encoder_input_ids, ..., max_new_tokens=1, end_id, "
                f"pad_id, ..., return_dict=False, output_sequence_lengths=False, ..., prompt_table, "
                f"prompt_tasks (comma-separated task index per request), ..., **kwargs); with return_dict it "
                f"returns output_ids [batch, beams, max_seq_len] (the input tokens first, padded with end_id), "
                f"sequence_lengths, and context_logits [batch, max input len, vocab] where the engine gathers "
                f"them (property gather_context_logits = model_config.compute_context_logits); the same keywords at {TAGGED}",
    },
}
# The trtllm-build flag without which an engine returns no context logits:
# tensorrt_llm/commands/build.py (stored commit 65f1d1536e18aea3380e6e270e00895a709333eb),
# the "Logits arguments" group; it lands in the engine's config.json as build_config.gather_context_logits.
CONTEXT_LOGITS_FLAG = "--gather_context_logits"


def _engine_config(engine_dir: Path) -> dict:
    p = engine_dir / "config.json"
    if not p.is_file():
        raise NotAvailable(f"{engine_dir}: no config.json (not a TensorRT-LLM engine directory)")
    return json.loads(p.read_text())


def load(engine_dir: str | Path) -> "TRTLLMEngine":
    """The engine in engine_dir (trtllm-build's output: config.json + rank*.engine,
    or encoder/ + decoder/), on TensorRT-LLM's runtime. NotAvailable where
    tensorrt_llm cannot be imported or no GPU is visible."""
    engine_dir = Path(engine_dir)
    try:
        import torch
        # tensorrt_llm/runtime/__init__.py exports ModelRunnerCpp only where its
        # C++ bindings import (PYTHON_BINDINGS); else this is an ImportError too
        from tensorrt_llm.runtime import ModelRunnerCpp  # type: ignore
    except ImportError as e:
        raise NotAvailable(
            f"{engine_dir}: tensorrt-llm engines run on TensorRT-LLM's runtime, which is not importable here "
            f"({e}); run validation on a GPU machine with tensorrt-llm installed"
        ) from e
    if not torch.cuda.is_available():
        raise NotAvailable(f"{engine_dir}: TensorRT-LLM's runtime needs a CUDA GPU and torch sees none")
    # TensorRT-LLM's own engine directories (built outside enginefarm) have no sidecar
    meta = read_sidecar(engine_dir).dump() if (engine_dir / SIDECAR).is_file() else {}
    encdec = (engine_dir / "decoder" / "config.json").is_file()
    if encdec and not (engine_dir / "encoder" / "config.json").is_file():
        # Nougat / BLIP: the visual features are the decoder's encoder output
        raise NotAvailable(
            f"{engine_dir}: a decoder-only tensorrt-llm engine fed visual features as its encoder output; "
            f"ModelRunnerCpp takes encoder_input_features for an encoder engine it runs itself (encoder/ or "
            f"vision/ next to decoder/, {MRC}), and this adapter does not wrap a runner that takes the encoder "
            f"output directly"
        )
    cfg = _engine_config(engine_dir / ("decoder" if encdec else ""))
    mapping = cfg.get("pretrained_config", {}).get("mapping", {})
    world = int(mapping.get("world_size") or int(mapping.get("tp_size", 1)) * int(mapping.get("pp_size", 1)))
    if world > 1:
        raise NotAvailable(f"{engine_dir}: a {world}-rank engine; this adapter loads single-rank engines only "
                           f"(more ranks need mpirun and a runner per rank)")
    windows = meta.get("runtime", {}).get("max_attention_window_size")
    runner = ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=0, is_enc_dec=encdec,
                                     max_attention_window_size=windows)
    return (TRTLLMEncDec if encdec else TRTLLMEngine)(runner, engine_dir, cfg, meta, encdec)


def sampling(d: Decoding) -> dict:
    """The farm's Decoding as the runner's sampling keywords (SIGNATURES:
    ModelRunnerCpp.generate). Greedy is top_k 1; sampling keeps the farm's
    top_k (0: no filter) and top_p; beam search passes num_beams and
    length_penalty. The runner's random generator is its own: a seed repeats
    its draws, not the aoti engines'."""
    out = {"num_beams": d.num_beams, "repetition_penalty": d.repetition_penalty,
           "length_penalty": d.length_penalty}
    if d.do_sample:
        out.update(top_k=d.top_k, top_p=d.top_p, temperature=d.temperature)
        if d.seed is not None:
            out["random_seed"] = d.seed
    else:
        out.update(top_k=1, top_p=0.0, temperature=1.0)
    return out


class TRTLLMEngine:
    """A loaded tensorrt-llm engine with the farm's engine interface."""

    def __init__(self, runner, engine_dir: Path, cfg: dict, meta: dict, encdec: bool):
        self.runner, self.engine_dir, self.cfg, self.meta, self.seq2seq = runner, engine_dir, cfg, meta, encdec
        build = cfg.get("build_config", {})
        pre = cfg.get("pretrained_config", {})
        self.gathers_context_logits = bool(build.get("gather_context_logits"))
        rows = int(build.get("max_prompt_embedding_table_size") or 0)
        if encdec:  # the prompt table enters the encoder
            enc = _engine_config(engine_dir / "encoder").get("build_config", {})
            rows = int(enc.get("max_prompt_embedding_table_size") or 0)
        self.table = {"max_rows": rows, "hidden_size": int(pre.get("hidden_size", 0))} if rows else None
        self.features_in = False
        self.device = "cuda"
        self._start = pre.get("decoder_start_token_id", meta.get("decoder_start_token_id"))

    max_batch_size = property(lambda self: int(self.runner.max_batch_size))
    max_input_len = property(lambda self: int(self.runner.max_input_len))
    max_seq_len = property(lambda self: int(self.runner.max_seq_len))
    max_beam_width = property(lambda self: int(self.runner.max_beam_width))
    vocab_size = property(lambda self: int(self.runner.vocab_size))
    max_multimodal_len = property(lambda self: self.table["max_rows"] if self.table else 0)

    @property
    def decoder_start_token_id(self) -> int:
        if self._start is None:
            raise NotAvailable(f"{self.engine_dir}: the decoder's config.json has no decoder_start_token_id")
        return int(self._start)

    # ------------------------------------------------------------------ one runner call
    def _run(self, dec: list[list[int]], enc: Optional[list[list[int]]], max_new_tokens: int,
             eos: Optional[int], prompt_table, d: Decoding) -> dict:
        import torch

        table = tasks = None
        if prompt_table is not None:
            if not self.table:
                raise BadInput("this engine was built without a prompt table (not for a multimodal recipe)")
            # one task: every request reads the same rows, at ids vocab_size + row
            table = prompt_table.to(self.runner.dtype).unsqueeze(0)  # [tasks=1, rows, hidden], engine dtype
            tasks = ",".join("0" for _ in (enc or dec))
        s = sampling(d)
        end = eos if eos is not None else -1
        return self.runner.generate(
            batch_input_ids=[torch.tensor(x, dtype=torch.int32) for x in dec],
            encoder_input_ids=[torch.tensor(x, dtype=torch.int32) for x in enc] if enc else None,
            max_new_tokens=max_new_tokens, end_id=end, pad_id=eos if eos is not None else 0,
            return_dict=True, output_sequence_lengths=True, prompt_table=table, prompt_tasks=tasks,
            num_beams=s["num_beams"], top_k=s["top_k"], top_p=s["top_p"], temperature=s["temperature"],
            repetition_penalty=s["repetition_penalty"], length_penalty=s["length_penalty"],
            random_seed=s.get("random_seed"),
        )

    @staticmethod
    def _new_tokens(out: dict, fed: list[list[int]], max_new_tokens: int, eos: Optional[int]) -> list[list[int]]:
        """The new tokens of each request's best beam: output_ids holds the fed
        tokens first and ends at sequence_lengths. The runner stops at end_id
        without counting it; the farm's engines return it, so it is put back."""
        ids, lens = out["output_ids"], out["sequence_lengths"]
        res = []
        for b, f in enumerate(fed):
            got = [int(t) for t in ids[b, 0, len(f): int(lens[b, 0])].tolist()]
            if eos is not None and len(got) < max_new_tokens and (not got or got[-1] != eos):
                got.append(eos)
            res.append(got[:max_new_tokens])
        return res

    def _context_logits(self, out: dict, n: int):
        if not self.gathers_context_logits or "context_logits" not in out:
            raise NotAvailable(
                f"{self.engine_dir}: the engine was built without context logits, which the logits and perplexity "
                f"gates read; rebuild it with trtllm-build {CONTEXT_LOGITS_FLAG}"
            )
        return out["context_logits"][0, :n].float().cpu()

    # ------------------------------------------------------------------ the farm's interface
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: Optional[int] = None,
                 prompt_table=None, decoding: Decoding = GREEDY, on_token: Optional[OnToken] = None) -> list[list[int]]:
        if not prompts:
            return []
        decoding.check(self.max_beam_width)
        if self.seq2seq:
            dec = [[self.decoder_start_token_id] for _ in prompts]
            out = self._run(dec, prompts, max_new_tokens, eos_token_id, prompt_table, decoding)
        else:
            dec = prompts
            out = self._run(prompts, None, max_new_tokens, eos_token_id, prompt_table, decoding)
        return replay(self._new_tokens(out, dec, max_new_tokens, eos_token_id), on_token)

    def logits(self, ids: list[int], prompt_table=None):
        """[T, vocab] for one prompt: the engine's context logits of one request."""
        out = self._run([ids], None, 1, None, prompt_table, GREEDY)
        return self._context_logits(out, len(ids))

    def generate_from_features(self, *a, **k):
        """Not on this engine: see TRTLLMEncDec."""
        raise NotAvailable(f"{self.engine_dir}: a decoder-only engine takes no encoder features")

    logits_from_features = generate_from_features


class TRTLLMEncDec(TRTLLMEngine):
    """An encoder-decoder engine (encoder/ + decoder/), the runner's is_enc_dec mode."""

    def logits(self, enc_ids: list[int], dec_ids: list[int], prompt_table=None):
        """[len(dec_ids), vocab]: the decoder teacher-forced on dec_ids (its
        context logits), after the encoder read enc_ids."""
        dec_max = int(self.cfg.get("build_config", {}).get("max_input_len") or 1)
        if len(dec_ids) > dec_max:
            raise NotAvailable(
                f"{self.engine_dir}: {len(dec_ids)} decoder tokens in one pass, but the decoder engine was built "
                f"for --max_input_len {dec_max}; rebuild the decoder with trtllm-build --max_input_len "
                f"{len(dec_ids)} (or more) and {CONTEXT_LOGITS_FLAG}"
            )
        out = self._run([dec_ids], [enc_ids], 1, None, prompt_table, GREEDY)
        return self._context_logits(out, len(dec_ids))

    def generate_from_features(self, *a, **k):
        raise NotAvailable(f"{self.engine_dir}: this engine's encoder takes token ids; visual features as the "
                           f"encoder output are not supported by this adapter")

    logits_from_features = generate_from_features
