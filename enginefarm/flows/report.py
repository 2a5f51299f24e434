"""What people look at: one row per variant, the Prefect artifacts of a
build or nightly run, the nightly's record in the store, and the picture of
the last N nights (which `enginefarm report` also writes to a file).

A row: recipe, variant, status (built | up to date | failed | skipped; a
variant built in this run whose validation gates failed is failed),
cache (which steps ran), engine size, build time (of the build step that
made the engine, so a cached variant keeps its build's time), validation
and its metrics, why (what made it stale, or what failed), and the
manifest.
"""

from __future__ import annotations

import base64
import io
import math
import re
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

from ..registry import quality, status_of
from ..tasks.policy import one_line

METRICS = ("logits_max_abs_diff", "top1_agreement", "perplexity_rel_diff", "top5_accuracy_drop")
# each variant's quality next to its reference (the unquantized Hugging Face model): registry.quality
QUALITY = ("perplexity", "perplexity_ref", "top1", "top1_ref", "top5", "top5_ref")
COLUMNS = ("recipe", "variant", "status", "cache", "size_mb", "build_s", "validation", *METRICS, *QUALITY, "why",
           "manifest")
STATUSES = ("built", "up to date", "failed", "skipped")
NIGHTLY = "nightly"  # the store's report kind
# the plot's panels: (row field, axis label)
PANELS = (("build_s", "build time (s)"), ("logits_max_abs_diff", "logits max |diff|"),
          ("perplexity_rel_diff", "perplexity rel. diff"), ("top1_agreement", "top-1 agreement"))


def why(e: BaseException) -> str:
    """The one line that says what failed (the step's own line when a step failed)."""
    return getattr(e, "step_line", None) or one_line(e)


