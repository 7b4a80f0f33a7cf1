"""The ``devops`` console program: the same collections as ``inv``, for people without a tasks.py."""

from invoke import Program

from . import __version__
from .tasks import ns

program = Program(name="devops", binary="devops", version=__version__, namespace=ns)


def main() -> None:
    program.run()
