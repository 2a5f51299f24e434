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

    if not NAME_RE.fullmatch(a.name):
        raise BadInput(f"recipe name {a.name!r}: use lower-case letters, digits, '.', '_', '-'")
    source = _source_arg(a.source)
    config = None
    if "tiny" in source:
        from .testing import ensure_tiny, tiny_models

        known = tiny_models()
        if source["tiny"] not in known:
            raise BadInput(f"--source tiny:{source['tiny']}: no such tiny model (known: {', '.join(known)})")
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
        # video families: 8 frames a video, as the released LLaVA-NeXT-Video models were trained with
        "components": {c: {"num_frames": 8} if c == "visual" and getattr(fam, "media", "") == "video" else {}
                       for c in fam.components},
        "matrix": {"backend": ["aoti"], "dtype": ["float32"], "quant": ["none"], "tp": [1], "target": ["cpu"]},
    }
    r = parse_recipe(data, f"<recipe new {a.name}>")  # fills every default, and checks
    fam.check_recipe(r)
    if config is not None:
        for v in r.variants():
            fam.check_config(config, v)
    if "path" in source and fam.implemented:  # what validation and `run` will load is there
        fam.check_inputs(Path(source["path"]), f"--source {a.source}")
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
        vs = v.get("validation_status") or ("passed" if v["validation"] else "failed")
        status = {"passed": "passed", "failed": "FAILED"}.get(vs, "pending (no compatible GPU)")
        if vs == "pending":
            status += ": " + ", ".join(c for c, x in (v.get("validation_components") or {}).items()
                                       if x["status"] == "pending") + " not run here; validated not moved"
        print(f"  {name}: validation {status}; engine {size/1e6:.2f} MB; {v['manifest']}")
        print(f"    {steps}")
        for g, r in (v.get("gates") or {}).items():
            val = r["value"] if not isinstance(r["value"], float) else f"{r['value']:.3g}"
            print(f"    gate {g}: {val} (limit {r['limit']}) {'ok' if r['passed'] else 'FAIL'}")
    if s.get("all_cached"):
        print("  every step cached" + ("" if s.get("flow_run") else " (answered from the store; no flow run needed)"))


def cmd_plan(a) -> int:
    from .flows.build import plan, plan_notes, prepare
    from .store import open_store

    r, vs = prepare(a.recipe, a.variant or None, require_backends=False)
    st = open_store(a.store)
    planned = plan(r, vs, st)[0]
    rows = [(x.step, x.variant, "cached" if x.hit else "will run", x.hit.key[:12] if x.hit else "")
            for x in planned]
    notes = plan_notes(r, vs, planned)
    if a.json:
        out = [dict(zip(("step", "variant", "status", "key"), x)) for x in rows]
        for row in out:
            if row["step"].startswith("build[") and row["variant"] in notes:
                row["notes"] = [n[len(row["step"]) + 1:] if n.startswith(row["step"] + " if ") else n.split(": ", 1)[1]
                                for n in notes[row["variant"]] if n.startswith(row["step"])]
        print(json.dumps(out, indent=2))
        return 0
    print(f"recipe {r.name} ({r.family}) against {st.uri}")
    print("  fetch -> [calibrate] -> convert -> [shards] -> build -> validate -> publish -> alias")
    for step, variant, status, key in rows:
        print(f"  {step:<14} {variant:<18} {status:<9} {key}")
    for name, lines in notes.items():
        for line in lines:
            print(f"  {name}: {line}")
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


def _catalog_rows() -> list[dict]:
    from .families import get_family
    from .families import load_recipe
    from .spec import catalog_paths

    rows = []
    for p in catalog_paths():
        try:
            r = load_recipe(str(p))
            fam = get_family(r.family)
            rows.append({"recipe": r.name, "family": r.family, "implemented": fam.implemented,
                         "variants": [v.name for v in r.variants()], "path": str(p)})
        except BadInput as e:
            rows.append({"recipe": p.stem, "error": str(e), "path": str(p)})
    return rows


