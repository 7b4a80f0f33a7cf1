"""GitHub releases of ``images.github.repo``: the newest release's asset named like the image.

Available when a token is in ``GH_TOKEN``/``GITHUB_TOKEN`` or ``gh auth status`` succeeds (the
token then comes from ``gh auth token``). The token goes to the API host only, as
``Authorization: Bearer``; the asset download is redirected to another host, which gets no token.
The expected sha256 is the asset's ``digest`` (``sha256:...``) or, failing that, the asset's line
in a published checksums file (``SHA256SUMS``, ``<asset>.sha256``, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import requests

from ..errors import SourceError
from . import Progress, SourceConfig
from .download import HTTPSource
from .http import Document, check_url, origin, redact

API_VERSION = "2022-11-28"
CHECKSUM_FILES = ("SHA256SUMS", "SHA256SUMS.txt", "sha256sums.txt", "sha256sum.txt", "checksums.txt")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _gh_host(api_url: str) -> str:
    """``gh``'s host name for an API base URL (api.github.com → github.com; GHES → its host)."""
    host = (urlsplit(api_url).hostname or "github.com").lower()
    return "github.com" if host == "api.github.com" else host


def parse_checksums(text: str, asset: str) -> str:
    """The sha256 of ``asset`` in a ``sha256sum``-style file ('' when it is not listed).

    A file holding only a hash (``<asset>.sha256`` often does) counts for ``asset``.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for line in lines:
        words = line.split(None, 1)
        if len(words) == 2 and _HEX64.match(words[0]):
            name = words[1].strip().lstrip("*").strip()
            if name == asset or name.endswith("/" + asset):
                return words[0].lower()
        # BSD style: SHA256 (name) = hex
        match = re.match(r"^SHA256 \((.+)\) = ([0-9a-fA-F]{64})$", line)
        if match and match.group(1) == asset:
            return match.group(2).lower()
    if len(lines) == 1 and _HEX64.match(lines[0].split()[0]) and len(lines[0].split()) == 1:
        return lines[0].split()[0].lower()
    return ""


class GitHubSource(HTTPSource):
    """Downloads ``<image name>`` from the latest release of ``cfg.github_repo``."""

    kind = "github"

    def __init__(self, cfg: Optional[SourceConfig] = None, session: Optional[requests.Session] = None):
        super().__init__(cfg, session)
        self.api = self.cfg.github_api_url.rstrip("/")
        self.repo = self.cfg.github_repo.strip().strip("/")
        self._token: Optional[str] = None
        self._release: Optional[dict] = None
        self._asset: Optional[dict] = None

    # -- auth --------------------------------------------------------------------------------
    def _env_token(self) -> str:
        return os.environ.get("GH_TOKEN", "").strip() or os.environ.get("GITHUB_TOKEN", "").strip()

    def _gh(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["gh", *args, "--hostname", _gh_host(self.api)],
            capture_output=True,
            text=True,
            timeout=15,
            env={**os.environ, "GH_PROMPT_DISABLED": "1"},
        )

    def token(self) -> str:
        """The token for the API host ('' when none): env first, then ``gh auth token``."""
        if self._token is None:
            token = self._env_token()
            if not token:
                try:
                    result = self._gh("auth", "token")
                    token = result.stdout.strip() if result.returncode == 0 else ""
                except (OSError, subprocess.SubprocessError):
                    token = ""
            self._token = token
        return self._token

    def available(self) -> bool:
        if "/" not in self.repo:
            self.unavailable_reason = f"images.github.repo {self.repo!r} is not owner/name"
            return False
        if self._env_token():
            return True
        try:
            result = self._gh("auth", "status")
        except FileNotFoundError:
            self.unavailable_reason = "no GH_TOKEN/GITHUB_TOKEN and the gh CLI is not installed"
            return False
        except (OSError, subprocess.SubprocessError) as exc:
            self.unavailable_reason = f"'gh auth status' failed: {exc}"
            return False
        if result.returncode != 0:
            self.unavailable_reason = "no GH_TOKEN/GITHUB_TOKEN and 'gh auth status' fails (run 'gh auth login')"
            return False
        return True

    def _headers(self, accept: str = "application/vnd.github+json") -> dict[str, str]:
        headers = {"Accept": accept, "X-GitHub-Api-Version": API_VERSION}
        token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    # -- API ---------------------------------------------------------------------------------
    def _get(self, url: str, accept: str = "application/vnd.github+json") -> Document:
        """GET a small document; the token goes to the API host only."""
        credentials = self._headers(accept) if origin(url) == origin(self.api) else {}
        return self.get_document(url, headers={"Accept": accept}, credentials=credentials)

    def _api_error(self, resp: Document, url: str) -> SourceError:
        status = resp.status_code
        if status == 401:
            return SourceError(f"{url}: HTTP 401 bad credentials; check GH_TOKEN/GITHUB_TOKEN or run 'gh auth login'")
        if status in (403, 429) and resp.headers.get("X-RateLimit-Remaining") == "0":
            return SourceError(f"{url}: GitHub API rate limit exceeded; set GH_TOKEN or wait for the reset")
        if status == 404:
            return SourceError(
                f"{url}: HTTP 404: repo {self.repo} has no published release, or the token cannot see it"
            )
        message = ""
        try:
            message = str(resp.json().get("message", ""))[:200]
        except ValueError:
            pass
        return SourceError(f"{url}: HTTP {status}" + (f": {message}" if message else ""))

    def release(self) -> dict:
        """The latest release (fetched once per source object)."""
        if self._release is None:
            check_url(self.api, "images.github.api_url")
            url = f"{self.api}/repos/{self.repo}/releases/latest"
            resp = self._get(url)
            if resp.status_code != 200:
                raise self._api_error(resp, url)
            try:
                data = resp.json()
            except ValueError:
                raise SourceError(f"{url}: answer is not JSON") from None
            if not isinstance(data, dict) or not data.get("tag_name"):
                raise SourceError(f"{url}: answer has no tag_name")
            self._release = data
        return self._release

    def _find_asset(self, release: dict) -> dict:
        assets = release.get("assets") or []
        for asset in assets:
            if asset.get("name") == self.cfg.image_name:
                return asset
        names = ", ".join(str(a.get("name")) for a in assets) or "none"
        raise SourceError(
            f"release {release.get('tag_name')} of {self.repo} has no asset {self.cfg.image_name} "
            f"(assets: {names})"
        )

    def _published_sha256(self, release: dict, asset: dict) -> str:
        digest = str(asset.get("digest") or "")
        if digest.lower().startswith("sha256:") and _HEX64.match(digest[7:]):
            return digest[7:].lower()
        by_name = {a.get("name"): a for a in release.get("assets") or []}
        image = self.cfg.image_name
        for candidate in (f"{image}.sha256", f"{image}.sha256sum", *CHECKSUM_FILES):
            sums = by_name.get(candidate)
            if not sums:
                continue
            url = sums.get("url") or sums.get("browser_download_url")
            resp = self._get(url, accept="application/octet-stream")
            if resp.status_code != 200:
                raise SourceError(f"{redact(url)}: cannot read checksums file {candidate}: HTTP {resp.status_code}")
            found = parse_checksums(resp.text, image)
            if found:
                return found
        return ""

    def latest_version(self) -> str:
        release = self.release()
        self._asset = self._find_asset(release)
        self.expected_sha256 = self._published_sha256(release, self._asset)
        return str(release["tag_name"])

    def download(self, dest: Path, progress: Optional[Progress] = None) -> str:
        if self._asset is None:
            self.latest_version()
        asset: dict[str, Any] = self._asset  # type: ignore[assignment]
        url = asset.get("url") or asset.get("browser_download_url")
        if not url:
            raise SourceError(f"asset {asset.get('name')} of {self.repo} has no download URL")
        if origin(url) == origin(self.api):
            credentials = self._headers("application/octet-stream")
        else:
            credentials = {"Accept": "application/octet-stream"}  # the token is for the API host only
        result = self.download_url(url, dest, progress, credentials=credentials,
                                   size=int(asset.get("size") or -1))
        return result.sha256
