"""Hugging Face checkpoint -> TensorRT-LLM checkpoint (config.json +
rank{N}.safetensors), streamed tensor by tensor.

Source tensors are read from memory-mapped safetensors (single file or
sharded through `model.safetensors.index.json`); each output tensor is made,
written and dropped before the next one, so peak memory stays near the
largest tensor, not the model. The family says how names map and split.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open

from .errors import BadInput
from .families.base import DecoderFamily, OutTensor
from .spec import Variant
from .tensors import TensorSource

ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor. The header needs every
    shape and dtype up front, so the caller gives a plan first."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Optional[dict] = None):
        self.path = path
        header: dict = {}
        off = 0
        self._order = []
        for name, dtype, shape in plan:
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self._order.append((name, dtype, tuple(shape), n))
            off += n
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((-len(hb)) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        ename, dtype, shape, n = self._order[self._i]
        if name != ename or t.dtype != dtype or tuple(t.shape) != shape:
            raise RuntimeError(f"writer plan mismatch at {name}: planned {ename} {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        if t.numel():
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()  # a view: written without another copy
            assert data.nbytes == n
            self._f.write(data.data)
        self._i += 1

    def close(self) -> None:
        if self._i != len(self._order):
            raise RuntimeError(f"writer closed after {self._i} of {len(self._order)} tensors")
        self._f.close()


def _shape_of(out: OutTensor, src: TensorSource, dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """Output shape/dtype from a cheap meta-device trial of the family's op."""
    metas = []
    for s in out.sources:
        h = src._open(src._where[s]) if s in src._where else None
        if h is None:
            raise BadInput(f"checkpoint {src.root} has no tensor {s!r} (needed for {out.name})")
        sl = h.get_slice(s)
        metas.append(torch.empty(sl.get_shape(), dtype=dtype, device="meta"))
    r = out.make(*metas)
    return tuple(r.shape), r.dtype


