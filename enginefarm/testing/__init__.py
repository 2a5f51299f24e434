"""Offline test support: tiny, seeded, random-initialised checkpoints."""

from .tiny import ensure_tiny, tiny_models, write_tiny

__all__ = ["ensure_tiny", "tiny_models", "write_tiny"]
