"""The VMs as things a user keeps: list them, delete one, reach one with OpenSSH, snapshot and
grow its disk. Functions of a :class:`~.lifecycle.VM` (booting and stopping stay there).

Snapshots and resizing change the VM's overlay with ``qemu-img``, so they need the VM stopped:
they hold its lock (no boot can start meanwhile) and refuse a running VM. Every refusal is a
one-line :class:`VMError` that changed nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from . import guest
from .errors import VMError
from .lifecycle import (NETWORK_OPEN, VM, include_line, live_record, load_last_boot, running_vms,
                        ssh_config_text, target_for, write_ssh_files)
from .machine import disk
from .machine.records import VMDir, is_alive, vm_folders


@dataclass
class VMSummary:
    """One line of ``vm.list``. ``memory`` and ``cpus`` are the running VM's, else those of its
    last boot (0 when it never booted); ``ssh_port`` only while it runs (None otherwise: a boot
    picks it); ``disk_used`` is what its overlay takes on the host, ``disk_size`` the disk the
    guest sees (0 before the first boot)."""

    name: str
    status: str  # running | starting | stopped | unknown (unreadable record)
    network: str
    ssh_port: Optional[int]
    memory: int
    cpus: int
    disk_used: int
    disk_size: int
    image_version: str
    uptime: int  # seconds; 0 unless running
    mount_type: str = ""  # virtiofs | sshfs (its record's, else its last boot's; "" when it never booted)

    def to_dict(self) -> dict:
        return asdict(self)


def unknown_vm(name: str) -> VMError:
    return VMError(f"no VM named '{name}' (inv vm.list shows them)")


def require_vm(vm: VM) -> VMDir:
    """The VM's folder; :func:`unknown_vm` when there is none."""
    folder = vm.dir
    if not folder.path.is_dir():
        raise unknown_vm(vm.name)
    return folder


# -- list -------------------------------------------------------------------------------------

def summary(name: str) -> VMSummary:
    folder = VMDir(name)
    last = load_last_boot(folder)
    try:
        record = live_record(name)
        status = record.status if record is not None else "stopped"
    except VMError:
        record, status = None, "unknown"
    try:
        size = disk.virtual_size(folder.disk) if folder.disk.exists() else 0
    except VMError:
        size = 0
    return VMSummary(
        name=name,
        status=status,
        network=str(getattr(record, "network", "") or last.get("network") or NETWORK_OPEN),
        mount_type=str(getattr(record, "mount_type", "") if record else last.get("mount_type") or
                       ("sshfs" if last else "")),
        ssh_port=int(record.ssh_port) if record else None,
        memory=int(record.memory if record else last.get("memory") or 0),
        cpus=int(record.cpus if record else last.get("cpus") or 0),
        disk_used=disk.allocated_size(folder.disk),
        disk_size=size,
        image_version=str(last.get("image_version") or ""),
        uptime=int(record.uptime_seconds()) if record and status == "running" else 0,
    )


def list_vms() -> list[VMSummary]:
    """Every VM under ``~/.core/vms``, running or not, by name."""
    return [summary(name) for name in vm_folders()]


# -- delete -----------------------------------------------------------------------------------

def delete(vm: VM, force: bool = False) -> int:
    """Remove the VM's folder (disk, snapshots, keys, logs) and the known_hosts lines of its port;
    the bytes freed. A running VM is refused unless ``force``, which stops it first."""
    import shutil  # here, as hostkeys below: vm.list, which imports this module, never needs them

    folder = require_vm(vm)
    try:
        record = live_record(vm.name)
    except VMError:
        if not force:
            raise VMError(f"VM '{vm.name}' has an unreadable record, so whether it runs is unknown: "
                          f"'inv vm.delete --name {vm.name} --force' deletes it anyway") from None
        record = None
    if record is not None:
        if not force:
            raise VMError(f"VM '{vm.name}' is running: stop it first ('inv vm.stop --name {vm.name}') "
                          "or delete it with --force")
        vm.stop()
    ports = {int(load_last_boot(folder).get("ssh_port") or 0)}
    with folder.try_locked() as locked:
        if not locked:
            raise VMError(f"VM '{vm.name}' is busy (a boot is in progress): stop it first, then delete it")
        with contextlib.suppress(VMError):
            again = folder.load()
            if again is not None:
                if is_alive(again):
                    raise VMError(f"VM '{vm.name}' was booted again meanwhile: nothing was deleted")
                ports.add(again.ssh_port)
        freed = _folder_bytes(folder.path)
        for port in ports - {0}:
            guest.close_master(target_for(vm.name, port))  # an idle OpenSSH master outlives the VM
        sockets = folder.socket_dir
        shutil.rmtree(folder.path)
        if sockets != folder.path:
            shutil.rmtree(sockets, ignore_errors=True)
    from . import hostkeys

    for port in ports - {0} - _ports_of_running_vms():
        hostkeys.forget_host(port)
    return freed


