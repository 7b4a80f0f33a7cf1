"""The ``vm`` collection: boot, stop, status, logs, list, delete, ssh-config, cp, snapshot and resize of
the dev VMs (thin: flags → library → print)."""

from __future__ import annotations

import json as _json
import sys

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
    "network": "open (the guest reaches what the host reaches) or restricted (nothing but the host proxy "
               "of inv claude); default: core.vm.network, open",
    "mount_type": "how /app reaches the project: virtiofs (shared memory, hot-plugged per command) or sshfs; "
                  "default: core.vm.mount_type, virtiofs",
})
def boot(c, memory=None, cpus=None, name=None, fresh=False, port=None, network=None, mount_type=None):
    """Boot the dev VM and wait until it accepts SSH."""
    d = devops(c, name)
    opts = BootOptions(
        memory=_int("memory", memory) or d.config.vm.memory,
        cpus=_int("cpus", cpus) or d.config.vm.cpus,
        name=d.name,
        fresh=bool(fresh),
        ssh_port=_int("port", port),
        network=(network or "").strip().lower(),
        mount_type=(mount_type or "").strip().lower(),
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


def mount_line(mount: dict) -> str:
    """A live project mount: whose, and for which command, or (kept: ``vm.mount_idle_timeout``)
    in use or for how long idle."""
    leases = int(mount.get("leases") or 0)
    if not mount.get("kept", True):
        state = f"for the command with PID {mount.get('pid', '?')}"
    elif leases:
        state = f"used by {leases} command{'s' if leases > 1 else ''}"
    else:
        state = f"idle {format_uptime(mount.get('idle') or 0)}, unmounted in {format_uptime(mount.get('ends_in') or 0)}"
    return f"Mount: /app <- {mount.get('project', '?')} ({state})"


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
            f"Network: {st.network or 'open'}",
            f"Mount type: {st.mount_type or 'sshfs'}",
            f"Uptime: {format_uptime(st.uptime.total_seconds())}",
            *[mount_line(m) for m in st.mounts],
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


def human_bytes(size: int) -> str:
    from ..machine.disk import human_bytes as fmt

    return fmt(size)


LIST_COLUMNS = ("NAME", "STATUS", "NETWORK", "MOUNT", "SSH", "MEMORY", "CPUS", "DISK", "IMAGE", "UPTIME")


def list_rows(vms) -> list[list[str]]:
    """``vm.list``'s table: one row per VM (:class:`~devops_tasks.vms.VMSummary`), a header first."""
    rows = [list(LIST_COLUMNS)]
    for vm in vms:
        disk = human_bytes(vm.disk_used) + (f" of {human_bytes(vm.disk_size)}" if vm.disk_size else "")
        rows.append([
            vm.name, vm.status, vm.network, vm.mount_type or "-", str(vm.ssh_port) if vm.ssh_port else "-",
            f"{vm.memory}MB" if vm.memory else "-", str(vm.cpus) if vm.cpus else "-", disk,
            vm.image_version or "-", format_uptime(vm.uptime) if vm.status == "running" else "-",
        ])
    return rows


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


@task(name="list", help={"json": "print the VMs as JSON"})
def list_(c, json=False):
    """List every VM under ~/.core/vms: status, network, SSH port, memory, CPUs, disk, image, uptime."""
    vms = devops(c).list_vms()
    if json:
        print(_json.dumps([vm.to_dict() for vm in vms], indent=2, sort_keys=True))
        return
    if not vms:
        print("No VMs (create one with: inv vm.boot)")
        return
    for line in table(list_rows(vms)):
        print(line)


@task(help={"name": NAME_HELP, "force": "stop the VM first when it is running"})
def delete(c, name=None, force=False):
    """Delete a VM: its disk, snapshots, keys and logs, and its known_hosts line."""
    d = devops(c, name)
    freed = d.delete(force=bool(force))
    print(f"Deleted VM '{d.name}' (freed {human_bytes(freed)})")


@task(name="ssh-config", help={"name": NAME_HELP})
def ssh_config(c, name=None):
    """Print an OpenSSH config block for the VM (ssh -F FILE NAME, scp -F, rsync, ~/.ssh/config Include)."""
    config = devops(c, name).ssh_config()
    if not config.running:
        print("# Note: the VM is stopped; this is the port of its last boot (a boot may choose another)",
              file=sys.stderr)
    sys.stdout.write(config.text)


@task(positional=["source", "dest"], help={
    "source": "what to copy: a path on this machine, or :PATH in the VM",
    "dest": "where to: :PATH in the VM, or a path on this machine",
    "name": NAME_HELP,
})
def cp(c, source, dest, name=None):
    """Copy a file or folder between this machine and the VM (the VM's side written :PATH).

    Help: inv --help vm.cp (Invoke wants the two paths before it reads a task's --help).
    """
    d = devops(c, name)
    result = d.copy(source, dest)
    side = f"{d.name}:{result.where}" if dest.startswith(":") else result.where
    print(f"Copied {result.summary()} to {side}")
    for path in result.skipped:
        print(f"Skipped (not a file, folder or link): {path!r}", file=sys.stderr)


def _snapshot_dicts(snaps) -> list[dict]:
    from ..clock import format_time

    return [{"tag": s.tag, "created": format_time(_from_epoch(s.created))} for s in snaps]


def _from_epoch(seconds: int):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(seconds, tz=timezone.utc)


@task(help={
    "name": NAME_HELP,
    "save": "save the stopped VM's disk as snapshot TAG",
    "restore": "bring the stopped VM's disk back to snapshot TAG (later changes are lost)",
    "delete": "delete snapshot TAG",
    "json": "print the snapshots (after the change) as JSON",
})
def snapshot(c, name=None, save=None, restore=None, delete=None, json=False):
    """List the VM's disk snapshots, or --save / --restore / --delete one (the VM must be stopped)."""
    chosen = [(flag, tag) for flag, tag in (("save", save), ("restore", restore), ("delete", delete)) if tag]
    if len(chosen) > 1:
        raise VMError("give one of --save, --restore and --delete")
    d = devops(c, name)
    message = ""
    if chosen:
        flag, tag = chosen[0]
        if flag == "save":
            d.save_snapshot(tag)
            message = f"Saved snapshot '{tag}' of VM '{d.name}'"
        elif flag == "restore":
            d.restore_snapshot(tag)
            message = f"Restored VM '{d.name}' to snapshot '{tag}'"
        else:
            d.delete_snapshot(tag)
            message = f"Deleted snapshot '{tag}' of VM '{d.name}'"
    snaps = d.snapshots()
    if json:
        print(_json.dumps(_snapshot_dicts(snaps), indent=2, sort_keys=True))
        return
    if message:
        print(message)
        return
    if not snaps:
        print(f"No snapshots of VM '{d.name}' (save one with: inv vm.snapshot --save TAG)")
        return
    rows = [["TAG", "CREATED"]] + [[item["tag"], item["created"]] for item in _snapshot_dicts(snaps)]
    for line in table(rows):
        print(line)


@task(help={"disk": "the new size: 20G, 20480M, or +2G to add (growing only)", "name": NAME_HELP})
def resize(c, disk=None, name=None):
    """Grow the stopped VM's disk; the guest's root file system fills it at the next boot."""
    if not disk:
        raise VMError("give the new size with --disk (e.g. --disk 20G or --disk +2G)")
    d = devops(c, name)
    old, new = d.resize_disk(str(disk))
    if old == new:
        print(f"The disk of VM '{d.name}' is already {human_bytes(new)}")
        return
    print(f"Disk of VM '{d.name}': {human_bytes(old)} -> {human_bytes(new)}")
    print("The root file system grows to fill it at the next boot")


ns = configure(Collection("vm", boot, stop, status, logs, list_, delete, ssh_config, cp, snapshot, resize))
