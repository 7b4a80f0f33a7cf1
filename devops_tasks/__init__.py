"""devops-tasks: a disposable Linux dev VM (QEMU), driven from Invoke or from Python.

The library works on its own (``DevOps``, ``ImageManager``, ...); the Invoke collections
(``devops_tasks.vm``, ``.image``, ``.shell``, ``.test``, ``.serve``, ``.claude``, and ``ns`` for all)
are thin tasks on top. Collections and heavier parts are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def _cache_bytecode() -> None:
    """Let Python write this package's .pyc files again when Invoke turned that off.

    ``inv`` sets ``sys.dont_write_bytecode`` (unless ``--write-pyc``) so that loading tasks.py leaves
    no compiled file in a project; by the time this package is imported tasks.py is compiled, but
    the flag stays, so an editable install (no .pyc until something writes them) compiled every
    module of this package again at each ``inv vm.status``: about a fifth of its time here. The
    interpreter's own setting (``-B``, ``PYTHONDONTWRITEBYTECODE``) is kept: ``sys.flags`` has it.
    """
    if sys.dont_write_bytecode and not sys.flags.dont_write_bytecode:
        sys.dont_write_bytecode = False


_cache_bytecode()

from .config import Config, config_path, default_config, load_config
from .devops import DevOps
from .errors import DevopsError
from .manifest import ImageInfo, Manifest
from .options import (
    BootOptions,
    ClaudeOptions,
    DevStatus,
    ServeOptions,
    ShellOptions,
    TestOptions,
    default_boot_options,
)
from .paths import image_name, image_path, images_dir

__version__ = "0.1.0"

_LAZY = {
    "ImageManager": ("devops_tasks.images", "ImageManager"),
    "TestConfig": ("devops_tasks.project", "TestConfig"),
    "load_test_config": ("devops_tasks.project", "load_test_config"),
    "detect_test_command": ("devops_tasks.project", "detect_test_command"),
    "detect_serve_command": ("devops_tasks.project", "detect_serve_command"),
}
_COLLECTIONS = ("vm", "image", "shell", "test", "serve", "claude")

__all__ = [
    "BootOptions",
    "ClaudeOptions",
    "Config",
    "DevOps",
    "DevStatus",
    "DevopsError",
    "ImageInfo",
    "Manifest",
    "ServeOptions",
    "ShellOptions",
    "TestOptions",
    "config_path",
    "default_boot_options",
    "default_config",
    "image_name",
    "image_path",
    "images_dir",
    "load_config",
    "ns",
    *_LAZY,
    *_COLLECTIONS,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _COLLECTIONS:
        return importlib.import_module(f"devops_tasks.tasks.{name}").ns
    if name == "ns":
        return importlib.import_module("devops_tasks.tasks").ns
    raise AttributeError(f"module 'devops_tasks' has no attribute {name!r}")
