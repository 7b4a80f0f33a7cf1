"""A tiny module for the example project: its tests run inside the dev VM with `inv test`."""

import platform


def greet(name: str = "world") -> str:
    return f"Hello, {name}!"


def where() -> str:
    """The kernel the code runs on (inside the VM: the guest's Linux)."""
    return f"{platform.system()} {platform.release()}"
