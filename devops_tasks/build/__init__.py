"""The image builder: a YAML recipe in (``config/<name>.yaml``), one bootable qcow2 out.

Public API: :func:`recipe_path`, :func:`load_recipe`, :func:`build_image` (and :class:`BuildResult`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .builder import GUEST_CONTRACT, BuildResult
from .recipe import Recipe, load_recipe_file, recipe_names, recipe_path

__all__ = ["BuildResult", "GUEST_CONTRACT", "Recipe", "build_image", "load_recipe", "recipe_path", "recipe_names"]

DEFAULT_RECIPE = "minimal"


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE) -> Recipe:
    return load_recipe_file(recipe_path(str(name_or_path)))


def build_image(
    recipe: str | Path | Recipe = DEFAULT_RECIPE,
    output: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    refresh: bool | None = None,
    force: bool = False,
) -> BuildResult:
    """Build the image for ``recipe`` (name, path or :class:`Recipe`).

    Without ``output`` it is installed as :func:`devops_tasks.paths.image_path` and recorded in the
    manifest (source ``build``, ``guest_contract=1``); with ``output`` it is written there and the
    manifest is left alone. ``log`` receives one-line progress messages. ``refresh``: True fetches
    package lists now, False never (offline), None when older than a day. A rebuild of an unchanged
    recipe with unchanged package versions reuses the cached image (``force`` rebuilds it).
    """
    from .builder import build

    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return build(loaded, output=Path(output) if output is not None else None, log=log, refresh=refresh, force=force)
