"""A named VM (:class:`VM`): boot, stop, status, logs, console, liveness and its SSH target.

The machine part (QEMU, ``machine/``) joined with the host-key part (``hostkeys``) and the SSH
policy (``guest.openssh``). Everything that works *in* a VM (shell, test, serve, claude) takes a
:class:`VM`; nothing here knows about them.

Boot holds the VM's lock from the liveness check until the guest answers, so concurrent boots of
one name give exactly one VM (the others then see it running). Anything started by a boot that
fails or is interrupted (Ctrl-C, SIGTERM) is stopped and its record removed before the error
propagates, so no half-booted VM or stale record is left behind.

``vm.status`` and ``vm.list`` come through here and should start as fast as ``inv --version``: what
only boot and stop use (host keys, the QEMU process, the disk, the boot hand-off, ports, signals)
is imported in the functions that use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from . import guest, paths
from .config import Config, check_mount_type, check_network_mode, default_config, env_float
from .errors import DevopsError, NotRunningError, VMError
from .fsutil import atomic_write_text, file_lock
from .machine.qemu import (MachineSpec, aarch64_firmware, accel_override, build_argv, detect_accel,
                           image_arch, qemu_binary, socat_binary)
from .clock import format_time, now_utc
from .machine.records import VMDir, VMRecord, all_names, is_alive, make_private
from .manifest import Manifest
from .options import BootOptions, DevStatus

Echo = Callable[[str], None]

READY_MARKER = b"devops-tasks: ssh ready"
POLL = 0.02
LOG_TAIL_LINES = 15

NOT_INSTALLED = "dev image not installed (run 'inv image.install' or 'inv image.build' first)"
ALREADY_RUNNING = "dev environment already running (use 'inv vm.stop' first or --fresh)"
NOT_RUNNING = "dev environment not running (run 'inv vm.boot' first)"


def print_line(line: str) -> None:
    print(line, flush=True)


class VM:
    """One named VM. ``echo`` receives the human-readable lines (pass ``lambda _: None`` for none)."""

    def __init__(self, name: str, config: Optional[Config] = None, echo: Echo = print_line):
        self.name = name
        self.config = config if config is not None else default_config()
        self.echo = echo

    def __repr__(self) -> str:
        return f"VM({self.name!r})"

    @property
    def dir(self) -> VMDir:
        return VMDir(self.name)

    def boot(self, opts: Optional[BootOptions] = None) -> DevStatus:
        """Start the VM and return once it accepts SSH with its pinned host key."""
        if opts is None:
            opts = BootOptions(memory=self.config.vm.memory, cpus=self.config.vm.cpus, name=self.name)
        elif opts.name and opts.name != self.name:
            raise VMError(f"these boot options are for VM '{opts.name}', not '{self.name}'")
        return boot(self, opts)

    def ensure_running(self, network: str = "") -> None:
        """Boot the VM when it is not running, saying so (``network``: its mode, "" = configured)."""
        if not self.is_running():
            self.echo("Dev environment not running, booting...")
            self.boot(BootOptions(memory=self.config.vm.memory, cpus=self.config.vm.cpus, name=self.name,
                                  network=network))

    def mount_type(self) -> str:
        """How the running VM mounts projects (``virtiofs`` or ``sshfs``); "" when it is not running."""
        record = live_record(self.name)
        return (record.mount_type or "sshfs") if record is not None else ""

    def qmp_socket(self) -> str:
        """The running VM's QMP socket; :class:`NotRunningError` when it is not running."""
        record = live_record(self.name)
        if record is None:
            raise NotRunningError(NOT_RUNNING)
        return record.qmp_socket

    def qmp(self, command: str, arguments: Optional[dict] = None, timeout: float = 2.0):
        """Run one QMP command on the running VM (virtiofs hot-plugs its share with it)."""
        from .machine import process

        return process.qmp(self.qmp_socket(), command, arguments, timeout)

    def network(self) -> str:
        """The running VM's network mode (``open`` or ``restricted``); "" when it is not running."""
        record = live_record(self.name)
        return record.network if record is not None else ""

    def stop(self) -> bool:
        """Stop the VM; False when it was not running."""
        return stop(self)

    def is_running(self) -> bool:
        record = live_record(self.name)
        return record is not None and record.status == "running"

    def status(self) -> DevStatus:
        return status(self)

    def logs(self, follow: bool = False, out=None) -> None:
        """Print the serial console log (``follow``: until Ctrl-C)."""
        logs(self, follow=follow, out=out)

    def console(self, stdin_fd: Optional[int] = None, stdout_fd: Optional[int] = None) -> None:
        """Attach this terminal to the serial console (detach with Ctrl-])."""
        console(self, stdin_fd=stdin_fd, stdout_fd=stdout_fd)

    def target(self) -> guest.Target:
        """Where the running VM's SSH server is; :class:`NotRunningError` when it is not running."""
        record = self.dir.load()
        if record is None or not is_alive(record):
            raise NotRunningError(NOT_RUNNING)
        return target_for(self.name, record.ssh_port)


