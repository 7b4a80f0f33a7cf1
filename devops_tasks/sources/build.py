"""The ``build`` image source: builds the image locally from a recipe (``images.build.recipe``,
default ``minimal``) with Debian packages only. The version is the recipe + exact package versions
hash, so ``check_update`` reports an update when Debian publishes new package versions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from ..errors import DevopsError, SourceError
from . import ImageSource, Progress, SourceConfig


class BuildSource(ImageSource):
    kind = "build"
    guest_contract = 1
    local = True  # built here from Debian packages apt verified: no published checksum to ask for

    def __init__(self, cfg: Optional[SourceConfig] = None, recipe: str = "",
                 log: Optional[Callable[[str], None]] = None):
        super().__init__(cfg)
        self.recipe_name = recipe or self.cfg.build_recipe
        self.log = log if log is not None else (None if self.cfg.quiet else _stderr)
        self._plan = None

    def available(self) -> bool:
        """Host tools present and the recipe found (nothing is fetched)."""
        from ..build import recipe_path
        from ..build.tools import missing_tools

        missing = missing_tools()
        if missing:
            packages = " ".join(sorted({package for _, package in missing}))
            self.unavailable_reason = f"missing host tools: run 'apt-get install {packages}'"
            return False
        try:
            recipe_path(self.recipe_name)
        except DevopsError as exc:
            self.unavailable_reason = str(exc)
            return False
        self.unavailable_reason = ""
        return True

    def _recipe(self):
        from ..build import load_recipe

        return load_recipe(self.recipe_name)

    def latest_version(self) -> str:
        """The version a build would have now (refreshes package lists older than a day)."""
        from ..build.builder import cached_image, plan

        try:
            self._plan = plan(self._recipe(), log=self.log)
        except DevopsError as exc:
            raise SourceError(f"build: {exc}") from exc
        hit = cached_image(self._plan)
        self.expected_sha256 = hit[1] if hit else ""
        return self._plan.version

    def download(self, dest: Path, progress: Optional[Progress] = None) -> str:
        """Build (or reuse the cached build) into ``dest`` atomically; returns its sha256."""
        from ..build.builder import build

        result = build(self._recipe(), output=Path(dest), install=False, log=self.log)
        self.downloaded_version = result.version
        self.expected_sha256 = result.sha256
        if progress is not None:
            progress(result.size, result.size)
        return result.sha256


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
