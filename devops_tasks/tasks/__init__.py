"""Invoke collections: ``vm``, ``image``, ``shell``, ``test``, ``serve``, ``claude``, and ``ns`` (all).

Each collection carries the ``core`` config itself, so a project may import just one:
``ns.add_collection(devops_tasks.vm)``.
"""

from invoke import Collection

from . import claude as _claude
from . import image as _image
from . import serve as _serve
from . import shell as _shell
from . import test as _test
from . import vm as _vm
from .common import configure

COLLECTIONS = {
    "vm": _vm.ns,
    "image": _image.ns,
    "shell": _shell.ns,
    "test": _test.ns,
    "serve": _serve.ns,
    "claude": _claude.ns,
}


def namespace() -> Collection:
    """All collections under one root (what ``inv`` in this repo and the ``devops`` program show)."""
    root = configure(Collection())
    for collection in COLLECTIONS.values():
        root.add_collection(collection)
    return root


ns = namespace()
