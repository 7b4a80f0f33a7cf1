"""The one place that knows where things live: ``~/.core``, the images dir, the image name."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_GO_OS = {"linux": "linux", "darwin": "darwin", "win32": "windows", "cygwin": "windows"}
_GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def go_os(system: str | None = None) -> str:
    """This OS in Go's spelling (``linux``, ``darwin``, ``windows``)."""
    system = system if system is not None else sys.platform
    for prefix, name in _GO_OS.items():
        if system.startswith(prefix):
            return name
    return system


def go_arch(machine: str | None = None) -> str:
    """This CPU architecture in Go's spelling (``amd64``, ``arm64``)."""
    if machine is None:  # os.uname is what platform.machine() reads, without importing platform
        machine = os.uname().machine if hasattr(os, "uname") else __import__("platform").machine()
    return _GO_ARCH.get(machine.lower(), machine.lower())


def image_name(system: str | None = None, machine: str | None = None) -> str:
    """Platform image file name, e.g. ``core-devops-linux-amd64.qcow2``."""
    return f"core-devops-{go_os(system)}-{go_arch(machine)}.qcow2"


def core_home() -> Path:
    """The ``~/.core`` root: ``$CORE_HOME`` when set, else ``$HOME/.core``."""
    override = os.environ.get("CORE_HOME", "")
    if override:
        return Path(override).expanduser()
    return Path(os.path.expanduser("~")) / ".core"


def images_dir() -> Path:
    """Where images and their manifest live: ``$CORE_IMAGES_DIR`` or ``~/.core/images``."""
    override = os.environ.get("CORE_IMAGES_DIR", "")
    if override:
        return Path(override).expanduser()
    return core_home() / "images"


def image_path() -> Path:
    """The platform image inside :func:`images_dir`."""
    return images_dir() / image_name()


def manifest_path() -> Path:
    return images_dir() / "manifest.json"


def config_path() -> Path:
    """``~/.core/config.yaml``."""
    return core_home() / "config.yaml"


def known_hosts_path() -> Path:
    """``~/.core/known_hosts``: the only file the tool trusts guest host keys from."""
    return core_home() / "known_hosts"


def vms_dir() -> Path:
    """One folder per VM lives here (record, sockets, overlay, keys, serial log)."""
    return core_home() / "vms"


def cache_dir() -> Path:
    """Downloaded packages and build caches: ``$CORE_CACHE_DIR`` or ``~/.core/cache``."""
    override = os.environ.get("CORE_CACHE_DIR", "")
    if override:
        return Path(override).expanduser()
    return core_home() / "cache"
