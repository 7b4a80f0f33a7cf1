"""The ``devops`` console program: the same collections as ``inv``, for people without a tasks.py.

``devops shell -- CMD`` is mostly start-up time, so its plain forms take a fast path that skips
loading Invoke and its tasks (:func:`fast_shell`), and steps aside to Invoke whenever an Invoke
config level could change what it does.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Mapping, Optional

from . import __version__

INVOKE_CONFIG_FILES = tuple(f"{base}.{ext}" for base in ("/etc/invoke", "~/.invoke")
                            for ext in ("yaml", "yml", "json", "py"))


def program():
    """An Invoke ``Program`` over every collection (imported here, not at start-up)."""
    from invoke import Program

    from .tasks import ns

    return Program(name="devops", binary="devops", version=__version__, namespace=ns)


@dataclass
class FastShell:
    """What ``devops shell`` was asked for (``name`` "" means the configured one)."""

    name: str = ""
    words: list[str] = field(default_factory=list)
    agent: bool = True
    mount: bool = True
    project: str = ""


def fast_shell_args(argv: list[str], environ: Mapping[str, str]) -> Optional[FastShell]:
    """``shell [--name N] [--no-agent] [--no-mount] [--project DIR] [-- CMD ...]`` → :class:`FastShell`,
    or None for Invoke.

    None for anything else: other tasks, ``--console``, help, Invoke's own flags, and whenever an
    Invoke config level exists that the fast path does not read (``/etc/invoke.*``,
    ``~/.invoke.*``, any ``INVOKE_*`` variable: each could set ``core.vm.name``). ``name`` is ""
    when not given: the caller takes ``vm.name`` from ``~/.core/config.yaml``.
    """
    if not argv or argv[0] not in ("shell", "shell.shell"):
        return None
    if any(key.startswith("INVOKE_") for key in environ):
        return None
    home = environ.get("HOME", "")
    for path in INVOKE_CONFIG_FILES:
        if path.startswith("~"):
            if not home:
                return None
            path = home + path[1:]
        if os.path.exists(path):
            return None
    words: list[str] = []
    rest = list(argv[1:])
    if "--" in rest:
        index = rest.index("--")
        rest, words = rest[:index], rest[index + 1:]
    name, agent, mount, project = "", True, True, ""
    while rest:
        flag = rest.pop(0)
        if flag == "--no-agent":
            agent = False
        elif flag == "--no-mount":
            mount = False
        elif flag in ("--name", "-n") and rest:
            name = rest.pop(0)
        elif flag.startswith("--name="):
            name = flag.split("=", 1)[1]
        elif flag in ("--project", "-p") and rest:
            project = rest.pop(0)
        elif flag.startswith("--project="):
            project = flag.split("=", 1)[1]
        else:
            return None
    return FastShell(name=name, words=words, agent=agent, mount=mount, project=project)


def fast_shell(argv: list[str], environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """Run ``devops shell`` without Invoke when :func:`fast_shell_args` allows; its status, or None."""
    args = fast_shell_args(argv, os.environ if environ is None else environ)
    if args is None:
        return None
    from .errors import DevopsError

    try:
        from .config import load_config
        from .lifecycle import VM
        from .options import ShellOptions
        from .workspace import shell

        config = load_config()  # ~/.core/config.yaml, as the Invoke path reads it
        vm = VM(args.name or config.vm.name, config)
        return shell(vm, ShellOptions(command=args.words, forward_agent=args.agent, mount=args.mount,
                                      project=args.project))
    except DevopsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def main() -> None:
    code = fast_shell(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    program().run()
