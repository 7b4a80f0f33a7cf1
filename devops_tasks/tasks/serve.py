"""The ``serve`` collection: ``inv serve [--port N] [--path SUB]`` runs the dev server in the VM."""

from invoke import Collection

from ..errors import ProjectError
from ..options import ServeOptions
from .common import configure, devops, exit_with, task


@task(
    default=True,
    help={
        "port": "port of the server, forwarded from 127.0.0.1 on this machine (default: 8000)",
        "path": "subdirectory of the project to serve from (the whole project is mounted at /app)",
        "vm": "VM name (default: core.vm.name, 'core-dev')",
        "project": "project directory mounted at /app (default: the current directory)",
    },
)
def serve(c, port=None, path=None, vm=None, project=None):
    """Serve the project from the VM at http://localhost:PORT until Ctrl-C."""
    opts = ServeOptions(port=_port(port), path=path or "")
    exit_with(devops(c, vm).serve(project or ".", opts))


def _port(value) -> int:
    if value is None or value == "":
        return ServeOptions().port
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProjectError(f"--port {value!r} is not a number (use 1-65535)") from None


ns = configure(Collection("serve"))
ns.add_task(serve)
