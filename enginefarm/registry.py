"""The store seen as a registry: refs resolved to published engines, the
rows of `ls`, and what changed between two builds (`diff`). Read-only; the
commands that move or delete things are flows (`flows/promote.py`,
`flows/gc.py`), and pulls live with the store (`store/pull.py`)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Optional

from .errors import BadInput, FarmError
from .store.base import check_alias, check_name

GPU_RE = re.compile(r"^sm_\d{2,3}$")


def check_gpu(gpu: Any) -> str:
    if not isinstance(gpu, str) or not GPU_RE.fullmatch(gpu):
        raise BadInput(f"bad --gpu {gpu!r}: expected a GPU target such as sm_80, sm_89 or sm_90")
    return gpu


def target_of(manifest: dict) -> Optional[str]:
    return ((manifest.get("results") or {}).get("variant") or {}).get("target")


def status_of(validation: Optional[dict]) -> str:
    """passed, failed or pending (an engine that no machine so far could
    run); records from before `status` existed: passed or failed."""
    v = validation or {}
    if v.get("status") in ("passed", "failed", "pending"):
        return v["status"]
    return "passed" if v.get("passed") else "failed"


def validation_line(validation: Optional[dict]) -> str:
    """`passed`, `FAILED`, or `pending (no compatible GPU): visual` for people."""
    v = validation or {}
    st = status_of(v)
    if st != "pending":
        return "passed" if st == "passed" else "FAILED"
    comps = sorted(c for c, x in (v.get("components") or {}).items() if x.get("status") == "pending")
    return f"pending ({v.get('reason') or 'no compatible GPU'})" + (f": {', '.join(comps)}" if comps else "")


def quality(metrics: Optional[dict]) -> dict:
    """The engine's quality next to its reference's (the unquantized Hugging
    Face model), from validation metrics: perplexity, top-1 and top-5
    accuracy on the text set, each {engine, reference}; {} when not measured."""
    m = metrics or {}
    out = {}
    for key, name in (("perplexity", "perplexity"), ("top1_accuracy", "top1"), ("top5_accuracy", "top5")):
        v = m.get(key)
        if isinstance(v, dict) and v.get("engine") is not None and v.get("reference") is not None:
            out[name] = {"engine": float(v["engine"]), "reference": float(v["reference"])}
    return out


def quality_line(metrics: Optional[dict]) -> str:
    """`perplexity 12.41 (reference 10.52, +18.0%), top-1 0.412 (0.451), top-5 0.700 (0.720)`, or ''."""
    q = quality(metrics)
    parts = []
    if "perplexity" in q:
        p = q["perplexity"]
        rel = (p["engine"] / p["reference"] - 1) * 100 if p["reference"] else float("nan")
        parts.append(f"perplexity {p['engine']:.3f} (reference {p['reference']:.3f}, {rel:+.1f}%)")
    for k, label in (("top1", "top-1"), ("top5", "top-5")):
        if k in q:
            parts.append(f"{label} {q[k]['engine']:.3f} ({q[k]['reference']:.3f})")
    return ", ".join(parts)


def component_targets(manifest: dict) -> dict[str, list[str]]:
    """{component: the GPUs its engine runs on} for the components built for
    GPUs (a TensorRT engine: its compute capabilities; another GPU engine:
    its target); components built for the CPU are left out."""
    res = manifest.get("results") or {}
    out = {}
    for c, info in (res.get("components") or {}).items():
        eng = (info or {}).get("engine") or {}
        targets = eng.get("compute_capabilities") or [info.get("target") or eng.get("target")
                                                       or (res.get("variant") or {}).get("target")]
        targets = [t for t in targets if t and t != "cpu"]
        if targets:
            out[c] = targets
    return out


def why_not_on(manifest: dict, gpu: Optional[str]) -> Optional[str]:
    """Why the engine (every component) cannot run on `gpu` (None: no GPU),
    naming each refusing component's targets; None if it can run there."""
    bad = {c: t for c, t in component_targets(manifest).items() if gpu is None or gpu not in t}
    if not bad:
        return None
    comps = manifest.get("results", {}).get("components") or {}
    parts = [f"{c} is a {comps.get(c, {}).get('backend', '?')} engine for {', '.join(t)}" for c, t in sorted(bad.items())]
    return "; ".join(parts) + (f"; it does not run on {gpu}" if gpu else "; there is no GPU to run it on")


