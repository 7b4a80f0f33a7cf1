"""For every test: tests/ on ``sys.path`` (its helper ``needs``) and the ``needs`` mark."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import needs  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(problem): skip the test locally, fail it under CI=true, when "
                                       "problem is not empty (see tests/needs.py)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        needs.need(mark.args[0] if mark.args else "")
