import os

from hello import greet, where


def test_greet_default():
    assert greet() == "Hello, world!"


def test_greet_name():
    assert greet("dev VM") == "Hello, dev VM!"


def test_where_reports_a_kernel():
    assert where().startswith("Linux")


def test_env_from_test_yaml():
    """`.core/test.yaml`'s env reaches the tests (HELLO_GREETING is set there)."""
    assert os.environ.get("HELLO_GREETING", "hi") in ("hi", "hello from .core/test.yaml")
