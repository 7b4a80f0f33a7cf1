"""A private apt (own sources, lists, empty dpkg status) so the host system is never changed and the
host's own apt state cannot change what a recipe resolves to."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ImageError
from ..fsutil import file_lock
from .recipe import AptSource
from .tools import run

LISTS_MAX_AGE = 24 * 3600
_INST_RE = re.compile(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)")
_KERNEL_IMAGE_RE = re.compile(r"^linux-image-\d")

Log = Callable[[str], None]


@dataclass(frozen=True, order=True)
class Package:
    name: str
    version: str
    arch: str

    @property
    def filename(self) -> str:
        """The .deb file name apt gives this package (an epoch's ``:`` is quoted as ``%3a``)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    def pin(self) -> str:
        return f"{self.name}={self.version}"


HOST_APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def host_mirrors(roots=HOST_APT_SOURCES) -> dict[str, str]:
    """Suite → mirror URI from the host's apt sources (one-line ``.list`` and deb822 ``.sources``)."""
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files += sorted(p for p in root.iterdir() if p.suffix in (".list", ".sources"))
        elif root.is_file():
            files.append(root)
    found: dict[str, str] = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.split()
                if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"])[0] == "no":
                    continue
                for suite in fields.get("suites", []):
                    for uri in fields.get("uris", [])[:1]:
                        found.setdefault(suite, uri.rstrip("/"))
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.setdefault(words[2], words[1].rstrip("/"))
    return found


def with_host_mirrors(source: AptSource, roots=HOST_APT_SOURCES) -> AptSource:
    """Fill empty mirrors from the host's apt sources; no mirror at all is a clear error."""
    if source.mirror and source.security_mirror:
        return source
    mirrors = host_mirrors(roots)
    mirror = source.mirror or mirrors.get(source.suite, "")
    if not mirror:
        raise ImageError(
            f"no Debian mirror for suite '{source.suite}' in the host's apt sources "
            "(/etc/apt/sources.list*): set apt.mirror in the recipe"
        )
    security = source.security_mirror or mirrors.get(f"{source.suite}-security", "")
    return dataclasses.replace(source, mirror=mirror, security_mirror=security)


class Apt:
    """apt-get/apt-cache against a private state dir under the build cache."""

    def __init__(self, source: AptSource, cache: Path, log: Log | None = None):
        source = with_host_mirrors(source)
        self.source = source
        key = hashlib.sha256(repr((source.mirror, source.security_mirror, source.suite,
                                   source.components, source.architecture)).encode()).hexdigest()[:12]
        self.root = cache / "apt" / f"{source.suite}-{source.architecture}-{key}"
        self.debs = cache / "debs"
        self.log = log or (lambda message: None)

    # -- state ---------------------------------------------------------------------------------
    def _sources_list(self) -> str:
        s = self.source
        opts = f"[arch={s.architecture} signed-by={s.keyring}]"
        comps = " ".join(s.components)
        lines = [f"deb {opts} {s.mirror} {s.suite} {comps}", f"deb {opts} {s.mirror} {s.suite}-updates {comps}"]
        if s.security_mirror:
            lines.append(f"deb {opts} {s.security_mirror} {s.suite}-security {comps}")
        return "\n".join(lines) + "\n"

    def _prepare(self) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d",
                    "etc/apt.conf.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.debs.mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        sources = self.root / "etc/sources.list"
        text = self._sources_list()
        if not sources.exists() or sources.read_text() != text:
            sources.write_text(text)

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::SourceList": r / "etc/sources.list",
            "Dir::Etc::SourceParts": r / "etc/sources.list.d",
            "Dir::Etc::Preferences": r / "etc/preferences",
            "Dir::Etc::PreferencesParts": r / "etc/preferences.d",
            "Dir::State": r,
            "Dir::State::Lists": r / "lists",
            "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache",
            "Dir::Cache::archives": r / "cache/archives",
            # some hosts (Debian's docker images) switch the binary caches off; they save ~1 s a call
            "Dir::Cache::pkgcache": "pkgcache.bin",
            "Dir::Cache::srcpkgcache": "srcpkgcache.bin",
            "APT::Architecture": self.source.architecture,
            "APT::Architectures": self.source.architecture,
            "APT::Install-Recommends": "false",
            "APT::Get::List-Cleanup": "true",
            "Acquire::Languages": "none",
            "Debug::NoLocking": "true",
        }
        if os.geteuid() == 0:
            opts["APT::Sandbox::User"] = "root"
        result: list[str] = []
        for key, value in opts.items():
            result += ["-o", f"{key}={value}"]
        return result

    def _lists_age(self) -> float | None:
        stamps = [p.stat().st_mtime for p in (self.root / "lists").glob("*Release")]
        return time.time() - min(stamps) if stamps else None

    def fingerprint(self) -> str:
        """A hash of the Release files: the package metadata a resolution was made against."""
        digest = hashlib.sha256()
        for release in sorted((self.root / "lists").glob("*Release")):
            digest.update(release.name.encode() + b"\0" + release.read_bytes())
        return digest.hexdigest()

    # -- operations ----------------------------------------------------------------------------
    def update(self, refresh: bool | None = None) -> None:
        """Fetch package lists when missing, older than a day, or when ``refresh`` is True.
        ``refresh=False`` never fetches when lists exist (offline rebuilds)."""
        self._prepare()
        with file_lock(self.root / ".lock"):
            age = self._lists_age()
            if age is not None and (refresh is False or (refresh is None and age < LISTS_MAX_AGE)):
                return
            keyring = Path(self.source.keyring)
            if not keyring.is_file():
                raise ImageError(
                    f"apt keyring {keyring} not found: run 'apt-get install debian-archive-keyring' "
                    "or set apt.keyring in the recipe"
                )
            self.log(f"Fetching package lists for {self.source.suite} from {self.source.mirror}")
            try:
                run(["apt-get", *self.options(), "update", "-q"], "fetching package lists", space_dir=self.root)
            except ImageError as exc:
                if age is None:
                    raise ImageError(f"cannot fetch package lists from {self.source.mirror}: {exc}") from None
                self.log(f"Warning: package lists not refreshed ({exc}); using the cached ones")
            else:
                for release in (self.root / "lists").glob("*Release"):
                    os.utime(release)

    def resolve(self, packages: Iterable[str], what: str = "root file system") -> list[Package]:
        """Exact versions of ``packages`` and their dependency closure (no recommends)."""
        names = list(packages)
        args = ["apt-get", *self.options(), "install", "--simulate", "--no-install-recommends", "-q", *names]
        try:
            result = run(args, f"resolving the {what} packages")
        except ImageError as exc:
            raise self._explain(str(exc), names) from None
        found = []
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            match = _INST_RE.match(line)
            if match:
                found.append(Package(*match.groups()))
        if not found:
            raise ImageError(f"resolving the {what} packages: apt selected nothing for {' '.join(names)}")
        return sorted(found)

    def _explain(self, message: str, names: list[str]) -> ImageError:
        unknown = re.search(r"Unable to locate package (\S+)", message)
        if unknown:
            return ImageError(f"unknown package '{unknown.group(1)}' in Debian {self.source.suite}: fix the recipe")
        candidate = re.search(r"Package '?(\S+?)'? has no installation candidate", message)
        if candidate:
            return ImageError(f"package '{candidate.group(1)}' has no installable version in Debian {self.source.suite}")
        return ImageError(f"{message} (packages: {' '.join(names)})")

    def show(self, name: str) -> dict[str, str]:
        """The candidate's control fields (``apt-cache show``)."""
        try:
            result = run(["apt-cache", *self.options(), "show", "--no-all-versions", name], f"looking up {name}")
        except ImageError:
            raise ImageError(f"unknown kernel package '{name}' in Debian {self.source.suite}: fix kernel.package in the recipe") from None
        fields: dict[str, str] = {}
        key = ""
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            if line[0].isspace() and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields:
            raise ImageError(f"unknown kernel package '{name}' in Debian {self.source.suite}: fix kernel.package in the recipe")
        return fields

    def kernel(self, name: str) -> Package:
        """The versioned ``linux-image-<abi>-<flavour>`` package behind a kernel (meta)package."""
        fields = self.show(name)
        for _ in range(3):
            if _KERNEL_IMAGE_RE.match(fields["Package"]) and "unsigned" not in fields["Package"]:
                return Package(fields["Package"], fields["Version"], fields.get("Architecture", "amd64"))
            deps = [alt.strip().split()[0] for dep in fields.get("Depends", "").split(",") for alt in dep.split("|")]
            images = [dep for dep in deps if _KERNEL_IMAGE_RE.match(dep)]
            if not images:
                break
            fields = self.show(images[0])
        raise ImageError(f"'{name}' is not a Linux kernel image package: fix kernel.package in the recipe")

    def download(self, packages: Iterable[Package]) -> dict[Package, Path]:
        """Every package's .deb from the cache, fetching the missing ones (apt checks their hashes)."""
        self._prepare()
        wanted = {pkg: self.debs / pkg.filename for pkg in packages}
        missing = sorted(pkg for pkg, path in wanted.items() if not path.is_file())
        if missing:
            self.log(f"Downloading {len(missing)} packages")
            partial = self.debs / f".partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            try:
                try:
                    run(["apt-get", *self.options(), "download", "-q", *[p.pin() for p in missing]],
                        "downloading packages", cwd=partial, space_dir=self.debs)
                except ImageError as exc:
                    raise self._explain(str(exc), [p.pin() for p in missing]) from None
                for pkg in missing:
                    fetched = partial / pkg.filename
                    if not fetched.is_file():
                        raise ImageError(f"downloading packages: apt did not deliver {pkg.filename}")
                    os.replace(fetched, wanted[pkg])
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return wanted
