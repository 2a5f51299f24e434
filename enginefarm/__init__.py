"""enginefarm: a build farm for inference engines."""

__version__ = "0.1.0"
