"""What every task module shares: the ``core`` config layer, error handling, the ``--`` words."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Mapping

from invoke import Collection, task as invoke_task
from invoke.exceptions import Exit

from ..config import DEFAULTS, Config, merge, read_config_file
from ..devops import DevOps
from ..errors import ConfigError, DevopsError

CONFIG_KEY = "core"


def core_layer() -> tuple[dict[str, Any], ConfigError | None]:
    """Package defaults overlaid with ``~/.core/config.yaml``, read when the collections are built.

    A broken file must not break ``inv --list``: its error is kept and raised when a task runs.
    """
    try:
        return merge(DEFAULTS, read_config_file()), None
    except ConfigError as exc:
        return merge(DEFAULTS, {}), exc


_LAYER, _LAYER_ERROR = core_layer()


def configure(collection: Collection) -> Collection:
    """Give a collection the ``core`` config, so it works when imported on its own."""
    collection.configure({CONFIG_KEY: merge(_LAYER, {})})
    return collection


def _plain(value: Any) -> Any:
    """Invoke's config proxies → plain dicts."""
    if isinstance(value, Mapping) or hasattr(value, "_config"):
        return {key: _plain(value[key]) for key in value}
    return value


def core_config(c) -> Config:
    """The typed config of the running task: every Invoke level merged, then validated."""
    if _LAYER_ERROR is not None:
        raise _LAYER_ERROR
    # Merging under the file's layer again keeps its keys when a project's collection config
    # replaced the whole ``core`` key (Invoke merges collection configs shallowly).
    data = merge(_LAYER, _plain(c.config.get(CONFIG_KEY, {})))
    return Config.from_dict(data, origin=f"invoke config '{CONFIG_KEY}'")


def devops(c, name: str | None = None) -> DevOps:
    cfg = core_config(c)
    return DevOps(cfg, name=name or "")


def task(*args, **kwargs):
    """``invoke.task`` whose body turns a :class:`DevopsError` into a one-line message and exit 1."""

    def decorate(body: Callable):
        @functools.wraps(body)
        def run(*a, **kw):
            try:
                return body(*a, **kw)
            except DevopsError as exc:
                raise Exit(f"Error: {exc}", code=1) from None

        return invoke_task(**kwargs)(run)

    if len(args) == 1 and callable(args[0]) and not kwargs:
        return decorate(args[0])
    return decorate


def remainder_words(argv: list[str] | None = None) -> list[str]:
    """The words after ``--`` on the command line, each intact (Invoke 2 only keeps them joined)."""
    argv = sys.argv if argv is None else argv
    if "--" not in argv:
        return []
    return list(argv[argv.index("--") + 1 :])


def exit_with(code: int) -> None:
    """End the task with the status of what it ran in the guest."""
    if code:
        raise Exit(code=code)