def cmd_ls(a) -> int:
    if a.catalog:
        rows = _catalog_rows()
        if a.json:
            print(json.dumps(rows, indent=2))
        else:
            for x in rows:
                if "error" in x:
                    print(f"{x['recipe']:<28} ERROR {x['error'].splitlines()[0]}")
                else:
                    print(f"{x['recipe']:<28} {x['family']:<17} {'' if x['implemented'] else '(not implemented) '}{' '.join(x['variants'])}")
        return 0
    from .registry import age, engine_rows
    from .store import open_store

    if a.recipe is not None:
        from .store.base import check_name

        check_name("recipe", a.recipe)
    from .store.index import Indexed

    st = Indexed(open_store(a.store))  # refs and manifests through the store's index (read, never written)
    rows = engine_rows(st, a.recipe)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no engines in {st.uri}" + (f" for {a.recipe}" if a.recipe else ""))
        return 0
    # one line per engine: the aliases that point at it together
    engines: dict[tuple, dict] = {}
    for x in rows:
        e = engines.setdefault((x["recipe"], x["variant"], x["digest"]), {**x, "aliases": []})
        e["aliases"].append(x["alias"])
    print(f"{'RECIPE':<24} {'VARIANT':<16} {'TARGET':<7} {'ALIASES':<26} {'DIGEST':<13} {'SIZE':>10} {'VALIDATION':<10} AGE")
    for e in engines.values():
        print(f"{e['recipe']:<24} {e['variant']:<16} {str(e['target']):<7} {','.join(e['aliases']):<26} "
              f"{e['digest'][:12]:<13} {e['size']/1e6:>8.2f}MB {e['validation']:<10} {age(e['created_at'])}")
    return 0


def cmd_show(a) -> int:
    from .registry import quality_line, resolve, validation_line
    from .store import open_store

    st = open_store(a.store)
    value, m = resolve(st, a.ref)
    history = st.ref_history(value["recipe"], value["variant"], value["alias"])
    if a.json:
        print(json.dumps({"ref": value, "manifest": m, "history": history}, indent=2))
        return 0
    res = m.get("results", {})
    print(f"{value['recipe']}:{value['variant']}@{value['alias']} -> {value['manifest']}")
    print(f"  digest     {value['digest']}")
    print(f"  moved      {value.get('moved_at')} by {value.get('moved_by')} ({value.get('reason')})")
    print(f"  created    {m.get('created_at')} on {m.get('host')}  (schema {m.get('schema')})")
    src = res.get("source") or {}
    print(f"  source     {src.get('repo') or json.dumps(src)}" + (f" @ {src['commit']}" if src.get("commit") else ""))
    print(f"  variant    {json.dumps(res.get('variant'))}")
    for c, info in (res.get("components") or {}).items():
        eng = info.get("engine") or {}
        where = ", ".join(eng.get("compute_capabilities") or []) or info.get("target") or eng.get("target")
        print(f"  {c:<10} backend {info['backend']}" + (f" for {where}" if where else "")
              + f"; toolchain {json.dumps(info['toolchain'])}")
    if res.get("toolchain"):
        print("  toolchain  " + ", ".join(f"{k} {v}" for k, v in res["toolchain"].items() if v))
    if res.get("farm"):
        print(f"  farm       enginefarm {res['farm'].get('version')}" + (f" @ {res['farm']['commit']}" if res['farm'].get('commit') else ""))
    if res.get("timings"):
        print("  timings    " + ", ".join(f"{k} {v}s" for k, v in res["timings"].items() if v is not None))
    val = res.get("validation") or {}
    print(f"  validation {validation_line(val)}")
    q = quality_line(val.get("metrics"))
    if q:  # next to the unquantized reference: what a quantized variant costs
        print(f"  quality    {q}")
    for c, x in (val.get("components") or {}).items():
        print(f"    {c}: {x['status']}" + (f" ({x.get('reason')}: {x['detail']})" if x.get("detail") else ""))
    for g, r in (val.get("gates") or {}).items():
        print(f"    {g}: {r['value']} (limit {r['limit']}) {'ok' if r['passed'] else 'FAIL'}")
    print("  files")
    for rel, f in sorted(m.get("files", {}).items()):
        print(f"    {rel:<24} {f['size']:>12}  sha256:{f['sha256'][:16]}")
    if history:
        print(f"  history of @{value['alias']} (newest last)")
        for h in history[-10:]:
            v = h.get("value") or {}
            print(f"    {h.get('at')}  {(v.get('previous') or '-')[:12]} -> {str(v.get('digest'))[:12]}  "
                  f"by {v.get('moved_by')} ({v.get('reason')})")
    return 0