def _ports_of_running_vms() -> set[int]:
    ports = set()
    for name in running_vms():
        with contextlib.suppress(VMError):
            record = live_record(name)
            if record is not None:
                ports.add(record.ssh_port)
    return ports


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


# -- OpenSSH config ---------------------------------------------------------------------------

@dataclass
class SshConfig:
    text: str  # the Host block (with comments)
    path: Path  # the same block in the VM's folder: ``ssh -F PATH`` or ``Include PATH``
    include: str  # the line for ~/.ssh/config
    running: bool


def ssh_config(vm: VM) -> SshConfig:
    """The VM's OpenSSH config block, also written to its folder (``Include`` reads it there).

    The port is the running VM's, else that of its last boot; a VM that never booted has none.
    """
    folder = require_vm(vm)
    record = live_record(vm.name)
    port = record.ssh_port if record is not None else int(load_last_boot(folder).get("ssh_port") or 0)
    if not port:
        raise VMError(f"VM '{vm.name}' has never booted, so it has no SSH port yet: "
                      f"'inv vm.boot --name {vm.name}' first")
    if record is not None:
        write_ssh_files(folder, port)
    text = ssh_config_text(vm.name, port)
    return SshConfig(text=text, path=folder.ssh_config, include=include_line(folder.ssh_config),
                     running=record is not None)


# -- snapshots and disk size (stopped VMs only) ------------------------------------------------

@contextlib.contextmanager
def stopped_disk(vm: VM, what: str) -> Iterator[Path]:
    """The stopped VM's overlay, with the VM's lock held (no boot starts meanwhile)."""
    folder = require_vm(vm)
    with folder.try_locked() as locked:
        if not locked:
            raise VMError(f"VM '{vm.name}' is busy (a boot is in progress): try again once it is done")
        record = folder.load()
        if record is not None and is_alive(record):
            raise VMError(f"VM '{vm.name}' is running: {what} needs it stopped "
                          f"('inv vm.stop --name {vm.name}' first)")
        if not folder.disk.is_file():
            raise VMError(f"VM '{vm.name}' has no disk yet: boot it once ('inv vm.boot --name {vm.name}')")
        yield folder.disk


def snapshots(vm: VM) -> list[disk.Snapshot]:
    """The VM's snapshots, oldest first (also while it runs: reading them changes nothing)."""
    folder = require_vm(vm)
    if not folder.disk.is_file():
        return []
    return disk.snapshots(folder.disk)


def _tags(found: list[disk.Snapshot]) -> str:
    return ", ".join(s.tag for s in found) if found else "none"


def save_snapshot(vm: VM, tag: str) -> disk.Snapshot:
    disk.check_tag(tag)
    with stopped_disk(vm, "saving a snapshot") as overlay:
        if any(s.tag == tag for s in disk.snapshots(overlay)):
            raise VMError(f"VM '{vm.name}' already has a snapshot '{tag}' (delete it first: --delete {tag})")
        disk.save_snapshot(overlay, tag)
        return next(s for s in disk.snapshots(overlay) if s.tag == tag)


def _existing(vm: VM, overlay: Path, tag: str) -> None:
    found = disk.snapshots(overlay)
    if not any(s.tag == tag for s in found):
        raise VMError(f"VM '{vm.name}' has no snapshot '{tag}' (it has: {_tags(found)})")


def restore_snapshot(vm: VM, tag: str) -> None:
    """The disk exactly as it was when ``tag`` was saved (its size included)."""
    disk.check_tag(tag)
    with stopped_disk(vm, "restoring a snapshot") as overlay:
        _existing(vm, overlay, tag)
        disk.restore_snapshot(overlay, tag)


def delete_snapshot(vm: VM, tag: str) -> None:
    disk.check_tag(tag)
    with stopped_disk(vm, "deleting a snapshot") as overlay:
        _existing(vm, overlay, tag)
        disk.delete_snapshot(overlay, tag)


def resize_disk(vm: VM, size: str) -> tuple[int, int]:
    """Grow the VM's disk to ``size`` (``20G``, ``+2G``); (old, new) in bytes. The guest's root
    file system fills it at the next boot (images made by ``image.build``)."""
    with stopped_disk(vm, "resizing its disk") as overlay:
        current = disk.virtual_size(overlay)
        new = disk.parse_size(size, current)
        disk.check_resize(current, new, size)
        if new != current:
            disk.resize(overlay, new)
        return current, new
