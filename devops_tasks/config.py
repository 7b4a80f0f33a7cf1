"""``~/.core/config.yaml``: typed config with defaults, partial files and strict validation."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import paths
from .errors import ConfigError

VALID_SOURCES = ("auto", "github", "cdn", "registry", "build")
# vm.network: QEMU user networking as is, or restrict=on (see machine/qemu.py, which takes them from here)
NETWORK_MODES = ("open", "restricted")
# Where a restricted VM's claude may go through the host proxy (config claude.allow; --allow adds)
DEFAULT_ALLOW = [
    "api.anthropic.com",
    "pypi.org", "files.pythonhosted.org",
    "registry.npmjs.org",
    "github.com", "*.github.com", "*.githubusercontent.com",
]

DEFAULTS: dict[str, Any] = {
    "version": 1,
    "images": {
        "source": "auto",
        "github": {"repo": "host-uk/core-images", "api_url": "https://api.github.com"},
        "registry": {"image": "ghcr.io/host-uk/core-devops"},
        "cdn": {"url": ""},
        "build": {"recipe": "minimal"},
        "require_checksum": True,
    },
    "vm": {
        "name": "core-dev",
        "memory": 4096,
        "cpus": 2,
        "ssh_port": 2222,
        "accel": "",
        "boot_timeout": 120,
        "network": "open",
        "mount_type": "virtiofs",
        "trust_host_ca": True,
        "ca_bundle": "",
        "mount_idle_timeout": 0,
    },
    "claude": {
        "allow": DEFAULT_ALLOW,
        "api_url": "https://api.anthropic.com",
    },
}


@dataclass
class GitHubConfig:
    repo: str = DEFAULTS["images"]["github"]["repo"]
    api_url: str = DEFAULTS["images"]["github"]["api_url"]


@dataclass
class RegistryConfig:
    image: str = DEFAULTS["images"]["registry"]["image"]


@dataclass
class CDNConfig:
    url: str = DEFAULTS["images"]["cdn"]["url"]


@dataclass
class BuildConfig:
    recipe: str = DEFAULTS["images"]["build"]["recipe"]


@dataclass
class ImagesConfig:
    source: str = DEFAULTS["images"]["source"]
    github: GitHubConfig = field(default_factory=GitHubConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    cdn: CDNConfig = field(default_factory=CDNConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    # False: an image whose source publishes no sha256 installs, recorded as unverified
    require_checksum: bool = DEFAULTS["images"]["require_checksum"]


@dataclass
class VMConfig:
    """Defaults for ``vm.boot`` when a flag is not given (our addition to the original's config)."""

    name: str = DEFAULTS["vm"]["name"]
    memory: int = DEFAULTS["vm"]["memory"]
    cpus: int = DEFAULTS["vm"]["cpus"]
    ssh_port: int = DEFAULTS["vm"]["ssh_port"]
    accel: str = DEFAULTS["vm"]["accel"]
    boot_timeout: float = DEFAULTS["vm"]["boot_timeout"]
    network: str = DEFAULTS["vm"]["network"]  # open | restricted
    mount_type: str = DEFAULTS["vm"]["mount_type"]  # virtiofs | sshfs: how /app reaches the project
    # hand the guest the CA certificates the host trusts beyond the public ones (see handoff.py)
    trust_host_ca: bool = DEFAULTS["vm"]["trust_host_ca"]
    ca_bundle: str = DEFAULTS["vm"]["ca_bundle"]  # "" = the host's system bundle
    # seconds the project mount stays after the command that used it (0: it ends with the command)
    mount_idle_timeout: float = DEFAULTS["vm"]["mount_idle_timeout"]

    def check(self, origin: str) -> None:
        """Values a VM cannot start with are errors naming ``origin`` and the key."""
        if not 1 <= self.ssh_port <= 65535:
            raise ConfigError(f"{origin}: vm.ssh_port: {self.ssh_port} is not a TCP port (1 to 65535)")
        for key in ("memory", "cpus"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{origin}: vm.{key}: must be positive, not {getattr(self, key)}")
        if self.boot_timeout <= 0:
            raise ConfigError(f"{origin}: vm.boot_timeout: must be positive, not {self.boot_timeout}")
        check_network_mode(self.network, f"{origin}: vm.network")
        check_mount_type(self.mount_type, f"{origin}: vm.mount_type")
        if not 0 <= self.mount_idle_timeout <= 86400:
            raise ConfigError(f"{origin}: vm.mount_idle_timeout: {self.mount_idle_timeout:g} is not a number of "
                              "seconds from 0 (the mount ends with the command) to 86400")


def check_network_mode(mode: str, where: str) -> str:
    """``open`` or ``restricted``; anything else is an error naming ``where``."""
    if mode not in NETWORK_MODES:
        raise ConfigError(f"{where}: unknown network mode {mode!r} (valid: {', '.join(NETWORK_MODES)})")
    return mode


MOUNT_TYPES = ("virtiofs", "sshfs")
_NO_9P = ("the images' kernel (linux-image-cloud-amd64) is built without 9p (CONFIG_9P_FS unset); "
          "use virtiofs or sshfs")


def check_mount_type(mount_type: str, where: str) -> str:
    """``virtiofs`` or ``sshfs``; anything else (``9p`` included) is a one-line error naming ``where``."""
    if mount_type == "9p":
        raise ConfigError(f"{where}: mount type '9p' is not available: {_NO_9P}")
    if mount_type not in MOUNT_TYPES:
        raise ConfigError(f"{where}: unknown mount type {mount_type!r} (valid: {', '.join(MOUNT_TYPES)})")
    return mount_type


@dataclass
class ClaudeConfig:
    """The restricted network of ``inv claude``: where the host proxy lets the VM go, and where its
    API endpoint forwards (adding the credentials the VM never sees)."""

    allow: list[str] = field(default_factory=lambda: list(DEFAULT_ALLOW))
    api_url: str = DEFAULTS["claude"]["api_url"]

    def check(self, origin: str) -> None:
        if self.allow == DEFAULT_ALLOW and self.api_url == DEFAULTS["claude"]["api_url"]:
            return  # the defaults are valid (a unit test checks): every task but claude skips the parsers
        from .proxy.allowlist import AllowlistError, parse_entry
        from .proxy.upstream import Upstream

        for entry in self.allow:
            try:
                parse_entry(entry)
            except AllowlistError as exc:
                raise ConfigError(f"{origin}: claude.allow: {exc}") from None
        try:
            Upstream.from_url(self.api_url)
        except ValueError as exc:
            raise ConfigError(f"{origin}: claude.api_url: {exc}") from None


def _word_list(value: Any, where: str) -> list[str]:
    """A YAML list of strings, or one string of comma/space separated words (an ``INVOKE_CORE_*`` variable)."""
    if isinstance(value, str):
        return [word for word in value.replace(",", " ").split() if word]
    if isinstance(value, (list, tuple)) and all(isinstance(item, (str, int)) for item in value):
        return [str(item).strip() for item in value if str(item).strip()]
    raise ConfigError(f"{where}: expected a list of host[:port] entries, got {value!r}")


@dataclass
class Config:
    version: int = 1
    images: ImagesConfig = field(default_factory=ImagesConfig)
    vm: VMConfig = field(default_factory=VMConfig)
    claude: ClaudeConfig = field(default_factory=ClaudeConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "config") -> "Config":
        """Build from a (possibly partial) mapping: absent keys keep defaults, unknown keys are ignored
        (the file is shared with other tools), wrong types are errors naming ``origin`` and the key."""
        merged = merge(DEFAULTS, _known(data, DEFAULTS))
        images = merged["images"]
        vm = merged["vm"]
        claude = merged["claude"]
        source = str(images["source"]).strip().lower()
        if source not in VALID_SOURCES:
            raise ConfigError(
                f"{origin}: images.source: unknown source {images['source']!r} "
                f"(valid: {', '.join(VALID_SOURCES)})"
            )
        try:
            config = cls(
                version=int(merged["version"]),
                images=ImagesConfig(
                    source=source,
                    github=GitHubConfig(**{k: str(v) for k, v in images["github"].items()}),
                    registry=RegistryConfig(image=str(images["registry"]["image"])),
                    cdn=CDNConfig(url=str(images["cdn"]["url"] or "")),
                    build=BuildConfig(recipe=str(images["build"]["recipe"])),
                    require_checksum=_bool(images["require_checksum"], f"{origin}: images.require_checksum"),
                ),
                vm=VMConfig(
                    name=str(vm["name"]),
                    memory=int(vm["memory"]),
                    cpus=int(vm["cpus"]),
                    ssh_port=int(vm["ssh_port"]),
                    accel=str(vm["accel"] or ""),
                    boot_timeout=float(vm["boot_timeout"]),
                    network=str(vm["network"] or "").strip().lower(),
                    mount_type=str(vm["mount_type"] or "").strip().lower(),
                    trust_host_ca=_bool(vm["trust_host_ca"], f"{origin}: vm.trust_host_ca"),
                    ca_bundle=str(vm["ca_bundle"] or ""),
                    mount_idle_timeout=float(vm["mount_idle_timeout"] or 0),
                ),
                claude=ClaudeConfig(
                    allow=_word_list(claude["allow"], f"{origin}: claude.allow"),
                    api_url=str(claude["api_url"] or ""),
                ),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: invalid value: {exc}") from exc
        config.vm.check(origin)
        config.claude.check(origin)
        return config


def _bool(value: Any, where: str) -> bool:
    """A YAML boolean, or its spelling in a string (an ``INVOKE_CORE_*`` variable)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _known(data: Any, shape: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Keep only keys the shape knows; a section that is not a mapping is an error."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, default in shape.items():
        if key not in data:
            continue
        value = data[key]
        name = f"{where}.{key}" if where else key
        if isinstance(default, Mapping):
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
            out[key] = _known(value, default, name)
        elif value is not None:
            out[key] = value
    return out


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: nested mappings merge key by key, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_config() -> Config:
    return Config()


def config_path() -> Path:
    return paths.config_path()


def yaml_error(path: Path | str, exc: yaml.YAMLError) -> ConfigError:
    """One wording for every YAML file the tool reads: the file, the line and column, the problem."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "syntax error"
        if exc.context and exc.problem:
            problem += f" ({exc.context})"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return ConfigError(f"{path}: invalid YAML{where}: {problem}")
    return ConfigError(f"{path}: invalid YAML: {exc}")


def read_config_file(path: Path | None = None) -> dict[str, Any]:
    """The raw mapping in the config file ({} when missing); errors name the file and line."""
    path = Path(path) if path is not None else paths.config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise yaml_error(path, exc) from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return _known(data, DEFAULTS)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_config(path: Path | None = None) -> Config:
    """Defaults overlaid with ``~/.core/config.yaml`` (missing file → defaults)."""
    path = Path(path) if path is not None else paths.config_path()
    return Config.from_dict(read_config_file(path), origin=str(path))


def env_float(name: str, default: float) -> float:
    """A number of seconds from the environment variable ``name`` (unset or empty: ``default``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"${name}: expected a number of seconds, got {text!r}") from None


def env_int(name: str, default: int) -> int:
    """A whole number from the environment variable ``name`` (unset or empty: ``default``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"${name}: expected a whole number, got {text!r}") from None
