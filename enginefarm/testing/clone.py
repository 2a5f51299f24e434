"""Record a recipe as built without building it again: for catalogs of many
recipes that are one recipe under other names (the scale benchmark, tests).

`record_like(store, recipe, template)` writes every step of `recipe` the way
the farm does (`run_step` with the real step specs: the real keys, the
manifest schema check, write-once manifests; publish is the real publish
task, aliases and history included), with the files and results of the
template's step of the same variant, which must be built in the store
already. What differs from the template's manifests is what a real build of
`recipe` would change too: recipe name and digest, keys and input digests,
times, hosts. Nothing is read but manifests; no weight file is opened.
"""

from __future__ import annotations

from ..errors import BadInput


def record_like(store, recipe: str, template: str) -> list[str]:
    """Record every variant of the recipe at path `recipe` from the recipe
    at path `template`; the variants recorded."""
    from ..flows.build import plan, prepare
    from ..tasks import build as build_step
    from ..tasks import convert as convert_step
    from ..tasks import fetch as fetch_step
    from ..tasks import publish as publish_step
    from ..tasks import reference as reference_step
    from ..tasks import shards as shards_step
    from ..tasks import validate as validate_step
    from ..tasks.base import Ctx, StepResult, run_step

    t, tvs = prepare(template)
    trows, done = plan(t, tvs, store)
    r, vs = prepare(recipe)
    missing = [v.name for v in vs if v.name not in done]
    if missing:
        raise BadInput(f"template {t.name} has no built variant {', '.join(missing)} in {store.uri}")
    if r.enabled_components != ["llm"]:
        raise BadInput(f"record_like: {r.name} has components {r.enabled_components}; only llm-only recipes")
    ctx = Ctx(store=store, recipe=r)

    def same(res: StepResult):
        return lambda out, scratch: (res.results, dict(res.files))  # files are blobs already: nothing copied

    fetched = run_step(ctx, fetch_step.spec(ctx), same(done[vs[0].name]["fetch"]))
    config = fetched.results["config"]
    referenced = None
    if reference_step.needed(ctx):  # the template's, recorded under this recipe's key
        trefs = [x.hit for x in trows if x.step == "reference" and x.hit]
        if not trefs:
            raise BadInput(f"template {t.name} has no reference step in {store.uri}")
        referenced = run_step(ctx, reference_step.spec(ctx, fetched), same(trefs[0]))
    for v in vs:
        tmpl = done[v.name]
        conv = run_step(ctx, convert_step.spec(ctx, fetched, v), same(tmpl["convert"]))
        shards = None
        if shards_step.needed(v):
            shards = run_step(ctx, shards_step.spec(ctx, fetched, conv, v, referenced), same(tmpl["shards"]))
        built = run_step(ctx, build_step.spec(ctx, conv, v, "llm", config), same(tmpl["build.llm"]))
        val = run_step(ctx, validate_step.spec(ctx, fetched, built, v, None, referenced), same(tmpl["validate"]))
        publish_step.publish_task.fn(ctx, v, fetched, conv, {"llm": built}, val, shards)
    return [v.name for v in vs]