def cmd_diff(a) -> int:
    from .registry import diff_manifests, resolve
    from .store import open_store

    st = open_store(a.store)
    (va, ma), (vb, mb) = resolve(st, a.ref_a), resolve(st, a.ref_b)
    d = diff_manifests(ma, mb)
    if a.json:
        print(json.dumps({"a": va, "b": vb, "changes": d}, indent=2, default=str))
        return 0
    print(f"a: {a.ref_a} -> {va['digest'][:12]} ({ma.get('created_at')})")
    print(f"b: {a.ref_b} -> {vb['digest'][:12]} ({mb.get('created_at')})")
    if va["digest"] == vb["digest"]:
        print("the same engine")
        return 0
    for section, changes in d.items():
        print(f"{section}: " + ("unchanged" if not changes else f"{len(changes)} change(s)"))
        for k, (old, new) in changes.items():
            print(f"  {k}: {_short(old)} -> {_short(new)}")
    return 0


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 72 else s[:69] + "..."


def cmd_promote(a) -> int:
    from .flows.promote import promote
    from .registry import resolve
    from .store import open_store

    st = open_store(a.store)
    value, m = resolve(st, a.ref)
    out = promote(st, value, m, a.alias, force=a.force)
    if a.json:
        print(json.dumps(out, indent=2))
    elif out["moved"]:
        print(f"{out['recipe']}:{out['variant']}@{out['alias']}: {(out['from'] or '-')[:12]} -> {out['digest'][:12]}"
              + (" (forced: validation did not pass)" if out["forced"] else ""))
    else:
        print(f"{out['recipe']}:{out['variant']}@{out['alias']} already points at {out['digest'][:12]}")
    return 0


def cmd_pull(a) -> int:
    from .registry import gpu_fit, resolve, status_of, validation_line
    from .store import open_store
    from .store.pull import pull

    try:
        st = open_store(a.store)
        value, m = resolve(st, a.ref, variant=a.variant, alias=a.alias, gpu=a.gpu)
        fit = gpu_fit(value, m, a.gpu)
        out = pull(st, value, m, a.dest, layout=a.layout,
                   progress=None if a.json else (lambda msg: print(f"[enginefarm] {msg}", file=sys.stderr)))
        out["gpu"] = fit
        out["validation_status"] = status_of((m.get("results") or {}).get("validation"))
    except FarmError as e:
        if a.json:  # CI scripts read one JSON object either way
            print(json.dumps({"ok": False, "error": str(e), "exit_code": e.exit_code}))
        raise
    if a.json:
        print(json.dumps({"ok": True, **out}, indent=2))
        return 0
    state = "up to date" if out["up_to_date"] else (
        f"{out['fetched_bytes']/1e6:.2f} MB fetched, {out['reused_files']} file(s) resumed")
    print(f"{out['ref']} ({out['digest'][:12]}, validation {validation_line((m.get('results') or {}).get('validation'))}) "
          f"-> {out['dest']} [{out['layout']}]: {len(out['files'])} file(s), every sha256 verified; {state}; "
          f"{out['seconds']}s")
    if fit.get("note") and fit["targets"]:
        print(f"enginefarm: {fit['note']}", file=sys.stderr)
    return 0


def cmd_gc(a) -> int:
    from .flows.gc import gc
    from .store import open_store

    st = open_store(a.store)
    out = gc(st, a.keep, dry_run=a.dry_run, wait=a.wait,
             progress=None if a.json else (lambda msg: print(f"[enginefarm] {msg}", file=sys.stderr)))
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    verb = "would delete" if a.dry_run else "deleted"
    print(f"gc {st.uri} --keep {a.keep}: {verb} {out['manifests']['deleted']} of {out['manifests']['total']} "
          f"manifest(s) and {out['blobs']['deleted']} of {out['blobs']['total']} blob(s) "
          f"({out['bytes_freed']/1e6:.2f} MB); aliases kept: {len(out['aliases'])}")
    return 0


WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".index.json")


