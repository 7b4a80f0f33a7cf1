"""What images are installed: ``<images dir>/manifest.json``, saved atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import paths
from .clock import format_time, now_utc, parse_time
from .errors import ManifestError
from .fsutil import atomic_write_text


@dataclass
class ImageInfo:
    """One installed image. ``guest_contract`` > 0 means the image follows this tool's guest contract
    (host key and login key injected at boot), so SSH is strict from the first connection.
    ``verified`` is False when the source published no checksum and the user allowed that
    (``images.require_checksum: false``): ``sha256`` was then only computed here."""

    version: str
    source: str
    sha256: str = ""
    downloaded: datetime = field(default_factory=now_utc)
    guest_contract: int = 0
    verified: bool = True

    def to_dict(self) -> dict:
        data = {"version": self.version}
        if self.sha256:
            data["sha256"] = self.sha256
        data["downloaded"] = format_time(self.downloaded)
        data["source"] = self.source
        if self.guest_contract:
            data["guest_contract"] = self.guest_contract
        if not self.verified:
            data["verified"] = False
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ImageInfo":
        return cls(
            version=str(data.get("version", "")),
            source=str(data.get("source", "")),
            sha256=str(data.get("sha256", "")),
            downloaded=parse_time(data["downloaded"]) if data.get("downloaded") else now_utc(),
            guest_contract=int(data.get("guest_contract", 0) or 0),
            verified=data.get("verified", True) is not False,
        )


@dataclass
class Manifest:
    """``{"images": {name: ImageInfo}}`` bound to its file."""

    path: Path
    images: dict[str, ImageInfo] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> "Manifest":
        """Read the manifest; a missing file is an empty manifest, invalid JSON is an error."""
        path = Path(path) if path is not None else paths.manifest_path()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise ManifestError(f"{path}: cannot read the image manifest: {exc.strerror}") from exc
        try:
            data = json.loads(text)
            images = {name: ImageInfo.from_dict(info) for name, info in (data.get("images") or {}).items()}
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ManifestError(
                f"{path}: invalid image manifest ({exc}); fix or delete it and reinstall the image"
            ) from exc
        return cls(path, images)

    def get(self, name: str) -> ImageInfo | None:
        return self.images.get(name)

    def set(self, name: str, info: ImageInfo) -> None:
        self.images[name] = info

    def remove(self, name: str) -> None:
        self.images.pop(name, None)

    def to_json(self) -> str:
        body = {"images": {name: info.to_dict() for name, info in sorted(self.images.items())}}
        return json.dumps(body, indent=2) + "\n"

    def save(self) -> None:
        """Replace the whole file atomically: a crash mid-save leaves the old manifest intact."""
        try:
            atomic_write_text(self.path, self.to_json())
        except OSError as exc:
            raise ManifestError(f"{self.path}: cannot save the image manifest: {exc.strerror or exc}") from exc
