"""The ``image`` collection."""

from invoke import Collection

from .common import configure

ns = configure(Collection("image"))