def _lay_out(st, value: dict, m: dict, weights: bool = False) -> Path:
    """The ref's engines (<cache>/<component>/) and the fetched checkpoint's
    files other than weights: tokenizer, processor, config (<cache>/source/);
    with weights=True the weights too (a Hugging Face reference runs there)."""
    import tempfile

    cache = Path(os.environ.get("ENGINEFARM_CACHE", Path(tempfile.gettempdir()) / "enginefarm-cache")) / value["digest"][:16]
    for rel, f in m["files"].items():
        if not (cache / rel).exists():
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            st.get_blob_file(f["sha256"], cache / rel, size=f["size"])
    fm = st.get_manifest(value["recipe"], "fetch", m["inputs"]["fetch"]["key"])
    for rel, f in fm["files"].items():
        if (weights or not rel.endswith(WEIGHTS)) and not (cache / "source" / rel).exists():
            (cache / "source" / rel).parent.mkdir(parents=True, exist_ok=True)
            st.get_blob_file(f["sha256"], cache / "source" / rel, size=f["size"])
    return cache


def _pairs(images: list[str], prompts: list[str], media: str = "image") -> tuple[list[str], list[str]]:
    """One image (or video) per prompt: n and n, or one of either for all of the other."""
    if len(images) == len(prompts):
        return images, prompts
    if len(images) == 1:
        return images * len(prompts), prompts
    if len(prompts) == 1:
        return images, prompts * len(images)
    raise BadInput(f"{len(images)} --{media} and {len(prompts)} --prompt: give one {media} per prompt, "
                   f"or one {media} for every prompt, or one prompt for every {media}")


def cmd_run(a) -> int:
    from .backends import get_backend
    from .registry import resolve
    from .store import open_store

    if a.image and a.video:
        raise BadInput("give --image or --video, not both: one kind a run (LLaVA-NeXT-Video takes either)")
    if a.frames is not None and not a.video:
        raise BadInput("--frames is for --video")
    if a.frames is not None and a.frames < 1:
        raise BadInput(f"--frames must be at least 1 (got {a.frames})")
    if a.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be at least 1 (got {a.max_new_tokens})")
    st = open_store(a.store)
    value, m = resolve(st, a.ref)
    comps = m["results"]["components"]
    given = "image" if a.image else "video" if a.video else None
    if given and "visual" not in comps:
        raise BadInput(f"{a.ref} has a text-only engine (no visual component); --{given} needs a multimodal recipe")
    if "visual" in comps:
        media, takes = _media_of(comps)
        if not given:
            raise BadInput(f"{a.ref} is multimodal: give {_flags(takes)} (one per prompt, or one for every prompt)")
        if given not in takes:
            raise BadInput(f"{a.ref} takes {media}s, not {given}s: give --{media} PATH"
                           + (" (--video needs a video family: llava-next-video)" if media == "image" else ""))
        images, prompts = _pairs(a.image or a.video, a.prompt, given)
        return _run_multimodal(a, value, _lay_out(st, value, m), images, prompts, given)
    cache = _lay_out(st, value, m)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache / "source", trust_remote_code=False)
    eng = get_backend(comps["llm"]["backend"]).load(cache / "llm")
    prompts = [tok(p).input_ids for p in a.prompt]
    d, watch = _decoding(a, len(prompts), lambda ids: tok.decode(ids, skip_special_tokens=True))
    if a.stream:
        print(a.prompt[0], end="", flush=True)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, a.max_new_tokens, eos_token_id=tok.eos_token_id, decoding=d, on_token=watch)
    dt = time.perf_counter() - t0
    results = [{"prompt": p, "output_ids": watch.ids(i, o), "text": watch.text(i, o)}
               for i, (p, o) in enumerate(zip(a.prompt, outs))]
    watch.flush()
    if a.stream:
        print(file=sys.stdout)
    if a.json:
        print(json.dumps({"ref": value, "results": results, "seconds": round(dt, 3)}, indent=2))
    elif not a.stream:
        for r in results:
            print(f"{r['prompt']}{r['text']}")
    return 0


