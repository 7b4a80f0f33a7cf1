"""Where images come from: the :class:`ImageSource` protocol, its config, and the built-in sources.

Every HTTP source (GitHub releases, a CDN folder, an OCI registry) delivers through the one
resumable, verified download in :mod:`devops_tasks.sources.download`. The sources themselves are
imported on first use (``from devops_tasks.sources import CDNSource``) so ``import devops_tasks``
never pulls in ``requests`` or ``tqdm``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable

Progress = Callable[[int, int], None]

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_RETRIES = 20


@runtime_checkable
class ImageSource(Protocol):
    """What the :class:`~devops_tasks.images.ImageManager` needs from a source.

    Optional attributes a source may also have (read with ``getattr``):

    * ``expected_sha256`` -- the sha256 the source publishes for the latest image (after
      :meth:`latest_version`), empty when it publishes none;
    * ``guest_contract`` -- copied into the manifest entry (``ImageInfo.guest_contract``), 0 when
      absent;
    * ``unavailable_reason`` -- one line saying why :meth:`available` is False;
    * ``downloaded_version`` -- the version actually delivered by :meth:`download` when it can
      differ from what :meth:`latest_version` said (e.g. a CDN file changed in between).
    """

    def name(self) -> str:
        """Short name recorded in the manifest: ``github``, ``cdn``, ``registry``, ``build``."""
        ...

    def available(self) -> bool:
        """Cheap check that this source can be asked at all (configured, authenticated)."""
        ...

    def latest_version(self) -> str:
        """The newest version this source offers; raises :class:`SourceError` when it cannot tell."""
        ...

    def download(self, dest: Path, progress: Optional[Progress] = None) -> str:
        """Put the latest image at ``dest`` (atomically) and return its verified sha256 hex."""
        ...


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        from ..errors import ConfigError

        raise ConfigError(f"${name}: expected a number of seconds, got {text!r}") from None


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        from ..errors import ConfigError

        raise ConfigError(f"${name}: expected a whole number, got {text!r}") from None


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


@dataclass
class SourceConfig:
    """What the sources need to know, flattened from :class:`~devops_tasks.config.Config`.

    ``connect_timeout``/``read_timeout`` (seconds) bound each HTTP request; ``retries`` bounds how
    often one download resumes after a cut connection. ``insecure_registries`` lists registry hosts
    (``host`` or ``host:port``) spoken to over plain http; loopback registries always are.
    """

    github_repo: str = "host-uk/core-images"
    github_api_url: str = "https://api.github.com"
    cdn_url: str = ""
    registry_image: str = "ghcr.io/host-uk/core-devops"
    image_name: str = ""
    build_recipe: str = "minimal"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    retries: int = DEFAULT_RETRIES
    quiet: bool = False
    insecure_registries: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.image_name:
            from ..paths import image_name

            self.image_name = image_name()

    @property
    def timeout(self) -> tuple[float, float]:
        """The ``requests`` timeout tuple ``(connect, read)``."""
        return (self.connect_timeout, self.read_timeout)

    @classmethod
    def from_config(cls, config: Any, image_name: str = "", quiet: bool = False) -> "SourceConfig":
        """From the typed config plus the environment overrides:
        ``CORE_HTTP_CONNECT_TIMEOUT``, ``CORE_HTTP_READ_TIMEOUT``, ``CORE_DOWNLOAD_RETRIES``,
        ``CORE_INSECURE_REGISTRIES`` (comma-separated ``host[:port]``)."""
        images = config.images
        return cls(
            github_repo=images.github.repo,
            github_api_url=getattr(images.github, "api_url", "") or "https://api.github.com",
            cdn_url=images.cdn.url,
            registry_image=images.registry.image,
            image_name=image_name,
            build_recipe=getattr(getattr(images, "build", None), "recipe", "minimal"),
            connect_timeout=_env_float("CORE_HTTP_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
            read_timeout=_env_float("CORE_HTTP_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
            retries=_env_int("CORE_DOWNLOAD_RETRIES", DEFAULT_RETRIES),
            quiet=quiet,
            insecure_registries=_env_list("CORE_INSECURE_REGISTRIES"),
        )


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