def convert_checkpoint(
    family: DecoderFamily,
    src_dir: str | Path,
    out_dir: str | Path,
    variant: Variant,
    allow_pickle: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    calibration: Optional[dict] = None,
) -> dict:
    """Convert one checkpoint for one variant; returns a summary. A family
    writes one checkpoint at out_dir (decoder-only) or several in
    sub-directories (encoder-decoder: out_dir/encoder, out_dir/decoder).
    A calibrated quantization (w4a16_awq) takes the `calibrate` step's
    statistics: {hf linear name + '.pre_quant_scale': [in] float32}."""
    from .quant import effective_scheme

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    try:
        hf = json.loads((src_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {src_dir / 'config.json'}: {e}") from None
    scheme = effective_scheme(variant, hf)
    if scheme is not None and scheme.awq:  # the group size chosen for this model, in config.json too
        variant = variant.model_copy(update={"group_size": scheme.group_size})
    if scheme is not None and (scheme.awq or scheme.act) and not calibration:
        raise BadInput(f"{variant.quant}: the conversion needs the calibrate step's statistics")
    family.check_config(hf, variant, where=str(src_dir / "config.json"))
    src = TensorSource(src_dir, allow_pickle=allow_pickle)
    names = src.names()
    dtype = TORCH_DTYPES[variant.dtype]
    parts = family.checkpoint_parts(hf, names, variant)
    t0 = time.perf_counter()
    n_bytes = 0
    counts: dict[str, int] = {}
    for part in parts:
        part_dir = out_dir / part.subdir if part.subdir else out_dir
        part_dir.mkdir(parents=True, exist_ok=True)
        (part_dir / "config.json").write_text(json.dumps(part.config, indent=2, sort_keys=True))
        label = f"{part.subdir} " if part.subdir else ""
        for rank in range(variant.tp):
            outs = part.tensors(rank)
            n_bytes += _write_rank(outs, src, part_dir / f"rank{rank}.safetensors", rank, dtype, scheme,
                                   progress, f"convert {label}rank {rank}", calibration)
        counts[part.subdir] = len(outs)
    summary = {"tensors_per_rank": sum(counts.values()), "bytes_written": n_bytes,
               "seconds": round(time.perf_counter() - t0, 3)}
    if len(parts) > 1:
        summary["parts"] = {k: {"tensors_per_rank": v} for k, v in counts.items()}
    return summary


def _write_rank(outs: list[OutTensor], src: TensorSource, path: Path, rank: int, dtype: torch.dtype, scheme,
                progress: Optional[Callable[[str], None]], label: str, calibration: Optional[dict] = None) -> int:
    """One rank file, tensor by tensor; returns the bytes written."""
    from .quant import is_quantized_weight, quantize

    from .quant import act_plan

    plan = []
    for o in outs:
        shape, dt = _shape_of(o, src, dtype)
        if scheme and scheme.act and is_quantized_weight(o.name):
            base = o.name[: -len("weight")]
            plan += [(base + suffix, sdt, ss) for suffix, sdt, ss in act_plan(scheme, shape, dtype)]
        elif scheme and is_quantized_weight(o.name):
            _, ss = scheme.shapes(shape, name=f"rank {rank} {o.name}")
            wdt, ws = scheme.weight_storage(shape, dtype, name=f"rank {rank} {o.name}")
            plan.append((o.name, wdt, ws))
            plan.append((o.name[: -len("weight")] + scheme.scale_name, dtype, ss))
            if scheme.awq:  # quant.PREQUANT_SHAPE
                plan.append((o.name[: -len("weight")] + "prequant_scaling_factor", dtype, (shape[1],)))
        else:
            plan.append((o.name, dt, shape))
    w = SafetensorsWriter(path, plan, {"format": "pt", "rank": rank})
    n_bytes = 0
    by_name = {o.name: o for o in outs}
    for i, o in enumerate(outs):
        if scheme and scheme.act and is_quantized_weight(o.name):
            for k, t in act_quantize_out(o, lambda s: src.get(s).to(dtype), scheme, dtype, calibration,
                                         input_siblings(o.name, by_name)).items():
                w.write(k, t)
                n_bytes += t.numel() * t.element_size()
        elif scheme and is_quantized_weight(o.name):
            q, sc, pqs = quantize_out(o, lambda s: src.get(s).to(dtype), scheme, dtype, calibration)
            w.write(o.name, q)
            w.write(o.name[: -len("weight")] + scheme.scale_name, sc)
            n_bytes += q.numel() * q.element_size() + sc.numel() * sc.element_size()
            if pqs is not None:
                w.write(o.name[: -len("weight")] + "prequant_scaling_factor", pqs)
                n_bytes += pqs.numel() * pqs.element_size()
        else:
            t = o.make(*(src.get(s).to(dtype) for s in o.sources))
            w.write(o.name, t)
            n_bytes += t.numel() * t.element_size()
            del t
        if progress and (i % 16 == 0 or i == len(outs) - 1):
            progress(f"{label}: {i + 1}/{len(outs)} tensors")
    w.close()
    return n_bytes


def quantize_out(o: OutTensor, get: Callable[[str], torch.Tensor], scheme, dtype: torch.dtype,
                 calibration: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One quantized linear of a rank file: (stored weight, scales, pre-quant
    scale [in] or None). AWQ: each source weight divided by its linear's
    calibrated pre-quant scale before the concatenation / split, the scale
    itself carried through the same `make` (quant.prequant_scale_rows); the
    linears of one fused tensor share the mean of their scales (equal where
    the calibrate step searched one scale for them: calibration.awq_joint_search),
    and a linear with clip ratios (`.awq_clip`) is clipped block by block
    after smoothing (quant.awq_clip)."""
    from .quant import awq_clip, awq_smooth, prequant_scale_rows, quantize

    sources = [get(s) for s in o.sources]
    pqs = None
    if scheme.awq:
        try:
            scales = [calibration[s[: -len("weight")] + "pre_quant_scale"] for s in o.sources]
        except KeyError as e:
            raise BadInput(f"{o.name}: the calibration has no pre-quant scale for {e.args[0]}") from None
        if len(scales) > 1:  # one tensor from several linears of one input (q/k/v): their mean, as ModelOpt
            mean = torch.stack([x.float() for x in scales]).mean(0)
            scales = [mean] * len(scales)
        rows = prequant_scale_rows(o.make, sources, scales)
        sources = [awq_smooth(t, p) for t, p in zip(sources, scales)]
        # the clip search's ratios (calibration.awq_clip_search), on each whole source before the split
        clips = [calibration.get(s[: -len("weight")] + "awq_clip") for s in o.sources]
        sources = [t if c is None else awq_clip(t, c, scheme.group_size) for t, c in zip(sources, clips)]
        t = o.make(*sources)
        if rows.shape[0] != t.shape[1]:
            raise BadInput(f"{o.name}: AWQ needs weights stored [out, in]; this family's layout is not covered")
        pqs = rows.to(dtype)
    else:
        t = o.make(*sources)
    # on a GPU worker the rounding runs on the GPU: the same IEEE float32 division and float64 rounding give the same
    # integers and scales as the CPU (tests/test_quant_tp.py compares them where CUDA is present), a 7B model's two
    # quantizing converts took 123 s each on the H100 machine's CPU
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, sc = quantize(t.to(dev), scheme, dtype, name=o.name)
    return q.cpu(), sc.cpu(), pqs


def fused_linears(family, src_dir: str | Path, variant: Variant, allow_pickle: bool = False) -> list[list[str]]:
    """The Hugging Face linears (names without `.weight`) that become one
    quantized tensor of the checkpoint (q/k/v -> attention.qkv): the groups
    that share one AWQ pre-quant scale (calibration.awq_refine searches it)."""
    from .quant import is_quantized_weight

    src_dir = Path(src_dir)
    hf = json.loads((src_dir / "config.json").read_text())
    names = TensorSource(src_dir, allow_pickle=allow_pickle).names()
    groups = []
    for part in family.checkpoint_parts(hf, names, variant):
        for o in part.tensors(0):
            if is_quantized_weight(o.name) and len(o.sources) > 1 and all(x.endswith(".weight") for x in o.sources):
                groups.append([x[: -len(".weight")] for x in o.sources])
    return groups


def input_siblings(name: str, outs: dict) -> list[OutTensor]:
    """The other output tensors whose linears read the same input as `name`'s
    (TensorRT-LLM's names: a gated MLP's mlp.fc and mlp.gate); q/k/v are one
    tensor already."""
    for a, b in (("mlp.fc.weight", "mlp.gate.weight"), ("mlp.gate.weight", "mlp.fc.weight")):
        if name.endswith(a):
            other = outs.get(name[: -len(a)] + b)
            return [other] if other is not None else []
    return []


def act_quantize_out(o: OutTensor, get: Callable[[str], torch.Tensor], scheme, dtype: torch.dtype,
                     calibration: Optional[dict], siblings: list[OutTensor]) -> dict[str, torch.Tensor]:
    """One weight-and-activation quantized linear of a rank file (w8a8_sq,
    fp8; quant.act_plan): {rank-file name: tensor}, in the plan's order. The
    Hugging Face linears of this tensor (q/k/v) share the mean of their
    SmoothQuant scales and the max of their input amax; for fp8 those of its
    input siblings (gate/up) too, and the max of their weight amax over the
    whole, unsplit weights: as ModelOpt's exporter makes them."""
    from .quant import act_plan, act_quantize, awq_smooth, prequant_scale_rows

    # FP8: q/k/v and gate/up share their scales; SmoothQuant: q/k/v only (ModelOpt's export keeps gate's and
    # up's own SmoothQuant scales and input amax: tests/test_conformance_sq.py)
    group = list(o.sources) + ([s for sib in siblings for s in sib.sources] if scheme.act == "fp8" else [])

    def stat(src: str, what: str) -> torch.Tensor:
        key = src[: -len("weight")] + what
        if key not in calibration:
            raise BadInput(f"{o.name}: the calibration has no {what} for {src}")
        return calibration[key].float()

    input_amax = float(torch.stack([stat(s, "input_amax").reshape(()) for s in group]).max())
    sources = [get(s) for s in o.sources]
    base = o.name[: -len("weight")]
    if scheme.act == "int8_sq":
        mean = torch.stack([stat(s, "pre_quant_scale") for s in group]).mean(0)
        rows = prequant_scale_rows(o.make, sources, [mean] * len(sources))
        smoothed = [awq_smooth(x, mean) for x in sources]
        t = o.make(*smoothed)
        if rows.shape[0] != t.shape[1]:
            raise BadInput(f"{o.name}: SmoothQuant needs weights stored [out, in]; this family's layout is not covered")
        # each output channel's max|w| over the whole weight (ModelOpt's per-channel amax), carried
        # through the same `make` as the weights: a row-parallel shard keeps every output channel
        amax = [x.float().abs().amax(dim=1, keepdim=True).expand(-1, x.shape[1]) for x in smoothed]
        got = act_quantize(t, scheme, input_amax, o.make(*amax)[:, 0].contiguous())
        got["prequant_scaling_factor"] = rows.to(dtype)
    else:
        weight_amax = max(float(get(s).float().abs().max()) for s in group)
        got = act_quantize(o.make(*sources), scheme, input_amax, weight_amax)
    return {base + suffix: got[suffix] for suffix, _, _ in act_plan(scheme, tuple(got["weight"].shape), dtype)}


def convert_in_memory(family: DecoderFamily, hf_config: dict, tensors: dict, variant: Variant,
                      rank: int = 0, calibration: Optional[dict] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The same conversion as `convert_checkpoint`, for one rank, from tensors
    already in memory (a model's state dict, on any device) to a
    (config.json dict, rank tensors) pair: what `DecoderLM(DecoderConfig.
    from_trtllm(config), tensors)` takes. For benchmarks and tests that make
    their weights where they run; nothing is written."""
    from .quant import effective_scheme, is_quantized_weight

    scheme = effective_scheme(variant, hf_config)
    if scheme is not None and scheme.awq:
        variant = variant.model_copy(update={"group_size": scheme.group_size})
    family.check_config(hf_config, variant)
    dtype = TORCH_DTYPES[variant.dtype]
    cfg = family.trtllm_config(hf_config, variant)
    out = {}
    outs = list(family.tensors(hf_config, set(tensors), variant, rank))
    by_name = {o.name: o for o in outs}
    for o in outs:
        missing = [x for x in o.sources if x not in tensors]
        if missing:
            raise BadInput(f"no tensor {missing[0]!r} (needed for {o.name})")
        if scheme and scheme.act and is_quantized_weight(o.name):
            out.update(act_quantize_out(o, lambda x: tensors[x].to(dtype), scheme, dtype, calibration,
                                        input_siblings(o.name, by_name)))
        elif scheme and is_quantized_weight(o.name):
            q, sc, pqs = quantize_out(o, lambda x: tensors[x].to(dtype), scheme, dtype, calibration)
            out[o.name] = q
            out[o.name[: -len("weight")] + scheme.scale_name] = sc
            if pqs is not None:
                out[o.name[: -len("weight")] + "prequant_scaling_factor"] = pqs
        else:
            out[o.name] = o.make(*(tensors[x].to(dtype) for x in o.sources))
    return cfg, out


def load_rank(ckpt_dir: str | Path, rank: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and one rank's tensors of a TensorRT-LLM checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    tensors = {}
    with safe_open(str(ckpt_dir / f"rank{rank}.safetensors"), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return cfg, tensors


def convert_into(family: DecoderFamily, src_dir: Path, out: Path, variant: Variant,
                 progress: Optional[Callable[[str], None]] = None) -> dict:
    """convert_checkpoint into `out` (absent or an empty directory), written
    beside it and moved into place when complete: an interrupted run leaves
    nothing at `out`."""
    import shutil
    import tempfile

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        summary = convert_checkpoint(family, Path(src_dir), tmp, variant, progress=progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary

