"""fetch: the source checkpoint into the store.

Key: the source descriptor plus, for local sources, each file's name, size
and mtime (a stat, not a read); for Hugging Face, the pinned commit sha; for
S3, each object's ETag. Only safetensors, JSON and tokenizer files are taken;
pickled weights (.bin, .pt, .pth, .ckpt) are refused unless the recipe
allows them.
"""

from __future__ import annotations

import json
from pathlib import Path


from ..errors import BadInput, StepFailed
from ..hashing import code_version
from .base import Ctx, StepResult, StepSpec, materialize, run_step
from .policy import is_transient, step_task

PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TAKEN = (".safetensors", ".json", ".txt", ".model", ".tiktoken")
HF_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken"]


def source_dir(ctx: Ctx) -> Path | None:
    """The local directory of a path/tiny source (tiny: written on first use)."""
    src = ctx.recipe.source
    if src.tiny:
        from ..testing.tiny import ensure_tiny

        return ensure_tiny(src.tiny)
    if src.path:
        p = Path(src.path)
        if not p.is_absolute():
            p = (ctx.recipe.recipe_dir() / p).resolve()
        if not p.is_dir():
            raise BadInput(f"recipe {ctx.recipe.name}: source.path {src.path} is not a directory ({p})")
        return p
    return None


def _wanted(name: str, allow_pickle: bool) -> bool:
    n = name.lower()
    if n.endswith(PICKLED):
        return allow_pickle
    return n.endswith(TAKEN)


def _listing(root: Path, allow_pickle: bool) -> list[tuple[str, int, int]]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            rel = p.relative_to(root).as_posix()
            if _wanted(rel, allow_pickle):
                st = p.stat()
                out.append((rel, st.st_size, st.st_mtime_ns))
    return out


def _s3_split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""


def _s3_objects(uri: str) -> list[tuple[str, int, str]]:
    """(relative key, size, etag) of the checkpoint files under an s3 prefix."""
    import boto3

    bucket, prefix = _s3_split(uri)
    out = []
    try:
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix) :]
                if rel and _wanted(rel, False):
                    out.append((rel, o["Size"], o["ETag"].strip('"')))
    except Exception as e:
        raise BadInput(f"cannot list source {uri}: {e.__class__.__name__}: {e}") from None
    if not out:
        raise BadInput(f"no checkpoint files under {uri}")
    return sorted(out)


def _s3_download(uri: str, keys: list[str], out: Path) -> None:
    import boto3

    bucket, prefix = _s3_split(uri)
    s3 = boto3.client("s3")
    for rel in keys:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, prefix + rel, str(dest))


def resolve_branch(repo: str, branch: str) -> str:
    """The commit sha a tracked branch points at now (needs the Hugging Face API)."""
    from huggingface_hub import HfApi

    try:
        sha = HfApi().model_info(repo, revision=branch).sha
    except Exception as e:
        why = (f"source {repo} tracks branch {branch!r}, which could not be resolved to a commit "
               f"({e.__class__.__name__}: {e})")
        if is_transient(e):  # the hub did not answer: worth a retry (tasks/policy.py)
            raise StepFailed(why) from e
        raise BadInput(f"{why}; pin a revision to build offline") from None
    if not sha:
        raise BadInput(f"source {repo}: the hub returned no commit for branch {branch!r}")
    return sha


def spec(ctx: Ctx) -> StepSpec:
    src = ctx.recipe.source
    params: dict = {"kind": src.kind, "allow_pickle": src.allow_pickle}
    if src.hf:
        params.update(hf=src.hf, revision=src.revision or resolve_branch(src.hf, src.track))
    elif src.s3:
        params.update(s3=src.s3, objects=[(k, size, etag) for k, size, etag in _s3_objects(src.s3)])
    else:
        root = source_dir(ctx)
        params.update(path=str(root), files=_listing(root, src.allow_pickle))
        if not params["files"]:
            raise BadInput(f"recipe {ctx.recipe.name}: no checkpoint files in {root}")
    return StepSpec("fetch", params, {}, code_version(__name__), {})


def _work(ctx: Ctx, spec_: StepSpec):
    def work(out: Path, scratch: Path):
        p = spec_.params
        if p["kind"] == "hf":
            from huggingface_hub import snapshot_download

            patterns = HF_PATTERNS + (["*.bin"] if p["allow_pickle"] else [])
            try:
                snapshot_download(p["hf"], revision=p["revision"], local_dir=str(out), allow_patterns=patterns)
            except Exception as e:
                raise BadInput(f"cannot fetch {p['hf']}@{p['revision']}: {e.__class__.__name__}: {e}") from None
            for junk in out.rglob(".cache"):
                import shutil

                shutil.rmtree(junk, ignore_errors=True)
            extra = {}
        elif p["kind"] == "s3":
            _s3_download(p["s3"], [k for k, _, _ in p["objects"]], out)
            extra = {}
        else:
            root = Path(p["path"])
            extra = {rel: root / rel for rel, _, _ in p["files"]}
        cfg_path = (out / "config.json") if (out / "config.json").exists() else Path(p.get("path", out)) / "config.json"
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise BadInput(f"recipe {ctx.recipe.name}: the checkpoint has no readable config.json ({e})") from None
        if config.get("auto_map") and not ctx.recipe.source.trust_remote_code:
            pass  # remote code is never run; the families implement the architectures themselves
        n = len(extra) or sum(1 for _ in out.rglob("*") if _.is_file())
        return {"config": config, "files": n}, extra

    return work


_CHECKED: set[tuple[str, str]] = set()  # (family, fetch key): checked once per process


def check_inputs(ctx: Ctx, fetched: StepResult) -> None:
    """Right after fetch, before any heavy step: BadInput naming what the
    checkpoint lacks that a later step loads (tokenizer, processor files).
    Reads only the small files (no weights)."""
    import tempfile

    from ..families import get_family

    mark = (ctx.recipe.family, fetched.key)
    if mark in _CHECKED:
        return
    fam = get_family(ctx.recipe.family)
    with tempfile.TemporaryDirectory(prefix="ef-inputs-", dir=ctx.workdir) as d:
        small = materialize(ctx, fetched, Path(d), only=lambda rel: not rel.lower().endswith((".safetensors",) + PICKLED))
        fam.check_inputs(small, f"recipe {ctx.recipe.name}: the checkpoint")
    _CHECKED.add(mark)


@step_task("fetch")
def fetch_task(ctx: Ctx) -> StepResult:
    s = spec(ctx)
    return run_step(ctx, s, _work(ctx, s))
