"""The image recipe: a small YAML file, validated strictly so a typo is an error, not a silent default.

Every message names the recipe file and the field at fault. A recipe may ``extends:`` another one
(by name or path): it starts from that recipe, adds to its lists and replaces its other fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ..config import yaml_error
from ..errors import ConfigError

BUILTIN_SERVICES = ("acpid", "network", "ssh")
SERVICE_DIR = "/usr/lib/devops-tasks/services"
DEFAULT_CMDLINE = "console=ttyS0 quiet"
DEFAULT_DISK_SIZE = 8 << 30
MIN_DISK_SIZE = 256 << 20

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.\-]+$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_SERVICE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$")
_NPM_NAME_RE = re.compile(r"^(@[a-z0-9][a-z0-9._~\-]*/)?[a-z0-9][a-z0-9._~\-]*$")
# an exact semver: no ranges (^ ~ >= x *), no tags (latest)
_NPM_VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.\-]+)?(\+[0-9A-Za-z.\-]+)?$")
_SRI_SHA512_RE = re.compile(r"^sha512-[A-Za-z0-9+/]{86}==$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class AptSource:
    """Where packages come from. An empty mirror means the one the host's apt uses for the suite
    (so a build goes wherever this machine's apt is allowed to go)."""

    mirror: str = ""
    security_mirror: str = ""
    suite: str = "bookworm"
    components: tuple[str, ...] = ("main",)
    architecture: str = "amd64"
    keyring: str = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Kernel:
    package: str
    cmdline: str = DEFAULT_CMDLINE


@dataclass(frozen=True)
class ExtraFile:
    """A file written into the root file system (``content`` inline, or read from ``source``)."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class NpmPackage:
    """Files from one npm package at an exact version: ``files`` maps a path in the package (``.``
    for all of it) to where it goes in the guest. ``integrity`` (optional) pins the tarball's
    sha512 in the recipe too; the registry's must match it."""

    name: str
    version: str
    files: tuple[tuple[str, str], ...]
    integrity: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class Recipe:
    name: str
    path: Path
    kernel: Kernel
    packages: tuple[str, ...]
    modules: tuple[str, ...] = ()
    services: tuple[str, ...] = BUILTIN_SERVICES
    files: tuple[ExtraFile, ...] = ()
    exclude: tuple[str, ...] = ()
    shell: str = "/bin/sh"
    hostname: str = "devops"
    disk_size: int = DEFAULT_DISK_SIZE
    description: str = ""
    python_bytecode: bool = True
    apt: AptSource = field(default_factory=AptSource)
    npm: tuple[NpmPackage, ...] = ()
    npm_registry: str = ""

    def identity(self) -> dict:
        """Everything that shapes the image, in a JSON-able form (hashed into the version)."""
        import hashlib

        return {
            "name": self.name,
            "apt": {
                "mirror": self.apt.mirror,
                "security_mirror": self.apt.security_mirror,
                "suite": self.apt.suite,
                "components": list(self.apt.components),
                "architecture": self.apt.architecture,
            },
            "kernel": {"package": self.kernel.package, "cmdline": self.kernel.cmdline},
            "packages": sorted(self.packages),
            "modules": list(self.modules),
            "services": list(self.services),
            "files": [
                {"path": f.path, "mode": f.mode, "sha256": hashlib.sha256(f.data).hexdigest()} for f in self.files
            ],
            "exclude": list(self.exclude),
            "npm": [{"name": n.name, "version": n.version, "files": [list(f) for f in n.files]} for n in self.npm],
            "shell": self.shell,
            "hostname": self.hostname,
            "disk_size": self.disk_size,
            "python_bytecode": self.python_bytecode,
        }


class _Fields:
    """Pops fields off one YAML mapping; whatever is left over is an unknown field."""

    def __init__(self, source: Path, data: Any, where: str):
        self.source = source
        self.where = where
        if not isinstance(data, dict):
            raise self.error(f"{where or 'the recipe'} must be a mapping")
        self.data = dict(data)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def pop(self, key: str, default: Any = ..., kind: type | tuple = str) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.error(f"missing required field '{self.name(key)}'")
            return default
        value = self.data.pop(key)
        if value is None and default is not ...:
            return default
        if kind is str and not isinstance(value, str):
            raise self.error(f"field '{self.name(key)}' must be a string, got {_show(value)}")
        if kind is not str and not isinstance(value, kind):
            raise self.error(f"field '{self.name(key)}' has the wrong type ({_show(value)})")
        return value

    def names(self, key: str, pattern: re.Pattern, what: str, default: Any = ...) -> tuple[str, ...]:
        value = self.pop(key, default, kind=(list, tuple))
        result = []
        for item in value:
            if not isinstance(item, str) or not pattern.match(item):
                raise self.error(f"field '{self.name(key)}': invalid {what} {_show(item)}")
            if item in result:
                raise self.error(f"field '{self.name(key)}': {what} '{item}' listed twice")
            result.append(item)
        return tuple(result)

    def finish(self, known: tuple[str, ...]) -> None:
        if self.data:
            key = sorted(map(str, self.data))[0]
            raise self.error(f"unknown field '{self.name(key)}' (known: {', '.join(known)})")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_size(text: Any) -> int:
    """``8G``, ``512M``, ``8GiB`` or a byte count -> bytes; ValueError when not a size."""
    if isinstance(text, bool):
        raise ValueError(text)
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(text)
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(match.group(1)) * _UNITS[unit]


_TOP = ("name", "extends", "description", "apt", "kernel", "packages", "modules", "services", "files",
        "npm", "npm_registry", "exclude", "shell", "hostname", "disk_size", "python_bytecode")
_APT = ("mirror", "security_mirror", "suite", "components", "architecture", "keyring")
_KERNEL = ("package", "cmdline")
_FILE = ("path", "content", "source", "mode")
_NPM = ("name", "version", "files", "integrity")


def _apt(source: Path, data: Any, defaults: AptSource) -> AptSource:
    if data is None:
        return defaults
    f = _Fields(source, data, "apt")
    result = AptSource(
        mirror=f.pop("mirror", defaults.mirror),
        security_mirror=f.pop("security_mirror", defaults.security_mirror),
        suite=f.pop("suite", defaults.suite),
        components=f.names("components", re.compile(r"^[a-z0-9\-]+$"), "component", defaults.components),
        architecture=f.pop("architecture", defaults.architecture),
        keyring=f.pop("keyring", defaults.keyring),
    )
    f.finish(_APT)
    if result.architecture != "amd64":
        raise f.error(f"field 'apt.architecture': only amd64 guests can be built, not '{result.architecture}'")
    return result


def _kernel(source: Path, data: Any, defaults: Kernel | None) -> Kernel:
    if isinstance(data, str):
        data = {"package": data}
    f = _Fields(source, data, "kernel")
    package = f.pop("package", ... if defaults is None else defaults.package)
    cmdline = f.pop("cmdline", DEFAULT_CMDLINE if defaults is None else defaults.cmdline)
    f.finish(_KERNEL)
    if not _PACKAGE_RE.match(package):
        raise f.error(f"field 'kernel.package': invalid package name {_show(package)}")
    if "console=ttyS0" not in cmdline.split():
        raise f.error("field 'kernel.cmdline' must contain console=ttyS0 (the guest contract's serial console)")
    if any(word.startswith(("root=", "init=")) for word in cmdline.split()):
        raise f.error("field 'kernel.cmdline': root= and init= are set by the builder, remove them")
    return Kernel(package, cmdline)


def _mode(f: _Fields, value: Any, where: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777:
        if value > 0o777:  # "mode: 755" is decimal 755 (0o1363) in YAML, not rwxr-xr-x
            raise f.error(f"field '{where}.mode': write the mode with a leading 0 (0{value}) or quoted ('04755')")
        return value
    raise f.error(f"field '{where}.mode' must be an octal mode like 0644, got {_show(value)}")


def _guest_path(f: _Fields, path: Any, where: str) -> str:
    pure = PurePosixPath(path) if isinstance(path, str) else None
    if pure is None or not pure.is_absolute() or ".." in pure.parts or len(pure.parts) < 2:
        raise f.error(f"field '{where}' must be an absolute file path inside the guest, got {_show(path)}")
    return str(pure)


def _files(source: Path, data: Any) -> tuple[ExtraFile, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"{source}: field 'files' must be a list of {{path, content|source, mode}}")
    result: list[ExtraFile] = []
    for index, item in enumerate(data):
        where = f"files[{index}]"
        f = _Fields(source, item, where)
        path = f.pop("path")
        content = f.pop("content", None)
        src = f.pop("source", None)
        raw_mode = f.pop("mode", None, kind=(int, str))
        mode = 0o644 if raw_mode is None else _mode(f, raw_mode, where)
        f.finish(_FILE)
        path = _guest_path(f, path, f"{where}.path")
        if (content is None) == (src is None):
            raise f.error(f"{where}: give exactly one of 'content' or 'source'")
        if src is not None:
            file_path = (source.parent / src).resolve()
            try:
                payload = file_path.read_bytes()
            except OSError as exc:
                raise f.error(f"field '{where}.source': cannot read {file_path}: {exc.strerror}") from None
        else:
            payload = content.encode("utf-8")
        if any(other.path == path for other in result):
            raise f.error(f"field '{where}.path': '{path}' listed twice")
        result.append(ExtraFile(path, payload, mode))
    return tuple(result)


def _npm(source: Path, data: Any) -> tuple[NpmPackage, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"{source}: field 'npm' must be a list of {{name, version, files}}")
    result: list[NpmPackage] = []
    for index, item in enumerate(data):
        where = f"npm[{index}]"
        f = _Fields(source, item, where)
        name = f.pop("name")
        version = f.pop("version", kind=(str, int, float))
        files = f.pop("files", kind=dict)
        integrity = f.pop("integrity", "")
        f.finish(_NPM)
        if len(name) > 214 or not _NPM_NAME_RE.match(name):
            raise f.error(f"field '{where}.name': invalid npm package name {_show(name)}")
        if not isinstance(version, str):
            raise f.error(f"field '{where}.version': write the exact version as a string, e.g. \"1.2.3\", got {_show(version)}")
        if not _NPM_VERSION_RE.match(version):
            raise f.error(f"field '{where}.version': {_show(version)} is not an exact version (ranges and tags "
                          "like ^1.2.3, ~1.2, 1.x, >=1, latest are not allowed): write e.g. 1.2.3")
        if integrity and not _SRI_SHA512_RE.match(integrity):
            raise f.error(f"field '{where}.integrity' must be the registry's sha512 integrity "
                          f"(sha512-<88 base64 characters>), got {_show(integrity)}")
        if not files:
            raise f.error(f"field '{where}.files' must map at least one path in the package to a guest path")
        pairs: list[tuple[str, str]] = []
        for inner, target in files.items():
            pure = PurePosixPath(inner) if isinstance(inner, str) else None
            if pure is None or pure.is_absolute() or ".." in pure.parts or not inner.strip():
                raise f.error(f"field '{where}.files': {_show(inner)} must be a path inside the package "
                              "(relative, like bin/tool, or . for all of it)")
            guest = _guest_path(f, target, f"{where}.files.{inner}")
            if any(guest == other for _, other in pairs):
                raise f.error(f"field '{where}.files': '{guest}' is the target of two paths")
            pairs.append((str(pure), guest))
        if any(other.name == name for other in result):
            raise f.error(f"field '{where}.name': '{name}' listed twice")
        result.append(NpmPackage(name, version, tuple(pairs), integrity))
    return tuple(result)


def _merged(base: tuple, extra: tuple, key=lambda item: item) -> tuple:
    """``base`` then ``extra``; an item of ``extra`` replaces the base item with the same key."""
    replaced = {key(item): item for item in extra}
    kept = tuple(replaced.pop(key(item), item) for item in base)
    return kept + tuple(item for item in extra if key(item) in replaced)


def recipe_dirs() -> list[Path]:
    """The repo's ``config/`` (source checkout) first, then the installed ``devops_tasks.recipes``."""
    dirs = [Path(__file__).resolve().parents[2] / "config"]
    try:
        dirs.append(Path(str(resources.files("devops_tasks.recipes"))))
    except (ModuleNotFoundError, TypeError):
        pass
    return [d for d in dirs if d.is_dir()]


def recipe_names() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def _is_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def recipe_path(name: str) -> Path:
    """Where recipe ``name`` lives; a name ending in .yaml/.yml or holding a ``/`` is a file path."""
    if _is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: recipe file not found")
        return path
    for directory in recipe_dirs():
        candidate = directory / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = ", ".join(recipe_names()) or "none"
    raise ConfigError(f"unknown image recipe '{name}' (available: {known}; or give a path to a .yaml file)")


def _parent(f: _Fields, value: Any, chain: tuple[Path, ...]) -> "Recipe":
    """The recipe ``extends`` names: a path relative to this file, or a name looked up beside this
    file first, then among the built-in recipes."""
    if not isinstance(value, str) or not value.strip():
        raise f.error(f"field 'extends' must name a recipe or a .yaml file, got {_show(value)}")
    if _is_path(value):
        path = (f.source.parent / Path(value).expanduser()).resolve()
    else:
        beside = f.source.parent / f"{value}.yaml"
        try:
            path = beside.resolve() if beside.is_file() else recipe_path(value).resolve()
        except ConfigError as exc:
            raise f.error(f"field 'extends': {exc}") from None
    if path in chain:
        loop = " -> ".join(p.name for p in (*chain, path))
        raise f.error(f"field 'extends': recipes extend each other in a loop ({loop})")
    if not path.is_file():
        raise f.error(f"field 'extends': recipe file {path} not found")
    return load_recipe_file(path, chain)


def parse_recipe(text: str, source: Path, default_name: str = "", chain: tuple[Path, ...] = ()) -> Recipe:
    """Build a :class:`Recipe` from YAML text; ``source`` is used in messages and for resolving
    ``files[].source`` and ``extends`` paths."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(source, exc) from None
    if data is None:
        raise ConfigError(f"{source}: the recipe is empty")
    f = _Fields(source, data, "")
    base = _parent(f, f.pop("extends"), (*chain, Path(source).resolve())) if "extends" in f.data else None
    name = f.pop("name", default_name or source.stem)
    if not _SERVICE_RE.match(name):
        raise f.error(f"field 'name': invalid recipe name {_show(name)}")
    description = f.pop("description", "")
    apt = _apt(source, f.pop("apt", None, kind=dict), base.apt if base else AptSource())
    kernel = _kernel(source, f.pop("kernel", ... if base is None else None, kind=(dict, str)) or {},
                     base.kernel if base else None)
    packages = f.names("packages", _PACKAGE_RE, "package name", ... if base is None else ())
    if base is None and not packages:
        raise f.error("field 'packages' must list at least one package")
    modules = f.names("modules", _MODULE_RE, "module name", ())
    services = f.names("services", _SERVICE_RE, "service name", base.services if base else BUILTIN_SERVICES)
    files = _files(source, f.pop("files", None, kind=list))
    npm = _npm(source, f.pop("npm", None, kind=list))
    npm_registry = f.pop("npm_registry", base.npm_registry if base else "")
    if npm_registry and not re.match(r"^https?://[^/\s]+", npm_registry):
        raise f.error(f"field 'npm_registry' must be an http(s) URL, got {_show(npm_registry)}")
    exclude = tuple(f.pop("exclude", [], kind=list))
    for pattern in exclude:
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            raise f.error(f"field 'exclude': patterns must be absolute paths like /usr/share/man/*, got {_show(pattern)}")
    shell = f.pop("shell", base.shell if base else "/bin/sh")
    if not shell.startswith("/"):
        raise f.error(f"field 'shell' must be an absolute path, got {_show(shell)}")
    hostname = f.pop("hostname", base.hostname if base else "devops")
    if not _HOSTNAME_RE.match(hostname):
        raise f.error(f"field 'hostname': invalid host name {_show(hostname)}")
    raw_size = f.pop("disk_size", base.disk_size if base else DEFAULT_DISK_SIZE, kind=(int, str))
    try:
        disk_size = parse_size(raw_size)
    except ValueError:
        raise f.error(f"field 'disk_size' must be a size like 8G or 512M, got {_show(raw_size)}") from None
    if disk_size < MIN_DISK_SIZE:
        raise f.error(f"field 'disk_size' must be at least 256M, got {_show(raw_size)}")
    python_bytecode = f.pop("python_bytecode", base.python_bytecode if base else True, kind=bool)
    f.finish(_TOP)
    if base is not None:
        packages = _merged(base.packages, packages)
        modules = _merged(base.modules, modules)
        files = _merged(base.files, files, key=lambda item: item.path)
        npm = _merged(base.npm, npm, key=lambda item: item.name)
        exclude = _merged(base.exclude, exclude)
    provided = {PurePosixPath(x.path).name for x in files if str(PurePosixPath(x.path).parent) == SERVICE_DIR}
    for service in services:
        if service not in BUILTIN_SERVICES and service not in provided:
            raise f.error(
                f"field 'services': unknown service '{service}' (built in: {', '.join(BUILTIN_SERVICES)}; "
                f"or add a file at {SERVICE_DIR}/{service})"
            )
    return Recipe(
        name=name, path=source, kernel=kernel, packages=packages, modules=modules, services=services,
        files=files, exclude=exclude, shell=shell, hostname=hostname, disk_size=disk_size,
        description=description, apt=apt, python_bytecode=python_bytecode, npm=npm, npm_registry=npm_registry,
    )


def load_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> Recipe:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_recipe(text, Path(path), chain=chain)
