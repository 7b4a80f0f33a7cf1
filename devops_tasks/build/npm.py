"""npm packages in the image: an exact version looked up in the registry once (versions never change
there), its tarball checked against the registry's sha512 integrity before it is cached beside the
.debs, and the files the recipe names unpacked into the root file system with fixed modes (the
builder fixes their timestamps with the rest)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable
from urllib.parse import quote

import requests

from ..errors import DevopsError, ImageError
from ..fsutil import atomic_write_text, fsync_dir
from ..sources.download import download_file
from .recipe import NpmPackage

DEFAULT_REGISTRY = "https://registry.npmjs.org"
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
USER_AGENT = "devops-tasks"
TIMEOUT = (10.0, 60.0)

Log = Callable[[str], None]


@dataclass(frozen=True, order=True)
class NpmPin:
    """One resolved npm package: what goes into the image version (name, version, integrity)."""

    name: str
    version: str
    integrity: str
    tarball: str = field(compare=False)

    @property
    def filename(self) -> str:
        return tarball_name(self.name, self.version)

    def pin(self) -> str:
        return f"{self.name}@{self.version} {self.integrity}"


def tarball_name(name: str, version: str) -> str:
    """``@scope/pkg`` -> ``@scope+pkg-1.2.3.tgz`` (``+`` is not allowed in npm names: no clashes)."""
    return f"{name.replace('/', '+')}-{version}.tgz"


def ca_bundle() -> str | bool:
    """The CA file requests should trust: the one the environment names, else the system's bundle
    (which trusts what the host trusts, e.g. a TLS-intercepting gateway), else requests' own."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(var, "")
        if value and os.path.isfile(value):
            return value
    return next((path for path in SYSTEM_CA_BUNDLES if os.path.isfile(path)), True)


def registry_url(configured: str = "") -> str:
    """The recipe's ``npm_registry``; else what ``npm config get registry`` says (it honours .npmrc
    and NPM_CONFIG_REGISTRY) when npm is installed; else NPM_CONFIG_REGISTRY; else the public one."""
    if configured:
        return configured.rstrip("/")
    npm = shutil.which("npm")
    if npm:
        try:
            answer = subprocess.run([npm, "config", "get", "registry"], capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL, timeout=60, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            answer = ""
        if answer.startswith(("http://", "https://")):
            return answer.rstrip("/")
    env = os.environ.get("NPM_CONFIG_REGISTRY") or os.environ.get("npm_config_registry") or ""
    return env.rstrip("/") if env.startswith(("http://", "https://")) else DEFAULT_REGISTRY


def sha512_integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def integrity_of(path: Path) -> str:
    """The file's sha512 in the registry's Subresource Integrity form (``sha512-<base64>``)."""
    digest = hashlib.sha512()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _sha512_of(sri: str) -> str:
    """The sha512 entry of an SRI string (it may list several hashes); '' when it has none."""
    return next((part for part in sri.split() if part.startswith("sha512-")), "")


class Npm:
    """Registry look-ups and the tarball cache (``<cache>/npm``)."""

    def __init__(self, registry: str, cache: Path, log: Log | None = None):
        self.configured = registry
        self.dir = cache / "npm"
        self.log = log or (lambda message: None)
        self._registry = ""
        self._session: requests.Session | None = None

    @property
    def registry(self) -> str:
        if not self._registry:
            self._registry = registry_url(self.configured)
        return self._registry

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
            self._session.verify = ca_bundle()
            self._session.headers["User-Agent"] = USER_AGENT
        return self._session

    # -- metadata ------------------------------------------------------------------------------
    def resolve(self, package: NpmPackage) -> NpmPin:
        """The registry's integrity and tarball URL for the exact version (remembered in the cache)."""
        memo = self.dir / (tarball_name(package.name, package.version) + ".json")
        try:
            data = json.loads(memo.read_text())
            pin = NpmPin(data["name"], data["version"], data["integrity"], data["tarball"])
        except (OSError, ValueError, KeyError, TypeError):
            pin = self._lookup(package)
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps({"name": pin.name, "version": pin.version, "integrity": pin.integrity,
                                                "tarball": pin.tarball, "registry": self.registry}) + "\n")
        if package.integrity and pin.integrity != package.integrity:
            raise ImageError(f"npm package {package.spec}: the registry's integrity {pin.integrity} is not the "
                             f"recipe's {package.integrity}")
        return pin

    def _get(self, url: str, what: str) -> requests.Response:
        try:
            return self.session.get(url, timeout=TIMEOUT, headers={"Accept": "application/json"})
        except requests.exceptions.SSLError as exc:
            raise ImageError(f"{what}: TLS error talking to {self.registry} ({_short(exc)}); is its CA in "
                             f"{ca_bundle()}?") from None
        except requests.exceptions.RequestException as exc:
            raise ImageError(f"{what}: cannot reach the npm registry {self.registry}: {_short(exc)}") from None

    def _lookup(self, package: NpmPackage) -> NpmPin:
        what = f"looking up npm package {package.spec}"
        self.log(f"Looking up npm package {package.spec} in {self.registry}")
        base = f"{self.registry}/{quote(package.name, safe='@')}"
        resp = self._get(f"{base}/{quote(package.version)}", what)
        if resp.status_code in (404, 405):  # not found, or a registry without the per-version route
            resp = self._get(base, what)
            if resp.status_code == 404:
                raise ImageError(f"no npm package '{package.name}' in the registry {self.registry}: fix the recipe")
            doc = _json(resp, what)
            versions = doc.get("versions") if isinstance(doc.get("versions"), dict) else {}
            if package.version not in versions:
                latest = (doc.get("dist-tags") or {}).get("latest", "?")
                raise ImageError(f"npm package '{package.name}' has no version {package.version} in {self.registry} "
                                 f"(latest: {latest}): fix the recipe")
            doc = versions[package.version]
        else:
            doc = _json(resp, what)
        dist = doc.get("dist") if isinstance(doc, dict) else None
        if not isinstance(dist, dict) or not isinstance(dist.get("tarball"), str):
            raise ImageError(f"{what}: the registry's answer has no dist.tarball")
        integrity = _sha512_of(str(dist.get("integrity", "")))
        if not integrity:
            raise ImageError(f"{what}: the registry gives no sha512 integrity for it, so it cannot be checked")
        return NpmPin(package.name, package.version, integrity, dist["tarball"])

    # -- tarballs ------------------------------------------------------------------------------
    def download(self, pin: NpmPin) -> Path:
        """The package's tarball from the cache, fetching it when missing. It is only cached after
        its sha512 matched the registry's integrity; a mismatch deletes it."""
        target = self.dir / pin.filename
        if target.is_file():
            if hmac.compare_digest(integrity_of(target), pin.integrity):
                return target
            self.log(f"The cached {target.name} is damaged: fetching it again")
            target.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = self.dir / f".partial-{pin.filename}"
        self.log(f"Downloading npm package {pin.name}@{pin.version}")
        try:
            download_file(pin.tarball, staging, session=self.session, label=f"{pin.name}@{pin.version}")
        except DevopsError as exc:
            raise ImageError(f"downloading npm package {pin.name}@{pin.version}: {exc}") from None
        got = integrity_of(staging)
        if not hmac.compare_digest(got, pin.integrity):
            staging.unlink()
            raise ImageError(f"npm package {pin.name}@{pin.version}: the tarball from {pin.tarball} has integrity "
                             f"{got}, not the registry's {pin.integrity}; nothing was cached")
        os.replace(staging, target)
        fsync_dir(self.dir)
        with contextlib.suppress(OSError):
            staging.with_name(staging.name + ".lock").unlink()
        return target