def cmd_chat(a) -> int:
    from .backends import get_backend
    from .chat import Conversation, chat, engine_answer, reference_answer
    from .registry import resolve
    from .store import open_store

    if a.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens must be at least 1 (got {a.max_new_tokens})")
    if a.image and a.video:
        raise BadInput("give --image or --video, not both: a conversation is about one")
    st = open_store(a.store)
    value, m = resolve(st, a.ref)
    comps = m["results"]["components"]
    given = "image" if a.image else "video" if a.video else None
    media = None
    if "visual" in comps:
        media, takes = _media_of(comps)
        if given and given not in takes:
            raise BadInput(f"{a.ref} takes {media}s, not {given}s: give --{media} PATH")
    elif given:
        raise BadInput(f"{a.ref} has a text-only engine (no visual component); --{given} needs a multimodal recipe")
    first = _load_media(given, a.image or a.video) if given else None  # unreadable: exit 2 before any engine loads

    def read(prompt: str):
        try:
            return input(prompt)
        except EOFError:
            return None

    title = f"chat with {value['recipe']}:{value['variant']}@{value['alias']}"
    beside = " (beside it: the Hugging Face model, fp32, greedy)" if a.compare else ""
    write = lambda s: print(s, end="", flush=True)  # noqa: E731
    cache = _lay_out(st, value, m, weights=bool(a.compare))
    d, _ = _decoding(a, 1, None)
    if media is not None:
        from .backends import load_engine
        from .chat import media_conversation, media_engine_answer, media_reference_answer
        from .runtime.multimodal import MultimodalPipeline

        pipe = MultimodalPipeline.load(cache, load_engine)
        d.check(pipe.llm.max_beam_width)
        conv = media_conversation(pipe, _load_media)
        mine = media_engine_answer(pipe, a.max_new_tokens, d)
        ref = media_reference_answer(pipe, cache / "source", a.max_new_tokens) if a.compare else None
        print(title + beside, flush=True)
        if first is not None:
            write(conv.attach(given, a.image or a.video) + "\n")
        chat(conv, mine, pipe.llm.max_input_len, read, write, ref, d.stop)
        return 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache / "source", trust_remote_code=False)
    eng = get_backend(comps["llm"]["backend"]).load(cache / "llm")
    mine = engine_answer(eng, a.max_new_tokens, tok.eos_token_id, d)
    ref = reference_answer(cache / "source", a.max_new_tokens, tok.eos_token_id, tok.pad_token_id) if a.compare else None
    print(title + beside, flush=True)
    chat(Conversation(tok), mine, eng.max_input_len, read, write, ref, d.stop)
    return 0


def _media_of(comps: dict) -> tuple[str, tuple[str, ...]]:
    """A multimodal engine's item kind, and every kind it takes (LLaVA-NeXT-Video: video, image)."""
    visual = (comps["visual"].get("engine") or {}).get("visual") or {}
    media = visual.get("media", "image")
    return media, tuple(visual.get("takes") or (media,))


def _flags(takes) -> str:
    return " or ".join(f"--{k} PATH" for k in takes)


def _load_media(media: str, path: str):
    """An image, or a video's frames; BadInput naming the file when it cannot be read."""
    if media == "video":
        from .videos import load_video

        return load_video(path)
    from .images import load_image

    return load_image(path)


def _decoding(a, n: int, detokenize):
    """The run's decoding options and its stop-string / streaming watch."""
    from .runtime.decoding import TextWatch, options

    d = options(do_sample=a.sample or None, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                repetition_penalty=a.repetition_penalty, num_beams=a.num_beams, length_penalty=a.length_penalty,
                seed=a.seed, stop=tuple(a.stop or ()) or None)
    if a.stream and n != 1:
        raise BadInput(f"--stream prints one answer as it is generated: give one prompt (got {n})")
    if a.stream and a.json:
        raise BadInput("--stream and --json: pick one")
    stream = (lambda r, text: print(text, end="", flush=True)) if a.stream else None
    return d, TextWatch(n, detokenize, d.stop, stream)


