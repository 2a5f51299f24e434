"""Running a built LLM engine: generation (greedy, sampling, beam search:
runtime/decoding.py) and scoring from the package alone (no Hugging Face model code on this path).

An engine built for a multimodal recipe takes a prompt table (the visual
features, [rows, hidden]); token ids >= vocab_size select its rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BadInput
from .decoding import GREEDY, Decoding, OnToken, decode

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_aoti(engine_dir: Path, meta: dict):
    """The runner of an aoti package (its engine.json: meta)."""
    if meta.get("device") == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"engine in {engine_dir} was built for {meta.get('target')}; this machine has no CUDA GPU")
    return torch._inductor.aoti_load_package(str(engine_dir / meta["file"]))


class EngineBase:
    """What every LLM engine shares (the aoti decoder, the GPU engine form,
    the encoder-decoder pair): the limits it was built for, read from its
    sidecar (`meta`), its own KV caches per batch size (`cache_dims`:
    layers, kv heads, max_seq_len, head size), and the checks of a request
    against them and against its prompt table (`table`)."""

    meta: dict
    table: dict | None
    cache_dims: tuple
    dtype: torch.dtype
    device: str

    max_batch_size = property(lambda self: self.meta["max_batch_size"])
    max_input_len = property(lambda self: self.meta["max_input_len"])
    max_seq_len = property(lambda self: self.meta["max_seq_len"])
    vocab_size = property(lambda self: self.meta["vocab_size"])
    # beams per request the caches were sized for (engines built before it: 1)
    max_beam_width = property(lambda self: self.meta.get("max_beam_width", 1))

    @staticmethod
    def reorder(t: torch.Tensor, rows: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Rows of a per-sequence tensor (the caches: batch is dim 1) in a new
        order, or repeated (beam search); unchanged when rows are 0..n-1."""
        if rows.shape[0] == t.shape[dim] and bool((rows == torch.arange(rows.shape[0])).all()):
            return t
        return t.index_select(dim, rows.to(t.device))

    @property
    def max_multimodal_len(self) -> int:
        return self.table["max_rows"] if self.table else 0

    def new_cache(self, batch: int):
        L, KV, S, D = self.cache_dims
        z = torch.zeros((L, batch, KV, S, D), dtype=self.dtype, device=self.device)
        return z, z.clone()

    def cache(self, batch: int):
        """The engine's own caches for a batch size, reused between calls (the step
        masks positions past the current one, and overwrites them)."""
        caches = self.__dict__.setdefault("_caches", {})
        if batch not in caches:
            caches[batch] = self.new_cache(batch)
        return caches[batch]

    @classmethod
    def _prompts_by_length(cls, prompts: list[list[int]]) -> dict[int, list[int]]:
        """_by_length for a decoder-only LLM, whose prompts need a token each."""
        if any(not p for p in prompts):
            raise BadInput("an empty prompt (no tokens)")
        return cls._by_length(prompts)

    @staticmethod
    def _by_length(seqs: list[list[int]]) -> dict[int, list[int]]:
        """Indices of seqs grouped by length: each group runs as one batch."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(seqs):
            groups.setdefault(len(p), []).append(i)
        return groups

    def _check_batch_and_input(self, batch: int, n_in: int) -> None:
        if batch > self.max_batch_size:
            raise BadInput(f"{batch} sequences in one call, but the engine was built for max_batch_size {self.max_batch_size}")
        if n_in > self.max_input_len:
            raise BadInput(f"a prompt of {n_in} tokens, but the engine was built for max_input_len {self.max_input_len}")

    def _check_table(self, prompts: list[list[int]], prompt_table) -> None:
        top = max((max(p) for p in prompts if p), default=-1)
        if prompt_table is None:
            if top >= self.vocab_size:
                raise BadInput(f"token id {top} is past the vocabulary ({self.vocab_size}) and no prompt table was given")
            return
        if not self.table:
            raise BadInput("this engine was built without a prompt table (not for a multimodal recipe)")
        rows, hidden = prompt_table.shape
        if rows > self.table["max_rows"]:
            raise BadInput(f"a prompt table of {rows} rows (visual features), but the engine was built for "
                           f"max_multimodal_len {self.table['max_rows']}")
        if hidden != self.table["hidden_size"]:
            raise BadInput(f"prompt table rows of width {hidden}, but the LLM's hidden size is {self.table['hidden_size']}")
        if top >= self.vocab_size + rows:
            raise BadInput(f"token id {top} points past the prompt table ({rows} rows after vocab_size {self.vocab_size})")


class LLMEngine(EngineBase):
    def __init__(self, runner, sidecar: dict):
        self.run = runner
        self.meta = sidecar
        self.device = sidecar.get("device", "cpu")
        self.dtype = DTYPES[sidecar["dtype"]]
        L, _, KV, S, D = sidecar["cache_shape"]
        self.cache_dims = (L, KV, S, D)
        self.table = sidecar.get("prompt_table")  # {"max_rows", "hidden_size"} or None
        self.cuda_graphs = False  # the GPU engine form (enginefarm.gpu.engine) captures decode graphs; this one does not
        self.decode_run = None
        self._caches: dict[int, tuple] = {}

    @classmethod
    def load(cls, engine_dir: str | Path) -> "LLMEngine":
        engine_dir = Path(engine_dir)
        meta = json.loads((engine_dir / "engine.json").read_text())
        cls.check_meta(engine_dir, meta)
        return cls(load_aoti(engine_dir, meta), meta)

    @staticmethod
    def check_meta(engine_dir: Path, meta: dict) -> None:
        """An aoti engine that this machine can run."""
        if meta.get("format") != "aoti-pt2":
            raise BadInput(f"{engine_dir} holds a {meta.get('format')} engine, not an aoti package")
        if meta.get("device") == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"engine in {engine_dir} was built for {meta.get('target')}; this machine has no CUDA GPU")

    @torch.no_grad()
    def generate_ids(self, ids: torch.Tensor, max_new_tokens: int, prompt_table=None, events: dict | None = None):
        """Greedy continuation of a batch of equal-length prompts, no end-of-sequence
        test: [B, T] -> [B, max_new_tokens] (the interface enginefarm bench times; the
        GPU engine form has the same). With `events` on CUDA: 'start', 'first', 'end'."""
        B, T = ids.shape
        self._check(B, T, max_new_tokens)
        cuda = self.device == "cuda"

        def mark(k):
            if events is not None and cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                events[k] = e

        kc, vc = self.cache(B)
        mark("start")
        lg, kc, vc = self.step(ids, 0, kc, vc, prompt_table)
        nxt = lg[:, -1].argmax(-1, keepdim=True)
        out = [nxt]
        mark("first")
        for i in range(max_new_tokens - 1):
            lg, kc, vc = self.step(nxt, T + i, kc, vc)
            nxt = lg[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
        mark("end")
        return torch.cat(out, dim=1)

    def _check(self, batch: int, n_in: int, n_new: int = 0) -> None:
        self._check_batch_and_input(batch, n_in)
        if n_in + n_new > self.max_seq_len:
            raise BadInput(
                f"{n_in} prompt tokens + {n_new} new tokens exceed the engine's max_seq_len {self.max_seq_len}"
            )

    def step(self, ids: torch.Tensor, start: int, kc, vc, prompt_table: torch.Tensor | None = None):
        args = [ids.to(self.device), torch.tensor([start], dtype=torch.long, device=self.device), kc, vc]
        if self.table:  # the package always takes one; a text-only step gets a row of zeros
            if prompt_table is None:
                prompt_table = torch.zeros(1, self.table["hidden_size"])
            args.append(prompt_table.to(self.device, self.dtype))
        out = self.run(*args)
        return out[0], out[1], out[2]

    @torch.no_grad()
    def logits(self, ids: list[int], prompt_table: torch.Tensor | None = None) -> torch.Tensor:
        """[T, vocab] logits for one sequence (a prefill)."""
        self._check(1, len(ids))
        self._check_table([ids], prompt_table)
        kc, vc = self.new_cache(1)
        lg, _, _ = self.step(torch.tensor([ids], dtype=torch.long), 0, kc, vc, prompt_table)
        return lg[0].float().cpu()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None,
                 prompt_table: torch.Tensor | None = None, decoding: Decoding = GREEDY,
                 on_token: OnToken | None = None) -> list[list[int]]:
        """The continuation of each prompt, decoded as `decoding` says
        (greedy by default). Prompts of equal length run as one batch;
        others run one after another. Ids >= vocab_size pick rows of
        prompt_table (shared by the whole call). on_token(prompt index,
        token): each new token as it comes; True ends that prompt."""
        if not prompts:
            return []
        self._check(len(prompts), max(len(p) for p in prompts), max_new_tokens)
        self._check_table(prompts, prompt_table)
        decoding.check(self.max_beam_width)
        groups = self._prompts_by_length(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        for n, idx in groups.items():
            ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
            kc, vc = self.new_cache(len(idx))
            lg, kc, vc = self.step(ids, 0, kc, vc, prompt_table)
            state = {"kc": kc, "vc": vc, "pos": n}

            def step(tokens: torch.Tensor, rows: torch.Tensor, state=state) -> torch.Tensor:
                kc, vc = self.reorder(state["kc"], rows), self.reorder(state["vc"], rows)
                lg, state["kc"], state["vc"] = self.step(tokens, state["pos"], kc, vc)
                state["pos"] += 1
                return lg[:, -1]

            tell = (lambda r, t, idx=idx: on_token(idx[r], t)) if on_token else None
            got = decode(lg[:, -1], step, [prompts[i] for i in idx], max_new_tokens, eos_token_id, decoding, tell)
            for j, i in enumerate(idx):
                out[i] = got[j]
        return out
