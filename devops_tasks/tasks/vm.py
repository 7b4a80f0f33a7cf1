"""The ``vm`` collection."""

from invoke import Collection

from .common import configure

ns = configure(Collection("vm"))