def resolve(store, text: str, variant: Optional[str] = None, alias: Optional[str] = None,
            gpu: Optional[str] = None) -> tuple[dict, dict]:
    """(ref value, publish manifest) for REF = RECIPE[:VARIANT][@ALIAS], with
    --variant / --alias / --gpu as the pull command takes them. BadInput when
    the ref is malformed, contradicts itself or does not exist."""
    from .families import load_recipe
    from .spec import parse_ref

    ref = parse_ref(text)
    if variant is not None:
        check_name("variant", variant)
        if ref.variant is not None and ref.variant != variant:
            raise BadInput(f"ref {text!r} names variant {ref.variant!r} but --variant says {variant!r}")
    if alias is not None:
        check_alias(alias)
        if "@" in text and ref.alias != alias:
            raise BadInput(f"ref {text!r} names alias {ref.alias!r} but --alias says {alias!r}")
    if gpu is not None:
        check_gpu(gpu)
    recipe, v, a = ref.recipe, ref.variant or variant, alias or ref.alias
    check_alias(a)
    if v is None or gpu is not None:
        have = sorted({var for _, var, al in store.list_refs(recipe) if al == a})
        if gpu is not None:
            names = [x for x in ((f"{v}-{gpu}", v) if v else have) if x in have]
            found, refused = [], {}
            for name in names:
                value, m = _get(store, recipe, name, a)
                if not component_targets(m):  # built for the CPU only: not an engine for a GPU
                    continue
                why = why_not_on(m, gpu)
                if why is None:
                    found.append(name)
                else:
                    refused[name] = why
            if len(found) != 1:
                what = f"{recipe}{':' + v if v else ''}@{a}"
                if not found:
                    if len(refused) == 1:  # the one engine asked for, and the GPU it cannot run on
                        name, why = next(iter(refused.items()))
                        raise BadInput(f"refusing {recipe}:{name}@{a} for {gpu}: its {why}")
                    raise BadInput(f"no engine {what} built for {gpu} in {store.uri}"
                                   + (f" (variants with @{a}: {', '.join(have)})" if have else "")
                                   + "".join(f"; {n}: {w}" for n, w in refused.items()))
                raise BadInput(f"several engines {what} are built for {gpu} ({', '.join(found)}); name the variant")
            v = found[0]
        else:
            try:
                v = load_recipe(recipe).variant(None).name
            except BadInput:
                if not have:
                    raise BadInput(f"ref {text}: no engines for {recipe!r}@{a} in {store.uri}") from None
                v = have[0] if len(have) == 1 else recorded_default(store, recipe, have, a)
                if v is None:
                    raise BadInput(f"ref {text}: name the variant (RECIPE:VARIANT); the store has {have}") from None
    return _get(store, recipe, v, a)


def recorded_default(store, recipe: str, have: list[str], alias: str) -> Optional[str]:
    """The recipe's default variant as its newest publish manifest recorded
    it (a recipe given by path is not in the catalog), if it is among `have`."""
    newest: tuple[str, Optional[str]] = ("", None)
    for name in have:
        try:
            _, m = _get(store, recipe, name, alias)
        except FarmError:
            continue
        when = m.get("created_at") or ""
        if when >= newest[0]:
            newest = (when, ((m.get("results") or {}).get("recipe") or {}).get("default_variant"))
    return newest[1] if newest[1] in have else None


def _get(store, recipe: str, variant: str, alias: str) -> tuple[dict, dict]:
    got = store.get_ref(recipe, variant, alias)
    if got is None:
        raise BadInput(f"ref {recipe}:{variant}@{alias} does not exist in {store.uri}")
    value, _ = got
    m = store.get_manifest_by_path(value.get("manifest"))
    if m is None:
        raise FarmError(f"ref {recipe}:{variant}@{alias} points at {value['manifest']}, which is missing from {store.uri}")
    return value, m


# ---------------------------------------------------------------------- ls


def age(iso: Optional[str]) -> str:
    try:
        dt = datetime.fromisoformat(iso)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    s = (datetime.now(timezone.utc) - dt).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(max(s, 0))}s"


