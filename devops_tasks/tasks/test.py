"""The ``test`` collection."""

from invoke import Collection

from .common import configure

ns = configure(Collection("test"))