def _json(resp: requests.Response, what: str) -> dict:
    if resp.status_code != 200:
        raise ImageError(f"{what}: the registry answered HTTP {resp.status_code}")
    try:
        data = resp.json()
    except ValueError:
        raise ImageError(f"{what}: the registry's answer is not JSON") from None
    if not isinstance(data, dict):
        raise ImageError(f"{what}: the registry's answer is not a JSON object")
    return data


def _short(exc: BaseException) -> str:
    """The innermost cause of a requests error, on one line."""
    text = " ".join(str(exc).split())
    for needle in ("certificate verify failed", "Name or service not known", "Temporary failure in name resolution",
                   "Connection refused", "timed out"):
        if needle in text:
            return text[text.index(needle):].split("'")[0].split(")")[0]
    return text[:200]


# -- unpacking -------------------------------------------------------------------------------------
def install(tarball: Path, package: NpmPackage, root: Path) -> int:
    """Copy the recipe's ``files`` of the package into ``root`` in one pass over the tarball:
    regular files (0755 when the tarball marks them executable, else 0644) and directories (0755).
    Links and special files are skipped, as npm does. Returns the number of files written."""
    real_root = os.path.realpath(root)
    found: set[str] = set()
    written = 0
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            inner = PurePosixPath(*parts[1:]) if len(parts) > 1 else None  # npm drops the top folder
            if inner is None or not (member.isfile() or member.isdir()):
                continue
            if inner.is_absolute() or ".." in inner.parts:
                raise ImageError(f"npm package {package.spec}: unsafe path {member.name!r} in its tarball")
            for source, guest in package.files:
                if source == ".":
                    rel = inner
                elif inner.as_posix() == source:
                    rel = PurePosixPath()
                elif inner.as_posix().startswith(source + "/"):
                    rel = inner.relative_to(source)
                else:
                    continue
                found.add(source)
                target = Path(root, guest.lstrip("/"), rel) if rel.parts else Path(root, guest.lstrip("/"))
                if member.isdir():
                    _make_dirs(root, real_root, target)
                else:
                    _write(tar, member, root, real_root, target, package)
                    written += 1
    missing = [source for source, _ in package.files if source not in found]
    if missing:
        raise ImageError(f"npm package {package.spec} has no '{missing[0]}' (see its file list on the registry)")
    return written


def _make_dirs(root: Path, real_root: str, directory: Path) -> None:
    """Create ``directory`` and missing parents as 0755 (not the builder's umask), inside ``root`` only."""
    missing = []
    probe = directory
    while not probe.exists() and probe != root:
        missing.append(probe)
        probe = probe.parent
    real = os.path.realpath(probe)
    if real != real_root and not real.startswith(real_root + os.sep):
        raise ImageError(f"{directory} leaves the root file system through a symlink")
    if probe.exists() and not probe.is_dir():
        raise ImageError(f"cannot make directory {directory.relative_to(root)}: {probe.relative_to(root)} is a file")
    for path in reversed(missing):
        path.mkdir()
        os.chmod(path, 0o755)


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, real_root: str, target: Path,
           package: NpmPackage) -> None:
    _make_dirs(root, real_root, target.parent)
    if target.is_dir() and not target.is_symlink():
        raise ImageError(f"npm package {package.spec}: /{target.relative_to(root)} is a directory in the image")
    if os.path.lexists(target):
        target.unlink()
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    with source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, 4 << 20)
    os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
