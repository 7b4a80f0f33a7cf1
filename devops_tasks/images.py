"""The :class:`ImageManager`: install, update, list and prune the dev image.

It picks sources from ``images.source`` (``auto`` tries GitHub, the CDN, the registry, then a local
build), downloads through the source, and records the result in the manifest *last*: the image
file is already complete, verified, fsynced and renamed into place by then, and the manifest
itself is replaced atomically under a lock, so a crash or Ctrl-C never leaves a half image counted
as installed. It refuses an image without a published checksum (unless ``images.require_checksum``
is false) and never replaces the image while a VM runs on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import paths
from .config import VALID_SOURCES, Config
from .errors import DevopsError, ImageError, SourceError
from .fsutil import file_lock, is_locked
from .machine.records import VMDir, all_names, is_alive
from .clock import now_utc
from .manifest import ImageInfo, Manifest
from .sources import ImageSource, SourceConfig

Echo = Callable[[str], None]
Progress = Callable[[int, int], None]

AUTO_ORDER = ("github", "cdn", "registry", "build")
IMAGE_SUFFIXES = (".qcow2", ".img", ".raw", ".iso", ".vmdk")


class UpdateCheckError(SourceError):
    """The source could not say its latest version; ``current`` is still the installed version."""

    def __init__(self, message: str, current: str):
        super().__init__(message)
        self.current = current


@dataclass
class PruneResult:
    removed: list[Path]
    freed: int
    skipped: list[str]


def _make_source(kind: str, cfg: SourceConfig, echo: Optional[Echo] = None) -> ImageSource:
    """The real source called ``kind`` (one of ``AUTO_ORDER``), imported on first use: ``requests``
    stays unloaded until then."""
    if kind == "github":
        from .sources.github import GitHubSource

        return GitHubSource(cfg)
    if kind == "cdn":
        from .sources.cdn import CDNSource

        return CDNSource(cfg)
    if kind == "registry":
        from .sources.registry import RegistrySource

        return RegistrySource(cfg)
    from .sources.build import BuildSource

    return BuildSource(cfg, log=echo)  # the builder's one-line progress messages


def _why_unavailable(source: ImageSource) -> str:
    reason = source.unavailable_reason
    return f"not available ({reason})" if reason else "not available"


class ImageManager:
    """Installs and updates the platform image (``paths.image_name()``) in ``paths.images_dir()``.

    ``sources`` (tests, embedders) replaces the real ones: it is the candidate list, in ``auto``
    order, and a non-``auto`` selection picks the candidate with that ``name()``.
    ``manifest`` (tests) replaces the manifest read from disk. ``quiet`` hides progress bars.
    """

    def __init__(
        self,
        config: Optional[Config] = None,
        sources: Optional[list[ImageSource]] = None,
        manifest: Optional[Manifest] = None,
        echo: Echo = print,
        quiet: bool = False,
    ):
        self.config = config if config is not None else Config()
        self._sources = list(sources) if sources is not None else None
        self._manifest = manifest
        self.echo = echo
        self.quiet = quiet
        self.image_name = paths.image_name()
        self.images_dir = paths.images_dir()
        self.image_path = self.images_dir / self.image_name
        self.manifest_path = manifest.path if manifest is not None else paths.manifest_path()

    # -- sources -----------------------------------------------------------------------------
    def source_config(self) -> SourceConfig:
        return SourceConfig.from_config(self.config, image_name=self.image_name, quiet=self.quiet)

    def source_kind(self, source: str = "") -> str:
        """``source`` (or ``images.source``) checked against the known kinds."""
        kind = (source or self.config.images.source or "auto").strip().lower()
        if kind not in VALID_SOURCES:
            raise ImageError(
                f"unknown image source {kind!r} (valid: {', '.join(VALID_SOURCES)}); "
                "fix --source or images.source in ~/.core/config.yaml"
            )
        return kind

    def candidates(self, source: str = "") -> list[ImageSource]:
        """The sources to try for ``source`` (default: ``images.source``), in order."""
        kind = self.source_kind(source)
        kinds = AUTO_ORDER if kind == "auto" else (kind,)
        if self._sources is not None:
            if kind == "auto":
                return list(self._sources)
            return [s for s in self._sources if s.name() == kind]
        cfg = self.source_config()
        return [_make_source(k, cfg, self.echo) for k in kinds]

    # -- state -------------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        """The manifest as it is now on disk (or the one given to the constructor)."""
        if self._manifest is not None:
            return self._manifest
        return Manifest.load(self.manifest_path)

    def info(self) -> Optional[ImageInfo]:
        return self.manifest().get(self.image_name)

    def is_installed(self) -> bool:
        """The image file is in place *and* the manifest records it (a ``.part`` never counts)."""
        return self.image_path.is_file() and self.info() is not None

    # -- install -----------------------------------------------------------------------------
    def install(self, progress: Optional[Progress] = None, source: str = "") -> ImageInfo:
        """Download the latest image from the first source that works and record it.

        Raises ``no image source available`` when no candidate is available, and otherwise the
        failure of a lone source, or one error listing every source and why it failed. Refuses
        while a VM runs on the installed image.
        """
        candidates = self.candidates(source)
        self.refuse_while_in_use()
        failures: dict[int, str] = {}
        tried: list[tuple[int, ImageSource]] = []
        for index, src in enumerate(candidates):
            if src.available():
                tried.append((index, src))
            else:
                failures[index] = _why_unavailable(src)
        if not tried:
            detail = "; ".join(f"{candidates[i].name()}: {why}" for i, why in sorted(failures.items()))
            raise SourceError(f"no image source available ({detail})" if detail else "no image source available")

        last: Optional[DevopsError] = None
        for index, src in tried:
            if src.name() == "build" and index > 0:
                self.echo("No download source worked; building the image locally instead")
            try:
                return self._install_from(src, progress)
            except DevopsError as exc:
                last = exc
                failures[index] = str(exc)
        if len(candidates) == 1 and last is not None:
            raise last
        detail = "; ".join(f"{candidates[i].name()}: {why}" for i, why in sorted(failures.items()))
        raise SourceError(f"every image source failed: {detail}") from last

    def _install_from(self, src: ImageSource, progress: Optional[Progress]) -> ImageInfo:
        try:
            version = src.latest_version()
        except DevopsError as exc:
            raise SourceError(f"failed to get latest version: {exc}") from exc
        verified = bool(src.expected_sha256) or src.local
        if not verified:
            if self.config.images.require_checksum:
                raise ImageError(
                    f"{src.name()} publishes no sha256 for {self.image_name} {version}: refusing an "
                    "unverified image (publish a checksum, or set images.require_checksum: false in "
                    "~/.core/config.yaml to install it unverified)"
                )
            self.echo(f"Warning: {src.name()} publishes no sha256 for {self.image_name} {version}; "
                      "installing it unverified (images.require_checksum: false)")
        self.echo(f"Downloading {self.image_name} from {src.name()}...")
        self.images_dir.mkdir(parents=True, exist_ok=True)
        try:
            sha = src.download(self.image_path, progress)
        except OSError as exc:
            raise ImageError(f"{self.image_path}: {exc.strerror or exc}") from exc
        if not self.image_path.is_file():
            raise ImageError(f"{src.name()}: download finished but {self.image_path} is missing")
        info = ImageInfo(
            version=src.downloaded_version or version,
            source=src.name(),
            sha256=sha or "",
            downloaded=now_utc(),
            guest_contract=src.guest_contract,
            verified=verified,
        )
        self._record(info)
        return info

    def vms_on_image(self) -> list[str]:
        """Names of the VMs whose QEMU runs now on the installed image (stale records do not count)."""
        image = os.path.realpath(self.image_path)
        names = []
        for name in all_names():
            record = VMDir(name).load()
            if record is not None and os.path.realpath(record.image) == image and is_alive(record):
                names.append(name)
        return names

    def refuse_while_in_use(self) -> None:
        """Raise :class:`ImageError` when a VM runs on the installed image: replacing the file
        under a running QEMU would corrupt its disk."""
        if not self.image_path.exists():
            return
        running = self.vms_on_image()
        if running:
            many = len(running) > 1
            raise ImageError(
                f"cannot replace {self.image_name} while VM{'s' if many else ''} {', '.join(running)} "
                f"{'are' if many else 'is'} running on it: stop {'them' if many else 'it'} first "
                f"(inv vm.stop --name {running[0] if not many else 'NAME'}), then try again"
            )

    def _record(self, info: ImageInfo) -> None:
        """Manifest read-modify-write under its lock; the save itself is atomic."""
        if self._manifest is not None:
            self._manifest.set(self.image_name, info)
            self._manifest.save()
            return
        with file_lock(self.manifest_path.with_name(self.manifest_path.name + ".lock")):
            manifest = Manifest.load(self.manifest_path)
            manifest.set(self.image_name, info)
            manifest.save()

    # -- update ------------------------------------------------------------------------------
    def _update_source(self) -> tuple[str, ImageSource]:
        info = self.info()
        if info is None or not self.image_path.is_file():
            raise ImageError("image not installed (run 'inv image.install' first)")
        candidates = [s for s in self.candidates() if s.available()]
        if not candidates:
            raise UpdateCheckError("no image source available", info.version)
        # Ask the source the image came from when it is still a candidate: versions of
        # different sources need not be comparable.
        for src in candidates:
            if src.name() == info.source:
                return info.version, src
        return info.version, candidates[0]

    def check_update(self) -> tuple[str, str, bool]:
        """``(current, latest, has_update)``; ``image not installed`` when it is not.

        When the source fails, :class:`UpdateCheckError` carries ``.current``.
        """
        current, src = self._update_source()
        try:
            latest = src.latest_version()
        except DevopsError as exc:
            raise UpdateCheckError(f"failed to get latest version: {exc}", current) from exc
        return current, latest, latest != current

    def update(self, progress: Optional[Progress] = None) -> tuple[str, str, Optional[ImageInfo]]:
        """Install the latest version when it differs: ``(current, latest, new info or None)``.

        Refuses (:class:`ImageError`) while a VM runs on the installed image."""
        current, src = self._update_source()
        try:
            latest = src.latest_version()
        except DevopsError as exc:
            raise UpdateCheckError(f"failed to get latest version: {exc}", current) from exc
        if latest == current:
            return current, latest, None
        self.refuse_while_in_use()
        return current, latest, self._install_from(src, progress)

    # -- list and prune ----------------------------------------------------------------------
    def list(self) -> list[dict]:
        """One dict per manifest entry: name, version, source, size (None when the file is
        missing), sha256, verified (False: no published checksum was checked), downloaded
        (RFC 3339), current (the platform image), installed."""
        rows = []
        for name, info in sorted(self.manifest().images.items()):
            path = self.images_dir / name
            try:
                size: Optional[int] = path.stat().st_size
            except OSError:
                size = None
            data = info.to_dict()
            rows.append(
                {
                    "name": name,
                    "version": info.version,
                    "source": info.source,
                    "size": size,
                    "sha256": info.sha256,
                    "verified": info.verified,
                    "downloaded": data["downloaded"],
                    "current": name == self.image_name,
                    "installed": size is not None,
                }
            )
        return rows

    def prune(self) -> PruneResult:
        """Remove stale ``.part`` files (with their ``.part.json``) and image files the manifest
        does not reference (never the platform image). A download in progress is left alone."""
        removed: list[Path] = []
        skipped: list[str] = []
        freed = 0
        if not self.images_dir.is_dir():
            return PruneResult(removed, freed, skipped)
        referenced = set(self.manifest().images) | {self.image_name}
        for path in sorted(self.images_dir.iterdir()):
            if not path.is_file() or path.is_symlink():
                continue
            name = path.name
            if name.endswith(".part") or name.endswith(".part.json"):
                image = name[: -len(".part")] if name.endswith(".part") else name[: -len(".part.json")]
                if is_locked(self.images_dir / f"{image}.lock"):
                    skipped.append(f"{name} (download in progress)")
                    continue
            elif not (name.endswith(IMAGE_SUFFIXES) and name not in referenced):
                continue
            size = path.stat().st_size
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                skipped.append(f"{name} ({exc.strerror or exc})")
                continue
            removed.append(path)
            freed += size
        return PruneResult(removed, freed, skipped)

