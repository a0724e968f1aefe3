"""Which recipes exist: the built-in ones plus any that an installed package registers under
the `factory_saas.recipes` entry-point group (name = "module:Class")."""

from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points

from jobs.recipes.base import Recipe
from tenants.errors import DomainError

ENTRY_POINT_GROUP = "factory_saas.recipes"
BUILTIN_RECIPES = {
    "tabular-classifier": "jobs.recipes.tabular:TabularClassifier",
    "image-classifier": "jobs.recipes.images:ImageClassifier",
    "text-classifier": "jobs.recipes.text:TextClassifier",
    "timeseries-forecaster": "jobs.recipes.timeseries:TimeSeriesForecaster",
}

logger = logging.getLogger(__name__)


class RecipeNotFound(DomainError):
    code = "unknown_recipe"
    status = 400


def get_recipe(name: str) -> type[Recipe]:
    recipes = list_recipes()
    try:
        return recipes[name]
    except KeyError:
        raise RecipeNotFound(
            f"There is no recipe named {name!r}.",
            fields={"recipe": [f"Unknown recipe; choose one of: {', '.join(sorted(recipes))}."]},
        ) from None


@functools.cache
def list_recipes() -> dict[str, type[Recipe]]:
    """Every recipe by name. A plugin cannot replace a built-in, and one that fails to load is
    left out with an error in the log rather than taking the job list down with it."""
    recipes = {name: _load(target) for name, target in BUILTIN_RECIPES.items()}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in recipes:
            if entry_point.value != BUILTIN_RECIPES.get(entry_point.name):
                logger.error("Recipe plugin %r would replace a built-in; ignored.", entry_point)
            continue
        try:
            recipe = entry_point.load()
        except Exception:
            logger.exception("Recipe plugin %r cannot be imported; ignored.", entry_point)
            continue
        if not (isinstance(recipe, type) and issubclass(recipe, Recipe)):
            logger.error("Recipe plugin %r is not a Recipe subclass; ignored.", entry_point)
        elif recipe.name != entry_point.name:
            logger.error("Recipe plugin %r names itself %r; ignored.", entry_point, recipe.name)
        else:
            recipes[entry_point.name] = recipe
    return recipes


def _load(target: str) -> type[Recipe]:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
