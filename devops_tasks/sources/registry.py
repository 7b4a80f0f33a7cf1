"""An OCI registry (``images.registry.image`` = ``host/repo[:tag]``): the image as an artifact layer.

The pull is the short OCI distribution protocol spoken with ``requests``:

1. no tag in the reference → ``GET /v2/<repo>/tags/list`` (paginated) and take the highest
   version tag, compared numerically (``v1.10.0`` > ``v1.9.3``); ``latest``, ``-rc`` and other
   non-version tags are skipped;
2. ``GET /v2/<repo>/manifests/<tag>`` with OCI/Docker ``Accept`` headers; the body's sha256 must
   equal ``Docker-Content-Digest``; an index is resolved to this platform's manifest;
3. the layer whose ``org.opencontainers.image.title`` annotation is the image name (or the only
   layer) is fetched with ``GET /v2/<repo>/blobs/<digest>`` through the resumable download, and
   its sha256 must equal the digest.

Auth: anonymous or with ``CORE_REGISTRY_USER``/``CORE_REGISTRY_PASSWORD``; a ``Bearer`` challenge
(``WWW-Authenticate: Bearer realm=...,service=...,scope=...``) is answered by fetching a token
from the realm, a ``Basic`` one with the credentials. Plain http is used for loopback registries
only; https otherwise. Why not the ``oras`` SDK: it cannot resume, does not verify digests and
retries for minutes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlencode, urljoin, urlsplit

import requests

from ..errors import SourceError
from ..paths import go_arch, go_os
from . import Progress, SourceConfig
from .download import HTTPSource
from .http import Document, is_loopback, origin, redact

USER_ENV = "CORE_REGISTRY_USER"
PASSWORD_ENV = "CORE_REGISTRY_PASSWORD"
TITLE = "org.opencontainers.image.title"

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

_VERSION = re.compile(r"^[vV]?(\d+(?:\.\d+)*)$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


def version_key(tag: str) -> Optional[tuple[int, ...]]:
    """``v1.10.0`` → ``(1, 10, 0)``; None for tags that are not plain versions (``latest``,
    ``v2.0.0-rc1``, ``sha-abc``)."""
    match = _VERSION.match(tag)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def highest_version(tags: list[str]) -> Optional[str]:
    keyed = [(key, tag) for tag in tags if (key := version_key(tag)) is not None]
    if not keyed:
        return None
    # (1,) < (1, 0): a floating major tag never beats a full version of the same major.
    return max(keyed, key=lambda kt: (kt[0], len(kt[1]), kt[1]))[1]


@dataclass
class Reference:
    host: str
    repo: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        text = f"{self.host}/{self.repo}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(image: str) -> Reference:
    """``host[:port]/repo[:tag][@sha256:...]``; a name without a host means Docker Hub."""
    text = image.strip()
    if not text:
        raise SourceError("images.registry.image is empty (expected host/repo[:tag])")
    digest = ""
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise SourceError(f"images.registry.image {image!r}: unsupported digest {digest!r}")
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = "registry-1.docker.io", text if "/" in text else f"library/{text}"
    tag = ""
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
    if not path or not re.match(r"^[a-z0-9]+(?:[._/-]+[a-z0-9]+)*$", path):
        raise SourceError(f"images.registry.image {image!r}: invalid repository name {path!r}")
    return Reference(host=host.lower(), repo=path, tag=tag, digest=digest)


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class RegistrySource(HTTPSource):
    kind = "registry"

    def __init__(self, cfg: Optional[SourceConfig] = None, session: Optional[requests.Session] = None):
        super().__init__(cfg, session)
        self._ref: Optional[Reference] = None
        self._auth: dict[str, str] = {}
        self._layer: Optional[dict] = None
        self.user = os.environ.get(USER_ENV, "")
        self.password = os.environ.get(PASSWORD_ENV, "")

    @property
    def ref(self) -> Reference:
        if self._ref is None:
            self._ref = parse_reference(self.cfg.registry_image)
        return self._ref

    def available(self) -> bool:
        try:
            self.ref
        except SourceError as exc:
            self.unavailable_reason = str(exc)
            return False
        return True

    # -- transport ---------------------------------------------------------------------------
    @property
    def base(self) -> str:
        scheme = "http" if is_loopback(urlsplit(f"//{self.ref.host}").hostname or "") else "https"
        return f"{scheme}://{self.ref.host}/v2/{self.ref.repo}"

    def _basic(self) -> str:
        raw = f"{self.user}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _authenticate(self, resp: requests.Response) -> dict[str, str]:
        """Answer a 401's challenge; returns the Authorization header to use from now on."""
        header = resp.headers.get("WWW-Authenticate", "")
        scheme, params = _challenge(header)
        where = f"{self.ref.host}/{self.ref.repo}"
        if scheme == "basic":
            if not (self.user and self.password):
                raise SourceError(f"registry {where} needs credentials: set {USER_ENV} and {PASSWORD_ENV}")
            self._auth = {"Authorization": self._basic()}
            return self._auth
        if scheme != "bearer" or not params.get("realm"):
            raise SourceError(f"registry {where}: HTTP 401 with an unsupported challenge {scheme or '(none)'!r}")
        realm = params["realm"]
        realm_parts = urlsplit(realm)
        if realm_parts.scheme not in ("http", "https"):
            raise SourceError(f"registry {where}: invalid token realm {realm!r}")
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope") or f"repository:{self.ref.repo}:pull"
        credentials = {"Authorization": self._basic()} if self.user and self.password else {}
        url = realm + ("&" if "?" in realm else "?") + urlencode({k: v for k, v in query.items() if v})
        try:
            token_resp = self.get_document(url, credentials=credentials)
        except SourceError as exc:
            raise SourceError(f"registry {where}: token server: {exc}") from None
        if token_resp.status_code in (401, 403):
            hint = f"check {USER_ENV}/{PASSWORD_ENV}" if self.user else f"set {USER_ENV} and {PASSWORD_ENV}"
            raise SourceError(f"token server {redact(realm)} refused access to {where} (HTTP {token_resp.status_code}); {hint}")
        if token_resp.status_code != 200:
            raise SourceError(f"token server {redact(realm)}: HTTP {token_resp.status_code}")
        try:
            body = token_resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise SourceError(f"token server {redact(realm)}: answer has no token")
        self._auth = {"Authorization": f"Bearer {token}"}
        return self._auth

    def _get(self, url: str, accept: str = "") -> Document:
        """GET from the registry, answering one auth challenge; auth goes to the registry only."""
        if origin(url) != origin(self.base):
            return self.get_document(url, headers={"Accept": accept} if accept else None)
        return self.get_document(url, headers={"Accept": accept} if accept else None,
                                 credentials=dict(self._auth), reauth=self._authenticate)

    def _error(self, resp: Document, what: str) -> SourceError:
        where = f"{self.ref.host}/{self.ref.repo}"
        code = ""
        try:
            errors = resp.json().get("errors") or []
            code = ", ".join(str(e.get("code")) for e in errors if e.get("code"))
        except (ValueError, AttributeError):
            pass
        if resp.status_code == 401:
            return SourceError(f"registry {where}: {what}: access denied (HTTP 401); set {USER_ENV} and {PASSWORD_ENV}")
        if resp.status_code == 404:
            return SourceError(f"registry {where}: {what}: not found (HTTP 404{', ' + code if code else ''})")
        return SourceError(f"registry {where}: {what}: HTTP {resp.status_code}{' ' + code if code else ''}")

    # -- tags and manifests ------------------------------------------------------------------
    def tags(self) -> list[str]:
        url: Optional[str] = f"{self.base}/tags/list?n=1000"
        tags: list[str] = []
        for _ in range(100):
            if not url:
                break
            resp = self._get(url)
            if resp.status_code != 200:
                raise self._error(resp, "listing tags")
            try:
                tags.extend(str(t) for t in (resp.json().get("tags") or []))
            except (ValueError, AttributeError):
                raise SourceError(f"registry {redact(url)}: tag list is not JSON") from None
            match = re.search(r"<([^>]+)>\s*;\s*rel=\"?next\"?", resp.headers.get("Link", ""))
            url = urljoin(url, match.group(1)) if match else None
        return tags

    def _manifest(self, reference: str) -> tuple[dict, str]:
        """The manifest for a tag or digest, its digest checked against what the registry says."""
        resp = self._get(f"{self.base}/manifests/{quote(reference, safe=':')}", accept=ACCEPT)
        if resp.status_code != 200:
            raise self._error(resp, f"manifest {reference}")
        body = resp.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        claimed = resp.headers.get("Docker-Content-Digest", "")
        if reference.startswith("sha256:") and digest != reference:
            raise SourceError(f"registry {self.ref.host}/{self.ref.repo}: manifest {reference} does not match its digest")
        if claimed and claimed != digest:
            raise SourceError(
                f"registry {self.ref.host}/{self.ref.repo}: manifest {reference} does not match Docker-Content-Digest"
            )
        try:
            data = json.loads(body)
        except ValueError:
            raise SourceError(f"registry {self.ref.host}/{self.ref.repo}: manifest {reference} is not JSON") from None
        if not isinstance(data, dict):
            raise SourceError(f"registry {self.ref.host}/{self.ref.repo}: manifest {reference} is not an object")
        return data, digest

    def _resolve(self, reference: str) -> tuple[dict, str]:
        data, digest = self._manifest(reference)
        media = data.get("mediaType") or ""
        if media in INDEX_TYPES or ("manifests" in data and "layers" not in data):
            entries = data.get("manifests") or []
            want = (go_os(), go_arch())
            chosen = [m for m in entries if (m.get("platform") or {}).get("os") == want[0]
                      and (m.get("platform") or {}).get("architecture") == want[1]]
            if not chosen and len(entries) == 1:
                chosen = entries
            if not chosen:
                raise SourceError(
                    f"registry {self.ref}: index {reference} has no manifest for {want[0]}/{want[1]}"
                )
            return self._manifest(chosen[0]["digest"])
        return data, digest

    def _pick_layer(self, manifest: dict, reference: str) -> dict:
        layers = manifest.get("layers") or []
        titled = [l for l in layers if (l.get("annotations") or {}).get(TITLE) == self.cfg.image_name]
        if titled:
            return titled[0]
        if len(layers) == 1:
            return layers[0]
        titles = ", ".join(str((l.get("annotations") or {}).get(TITLE, "?")) for l in layers) or "none"
        raise SourceError(
            f"registry {self.ref.host}/{self.ref.repo}:{reference}: no layer titled {self.cfg.image_name} "
            f"(layers: {titles})"
        )

    def latest_version(self) -> str:
        ref = self.ref
        if ref.digest:
            reference, version = ref.digest, ref.digest[:19]
        elif ref.tag:
            reference = version = ref.tag
        else:
            tags = self.tags()
            best = highest_version(tags)
            if best is None:
                shown = ", ".join(sorted(tags)[:10]) or "none"
                raise SourceError(
                    f"registry {ref.host}/{ref.repo} has no version tag (tags: {shown}); "
                    "push a tag like v1.0.0 or put a tag in images.registry.image"
                )
            reference = version = best
        manifest, digest = self._resolve(reference)
        layer = self._pick_layer(manifest, reference)
        match = _DIGEST.match(str(layer.get("digest", "")))
        if not match:
            raise SourceError(f"registry {ref}: layer digest {layer.get('digest')!r} is not a sha256 digest")
        self._layer = layer
        self.expected_sha256 = match.group(1)
        if ref.tag and not ref.digest and version_key(ref.tag) is None:
            version = f"{ref.tag}@{digest[:19]}"  # e.g. latest@sha256:0123456789ab: never a bare "latest"
        return version

    def download(self, dest: Path, progress: Optional[Progress] = None) -> str:
        if self._layer is None:
            self.latest_version()
        layer: dict = self._layer  # type: ignore[assignment]
        size = layer.get("size")
        result = self.download_url(
            f"{self.base}/blobs/{layer['digest']}",
            dest,
            progress,
            credentials=dict(self._auth),
            size=size if isinstance(size, int) else -1,
            reauth=self._authenticate,
        )
        return result.sha256
