"""The `build` deployment's flow: a typed form for the Prefect UI.

The deployment's only parameter is a `BuildRequest`; Prefect turns it into
the JSON schema the UI renders as a form (the recipe as a drop-down of the
catalog, the variants as a list, the backend as a drop-down, force as a
switch) and validates a run's parameters against it. A variant or backend
that the recipe does not have fails the run before anything starts, with a
message that lists what it does have.

The store is not on the form: deployed runs use the Prefect variable
`enginefarm_store` (see settings.py), set once per server.
"""

from __future__ import annotations

import enum
from typing import Optional

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BadInput
from ..families import load_recipe
from ..spec import Backend, catalog_paths
from .build import run_build
from .settings import resolve_store, task_runner


def _catalog_names() -> list[str]:
    try:
        return sorted({p.stem for p in catalog_paths()})
    except OSError:
        return []


# the catalog as it is where the deployment is made (and where its runs start)
CatalogRecipe = enum.Enum("CatalogRecipe", {n: n for n in _catalog_names()}, type=str)


class BuildRequest(BaseModel):
    """Build one recipe of the catalog."""

    model_config = ConfigDict(extra="forbid", title="BuildRequest")

    recipe: CatalogRecipe = Field(title="Recipe", description="a recipe of the catalog (models/)")
    variants: list[str] = Field(
        default_factory=list, title="Variants",
        description="variant names, e.g. fp16-tp1 (see `enginefarm ls --catalog`); empty: every variant "
        "(of the backend below, if one is chosen)",
    )
    backend: Optional[Backend] = Field(None, title="Backend", description="only the variants built with this backend")
    force: bool = Field(False, title="Force", description="rebuild every step, even those in the store")

    @model_validator(mode="after")
    def _known(self) -> "BuildRequest":
        self.selected()  # a variant or backend the recipe lacks is a validation error
        return self

    def selected(self) -> list[str]:
        """The variant names to build."""
        try:
            r = load_recipe(self.recipe.value)
            names = [r.variant(v).name for v in self.variants] if self.variants else [v.name for v in r.variants()]
        except BadInput as e:
            raise ValueError(str(e)) from None
        if self.backend:
            by_name = {v.name: v for v in r.variants()}
            names = [n for n in names if by_name[n].backend == self.backend]
            if not names:
                have = sorted({v.backend for v in r.variants()})
                raise ValueError(f"recipe {r.name} has no {'such ' if self.variants else ''}variant with backend "
                                 f"{self.backend} (its backends: {', '.join(have)})")
        return names


@flow(name="build", log_prints=False, validate_parameters=True, task_runner=task_runner())
def build_request(request: BuildRequest) -> dict:
    """Build a recipe of the catalog into the farm's store (the UI's form)."""
    return run_build(request.recipe.value, request.selected(), resolve_store(None), request.force)
