"""Boot, stop and inspect a named VM: the machine part (QEMU) joined with the host-key part (SSH).

Boot holds the VM's lock from the liveness check until the guest answers, so concurrent boots of
one name give exactly one VM (the others then see it running). Anything started by a boot that
fails or is interrupted (Ctrl-C, SIGTERM) is stopped and its record removed before the error
propagates, so no half-booted VM or stale record is left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from . import hostkeys, paths
from .errors import NotRunningError, VMError
from .fsutil import file_lock
from .machine import disk, process
from .machine.ports import pick_port
from .machine.qemu import (MachineSpec, aarch64_firmware, accel_override, build_argv, detect_accel,
                           image_arch, qemu_binary)
from .machine.records import VMDir, VMRecord, all_names, format_time, is_alive, now_utc
from .manifest import Manifest
from .options import BootOptions, DevStatus

READY_MARKER = b"devops-tasks: ssh ready"
POLL = 0.02
LOG_TAIL_LINES = 15

NOT_INSTALLED = "dev image not installed (run 'inv image.install' or 'inv image.build' first)"
ALREADY_RUNNING = "dev environment already running (use 'inv vm.stop' first or --fresh)"
NOT_RUNNING = "dev environment not running (run 'inv vm.boot' first)"


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        raise VMError(f"{name}={os.environ[name]!r} is not a number of seconds") from None


# -- boot ---------------------------------------------------------------------------------------

def boot(devops, opts: BootOptions) -> DevStatus:
    """Start the VM and return once it accepts SSH with its pinned host key."""
    name = opts.name or devops.name
    vm = VMDir(name)
    devops.name = name  # later stop/status/shell calls on this facade mean the VM it booted
    image = paths.image_path()
    info = Manifest.load().get(paths.image_name())
    if not image.is_file() or info is None:  # as ImageManager.is_installed: file *and* manifest entry
        raise VMError(NOT_INSTALLED)
    contract = bool(info and info.guest_contract)
    arch = image_arch(image)
    binary = qemu_binary(arch)
    accel = detect_accel(arch, accel_override(devops.config.vm.accel))
    timeout = _env_float("CORE_BOOT_TIMEOUT", devops.config.vm.boot_timeout)
    vm.ensure()
    with _interrupt_on_term(), vm.locked():
        old = vm.load()
        if old is not None and is_alive(old):
            if not opts.fresh:
                raise VMError(ALREADY_RUNNING)
            devops.echo("Stopping the running dev environment (--fresh)...")
            process.stop(old.pid, old.process_start, old.pidfile, old.qmp_socket, graceful=False)
        if old is not None:
            vm.clear()
        if opts.fresh:
            disk.reset(vm)
            if old is not None:
                hostkeys.forget_host(old.ssh_port)
        devops.echo(f"Config: {opts.memory}MB, {opts.cpus} CPUs")
        devops.echo("Booting dev environment...")
        if disk.prepare(vm, image, info):
            devops.echo("The installed image changed since this VM's disk was made: starting from a fresh disk")
        login_key = hostkeys.ensure_login_key()
        host_key = hostkeys.ensure_key(vm.host_key, f"devops-tasks-{name}")
        disk.rotate_log(vm.serial_log)
        record = None
        try:
            record = _start(vm, opts, devops.config.vm.ssh_port, image, binary, arch, accel, contract,
                            host_key, login_key)
            _wait_ready(devops, vm, record, contract, timeout)
            record.status = "running"
            vm.save(record)
        except BaseException:
            _abort(vm, record)
            raise
    devops.echo("Dev environment running")
    devops.echo("Connect with: inv shell")
    devops.echo(f"SSH port: {record.ssh_port}")
    return _status_from(record, installed=True, version=info.version)


def _start(vm: VMDir, opts: BootOptions, default_port: int, image: Path, binary: str, arch: str,
           accel: str, contract: bool, host_key: Path, login_key: Path) -> VMRecord:
    """Choose the port and start QEMU under the ports lock, so two boots never pick the same port."""
    with file_lock(paths.vms_dir() / ".ports.lock"):
        port = pick_port(opts.ssh_port, default_port, reserved=_ports_in_use(except_name=vm.name))
        spec = MachineSpec(
            name=vm.name, arch=arch, accel=accel, memory=opts.memory, cpus=opts.cpus, disk=vm.disk,
            pidfile=vm.pidfile, qmp_socket=vm.qmp_socket, serial_socket=vm.serial_socket,
            serial_log=vm.serial_log, ssh_port=port, host_key=host_key,
            authorized_keys=Path(str(login_key) + ".pub"),
            firmware=aarch64_firmware() if arch == "arm64" else None,
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
                guest_contract=int(contract),
            )
            vm.save(record)
        except BaseException:
            _abort(vm, None)
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


@contextlib.contextmanager
def _interrupt_on_term() -> Iterator[None]:
    """SIGTERM/SIGHUP during a boot unwind like Ctrl-C, so the half-booted VM is cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- readiness ------------------------------------------------------------------------------------

