"""The `enginefarm` command.

Exit codes: 0 done; 1 a step or a validation gate failed; 2 bad input
(recipe, arguments, ref), with one clear message and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .errors import BadInput, FarmError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 already; keep it to one line
        self.print_usage(sys.stderr)
        print(f"enginefarm: error: {message}", file=sys.stderr)
        sys.exit(2)


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    # the ephemeral API can take longer than Prefect's 20 s to start on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


# ----------------------------------------------------------------------------- recipe new


def _source_arg(src: str) -> dict:
    if src.startswith("tiny:"):
        return {"tiny": src[5:]}
    if src.startswith("s3://"):
        return {"s3": src}
    if src.startswith("hf:") or src.startswith("hf://"):
        rest = src.split(":", 1)[1].lstrip("/")
        repo, _, rev = rest.partition("@")
        return {"hf": repo, "revision": rev or None}
    p = Path(src)
    if p.is_dir():
        return {"path": str(p.resolve())}
    raise BadInput(
        f"--source {src!r}: not a directory; give a local checkpoint directory, tiny:NAME, s3://bucket/prefix "
        f"or hf:ORG/NAME@COMMIT_SHA"
    )


def cmd_recipe_new(a) -> int:
    import yaml

    from .families import detect_family, get_family
    from .spec import NAME_RE, parse_recipe

    if not NAME_RE.match(a.name):
        raise BadInput(f"recipe name {a.name!r}: use lower-case letters, digits, '.', '_', '-'")
    source = _source_arg(a.source)
    config = None
    if "tiny" in source:
        from .testing import TINY_MODELS, ensure_tiny

        if source["tiny"] not in TINY_MODELS:
            raise BadInput(f"--source tiny:{source['tiny']}: no such tiny model (known: {', '.join(TINY_MODELS)})")
        config = json.loads((ensure_tiny(source["tiny"]) / "config.json").read_text())
    elif "path" in source:
        cfg = Path(source["path"]) / "config.json"
        try:
            config = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise BadInput(f"--source {a.source}: cannot read {cfg}: {e}") from None
    family = a.family
    if family is None:
        if config is None:
            raise BadInput(f"--source {a.source}: the family cannot be detected offline from a remote source; pass --family")
        family = detect_family(config)
    fam = get_family(family)
    data = {
        "name": a.name,
        "description": f"{fam.title} from {a.source}",
        "family": family,
        "source": source,
        "components": {c: {} for c in fam.components},
        "matrix": {"backend": ["aoti"], "dtype": ["float32"], "quant": ["none"], "tp": [1], "target": ["cpu"]},
    }
    r = parse_recipe(data, f"<recipe new {a.name}>")  # fills every default, and checks
    fam.check_recipe(r)
    if config is not None:
        for v in r.variants():
            fam.check_config(config, v)
    full = r.model_dump(mode="json", exclude={"origin"})
    full["source"] = {k: v for k, v in full["source"].items() if v is not None}
    full["components"] = {c: {k: v for k, v in spec.items() if v is not None} for c, spec in full["components"].items()}
    full["limits"] = {k: v for k, v in full["limits"].items() if v is not None}
    if full.get("default_variant") is None:
        full["default_variant"] = r.variants()[0].name
    header = f"# enginefarm recipe for {fam.title}; family detected: {family}{'' if fam.implemented else ' (not implemented yet)'}\n"
    sys.stdout.write(header + yaml.safe_dump(full, sort_keys=False))
    return 0


# ----------------------------------------------------------------------------- build / plan


def cmd_build(a) -> int:
    _quiet_prefect()
    from .errors import GateFailed
    from .flows.build import answer_from_store, prepare

    t0 = time.perf_counter()
    prepare(a.recipe, a.variant or None)  # bad input exits 2 before Prefect starts
    try:
        summary = None
        if not a.force and not a.flow:
            # nothing to do: answered from the store's manifests, no flow run
            summary = answer_from_store(a.recipe, a.variant or None, a.store)
        if summary is None:
            from .flows.build import build

            summary = build(recipe=a.recipe, variants=a.variant or None, store=a.store, force=a.force)
        code = 0
    except GateFailed as e:
        summary = getattr(e, "summary", None)
        print(f"enginefarm: {e}", file=sys.stderr)
        code = 1
    if summary:
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        if a.json:
            print(json.dumps(summary, indent=2))
        else:
            _print_build(summary)
    return code


def _print_build(s: dict) -> None:
    print(f"recipe {s['recipe']} -> {s['store']}  ({s['seconds']}s)")
    for name, v in s["variants"].items():
        steps = "  ".join(f"{k}:{st}" for k, st in v["steps"].items())
        size = sum(f["size"] for f in v["files"].values())
        status = "passed" if v["validation"] else "FAILED"
        print(f"  {name}: validation {status}; engine {size/1e6:.2f} MB; {v['manifest']}")
        print(f"    {steps}")
        for g, r in (v.get("gates") or {}).items():
            val = r["value"] if not isinstance(r["value"], float) else f"{r['value']:.3g}"
            print(f"    gate {g}: {val} (limit {r['limit']}) {'ok' if r['passed'] else 'FAIL'}")
    if s.get("all_cached"):
        print("  every step cached" + ("" if s.get("flow_run") else " (answered from the store; no flow run needed)"))


def cmd_plan(a) -> int:
    from .flows.build import plan, prepare
    from .store import open_store

    r, vs = prepare(a.recipe, a.variant or None)
    st = open_store(a.store)
    rows = [(x.step, x.variant, "cached" if x.hit else "will run", x.hit.key[:12] if x.hit else "")
            for x in plan(r, vs, st)[0]]
    if a.json:
        print(json.dumps([dict(zip(("step", "variant", "status", "key"), x)) for x in rows], indent=2))
        return 0
    print(f"recipe {r.name} ({r.family}) against {st.uri}")
    print("  fetch -> convert -> build -> validate -> publish -> alias")
    for step, variant, status, key in rows:
        print(f"  {step:<14} {variant:<18} {status:<9} {key}")
    return 0


# ----------------------------------------------------------------------------- nightly / report


def cmd_nightly(a) -> int:
    _quiet_prefect()
    from .flows.nightly import load_catalog

    load_catalog(a.catalog)  # a missing or empty catalog exits 2 before Prefect starts
    from .flows.nightly import nightly

    if a.nights < 1:
        raise BadInput(f"--nights {a.nights}: expected 1 or more")
    state = nightly(catalog=a.catalog, store=a.store, force=a.force, nights=a.nights, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):  # the flow itself failed (not a variant): its exception says why
        if isinstance(summary, FarmError):
            raise summary
        raise FarmError(f"nightly failed: {state.message}")
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        from .flows.report import headline

        print(f"nightly {a.catalog} -> {summary['store']} ({summary['seconds']}s): {headline(summary['rows'])}")
        skipped: dict = {}
        for r in summary["rows"]:
            if r["status"] == "skipped":  # one line a recipe: its variants share the reason
                skipped.setdefault((r["recipe"], r["why"]), []).append(r["variant"])
            elif r["status"] != "up to date":
                print(f"  {r['status']:<10} {r['recipe']}:{r['variant']}  {r['why']}")
        for (recipe, why), vs in skipped.items():
            print(f"  {'skipped':<10} {recipe} ({len(vs)} variant{'s' if len(vs) != 1 else ''})  {why}")
        print(f"  record: {summary['record']}")
    return 0 if state.is_completed() else 1


def cmd_report(a) -> int:
    from .flows.report import NIGHTLY, last_nights, plot
    from .store import open_store

    if a.nights < 1:
        raise BadInput(f"--nights {a.nights}: expected 1 or more")
    st = open_store(a.store)
    records = last_nights(st, a.nights)
    if not records:
        raise BadInput(f"no nightly runs recorded in {st.uri} (reports/{NIGHTLY}/ is empty)")
    out = Path(a.out)
    if out.parent and not out.parent.is_dir():
        raise BadInput(f"--out {a.out}: directory {out.parent} does not exist")
    out.write_bytes(plot(records))
    if a.json:
        print(json.dumps({"plot": str(out), "nights": [{k: v for k, v in rec.items() if k != "rows"}
                                                       for rec in records]}, indent=2))
        return 0
    print(f"{'NIGHT (UTC)':<20} {'SECONDS':>8} {'BUILT':>6} {'UP TO DATE':>10} {'FAILED':>6} {'SKIPPED':>7}")
    for rec in records:
        c = rec["counts"]
        print(f"{rec['started_at'][:19]:<20} {rec['seconds']:>8} {c['built']:>6} {c['up to date']:>10} "
              f"{c['failed']:>6} {c['skipped']:>7}")
    print(f"plot of the last {len(records)} night(s): {out}")
    return 0


# ----------------------------------------------------------------------------- ls / show / run


def _age(iso: str) -> str:
    try:
        dt = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return "?"
    s = (datetime.now(timezone.utc) - dt).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"


def resolve(store, ref_text: str) -> tuple[dict, dict]:
    """(ref value, publish manifest) for a ref; BadInput when it does not exist."""
    from .spec import load_recipe, parse_ref

    ref = parse_ref(ref_text)
    variant = ref.variant
    if variant is None:
        try:
            variant = load_recipe(ref.recipe).variant(None).name
        except BadInput:
            variants = sorted({v for rr, v, _ in store.list_refs(ref.recipe)})
            if not variants:
                raise BadInput(f"ref {ref_text}: no engines for {ref.recipe!r} in {store.uri}") from None
            if len(variants) != 1:
                raise BadInput(f"ref {ref_text}: name the variant (RECIPE:VARIANT); the store has {variants or 'none'}") from None
            variant = variants[0]
    got = store.get_ref(ref.recipe, variant, ref.alias)
    if got is None:
        raise BadInput(f"ref {ref.recipe}:{variant}@{ref.alias} does not exist in {store.uri}")
    value, _ = got
    m = store.get_manifest_by_path(value["manifest"])
    if m is None:
        raise FarmError(f"ref {ref_text} points at {value['manifest']}, which is missing from {store.uri}")
    return value, m


def cmd_ls(a) -> int:
    if a.catalog:
        from .families import get_family
        from .spec import catalog_paths, load_recipe

        rows = []
        for p in catalog_paths():
            try:
                r = load_recipe(str(p))
                fam = get_family(r.family)
                rows.append({"recipe": r.name, "family": r.family, "implemented": fam.implemented,
                             "variants": [v.name for v in r.variants()], "path": str(p)})
            except BadInput as e:
                rows.append({"recipe": p.stem, "error": str(e), "path": str(p)})
        if a.json:
            print(json.dumps(rows, indent=2))
        else:
            for x in rows:
                if "error" in x:
                    print(f"{x['recipe']:<28} ERROR {x['error'].splitlines()[0]}")
                else:
                    print(f"{x['recipe']:<28} {x['family']:<17} {'' if x['implemented'] else '(not implemented) '}{' '.join(x['variants'])}")
        return 0
    from .store import open_store

    st = open_store(a.store)
    rows = []
    for recipe, variant, alias in sorted(st.list_refs(a.recipe)):
        got = st.get_ref(recipe, variant, alias)
        if not got:
            continue
        value, _ = got
        m = st.get_manifest_by_path(value["manifest"]) or {}
        res = m.get("results", {})
        rows.append({
            "recipe": recipe, "variant": variant, "alias": alias, "digest": value.get("digest"),
            "size": sum(f["size"] for f in m.get("files", {}).values()),
            "validation": "passed" if res.get("validation", {}).get("passed") else "failed",
            "created_at": m.get("created_at"), "manifest": value["manifest"],
        })
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no engines in {st.uri}" + (f" for {a.recipe}" if a.recipe else ""))
        return 0
    print(f"{'RECIPE':<24} {'VARIANT':<14} {'ALIAS':<10} {'DIGEST':<13} {'SIZE':>10} {'VALIDATION':<10} AGE")
    for x in rows:
        print(f"{x['recipe']:<24} {x['variant']:<14} {x['alias']:<10} {x['digest'][:12]:<13} "
              f"{x['size']/1e6:>8.2f}MB {x['validation']:<10} {_age(x['created_at'])}")
    return 0


def cmd_show(a) -> int:
    from .store import open_store

    st = open_store(a.store)
    value, m = resolve(st, a.ref)
    if a.json:
        print(json.dumps({"ref": value, "manifest": m}, indent=2))
        return 0
    res = m.get("results", {})
    print(f"{value['recipe']}:{value['variant']}@{value['alias']} -> {value['manifest']}")
    print(f"  digest     {value['digest']}")
    print(f"  moved      {value.get('moved_at')} by {value.get('moved_by')} ({value.get('reason')})")
    print(f"  created    {m.get('created_at')} on {m.get('host')}")
    print(f"  source     {json.dumps(res.get('source'))}")
    print(f"  variant    {json.dumps(res.get('variant'))}")
    for c, info in (res.get("components") or {}).items():
        print(f"  {c:<10} backend {info['backend']}; toolchain {json.dumps(info['toolchain'])}")
    val = res.get("validation") or {}
    print(f"  validation {'passed' if val.get('passed') else 'FAILED'}")
    for g, r in (val.get("gates") or {}).items():
        print(f"    {g}: {r['value']} (limit {r['limit']}) {'ok' if r['passed'] else 'FAIL'}")
    print("  files")
    for rel, f in sorted(m.get("files", {}).items()):
        print(f"    {rel:<24} {f['size']:>12}  sha256:{f['sha256'][:16]}")
    return 0


def cmd_run(a) -> int:
    import tempfile

    from .backends import get_backend
    from .store import open_store

    if a.image or a.video:
        raise BadInput("images and video need a multimodal family; none is implemented in this version")
    st = open_store(a.store)
    value, m = resolve(st, a.ref)
    cache = Path(os.environ.get("ENGINEFARM_CACHE", Path(tempfile.gettempdir()) / "enginefarm-cache")) / value["digest"][:16]
    eng_dir = cache / "llm"
    tok_dir = cache / "tokenizer"
    for rel, f in m["files"].items():
        if rel.startswith("llm/") and not (cache / rel).exists():
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            st.get_blob_file(f["sha256"], cache / rel, size=f["size"])
    fetch_in = m["inputs"]["fetch"]
    fm = st.get_manifest(value["recipe"], "fetch", fetch_in["key"])
    for rel, f in fm["files"].items():
        if (rel.startswith("tokenizer") or rel in ("vocab.json", "merges.txt", "special_tokens_map.json", "config.json")
                or rel.endswith(".model")) and not (tok_dir / rel).exists():
            tok_dir.mkdir(parents=True, exist_ok=True)
            st.get_blob_file(f["sha256"], tok_dir / rel, size=f["size"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
    backend = m["results"]["components"]["llm"]["backend"]
    eng = get_backend(backend).load(eng_dir)
    prompts = [tok(p).input_ids for p in a.prompt]
    t0 = time.perf_counter()
    outs = eng.generate(prompts, a.max_new_tokens, eos_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    results = [{"prompt": p, "output_ids": o, "text": tok.decode(o, skip_special_tokens=True)} for p, o in zip(a.prompt, outs)]
    if a.json:
        print(json.dumps({"ref": value, "results": results, "seconds": round(dt, 3)}, indent=2))
    else:
        for r in results:
            print(f"{r['prompt']}{r['text']}")
    return 0


# ----------------------------------------------------------------------------- convert


def cmd_convert(a) -> int:
    from .checkpoint import convert_checkpoint
    from .families import detect_family, get_family
    from .spec import Variant

    src = Path(a.src)
    if not (src / "config.json").is_file():
        raise BadInput(f"{a.src}: not a Hugging Face checkpoint directory (no config.json)")
    config = json.loads((src / "config.json").read_text())
    fam = get_family(a.family or detect_family(config))
    if not getattr(fam, "tensors", None) or not fam.implemented:
        raise BadInput(f"family {fam.name} has no converter yet")
    quant = a.quant or "none"
    v = Variant(name=f"{a.dtype}-tp{a.tp}", backend="tensorrt-llm", dtype=a.dtype, quant=quant, tp=a.tp, target="cpu")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"--out {out} exists and is not empty")
    summary = convert_checkpoint(fam, src, out, v, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"out": str(out), **summary}))
    return 0


# ----------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="enginefarm", description="A build farm for inference engines.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    rp = sub.add_parser("recipe", help="recipes")
    rsub = rp.add_subparsers(dest="recipe_cmd", required=True, parser_class=_Parser)
    rn = rsub.add_parser("new", help="print a complete recipe for a checkpoint")
    rn.add_argument("name")
    rn.add_argument("--source", required=True, help="a checkpoint dir, tiny:NAME, s3://bucket/prefix or hf:ORG/NAME@SHA")
    rn.add_argument("--family")
    rn.set_defaults(fn=cmd_recipe_new)

    def store_arg(sp):
        sp.add_argument("--store", default=None, help="directory, file://..., or s3://bucket/prefix (default: $ENGINEFARM_STORE or .farm)")

    b = sub.add_parser("build", help="build a recipe's variants")
    b.add_argument("recipe")
    b.add_argument("--variant", action="append", help="a variant to build (repeatable; default: all)")
    store_arg(b)
    b.add_argument("--force", action="store_true", help="rebuild every step even if cached")
    b.add_argument("--flow", action="store_true",
                   help="always start a Prefect flow run, even when every step is cached")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_build)

    pl = sub.add_parser("plan", help="the DAG, and which steps are cached")
    pl.add_argument("recipe")
    pl.add_argument("--variant", action="append")
    store_arg(pl)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plan)

    ni = sub.add_parser("nightly", help="rebuild the catalog's stale variants (the nightly flow, here)")
    ni.add_argument("--catalog", default="models", help="a directory of recipes (default: models)")
    store_arg(ni)
    ni.add_argument("--force", action="store_true", help="rebuild every variant")
    ni.add_argument("--nights", type=int, default=14, help="nights shown in the plot (default 14)")
    ni.add_argument("--json", action="store_true")
    ni.set_defaults(fn=cmd_nightly)

    rp_ = sub.add_parser("report", help="the last nights: a table, and their plot as a PNG file")
    store_arg(rp_)
    rp_.add_argument("--nights", type=int, default=14)
    rp_.add_argument("--out", default="nightly.png", help="where to write the plot (default nightly.png)")
    rp_.add_argument("--json", action="store_true")
    rp_.set_defaults(fn=cmd_report)

    ls = sub.add_parser("ls", help="engines in the store (or --catalog: recipes)")
    ls.add_argument("recipe", nargs="?")
    ls.add_argument("--catalog", action="store_true", help="list the catalog's recipes instead")
    store_arg(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_ls)

    sh = sub.add_parser("show", help="one engine's manifest")
    sh.add_argument("ref", help="RECIPE[:VARIANT][@ALIAS]")
    store_arg(sh)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(fn=cmd_show)

    rn = sub.add_parser("run", help="generate with a built engine")
    rn.add_argument("ref")
    rn.add_argument("--prompt", action="append", required=True, help="repeatable: one sequence each")
    rn.add_argument("--image", action="append")
    rn.add_argument("--video")
    rn.add_argument("--max-new-tokens", type=int, default=32)
    store_arg(rn)
    rn.add_argument("--json", action="store_true")
    rn.set_defaults(fn=cmd_run)

    cv = sub.add_parser("convert", help="HF checkpoint -> TensorRT-LLM checkpoint")
    cv.add_argument("src")
    cv.add_argument("--tp", type=int, default=1, choices=[1, 2, 4, 8])
    cv.add_argument("--quant", choices=["w8a16", "w4a16"])
    cv.add_argument("--group-size", type=int)
    cv.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    cv.add_argument("--family")
    cv.add_argument("--out", required=True)
    cv.set_defaults(fn=cmd_convert)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except BadInput as e:
        print(f"enginefarm: {e}", file=sys.stderr)
        return 2
    except FarmError as e:
        print(f"enginefarm: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("enginefarm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
