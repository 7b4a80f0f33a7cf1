"""The ``vm`` collection: boot, stop, status and logs of a named dev VM (thin: flags → library → print)."""

from __future__ import annotations

import json as _json

from invoke import Collection

from ..errors import VMError
from ..options import BootOptions, DevStatus
from .common import configure, devops, task

NAME_HELP = "VM name (default: config core.vm.name, 'core-dev'); several VMs can run side by side"


def _int(flag: str, value) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise VMError(f"--{flag} must be a whole number, not {value!r}") from None
    if number <= 0:
        raise VMError(f"--{flag} must be positive, not {number}")
    return number


@task(help={
    "memory": "guest memory in MB (default: core.vm.memory, 4096)",
    "cpus": "number of guest CPUs (default: core.vm.cpus, 2)",
    "name": NAME_HELP,
    "fresh": "stop it if running and start from a clean disk (discards changes and the old host key)",
    "port": "host SSH port on 127.0.0.1 (must be free; default: core.vm.ssh_port 2222 or the next free one)",
})
def boot(c, memory=None, cpus=None, name=None, fresh=False, port=None):
    """Boot the dev VM and wait until it accepts SSH."""
    d = devops(c, name)
    opts = BootOptions(
        memory=_int("memory", memory) or d.config.vm.memory,
        cpus=_int("cpus", cpus) or d.config.vm.cpus,
        name=d.name,
        fresh=bool(fresh),
        ssh_port=_int("port", port),
    )
    d.boot(opts)


@task(help={"name": NAME_HELP})
def stop(c, name=None):
    """Stop the dev VM (power button, then QMP quit, SIGTERM, SIGKILL)."""
    devops(c, name).stop()


def format_uptime(seconds: float) -> str:
    """``Ns`` under a minute, ``Nm`` under an hour, ``Nh Mm`` under a day, else ``Nd Nh``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def status_lines(st: DevStatus) -> list[str]:
    """The original's status text; the VM lines only while a VM exists."""
    lines = ["Dev Environment Status", f"Installed: {'Yes' if st.installed else 'No'}"]
    if st.image_version:
        lines.append(f"Version: {st.image_version}")
    state = "Running" if st.running else ("Starting" if st.container_id else "Stopped")
    lines.append(f"Status: {state}")
    if st.container_id:
        lines += [
            f"Container: {st.container_id}",
            f"Memory: {st.memory}MB",
            f"CPUs: {st.cpus}",
            f"SSH port: {st.ssh_port}",
            f"Uptime: {format_uptime(st.uptime.total_seconds())}",
        ]
    return lines


@task(help={"name": NAME_HELP, "json": "print the status as JSON"})
def status(c, name=None, json=False):
    """Show whether the dev VM is installed and running, and its resources."""
    st = devops(c, name).status()
    if json:
        print(_json.dumps(st.to_dict(), indent=2, sort_keys=True))
        return
    for line in status_lines(st):
        print(line)


@task(help={"name": NAME_HELP, "follow": "keep printing new console output until Ctrl-C"})
def logs(c, name=None, follow=False):
    """Print the dev VM's serial console log."""
    devops(c, name).logs(follow=bool(follow))


ns = configure(Collection("vm", boot, stop, status, logs))
