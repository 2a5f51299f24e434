"""Tiny Hugging Face checkpoints, written offline.

Each is random-initialised from a fixed seed and saved with
`save_pretrained` (config.json + model.safetensors) next to a small
byte-level BPE tokenizer trained on the farm's own text set, so tests and
the demo never download anything. `ensure_tiny(name)` writes one once and
afterwards leaves it untouched (its files keep their mtimes, so the fetch
step's cache key stays put).

    python -m enginefarm.testing.tiny opt /tmp/tiny-opt [--seed 1 --layers 3 ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3
VOCAB = 384


def default_root() -> Path:
    return Path(os.environ.get("ENGINEFARM_TINY_DIR", ".farm/tiny"))


def eval_text() -> str:
    return (Path(__file__).resolve().parent.parent / "data" / "eval.txt").read_text()


def make_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(eval_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _opt(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=hidden * 2,
        num_attention_heads=heads,
        max_position_embeddings=256,
        word_embed_proj_dim=hidden,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        init_std=0.1,
        tie_word_embeddings=True,
    )
    return OPTForCausalLM(cfg)


def _llama(seed: int, layers: int, hidden: int, heads: int, kv_heads: Optional[int], tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        initializer_range=0.1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


# name -> (builder, defaults)
TINY_MODELS: dict[str, tuple[Callable, dict]] = {
    "opt": (_opt, dict(layers=2, hidden=64, heads=4, kv_heads=None, tied=True)),
    "llama": (_llama, dict(layers=2, hidden=64, heads=4, kv_heads=2, tied=False)),
    "llama-tied": (_llama, dict(layers=2, hidden=48, heads=6, kv_heads=3, tied=True)),
}


def write_tiny(name: str, dest: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny checkpoint `name` into `dest` (replaced if present)."""
    import torch

    if name not in TINY_MODELS:
        raise KeyError(f"no tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    build, defaults = TINY_MODELS[name]
    args = {**defaults, **overrides}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        torch.manual_seed(seed)
        model = build(seed, **args).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        make_tokenizer().save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# one writer at a time in a process: the nightly checks recipes in threads,
# and transformers' lazy imports are not thread-safe on first use
_WRITING = threading.Lock()


def ensure_tiny(name: str, root: str | Path | None = None) -> Path:
    """The tiny checkpoint `name` under root, written on first use only."""
    dest = Path(root or default_root()) / name
    if (dest / "config.json").is_file():
        return dest
    with _WRITING:
        if (dest / "config.json").is_file():
            return dest
        return write_tiny(name, dest)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="write a tiny random-initialised HF checkpoint (offline)")
    ap.add_argument("name", choices=sorted(TINY_MODELS))
    ap.add_argument("dest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int, dest="kv_heads")
    a = ap.parse_args(argv)
    over = {k: v for k, v in vars(a).items() if k in ("layers", "hidden", "heads", "kv_heads") and v is not None}
    print(write_tiny(a.name, a.dest, seed=a.seed, **over))


if __name__ == "__main__":
    main()
