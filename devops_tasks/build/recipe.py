"""The image recipe: a small YAML file, validated strictly so a typo is an error, not a silent default.

Every message names the recipe file and the field at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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


_TOP = ("name", "description", "apt", "kernel", "packages", "modules", "services", "files",
        "exclude", "shell", "hostname", "disk_size", "python_bytecode")
_APT = ("mirror", "security_mirror", "suite", "components", "architecture", "keyring")
_KERNEL = ("package", "cmdline")
_FILE = ("path", "content", "source", "mode")


def _apt(source: Path, data: Any) -> AptSource:
    if data is None:
        return AptSource()
    f = _Fields(source, data, "apt")
    defaults = AptSource()
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


def _kernel(source: Path, data: Any) -> Kernel:
    if isinstance(data, str):
        data = {"package": data}
    f = _Fields(source, data, "kernel")
    package = f.pop("package")
    cmdline = f.pop("cmdline", DEFAULT_CMDLINE)
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
        pure = PurePosixPath(path)
        if not pure.is_absolute() or ".." in pure.parts or len(pure.parts) < 2:
            raise f.error(f"field '{where}.path' must be an absolute file path inside the guest, got {_show(path)}")
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
        if any(other.path == str(pure) for other in result):
            raise f.error(f"field '{where}.path': '{pure}' listed twice")
        result.append(ExtraFile(str(pure), payload, mode))
    return tuple(result)


def parse_recipe(text: str, source: Path, default_name: str = "") -> Recipe:
    """Build a :class:`Recipe` from YAML text; ``source`` is only used in messages and for
    resolving ``files[].source`` paths."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(source, exc) from None
    if data is None:
        raise ConfigError(f"{source}: the recipe is empty")
    f = _Fields(source, data, "")
    name = f.pop("name", default_name or source.stem)
    if not _SERVICE_RE.match(name):
        raise f.error(f"field 'name': invalid recipe name {_show(name)}")
    description = f.pop("description", "")
    apt = _apt(source, f.pop("apt", None, kind=dict))
    kernel = _kernel(source, f.pop("kernel", kind=(dict, str)))
    packages = f.names("packages", _PACKAGE_RE, "package name")
    if not packages:
        raise f.error("field 'packages' must list at least one package")
    modules = f.names("modules", _MODULE_RE, "module name", ())
    services = f.names("services", _SERVICE_RE, "service name", BUILTIN_SERVICES)
    files = _files(source, f.pop("files", None, kind=list))
    exclude = tuple(f.pop("exclude", [], kind=list))
    for pattern in exclude:
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            raise f.error(f"field 'exclude': patterns must be absolute paths like /usr/share/man/*, got {_show(pattern)}")
    shell = f.pop("shell", "/bin/sh")
    if not shell.startswith("/"):
        raise f.error(f"field 'shell' must be an absolute path, got {_show(shell)}")
    hostname = f.pop("hostname", "devops")
    if not _HOSTNAME_RE.match(hostname):
        raise f.error(f"field 'hostname': invalid host name {_show(hostname)}")
    raw_size = f.pop("disk_size", DEFAULT_DISK_SIZE, kind=(int, str))
    try:
        disk_size = parse_size(raw_size)
    except ValueError:
        raise f.error(f"field 'disk_size' must be a size like 8G or 512M, got {_show(raw_size)}") from None
    if disk_size < MIN_DISK_SIZE:
        raise f.error(f"field 'disk_size' must be at least 256M, got {_show(raw_size)}")
    python_bytecode = f.pop("python_bytecode", True, kind=bool)
    f.finish(_TOP)
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
        description=description, apt=apt, python_bytecode=python_bytecode,
    )


def load_recipe_file(path: Path) -> Recipe:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_recipe(text, Path(path))