def target_for(name: str, port: int) -> guest.Target:
    """The SSH target of VM ``name`` forwarded on ``port``: the tool's login key and known_hosts,
    and the VM's folder (one OpenSSH master per VM)."""
    from . import hostkeys

    return guest.Target(port=int(port), identity=hostkeys.login_key_path(),
                        known_hosts=paths.known_hosts_path(), vm_dir=VMDir(name).path)


# -- what a boot leaves for later: vm.list's settings, the VM's OpenSSH files --------------------

NETWORK_OPEN = "open"  # the guest reaches whatever the host reaches (QEMU user networking)


def remember_boot(vm: VMDir, record: VMRecord, image_version: str) -> None:
    """Keep what ``vm.list`` shows once the VM is stopped (the record goes with the process), and
    write the VM's ssh_config for ``ssh -F`` and ``Include``."""
    data = {"memory": record.memory, "cpus": record.cpus, "ssh_port": record.ssh_port,
            "network": getattr(record, "network", "") or NETWORK_OPEN, "image_version": image_version,
            "mount_type": getattr(record, "mount_type", "") or "sshfs",
            "booted_at": record.started_at}
    atomic_write_text(vm.last_boot, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600)
    with contextlib.suppress(DevopsError, OSError):  # a convenience: vm.ssh-config reports its errors
        write_ssh_files(vm, record.ssh_port)


