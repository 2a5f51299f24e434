"""The GPU engine form of the aoti backend (issue 8): engine-form decoder with
in-place per-layer KV caches (decoder.py, fast.py), weight-only decode kernels
(enginefarm.kernels.gemv), packages and sidecars (export.py), the runtime with
CUDA-graph decode (engine.py) and the CLIP vision tower (vision.py). Used when
a recipe sets `components.llm.aoti`, by `enginefarm bench`, and by bench/gpu_*.py."""
