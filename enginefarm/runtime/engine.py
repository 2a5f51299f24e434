"""Running a built LLM engine: greedy generation and scoring from the
package alone (no Hugging Face model code on this path)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BadInput

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LLMEngine:
    def __init__(self, runner, sidecar: dict):
        self.run = runner
        self.meta = sidecar
        self.device = sidecar.get("device", "cpu")
        self.dtype = DTYPES[sidecar["dtype"]]
        L, _, KV, S, D = sidecar["cache_shape"]
        self.cache_dims = (L, KV, S, D)

    @classmethod
    def load(cls, engine_dir: str | Path) -> "LLMEngine":
        engine_dir = Path(engine_dir)
        meta = json.loads((engine_dir / "engine.json").read_text())
        cls.check_meta(engine_dir, meta)
        runner = torch._inductor.aoti_load_package(str(engine_dir / meta["file"]))
        return cls(runner, meta)

    @staticmethod
    def check_meta(engine_dir: Path, meta: dict) -> None:
        """An aoti engine that this machine can run."""
        if meta.get("format") != "aoti-pt2":
            raise BadInput(f"{engine_dir} holds a {meta.get('format')} engine, not an aoti package")
        if meta.get("device") == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"engine in {engine_dir} was built for {meta.get('target')}; this machine has no CUDA GPU")

    @property
    def max_batch_size(self) -> int:
        return self.meta["max_batch_size"]

    @property
    def max_input_len(self) -> int:
        return self.meta["max_input_len"]

    @property
    def max_seq_len(self) -> int:
        return self.meta["max_seq_len"]

    def new_cache(self, batch: int):
        L, KV, S, D = self.cache_dims
        z = torch.zeros((L, batch, KV, S, D), dtype=self.dtype, device=self.device)
        return z, z.clone()

    def _check(self, batch: int, n_in: int, n_new: int = 0) -> None:
        if batch > self.max_batch_size:
            raise BadInput(f"{batch} sequences in one call, but the engine was built for max_batch_size {self.max_batch_size}")
        if n_in > self.max_input_len:
            raise BadInput(f"a prompt of {n_in} tokens, but the engine was built for max_input_len {self.max_input_len}")
        if n_in + n_new > self.max_seq_len:
            raise BadInput(
                f"{n_in} prompt tokens + {n_new} new tokens exceed the engine's max_seq_len {self.max_seq_len}"
            )

    def step(self, ids: torch.Tensor, start: int, kc, vc):
        out = self.run(ids.to(self.device), torch.tensor([start], dtype=torch.long, device=self.device), kc, vc)
        return out[0], out[1], out[2]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T, vocab] logits for one sequence (a prefill)."""
        self._check(1, len(ids))
        kc, vc = self.new_cache(1)
        lg, _, _ = self.step(torch.tensor([ids], dtype=torch.long), 0, kc, vc)
        return lg[0].float().cpu()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt. Prompts of equal length run as
        one batch; others run one after another."""
        if not prompts:
            return []
        self._check(len(prompts), max(len(p) for p in prompts), max_new_tokens)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            if not p:
                raise BadInput("an empty prompt (no tokens)")
            groups.setdefault(len(p), []).append(i)
        out: list[list[int]] = [[] for _ in prompts]
        for n, idx in groups.items():
            ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
            kc, vc = self.new_cache(len(idx))
            lg, kc, vc = self.step(ids, 0, kc, vc)
            done = torch.zeros(len(idx), dtype=torch.bool)
            pos = n
            for _ in range(max_new_tokens):
                nxt = lg[:, -1].argmax(-1).cpu()
                for j, i in enumerate(idx):
                    if not done[j]:
                        out[i].append(int(nxt[j]))
                if eos_token_id is not None:
                    done |= nxt == eos_token_id
                if bool(done.all()) or len(out[idx[0]]) >= max_new_tokens:
                    break
                lg, kc, vc = self.step(nxt[:, None], pos, kc, vc)
                pos += 1
        return out
