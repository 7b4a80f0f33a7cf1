"""Invoke entry point for this repo: ``inv --list`` shows every devops_tasks collection."""

from devops_tasks.tasks import ns  # noqa: F401  (Invoke looks for ``ns``)