def engine_rows(store, recipe: Optional[str] = None) -> list[dict]:
    """One row per alias: recipe, variant, alias, digest, size, validation,
    target, when the engine was built and when/by whom the alias moved."""
    rows = []
    cache: dict[str, dict] = {}
    refs = sorted(store.list_refs(recipe))
    warm = getattr(store, "prefetch", None)  # an Indexed store reads what its index lacks several at once
    if warm:
        warm([store.ref_path(*x) for x in refs])
        paths = {(g[0] or {}).get("manifest") for g in (store.get_ref(*x) for x in refs) if g}
        warm(sorted(p for p in paths if isinstance(p, str) and p.startswith("manifests/")))
    for r, variant, alias in refs:
        got = store.get_ref(r, variant, alias)
        if not got:
            continue
        value, _ = got
        path = value.get("manifest")
        if path not in cache:
            cache[path] = store.get_manifest_by_path(path) or {}
        m = cache[path]
        res = m.get("results", {})
        rows.append({
            "recipe": r, "variant": variant, "alias": alias, "digest": value.get("digest"),
            "size": sum(f["size"] for f in m.get("files", {}).values()),
            "validation": status_of(res.get("validation")),
            "target": target_of(m), "gpu_targets": component_targets(m), "created_at": m.get("created_at"), "moved_at": value.get("moved_at"),
            "moved_by": value.get("moved_by"), "manifest": path,
        })
    return rows


# ---------------------------------------------------------------------- diff


def _flat(prefix: str, obj: Any, out: dict) -> dict:
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def diff_manifests(a: dict, b: dict) -> dict:
    """What changed from publish manifest a to b, by section: inputs (recipe,
    source, input manifests, source files), toolchain, variant, metrics
    (validation gates and metrics), files. Each entry: path -> [old, new]."""
    ra, rb = a.get("results") or {}, b.get("results") or {}

    def sections(m: dict, r: dict) -> dict:
        return {
            "inputs": {
                "recipe": r.get("recipe") if isinstance(r.get("recipe"), dict) else
                {"name": m.get("recipe"), "digest": m.get("recipe_digest")},
                "source": r.get("source"),
                "steps": {k: v.get("digest") for k, v in (m.get("inputs") or {}).items()},
                "source_files": r.get("source_files"),
            },
            "toolchain": {"farm": r.get("toolchain"),
                          **{c: (info or {}).get("toolchain") for c, info in (r.get("components") or {}).items()}},
            "variant": r.get("variant"),
            "metrics": {"passed": (r.get("validation") or {}).get("passed"),
                        "gates": {g: x.get("value") for g, x in ((r.get("validation") or {}).get("gates") or {}).items()},
                        "metrics": (r.get("validation") or {}).get("metrics")},
            "files": m.get("files"),
        }

    sa, sb = sections(a, ra), sections(b, rb)
    out: dict[str, dict] = {}
    for name in sa:
        fa, fb = _flat("", sa[name], {}), _flat("", sb[name], {})
        changed = {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
        out[name] = changed
    return out


def gpu_fit(value: dict, m: dict, given: Optional[str]) -> dict:
    """Whether the engine runs on the GPU it is pulled for: --gpu (checked
    by resolve already), else this machine's (nvidia-smi / torch.cuda).
    BadInput, naming the engine's targets and the GPU, where it cannot; with
    no GPU found, nothing is refused and the answer says so."""
    from .backends.base import detect_gpu

    targets = component_targets(m)
    if given is not None:
        return {"gpu": given, "source": "--gpu", "targets": targets, "checked": bool(targets)}
    if not targets:
        return {"gpu": None, "source": None, "targets": {}, "checked": False,
                "note": "built for the CPU: runs on any machine"}
    gpu, how = detect_gpu()
    if gpu is None:
        return {"gpu": None, "source": how, "targets": targets, "checked": False,
                "note": f"no GPU detected here ({how}): not checked whether the engine runs here; "
                        f"pass --gpu sm_XY to check it for the GPU it will run on"}
    why = why_not_on(m, gpu)
    if why:
        raise BadInput(f"refusing {value['recipe']}:{value['variant']}@{value['alias']} for this machine's GPU "
                       f"({gpu}, from {how}): its {why}; nothing was written to the destination")
    return {"gpu": gpu, "source": how, "targets": targets, "checked": True}