def load_last_boot(vm: VMDir) -> dict:
    """What :func:`remember_boot` kept ({} when the VM never booted or the file is unreadable)."""
    try:
        data = json.loads(vm.last_boot.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def ssh_config_text(name: str, port: int) -> str:
    """The VM's OpenSSH ``Host`` block, trusting only this VM's own host key (its own
    known_hosts file: a port reused by another VM then fails the host-key check)."""
    vm = VMDir(name)
    target = dataclasses.replace(target_for(name, port), known_hosts=vm.ssh_known_hosts)
    return guest.config_block(name, target, comment=[
        f"devops-tasks VM '{name}' (rewritten by each boot; the SSH port can change then)",
        f"Use: ssh -F {vm.ssh_config} {name}   (also scp -F, rsync -e 'ssh -F ...')",
        "Or put this line near the top of ~/.ssh/config (before any Host line):",
        include_line(vm.ssh_config),
    ])


def include_line(path: Path) -> str:
    """The ``Include`` line for ~/.ssh/config that reads ``path``."""
    text = str(path)
    return f'Include "{text}"' if any(ch.isspace() for ch in text) else f"Include {text}"


def write_ssh_files(vm: VMDir, port: int) -> None:
    """``ssh_known_hosts`` (this VM's pinned host key lines) and ``ssh_config`` in the VM's folder."""
    from . import hostkeys

    lines = hostkeys.host_key_lines(port)
    if lines:
        atomic_write_text(vm.ssh_known_hosts, "".join(line + "\n" for line in lines), 0o600)
    atomic_write_text(vm.ssh_config, ssh_config_text(vm.name, port), 0o600)


# -- boot ---------------------------------------------------------------------------------------

def boot(machine: VM, opts: BootOptions) -> DevStatus:
    from . import handoff, hostkeys
    from .machine import disk, process
    from .signals import stop_as_interrupt

    name = machine.name
    network = check_network_mode(opts.network or machine.config.vm.network, "--network")
    mount_type = check_mount_type(opts.mount_type or machine.config.vm.mount_type,
                                  "--mount-type" if opts.mount_type else "vm.mount_type")
    if mount_type == "virtiofs" and sys.platform != "linux":  # memfd and virtiofsd are Linux's
        machine.echo("Note: virtiofs needs a Linux host (shared memfd RAM, virtiofsd): this VM mounts "
                     "projects over sshfs")
        mount_type = "sshfs"
    vm = VMDir(name)
    image = paths.image_path()
    info = Manifest.load().get(paths.image_name())
    if not image.is_file() or info is None:  # as ImageManager.is_installed: file *and* manifest entry
        raise VMError(NOT_INSTALLED)
    contract = bool(info and info.guest_contract)
    arch = image_arch(image)
    binary = qemu_binary(arch)
    accel = detect_accel(arch, accel_override(machine.config.vm.accel))
    timeout = env_float("CORE_BOOT_TIMEOUT", machine.config.vm.boot_timeout)
    socat = socat_binary() if network == "restricted" else ""
    handoff_data = handoff.boot_data(machine.config.vm.trust_host_ca, machine.config.vm.ca_bundle) if contract else {}
    vm.ensure()
    with stop_as_interrupt(), vm.locked():
        old = vm.load()
        if old is not None and is_alive(old):
            if not opts.fresh:
                raise VMError(ALREADY_RUNNING)
            machine.echo("Stopping the running dev environment (--fresh)...")
            process.stop(old.pid, old.process_start, old.pidfile, old.qmp_socket, graceful=False)
        if old is not None:
            vm.clear()
        if opts.fresh:
            disk.reset(vm)
            if old is not None:
                hostkeys.forget_host(old.ssh_port)
        machine.echo(f"Config: {opts.memory}MB, {opts.cpus} CPUs")
        if network == "restricted":
            machine.echo("Network: restricted (no way out but the host proxy of inv claude)")
        machine.echo("Booting dev environment...")
        if disk.prepare(vm, image, info):
            machine.echo("The installed image changed since this VM's disk was made: starting from a fresh disk")
        login_key = hostkeys.ensure_login_key()
        host_key = hostkeys.ensure_key(vm.host_key, f"devops-tasks-{name}")
        handed = handoff.write_boot_files(vm.path, handoff_data)
        disk.rotate_log(vm.serial_log)
        record = None
        try:
            record = _start(vm, opts, machine.config.vm.ssh_port, image, binary, arch, accel, contract,
                            host_key, login_key, network, socat, handed, mount_type)
            _wait_ready(machine, vm, record, contract, timeout)
            record.status = "running"
            vm.save(record)
            make_private(vm.path)  # QEMU's -daemonize sets its own umask (027) for the log it opens
            remember_boot(vm, record, info.version)
        except BaseException:
            _abort(vm, record)
            raise
    machine.echo("Dev environment running")
    machine.echo("Connect with: inv shell")
    machine.echo(f"SSH port: {record.ssh_port}")
    return _status_from(record, installed=True, version=info.version)


def _start(vm: VMDir, opts: BootOptions, default_port: int, image: Path, binary: str, arch: str,
           accel: str, contract: bool, host_key: Path, login_key: Path, network: str = "open",
           socat: str = "", guest_files: tuple[tuple[str, Path], ...] = (),
           mount_type: str = "sshfs") -> VMRecord:
    """Choose the port and start QEMU under the ports lock, so two boots never pick the same port."""
    import secrets

    from . import hostkeys
    from .machine import process
    from .machine.ports import pick_port

    with file_lock(paths.vms_dir() / ".ports.lock"):
        port = pick_port(opts.ssh_port, default_port, reserved=_ports_in_use(except_name=vm.name))
        spec = MachineSpec(
            name=vm.name, arch=arch, accel=accel, memory=opts.memory, cpus=opts.cpus, disk=vm.disk,
            pidfile=vm.pidfile, qmp_socket=vm.qmp_socket, serial_socket=vm.serial_socket,
            serial_log=vm.serial_log, ssh_port=port, host_key=host_key,
            authorized_keys=Path(str(login_key) + ".pub"),
            firmware=aarch64_firmware() if arch == "arm64" else None,
            network=network, proxy_socket=vm.proxy_socket if network == "restricted" else None,
            socat=socat or "socat",
            guest_files=guest_files,
            shared_memory=mount_type == "virtiofs",  # virtiofsd maps the guest's RAM
        )
        if contract:
            hostkeys.pin_host_key(port, host_key)
        else:
            hostkeys.forget_host(port)
        try:
            pid, start = process.start(build_argv(spec, binary), vm.pidfile, vm.qemu_stderr)
            record = VMRecord(
                id=secrets.token_hex(4), name=vm.name, image=str(image), pid=pid, process_start=start,
                started_at=format_time(now_utc()), ssh_port=port, memory=opts.memory, cpus=opts.cpus,
                ports={"ssh": port}, status="starting", accel=accel, binary=binary,
                pidfile=str(vm.pidfile), qmp_socket=str(vm.qmp_socket),
                serial_socket=str(vm.serial_socket), serial_log=str(vm.serial_log),
                guest_contract=int(contract), network=network,
                proxy_socket=str(vm.proxy_socket) if network == "restricted" else "",
                mount_type=mount_type,
            )
            vm.save(record)
        except BaseException:
            _abort(vm, None)
            hostkeys.forget_host(port)  # pinned above for this boot: a Ctrl-C here leaves no line
            raise
    return record


def _ports_in_use(except_name: str = "") -> set[int]:
    used: set[int] = set()
    for other in all_names():
        if other == except_name:
            continue
        with contextlib.suppress(VMError):
            record = VMDir(other).load()
            if record is not None and is_alive(record):
                used.update(record.ports.values())
                used.add(record.ssh_port)
    return used


def _abort(vm: VMDir, record: VMRecord | None) -> None:
    """Stop whatever this boot started (found by record, else by pidfile) and forget it."""
    from . import hostkeys
    from .machine import process

    try:
        if record is not None:
            process.stop(record.pid, record.process_start, record.pidfile, record.qmp_socket, graceful=False)
        else:
            pid = process.read_pidfile(vm.pidfile)
            if pid:
                process.stop(pid, "", str(vm.pidfile), vm.qmp_socket, graceful=False)
    finally:
        vm.clear()
        if record is not None:
            with contextlib.suppress(Exception):
                hostkeys.forget_host(record.ssh_port)


# -- readiness ------------------------------------------------------------------------------------

def _wait_ready(machine: VM, vm: VMDir, record: VMRecord, contract: bool, timeout: float) -> None:
    from . import hostkeys

    deadline = time.monotonic() + timeout
    alive = lambda: is_alive(record)  # noqa: E731
    if contract:
        wait_for_marker(vm.serial_log, READY_MARKER, deadline, alive, lambda: _not_ready(vm, timeout))
        _confirm_ssh(vm, record, deadline, timeout)
        return
    if os.environ.get("CORE_SKIP_SSH_SCAN", "") == "true":
        return
    wait_for_marker(vm.serial_log, READY_MARKER, deadline, alive, lambda: _not_ready(vm, timeout),
                    also=lambda: ssh_banner(record.ssh_port))
    keys = hostkeys.scan_host_keys(record.ssh_port, deadline)
    hostkeys.replace_host_keys(record.ssh_port, keys)
    machine.echo(
        f"Warning: this image does not follow the guest contract; its SSH host key for "
        f"[127.0.0.1]:{record.ssh_port} was trusted on first use (ssh-keyscan)"
    )


def wait_for_marker(log: Path, marker: bytes, deadline: float, alive: Callable[[], bool],
                    timeout_error: Callable[[], Exception], also: Callable[[], bool] | None = None,
                    interval: float = POLL) -> None:
    """Poll the serial log (only this boot's: it was rotated) for ``marker``; fail when QEMU dies or
    the deadline passes. ``also`` is another readiness test tried every half second."""
    pos, tail, next_also = 0, b"", 0.0
    while True:
        try:
            with open(log, "rb") as handle:
                handle.seek(pos)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            pos += len(chunk)
            buffer = tail + chunk
            if marker in buffer:
                return
            tail = buffer[-len(marker):]
        now = time.monotonic()
        if also is not None and now >= next_also:
            if also():
                return
            next_also = now + 0.5
        if not alive():
            raise VMError(f"QEMU exited during boot{_log_tail(log)}")
        if now >= deadline:
            raise timeout_error()
        time.sleep(interval)


def ssh_banner(port: int, timeout: float = 1.0) -> bool:
    """Does something answer ``SSH-`` on the forwarded port? (slirp accepts before the guest listens.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            return sock.recv(4) == b"SSH-"
    except OSError:
        return False


def _confirm_ssh(vm: VMDir, record: VMRecord, deadline: float, timeout: float) -> None:
    """One strict connection with the pinned key proves the guest is the one we keyed."""
    import subprocess

    from . import hostkeys

    argv = guest.ssh_argv(target_for(record.name, record.ssh_port), ["true"], forward_agent=False, tty=False, multiplex=False,
                          connect_timeout=5)
    last = ""
    while True:
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=max(1.0, min(15.0, deadline - time.monotonic() + 1)))
        except subprocess.TimeoutExpired:
            result = None
        if result is not None and result.returncode == 0:
            return
        last = result.stderr.strip() if result is not None else "ssh timed out"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in last or "Host key verification failed" in last:
            raise VMError(f"the guest's SSH host key does not match the pinned key: {last.splitlines()[-1]}")
        if "Permission denied" in last:  # the guest answered and refused our login key: final
            raise VMError(f"the guest refused the login key {hostkeys.login_key_path()}: {last.splitlines()[-1]}")
        if not is_alive(record):
            raise VMError(f"QEMU exited during boot{_log_tail(vm.serial_log)}")
        if time.monotonic() >= deadline:
            raise VMError(f"the guest printed its ready line but SSH failed within {timeout:.0f}s: {last}")
        time.sleep(0.1)


def _not_ready(vm: VMDir, timeout: float) -> VMError:
    return VMError(f"the guest did not become ready within {timeout:.0f}s (vm.boot_timeout / "
                   f"CORE_BOOT_TIMEOUT){_log_tail(vm.serial_log)}")


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        return f"; no serial output ({log})"
    tail = [line.rstrip("\r") for line in text.splitlines() if line.strip()][-lines:]
    if not tail:
        return f"; no serial output ({log})"
    return f"; last lines of the serial log ({log}):\n  " + "\n  ".join(tail)


# -- stop and status ------------------------------------------------------------------------------

def stop(machine: VM) -> bool:
    """Power the VM down (escalating to QMP quit, SIGTERM, SIGKILL); False when it was not running."""
    from . import hostkeys
    from .machine import process

    vm = machine.dir
    if not vm.path.is_dir():
        machine.echo("Dev environment is not running")
        return False
    # A boot in progress holds the lock: stop its QEMU anyway (that boot then sees QEMU gone, fails
    # and cleans up after itself) rather than wait for its deadline.
    with vm.try_locked() as locked:
        record = vm.load()
        if record is None or not is_alive(record):
            if locked:
                vm.clear()
            machine.echo("Dev environment is not running")
            return False
        machine.echo("Stopping dev environment...")
        timeouts = process.StopTimeouts(powerdown=env_float("CORE_POWERDOWN_TIMEOUT", 5.0))
        process.stop(record.pid, record.process_start, record.pidfile, record.qmp_socket, timeouts)
        from . import mount_keeper as keeper

        keeper.stop_all(vm.path)  # kept mounts (their connection is gone with the VM)
        if locked:
            vm.clear()
            hostkeys.forget_host(record.ssh_port)
    machine.echo("Stopped")
    return True


def live_record(name: str) -> VMRecord | None:
    """The record of a VM whose QEMU really runs; a stale record is removed (unless a boot holds the lock)."""
    vm = VMDir(name)
    record = vm.load()
    if record is None or is_alive(record):
        return record
    with vm.try_locked() as locked:
        if locked:
            again = vm.load()
            if again is not None and not is_alive(again):
                vm.clear()
    return None


def status(machine: VM) -> DevStatus:
    info = Manifest.load().get(paths.image_name())
    installed = paths.image_path().is_file() and info is not None
    version = info.version if info else ""
    record = live_record(machine.name)
    if record is None:
        return DevStatus(installed=installed, running=False, image_version=version,
                         ssh_port=machine.config.vm.ssh_port, name=machine.name)
    st = _status_from(record, installed, version)
    if st.running:
        from . import mount_keeper as keeper

        st.mounts = keeper.live_mounts(machine.dir.path)
    return st


def _status_from(record: VMRecord, installed: bool, version: str) -> DevStatus:
    from datetime import timedelta

    return DevStatus(
        installed=installed, running=record.status == "running", image_version=version,
        container_id=record.id, memory=record.memory, cpus=record.cpus, ssh_port=record.ssh_port,
        uptime=timedelta(seconds=int(record.uptime_seconds())), name=record.name,
        network=record.network or "open", mount_type=record.mount_type or "sshfs",
    )


def running_vms() -> list[str]:
    """Names of the VMs whose QEMU runs now (stale records are cleaned on the way)."""
    return [name for name in all_names() if live_record(name) is not None]


# -- serial console and log -------------------------------------------------------------------

def logs(machine: VM, follow: bool = False, out=None) -> None:
    """Copy the VM's serial log to ``out``; with ``follow``, keep copying until Ctrl-C."""
    from .machine.console import copy_log

    log = machine.dir.serial_log
    if not log.exists():
        raise VMError(f"no serial log for '{machine.name}' yet (boot it with 'inv vm.boot')")
    copy_log(log, out if out is not None else sys.stdout.buffer, follow)


def console(machine: VM, stdin_fd: int | None = None, stdout_fd: int | None = None) -> None:
    """Attach this terminal to the VM's serial console; Ctrl-] detaches."""
    from .machine.console import DETACH_NAME, relay

    record = live_record(machine.name)
    if record is None:
        raise NotRunningError(NOT_RUNNING)
    sys.stderr.write(f"Connected to the serial console of '{record.name}' (detach: {DETACH_NAME}; "
                     f"press Enter for a prompt)\r\n")
    sys.stderr.flush()
    relay(record.serial_socket,
          sys.stdin.fileno() if stdin_fd is None else stdin_fd,
          sys.stdout.fileno() if stdout_fd is None else stdout_fd)
    sys.stderr.write("\r\nDetached from the serial console\r\n")
