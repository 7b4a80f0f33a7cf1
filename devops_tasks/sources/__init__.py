"""Where images come from: the :class:`ImageSource` base, its config, and the built-in sources.

Every HTTP source (GitHub releases, a CDN folder, an OCI registry) is an
:class:`~devops_tasks.sources.download.HTTPSource` and delivers through the one resumable, verified
download in :mod:`devops_tasks.sources.download`. The sources themselves are imported on first use
(``from devops_tasks.sources import CDNSource``) so ``import devops_tasks`` never pulls in
``requests`` or ``tqdm``.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from ..config import DEFAULTS, Config, env_float, env_int

Progress = Callable[[int, int], None]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_RETRIES = 20

_IMAGES = DEFAULTS["images"]


@dataclass
class SourceConfig:
    """What the sources need to know, flattened from :class:`~devops_tasks.config.Config` (whose
    ``DEFAULTS`` are the defaults here too).

    ``connect_timeout``/``read_timeout`` (seconds) bound each HTTP request; ``retries`` bounds how
    often one download resumes after a cut connection.
    """

    github_repo: str = _IMAGES["github"]["repo"]
    github_api_url: str = _IMAGES["github"]["api_url"]
    cdn_url: str = _IMAGES["cdn"]["url"]
    registry_image: str = _IMAGES["registry"]["image"]
    image_name: str = ""
    build_recipe: str = _IMAGES["build"]["recipe"]
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    retries: int = DEFAULT_RETRIES
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.image_name:
            from ..paths import image_name

            self.image_name = image_name()

    @property
    def timeout(self) -> tuple[float, float]:
        """The ``requests`` timeout tuple ``(connect, read)``."""
        return (self.connect_timeout, self.read_timeout)

    @classmethod
    def from_config(cls, config: Config, image_name: str = "", quiet: bool = False) -> "SourceConfig":
        """From the typed config plus the environment overrides
        ``CORE_HTTP_CONNECT_TIMEOUT``, ``CORE_HTTP_READ_TIMEOUT`` and ``CORE_DOWNLOAD_RETRIES``."""
        images = config.images
        return cls(
            github_repo=images.github.repo,
            github_api_url=images.github.api_url,
            cdn_url=images.cdn.url,
            registry_image=images.registry.image,
            image_name=image_name,
            build_recipe=images.build.recipe,
            connect_timeout=env_float("CORE_HTTP_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            read_timeout=env_float("CORE_HTTP_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
            retries=env_int("CORE_DOWNLOAD_RETRIES", DEFAULT_RETRIES),
            quiet=quiet,
        )


class ImageSource(abc.ABC):
    """What the :class:`~devops_tasks.images.ImageManager` needs from a source.

    Declared by each source class:

    * ``kind`` -- the short name recorded in the manifest (``github``, ``cdn``, ``registry``,
      ``build``), returned by :meth:`name`;
    * ``guest_contract`` -- copied into the manifest entry (``ImageInfo.guest_contract``);
    * ``local`` -- the image is made on this machine, so there is no published checksum to ask for.

    Kept up to date by the source as it works:

    * ``expected_sha256`` -- the sha256 the source publishes for the latest image (after
      :meth:`latest_version`), '' when it publishes none;
    * ``downloaded_version`` -- the version :meth:`download` actually delivered when it can differ
      from what :meth:`latest_version` said (a CDN file changed in between), else '';
    * ``unavailable_reason`` -- one line saying why :meth:`available` is False.
    """

    kind: ClassVar[str] = ""
    guest_contract: ClassVar[int] = 0
    local: ClassVar[bool] = False

    def __init__(self, cfg: Optional[SourceConfig] = None):
        self.cfg = cfg if cfg is not None else SourceConfig()
        self.expected_sha256 = ""
        self.downloaded_version = ""
        self.unavailable_reason = ""

    def name(self) -> str:
        return self.kind

    @abc.abstractmethod
    def available(self) -> bool:
        """Cheap check that this source can be asked at all (configured, authenticated)."""

    @abc.abstractmethod
    def latest_version(self) -> str:
        """The newest version this source offers; raises :class:`SourceError` when it cannot tell."""

    @abc.abstractmethod
    def download(self, dest: Path, progress: Optional[Progress] = None) -> str:
        """Put the latest image at ``dest`` (atomically) and return its sha256 hex."""


_LAZY = {
    "GitHubSource": ("devops_tasks.sources.github", "GitHubSource"),
    "CDNSource": ("devops_tasks.sources.cdn", "CDNSource"),
    "RegistrySource": ("devops_tasks.sources.registry", "RegistrySource"),
    "download_file": ("devops_tasks.sources.download", "download_file"),
}

__all__ = ["ImageSource", "Progress", "SourceConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'devops_tasks.sources' has no attribute {name!r}")
