"""The ``devops`` console program: the same collections as ``inv``, for people without a tasks.py."""

import sys

from . import __version__


def program():
    """An Invoke ``Program`` over every collection (imported here, not at start-up)."""
    from invoke import Program

    from .tasks import ns

    return Program(name="devops", binary="devops", version=__version__, namespace=ns)


def main() -> None:
    # `devops shell -- CMD` is mostly start-up time: its plain forms skip loading Invoke's tasks.
    from .workspace import fast_shell

    code = fast_shell(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    program().run()