def _wait_ready(devops, vm: VMDir, record: VMRecord, contract: bool, timeout: float) -> None:
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
    devops.echo(
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

    argv = hostkeys.ssh_argv(record, ["true"], connect_timeout=5)
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

def stop(devops) -> bool:
    """Power the VM down (escalating to QMP quit, SIGTERM, SIGKILL); False when it was not running."""
    vm = VMDir(devops.name)
    if not vm.path.is_dir():
        devops.echo("Dev environment is not running")
        return False
    # A boot in progress holds the lock: stop its QEMU anyway (that boot then sees QEMU gone, fails
    # and cleans up after itself) rather than wait for its deadline.
    with vm.try_locked() as locked:
        record = vm.load()
        if record is None or not is_alive(record):
            if locked:
                vm.clear()
            devops.echo("Dev environment is not running")
            return False
        devops.echo("Stopping dev environment...")
        timeouts = process.StopTimeouts(powerdown=_env_float("CORE_POWERDOWN_TIMEOUT", 5.0))
        process.stop(record.pid, record.process_start, record.pidfile, record.qmp_socket, timeouts)
        if locked:
            vm.clear()
            hostkeys.forget_host(record.ssh_port)
    devops.echo("Stopped")
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


def is_running(devops) -> bool:
    record = live_record(devops.name)
    return record is not None and record.status == "running"


def status(devops) -> DevStatus:
    info = Manifest.load().get(paths.image_name())
    installed = paths.image_path().is_file() and info is not None
    version = info.version if info else ""
    record = live_record(devops.name)
    if record is None:
        return DevStatus(installed=installed, running=False, image_version=version,
                         ssh_port=devops.config.vm.ssh_port, name=devops.name)
    return _status_from(record, installed, version)


def _status_from(record: VMRecord, installed: bool, version: str) -> DevStatus:
    from datetime import timedelta

    return DevStatus(
        installed=installed, running=record.status == "running", image_version=version,
        container_id=record.id, memory=record.memory, cpus=record.cpus, ssh_port=record.ssh_port,
        uptime=timedelta(seconds=int(record.uptime_seconds())), name=record.name,
    )


def running_vms() -> list[str]:
    """Names of the VMs whose QEMU runs now (stale records are cleaned on the way)."""
    return [name for name in all_names() if live_record(name) is not None]


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


# -- serial console and log -------------------------------------------------------------------

def logs(devops, follow: bool = False, out=None) -> None:
    """Copy the VM's serial log to ``out``; with ``follow``, keep copying until Ctrl-C."""
    from .machine.console import copy_log

    log = VMDir(devops.name).serial_log
    if not log.exists():
        raise VMError(f"no serial log for '{devops.name}' yet (boot it with 'inv vm.boot')")
    copy_log(log, out if out is not None else sys.stdout.buffer, follow)


def console(devops, stdin_fd: int | None = None, stdout_fd: int | None = None) -> None:
    """Attach this terminal to the VM's serial console; Ctrl-] detaches."""
    from .machine.console import DETACH_NAME, relay

    record = live_record(devops.name)
    if record is None:
        raise NotRunningError(NOT_RUNNING)
    sys.stderr.write(f"Connected to the serial console of '{record.name}' (detach: {DETACH_NAME}; "
                     f"press Enter for a prompt)\r\n")
    sys.stderr.flush()
    relay(record.serial_socket,
          sys.stdin.fileno() if stdin_fd is None else stdin_fd,
          sys.stdout.fileno() if stdout_fd is None else stdout_fd)
    sys.stderr.write("\r\nDetached from the serial console\r\n")