def _run_multimodal(a, value: dict, cache: Path, images: list[str], prompts: list[str], media: str = "image") -> int:
    from .backends import load_engine
    from .runtime.multimodal import MultimodalPipeline

    if media == "video":
        from .videos import load_video, sample_frames

        # unreadable files: exit 2 before any engine loads
        pixels = [load_video(p) for p in images]
        if a.frames is not None:
            pixels = [sample_frames(v, a.frames) for v in pixels]
    else:
        from .images import load_image

        pixels = [load_image(p) for p in images]
    pipe = MultimodalPipeline.load(cache, load_engine)
    pipe.check_request(len(pixels), a.frames, media)
    d, watch = _decoding(a, len(prompts), pipe.decode)
    if a.stream:
        print(f"[{images[0]}] {prompts[0]}", end="", flush=True)
    t0 = time.perf_counter()
    outs = pipe.generate(pixels, prompts, a.max_new_tokens, eos_token_id=pipe.eos_token_id, decoding=d, on_token=watch)
    dt = time.perf_counter() - t0
    results = [{media: i, "prompt": p, "output_ids": watch.ids(k, o), "text": watch.text(k, o)}
               for k, (i, p, o) in enumerate(zip(images, prompts, outs))]
    watch.flush()
    if a.stream:
        print(file=sys.stdout)
    if media == "video":  # the frames each video gave (a short video gives all it has)
        for r, v in zip(results, pixels):
            r["frames"] = min(len(v), pipe.meta["num_frames"])
    if a.json:
        extra = {"num_frames": pipe.meta["num_frames"]} if media == "video" else {}
        print(json.dumps({"ref": value, "visual_features": pipe.features_of(media), **extra, "results": results,
                          "seconds": round(dt, 3)}, indent=2))
    elif not a.stream:
        for r in results:
            print(f"[{r[media]}] {r['prompt']}{r['text']}")
    return 0


# ----------------------------------------------------------------------------- convert


def cmd_convert(a) -> int:
    """The DAG's convert step's code on a local checkpoint; with --check, the
    DAG's shards step's check too (tp processes vs the Hugging Face model)."""
    from .checkpoint import convert_into
    from .families import detect_family, get_family
    from .spec import Variant

    src = Path(a.src)
    if not (src / "config.json").is_file():
        raise BadInput(f"{a.src}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        config = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise BadInput(f"{src / 'config.json'}: not JSON ({e})") from None
    fam = get_family(a.family or detect_family(config))
    if not getattr(fam, "tensors", None) or not fam.implemented:
        raise BadInput(f"family {fam.name} has no converter yet")
    quant = a.quant or "none"
    if a.group_size and quant == "none":
        raise BadInput("--group-size applies to weight-only quantization: give --quant w8a16 or w4a16")
    if a.group_size is not None and (a.group_size < 8 or a.group_size & (a.group_size - 1)):
        raise BadInput(f"--group-size is a power of two >= 8 (got {a.group_size})")

    from .spec import MAX_TP

    if not 1 <= a.tp <= MAX_TP:
        raise BadInput(f"--tp {a.tp}: a tp size is a whole number from 1 to {MAX_TP}")
    v = Variant(name=f"{a.dtype}-{quant}-tp{a.tp}", backend="tensorrt-llm", dtype=a.dtype, quant=quant, tp=a.tp,
                target="cpu", group_size=a.group_size)
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"--out {out} exists and is not an empty directory")
    fam.check_config(config, v, where=str(src / "config.json"))
    say = (lambda m: None) if a.quiet else (lambda m: print(m, file=sys.stderr))
    summary = convert_into(fam, src, out, v, progress=say)
    result = {"out": str(out), "family": fam.name, "tp": a.tp, "quant": quant, "group_size": a.group_size, **summary}
    if a.check:
        from .evaluation import check_conversion

        m = check_conversion(fam, src, out, v, a.max_input_len, progress=say)
        gates = m["gates"]
        result["check"] = m
        if not a.json:
            from .evaluation import gates_line

            vb = m.get("vs_baseline")
            print(f"check tp={a.tp} {quant}: {'PASSED' if m['passed'] else 'FAILED'}: {gates_line(gates)}")
            print(f"  perplexity {m['perplexity']['engine']:.4g} (HF fp32 {m['perplexity']['reference']:.4g}), "
                  f"top-1 acc {m['top1_accuracy']['engine']:.3f} (HF {m['top1_accuracy']['reference']:.3f})"
                  + (f"; vs {a.dtype}: logits diff {vb['logits_max_abs_diff']:.4g}, top-1 agreement "
                     f"{vb['top1_agreement']:.3f}, perplexity {vb['perplexity']['baseline']:.4g}" if vb else ""))
    if a.json or not a.check:
        print(json.dumps(result, default=str))
    return 0 if not a.check or result["check"]["passed"] else 1


# ----------------------------------------------------------------------------- bench


