"""A plain HTTP(S) folder (CDN, S3 bucket, any web server): ``<images.cdn.url>/<image name>``.

The version and checksum come from ``<images.cdn.url>/manifest.json`` when the folder has one::

    {"images": {"core-devops-linux-amd64.qcow2":
        {"version": "v1.4.0", "sha256": "<64 hex>", "file": "v1.4.0/core-devops-linux-amd64.qcow2"}}}

(``sha256`` and ``file`` optional; ``file`` is relative to the folder and defaults to the image
name). Without a manifest entry, the version is the image file's strong ETag, else its
Last-Modified time (as ``YYYY-MM-DDTHH:MM:SSZ``), from a HEAD request: never a constant.
"""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import requests

from ..errors import SourceError
from . import Progress, SourceConfig
from .download import HTTPSource
from .http import check_url, redact

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def version_from_validator(validator: str) -> str:
    """``"abc"`` → ``abc``; an HTTP date → ``2024-05-01T12:00:00Z``."""
    value = validator.strip()
    if value.startswith("W/"):
        value = value[2:]
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        return value[1:-1]
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return value
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class CDNSource(HTTPSource):
    kind = "cdn"

    def __init__(self, cfg: Optional[SourceConfig] = None, session: Optional[requests.Session] = None):
        super().__init__(cfg, session)
        self.base = self.cfg.cdn_url.strip().rstrip("/")
        self.unavailable_reason = "" if self.base else "images.cdn.url is not set"
        self._file = self.cfg.image_name
        self._from_headers = False

    def available(self) -> bool:
        return bool(self.base)

    @property
    def manifest_url(self) -> str:
        return f"{self.base}/manifest.json"

    @property
    def file_url(self) -> str:
        return f"{self.base}/{quote(self._file)}"

    def _from_manifest(self) -> Optional[str]:
        """The version listed in manifest.json, or None when there is no usable entry."""
        url = self.manifest_url
        resp = self.get_document(url)
        if resp.status_code in (403, 404):  # S3 answers 403 for a missing key
            return None
        if resp.status_code != 200:
            raise SourceError(f"{redact(url)}: HTTP {resp.status_code}")
        try:
            entry = (resp.json().get("images") or {}).get(self.cfg.image_name)
        except (ValueError, AttributeError):
            raise SourceError(
                f"{redact(url)}: not a valid image manifest "
                '(expected {"images": {"<image name>": {"version": ..., "sha256": ...}}})'
            ) from None
        if not entry:
            return None
        if not isinstance(entry, dict) or not str(entry.get("version") or "").strip():
            raise SourceError(f"{redact(url)}: entry {self.cfg.image_name} has no version")
        sha = str(entry.get("sha256") or "").strip().lower().removeprefix("sha256:")
        if sha and not _HEX64.match(sha):
            raise SourceError(f"{redact(url)}: entry {self.cfg.image_name} has an invalid sha256 {sha!r}")
        name = str(entry.get("file") or "").strip().lstrip("/")
        if ".." in name.split("/"):
            raise SourceError(f"{redact(url)}: entry {self.cfg.image_name} has an unsafe file {name!r}")
        self._file = name or self.cfg.image_name
        self.expected_sha256 = sha
        return str(entry["version"]).strip()

    def _from_headers_of_file(self) -> str:
        url = self.file_url
        resp = self.get_document(url, method="HEAD")
        if resp.status_code == 404:
            raise SourceError(f"{redact(url)}: not found (HTTP 404); check images.cdn.url")
        if resp.status_code != 200:
            raise SourceError(f"{redact(url)}: HTTP {resp.status_code}")
        etag = resp.headers.get("ETag", "").strip()
        modified = resp.headers.get("Last-Modified", "").strip()
        validator = etag if etag and not etag.startswith("W/") else (modified or etag)
        if not validator:
            raise SourceError(
                f"{redact(url)}: cannot tell the version: no manifest.json entry, no ETag, no Last-Modified"
            )
        return version_from_validator(validator)

    def latest_version(self) -> str:
        check_url(self.base, "images.cdn.url")
        self._file = self.cfg.image_name
        self.expected_sha256 = ""
        version = self._from_manifest()
        self._from_headers = version is None
        if version is None:
            version = self._from_headers_of_file()
        return version

    def download(self, dest: Path, progress: Optional[Progress] = None) -> str:
        result = self.download_url(self.file_url, dest, progress)
        # Versioned by headers: record the version of the bytes actually received.
        self.downloaded_version = (
            version_from_validator(result.validator) if self._from_headers and result.validator else ""
        )
        return result.sha256