def _num(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _blank(recipe: str, variant: str, status: str, reason: str) -> dict:
    out = dict.fromkeys(COLUMNS)
    out.update(recipe=recipe, variant=variant, status=status, why=reason)
    return out


def row(st, recipe: str, variant: str, steps: dict, reasons: Iterable[str] = ()) -> dict:
    """The row of a variant whose steps all finished (built now or found in the store)."""
    ran = [k for k, s in steps.items() if not s.cached]
    pub, val = steps["publish"], steps["validate"]
    metrics = val.results.get("metrics") or {}
    status, why_ = ("built" if ran else "up to date"), "; ".join(reasons)
    if ran and status_of(val.results) == "failed":  # built tonight, not good enough: a failure of tonight's
        failing = [g for g, x in (val.results.get("gates") or {}).items() if not x.get("passed")]
        status = "failed"
        why_ = (f"recipe {recipe}, variant {variant}: validation gates failed: {', '.join(failing)} "
                f"(published as latest, not validated)" + (f"; stale because {why_}" if why_ else ""))
    out = _blank(recipe, variant, status, why_)
    out.update(
        cache="all cached" if not ran else "ran: " + ", ".join(ran),
        size_mb=round(sum(f["size"] for f in pub.files.values()) / 1e6, 3),
        build_s=round(sum(float(s.manifest.get("duration_s") or 0) for k, s in steps.items()
                          if k.startswith("build.")), 2),
        validation=status_of(val.results),  # passed, failed, pending (no compatible GPU)
        manifest=st.manifest_path(recipe, "publish", pub.key),
        **{m: _num(metrics.get(m)) for m in METRICS},
    )
    for k, q in quality(metrics).items():
        out[k], out[k + "_ref"] = q["engine"], q["reference"]
    return out


def quality_cell(r: dict) -> str:
    """`ppl 12.41 / 10.52 (+18.0%) · top-1 0.41 / 0.45 · top-5 0.70 / 0.72` (engine / reference)."""
    parts = []
    if _num(r.get("perplexity")) is not None and _num(r.get("perplexity_ref")):
        rel = (r["perplexity"] / r["perplexity_ref"] - 1) * 100
        parts.append(f"ppl {r['perplexity']:.2f} / {r['perplexity_ref']:.2f} ({rel:+.1f}%)")
    for k, label in (("top1", "top-1"), ("top5", "top-5")):
        if _num(r.get(k)) is not None and _num(r.get(k + "_ref")) is not None:
            parts.append(f"{label} {r[k]:.3f} / {r[k + '_ref']:.3f}")
    return " · ".join(parts) or "-"


def failed_row(recipe: str, variant: str, e: BaseException | str) -> dict:
    return _blank(recipe, variant, "failed", e if isinstance(e, str) else why(e))


def skipped_row(recipe: str, variant: str, reason: str) -> dict:
    return _blank(recipe, variant, "skipped", reason)


def counts(rows: list[dict]) -> dict:
    c = Counter(r["status"] for r in rows)
    return {s: c.get(s, 0) for s in STATUSES}


def headline(rows: list[dict]) -> str:
    c = counts(rows)
    n = len(rows)
    parts = [f"{c['built']} built", f"{c['up to date']} up to date", f"{c['failed']} failed"]
    if c["skipped"]:
        parts.append(f"{c['skipped']} skipped")
    return f"{n} variant{'s' if n != 1 else ''}: " + ", ".join(parts)


def manifest_url(st, path: str) -> str:
    """A link to a manifest (or any key) of the store: file:// or s3://."""
    if st.uri.startswith("s3://"):
        return f"{st.uri}/{path}"
    return (Path(st.uri) / path).as_uri()


def markdown(title: str, rows: list[dict], st, extra: str = "") -> str:
    lines = [f"# {title}", "", f"**{headline(rows)}**", "", f"store: `{st.uri}`", ""]
    if extra:
        lines += [extra, ""]
    for status, heading in (("failed", "Failed"), ("built", "Built"), ("skipped", "Skipped (not buildable here)")):
        sel = [r for r in rows if r["status"] == status]
        if sel:
            lines.append(f"## {heading}")
            for r in sel:
                link = f" ([manifest]({manifest_url(st, r['manifest'])}))" if r.get("manifest") else ""
                lines.append(f"- `{r['recipe']}:{r['variant']}`: {r['why'] or r['cache']}{link}")
            lines.append("")
    ok = [r for r in rows if r["status"] in ("built", "up to date")]
    if ok:
        lines += ["## Engines", "", "| recipe | variant | status | size (MB) | build (s) | validation | "
                  "quality (engine / reference) | manifest |",
                  "| --- | --- | --- | ---: | ---: | --- | --- | --- |"]
        for r in ok:
            lines.append(f"| {r['recipe']} | {r['variant']} | {r['status']} | {r['size_mb']} | {r['build_s']} | "
                         f"{r['validation']} | {quality_cell(r)} | "
                         f"[{r['manifest'].split('/')[-1][:12]}]({manifest_url(st, r['manifest'])}) |")
    return "\n".join(lines) + "\n"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lower-case letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def _in_flow_run() -> bool:
    try:
        from prefect.context import FlowRunContext

        return FlowRunContext.get() is not None
    except Exception:
        return False


def publish_build(st, recipe: str, rows: list[dict]) -> None:
    """The build run's artifacts: summary, table of variants, a link per manifest."""
    if not _in_flow_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(markdown(f"build {recipe}", rows, st), key=artifact_key("build", recipe, "summary"),
                             description=f"build {recipe}: {headline(rows)}")
    create_table_artifact(rows, key=artifact_key("build", recipe, "variants"), description=f"variants of {recipe}")
    _manifest_links(st, "build", rows)


# ----------------------------------------------------------------------------- nights


def night_name(started: datetime, flow_run: Optional[str]) -> str:
    return started.strftime("%Y%m%dt%H%M%Sz") + "-" + (str(flow_run) if flow_run else uuid.uuid4().hex)[:8]


def night_record(started: datetime, catalog: str, st, flow_run: Optional[str], rows: list[dict]) -> dict:
    finished = datetime.now(timezone.utc)
    return {
        "kind": NIGHTLY,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": finished.isoformat(timespec="seconds"),
        "seconds": round((finished - started).total_seconds(), 2),
        "catalog": catalog,
        "store": st.uri,
        "flow_run": str(flow_run) if flow_run else None,
        "counts": counts(rows),
        "rows": rows,
    }


def last_nights(st, n: int) -> list[dict]:
    names = st.list_reports(NIGHTLY)[-n:] if n > 0 else []
    return [rec for rec in (st.get_report(NIGHTLY, x) for x in names) if rec]


MAX_LINES = 12  # more variants than this: each panel draws their median and maximum per night


def _spread(records: list[dict], field: str) -> dict[str, list[float]]:
    """Per night, the median and the maximum of field over the variants that have it."""
    import statistics

    out: dict[str, list[float]] = {"median": [], "max": []}
    for rec in records:
        ys = [y for r in rec["rows"] if r["status"] in ("built", "up to date") and (y := _num(r.get(field))) is not None]
        out["median"].append(statistics.median(ys) if ys else math.nan)
        out["max"].append(max(ys) if ys else math.nan)
    return out


def plot(records: list[dict]) -> bytes:
    """PNG: build time and validation metrics per variant over the given nights
    (over MAX_LINES variants: their median and maximum, one line each)."""
    from matplotlib.figure import Figure

    labels = [rec["started_at"][5:16].replace("T", " ") for rec in records]
    names = sorted({f"{r['recipe']}:{r['variant']}" for rec in records for r in rec["rows"]
                    if r["status"] in ("built", "up to date")})
    fig = Figure(figsize=(10, 2.6 * len(PANELS) + 0.6), dpi=100)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    xs = list(range(len(records)))
    if len(names) > MAX_LINES:
        for ax, (field, _) in zip(axes, PANELS):
            for what, ys in _spread(records, field).items():
                ax.plot(xs, ys, marker="o", label=f"{what} of {len(names)} variants")
        names = [f"{len(names)} variants"]
    else:
        for name in names:
            by_night = [{f"{r['recipe']}:{r['variant']}": r for r in rec["rows"]}.get(name) for rec in records]
            for ax, (field, _) in zip(axes, PANELS):
                ys = [(r or {}).get(field) for r in by_night]
                ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=name)
    for ax, (_, label) in zip(axes, PANELS):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False, style="sci", scilimits=(-3, 4))
    axes[-1].set_xticks(xs, labels, rotation=30, ha="right")
    axes[-1].set_xlabel("night (UTC)")
    axes[0].set_title(f"enginefarm nightly: last {len(records)} night{'s' if len(records) != 1 else ''}")
    if names:
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def publish_nightly(st, record: dict, record_key: str, png: bytes) -> None:
    """The nightly run's artifacts: summary, table, plot, link to its record in the store."""
    if not _in_flow_run():
        return
    from prefect.artifacts import (
        create_image_artifact, create_link_artifact, create_markdown_artifact, create_table_artifact,
    )

    rows = record["rows"]
    extra = f"catalog `{record['catalog']}`, {record['seconds']} s; record: [{record_key}]({manifest_url(st, record_key)})"
    create_markdown_artifact(markdown(f"nightly {record['started_at']}", rows, st, extra),
                             key="nightly-summary", description=headline(rows))
    create_table_artifact(rows, key="nightly-variants", description="every variant of the catalog tonight")
    create_image_artifact("data:image/png;base64," + base64.b64encode(png).decode(), key="nightly-plot",
                          description="build time and validation metrics per variant, last nights")
    create_link_artifact(manifest_url(st, record_key), link_text="tonight's record in the store",
                         key="nightly-record", description="the night's rows as JSON")
    _manifest_links(st, "nightly", [r for r in rows if r["status"] != "up to date"])


def _manifest_links(st, kind: str, rows: list[dict]) -> None:
    """A link artifact to the publish manifest of each row that has one."""
    from prefect.artifacts import create_link_artifact

    for r in rows:
        if r.get("manifest"):
            create_link_artifact(manifest_url(st, r["manifest"]), link_text=f"{r['recipe']}:{r['variant']} manifest",
                                 key=artifact_key(kind, r["recipe"], r["variant"], "manifest"),
                                 description=f"the publish manifest of {r['recipe']}:{r['variant']}")