def cmd_bench(a) -> int:
    """Latency/throughput sweep of a built engine next to eager Hugging Face (enginefarm/benchmark.py)."""
    from .benchmark import dumps, format_table, parse_ints, run_bench
    from .store import open_store

    st = open_store(a.store)
    graphs = {"on": True, "off": False, "recipe": None}[a.cuda_graphs]
    say = (lambda m: None) if a.json else (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    report = run_bench(st, a.ref, parse_ints(a.batch, "batch"), parse_ints(a.input_len, "input-len"),
                       parse_ints(a.output_len, "output-len"), warmup=a.warmup, iters=a.iters, eager=not a.no_eager,
                       record=not a.no_record, cuda_graphs=graphs, progress=say)
    print(dumps(report) if a.json else format_table(report))
    return 0


# ----------------------------------------------------------------------------- main


def _decoding_args(p, stream: bool = True) -> None:
    dg = p.add_argument_group("decoding (default: greedy)")
    dg.add_argument("--sample", action="store_true", help="sample the next token (with the filters below)")
    dg.add_argument("--temperature", type=float)
    dg.add_argument("--top-k", type=int, dest="top_k", help="sample among the k most likely tokens")
    dg.add_argument("--top-p", type=float, dest="top_p", help="sample among the most likely tokens whose probability adds up to p")
    dg.add_argument("--repetition-penalty", type=float, dest="repetition_penalty")
    dg.add_argument("--num-beams", type=int, dest="num_beams", help="beam search (up to the recipe's limits.max_beam_width)")
    dg.add_argument("--length-penalty", type=float, dest="length_penalty", help="beam search: score / length ** this")
    dg.add_argument("--seed", type=int, help="sampling: the same seed gives the same tokens")
    dg.add_argument("--stop", action="append", help="repeatable: end an answer where this text appears (not printed)")
    if stream:
        dg.add_argument("--stream", action="store_true", help="print the answer as it is generated (one prompt)")


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

    def store_json(sp, fn):
        """The options every store command shares: --store, --json; then its handler."""
        store_arg(sp)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(fn=fn)

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
    store_json(pl, cmd_plan)

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
    store_json(ls, cmd_ls)

    sh = sub.add_parser("show", help="one engine's manifest, provenance and alias history")
    sh.add_argument("ref", help="RECIPE[:VARIANT][@ALIAS]")
    store_json(sh, cmd_show)

    df = sub.add_parser("diff", help="what changed between two builds: inputs, toolchain, metrics, files")
    df.add_argument("ref_a", metavar="REF")
    df.add_argument("ref_b", metavar="REF")
    store_json(df, cmd_diff)

    pr = sub.add_parser("promote", help="point an alias (prod, ...) at an engine; refuses an unvalidated one")
    pr.add_argument("ref", help="RECIPE[:VARIANT][@ALIAS]: the engine to promote")
    pr.add_argument("alias", help="the alias to move (prod, staging, ...)")
    pr.add_argument("--force", action="store_true", help="promote even if its validation did not pass")
    store_json(pr, cmd_promote)

    pu = sub.add_parser("pull", help="fetch an engine into a directory, verified, atomically")
    pu.add_argument("ref", help="RECIPE[:VARIANT][@ALIAS]")
    pu.add_argument("--variant", help="the variant (or give it in REF)")
    pu.add_argument("--alias", help="the alias (or give it in REF; default latest)")
    pu.add_argument("--gpu", help="the GPU target the engine must be built for (sm_XY)")
    pu.add_argument("--dest", required=True, help="the directory to write (absent, empty, or an earlier pull)")
    pu.add_argument("--layout", default="plain", choices=["plain", "triton"])
    store_json(pu, cmd_pull)

    gcp = sub.add_parser("gc", help="delete manifests and blobs that no kept engine or alias needs")
    gcp.add_argument("--keep", type=int, required=True, help="publish manifests kept per variant (besides aliases)")
    gcp.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    gcp.add_argument("--wait", type=float, default=60.0, help="seconds to wait for running builds (default 60)")
    store_json(gcp, cmd_gc)

    rn = sub.add_parser("run", help="generate with a built engine")
    rn.add_argument("ref")
    rn.add_argument("--prompt", action="append", required=True, help="repeatable: one sequence each")
    rn.add_argument("--image", action="append", help="repeatable: an image file, paired with the prompts in order")
    rn.add_argument("--video", action="append",
                    help="repeatable: a video (a directory of frames, a uint8 .npy [T, H, W, 3], builtin:NAME), "
                         "paired with the prompts in order; video models (llava-next-video, which takes --image "
                         "too)")
    rn.add_argument("--frames", type=int,
                    help="frames sampled per video (default: the engine's num_frames, which is also the most)")
    rn.add_argument("--max-new-tokens", type=int, default=32)
    _decoding_args(rn)
    store_arg(rn)
    rn.add_argument("--json", action="store_true")
    rn.set_defaults(fn=cmd_run)

    ch = sub.add_parser(
        "chat", help="talk to a built engine (with images or videos for multimodal ones); --compare hf: the "
                     "Hugging Face answer beside it",
        description="An interactive conversation with a built engine: type a message, get the engine's answer\n"
                    "and its time (with --compare hf, the Hugging Face model's answer and time beside it).\n\n"
                    "At the prompt:\n"
                    "  /image PATH   multimodal engines: a new conversation about this image\n"
                    "  /video PATH   LLaVA-NeXT-Video: a new conversation about this video (a directory of\n"
                    "                frames, a uint8 .npy [T, H, W, 3], or builtin:NAME)\n"
                    "  /reset        forget the conversation\n"
                    "  /quit         end it (or Ctrl-D)\n\n"
                    "A conversation is about one image or video; its oldest turns are dropped when it outgrows\n"
                    "the engine's max_input_len. A path that cannot be read is one line and the conversation\n"
                    "goes on (given as --image/--video: exit 2).",
        epilog="examples:  enginefarm chat tiny-llama --compare hf\n"
               "           enginefarm chat tiny-llava --image photo.png   (then: you> What is shown here?)\n"
               "           enginefarm chat tiny-llava-next-video --video frames/   (a directory of frames, a .npy, builtin:orbit)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ch.add_argument("ref")
    ch.add_argument("--compare", choices=["hf"], help="also answer with the Hugging Face model, with its time")
    ch.add_argument("--image", metavar="PATH", help="multimodal engines: the first conversation's image "
                    "(a file, or builtin:NAME); /image PATH at the prompt changes it")
    ch.add_argument("--video", metavar="PATH", help="video engines (LLaVA-NeXT-Video): the first conversation's "
                    "video; /video PATH (or /image PATH) at the prompt changes it")
    ch.add_argument("--max-new-tokens", type=int, default=48)
    _decoding_args(ch, stream=False)
    store_arg(ch)
    ch.set_defaults(fn=cmd_chat, stream=False, json=False)

    bn = sub.add_parser("bench", help="latency/throughput sweep of an engine (multimodal: the visual engine and the "
                        "whole pipeline), next to eager Hugging Face")
    bn.add_argument("ref", help="RECIPE[:VARIANT][@ALIAS]")
    bn.add_argument("--batch", default="1", help="batch sizes, comma-separated (default 1; multimodal: images too)")
    bn.add_argument("--input-len", default="32", help="prompt lengths, comma-separated (default 32; multimodal: text "
                    "tokens, the image's visual features on top)")
    bn.add_argument("--output-len", default="32", help="new tokens, comma-separated (default 32)")
    bn.add_argument("--warmup", type=int, default=2)
    bn.add_argument("--iters", type=int, default=5, help="timed repeats per point (medians are reported)")
    bn.add_argument("--no-eager", action="store_true", help="skip the eager Hugging Face baseline")
    bn.add_argument("--cuda-graphs", choices=["recipe", "on", "off"], default="recipe",
                    help="decode through CUDA graphs (default: as the recipe built it)")
    bn.add_argument("--no-record", action="store_true", help="do not record the result in the store")
    store_arg(bn)
    bn.add_argument("--json", action="store_true")
    bn.set_defaults(fn=cmd_bench)

    cv = sub.add_parser("convert", help="HF checkpoint -> TensorRT-LLM checkpoint")
    cv.add_argument("src")
    cv.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel size: any that divides the model's heads and MLP width (default 1)")
    cv.add_argument("--quant", choices=["w8a16", "w4a16"])
    cv.add_argument("--group-size", type=int)
    cv.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    cv.add_argument("--family")
    cv.add_argument("--out", required=True)
    cv.add_argument("--check", action="store_true",
                    help="prove the rank files: run them in tp processes (gloo/nccl) against the HF model")
    cv.add_argument("--max-input-len", type=int, default=32, help="window of the --check text-set evaluation")
    cv.add_argument("--json", action="store_true")
    cv.add_argument("--quiet", action="store_true", help="no progress lines")
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
