"""Offline test support: tiny, seeded, random-initialised checkpoints."""

from .tiny import TINY_MODELS, ensure_tiny, write_tiny

__all__ = ["TINY_MODELS", "ensure_tiny", "write_tiny"]
