"""The ``test`` collection: ``inv test [--name NAME] [-- CMD ...]`` runs the project's tests in the VM."""

from invoke import Collection

from ..options import TestOptions
from .common import configure, devops, exit_with, remainder_words, task


@task(
    default=True,
    help={
        "name": "run the named command from .core/test.yaml instead of the detected one",
        "vm": "VM name (default: core.vm.name, 'core-dev')",
        "project": "project directory mounted at /app (default: the current directory)",
        "setup": "install the dependencies (test.yaml setup, or the detected install) even if nothing changed",
    },
)
def test(c, name=None, vm=None, project=None, setup=False):
    """Run the project's tests in the VM (`-- CMD ...` > --name > detected); exit with their status."""
    opts = TestOptions(name=name or "", command=remainder_words(), setup=bool(setup))
    exit_with(devops(c, vm).test(project or ".", opts))


test.__test__ = False  # not a pytest test

ns = configure(Collection("test"))
ns.add_task(test)
