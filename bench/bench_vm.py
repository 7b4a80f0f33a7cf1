#!/usr/bin/env python3
"""Boot-to-ready, stop and status times of the ``vm`` tasks, each against a baseline in the same run.

    .venv/bin/python bench/bench_vm.py [--image PATH] [--runs 3] [--memory 512] [--cpus 1]
                                       [--status-runs 15] [--status-only]

Without ``--image`` the image builder's default recipe is built (or reused from its cache).

* boot: ``inv vm.boot`` (new process: Python, Invoke, record, lock, keys, QEMU, wait for the guest's
  ready line, one strict SSH) vs plain QEMU with the same argument list plus an ``ssh ... true`` poll
  every 0.1 s on the same image; ratio tool/plain (goal <= 1.05, and the difference < 300 ms);
* stop: ``inv vm.stop`` (ACPI power-down) vs QMP ``system_powerdown`` and waiting for the process;
* status: ``inv vm.status`` vs ``inv --version`` (Python and Invoke alone: the floor of any task),
  both new processes, interleaved, medians of ``--status-runs``; with the VM running and stopped;
  ``inv vm.list`` too. Ratio status/--version (goal <= 1.3). ``--status-only`` skips the boot and
  stop rounds (one boot for the running case).
Both boots reuse their overlay (the tool's persists across stop/boot) and pinned host key.
Every process runs with its .pyc files (``PYTHONDONTWRITEBYTECODE`` is dropped and a warm-up run
writes them), as an installed package does.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INV = str(Path(sys.executable).parent / "inv")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return elapsed


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (/proc/<pid>/stat field 22)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def now_ticks() -> int:
    """The current time on the same clock: the start of a process made just now."""
    marker = subprocess.Popen(["sleep", "1"])
    try:
        return start_ticks(marker.pid)
    finally:
        marker.kill()
        marker.wait()


PRE_QEMU: list[float] = []  # inv vm.boot started → QEMU daemon started: what the tool adds up front


def tool_boot_stop(memory: int, cpus: int) -> tuple[float, float]:
    from devops_tasks.machine.records import VMDir

    t0 = now_ticks()
    boot = timed([INV, "vm.boot", "--memory", str(memory), "--cpus", str(cpus)])
    PRE_QEMU.append((start_ticks(VMDir("core-dev").load().pid) - t0) / os.sysconf("SC_CLK_TCK"))
    stop = timed([INV, "vm.stop"])
    return boot, stop


def plain_boot_stop(work: Path, image: Path, memory: int, cpus: int) -> tuple[float, float]:
    """The same QEMU argv, started by hand, then ``ssh true`` every 0.1 s until it succeeds."""
    from devops_tasks import guest, hostkeys
    from devops_tasks.lifecycle import target_for
    from devops_tasks.machine import process
    from devops_tasks.machine.qemu import MachineSpec, build_argv
    from devops_tasks.machine.records import is_vm_process, process_start

    port = free_port()
    spec = MachineSpec(
        name="plain", arch="amd64", accel="tcg", memory=memory, cpus=cpus, disk=work / "overlay.qcow2",
        pidfile=work / "qemu.pid", qmp_socket=work / "qmp.sock", serial_socket=work / "serial.sock",
        serial_log=work / "serial.log", ssh_port=port, host_key=work / "hostkey",
        authorized_keys=Path(str(hostkeys.login_key_path()) + ".pub"),
    )
    hostkeys.pin_host_key(port, spec.host_key)
    ssh = guest.ssh_argv(target_for("bench", port), ["true"], forward_agent=False, tty=False, multiplex=False,
                         connect_timeout=2)
    start = time.perf_counter()
    subprocess.run(build_argv(spec), check=True, stdin=subprocess.DEVNULL, start_new_session=True)
    while subprocess.run(ssh, capture_output=True, stdin=subprocess.DEVNULL).returncode != 0:
        time.sleep(0.1)
    boot = time.perf_counter() - start
    pid = int(spec.pidfile.read_text())
    pstart = process_start(pid)
    start = time.perf_counter()
    process.qmp(spec.qmp_socket, "system_powerdown")
    while is_vm_process(pid, pstart, str(spec.pidfile)):
        time.sleep(0.02)
    stop = time.perf_counter() - start
    hostkeys.forget_host(port)
    return boot, stop


def median(values: list[float]) -> float:
    return statistics.median(values)


STATUS_ARGVS = {"inv --version": [INV, "--version"], "inv vm.status": [INV, "vm.status"],
                "inv vm.list": [INV, "vm.list"]}


def status_round(runs: int) -> dict[str, float]:
    """Medians of interleaved runs (the order rotates each round: other load hits each alike)."""
    times: dict[str, list[float]] = {label: [] for label in STATUS_ARGVS}
    labels = list(STATUS_ARGVS)
    for label in labels:  # warm-up: page cache and .pyc files
        timed(STATUS_ARGVS[label])
    for run in range(runs):
        for label in labels[run % len(labels):] + labels[:run % len(labels)]:
            times[label].append(timed(STATUS_ARGVS[label]))
    return {label: median(values) for label, values in times.items()}


def print_status(state: str, result: dict[str, float]) -> None:
    floor = result["inv --version"]
    cells = "  ".join(f"{label} {1000 * value:.0f} ms" for label, value in result.items())
    print(f"status, VM {state:8}  {cells}  ratio vm.status/--version {result['inv vm.status'] / floor:.2f} "
          f"(goal <= 1.3)  vm.list/--version {result['inv vm.list'] / floor:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, help="qcow2 that follows the guest contract")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--status-runs", type=int, default=15)
    parser.add_argument("--status-only", action="store_true", help="skip the boot and stop rounds")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-vm-"))
    os.environ.update(CORE_HOME=str(work / "core"), CORE_IMAGES_DIR=str(work / "images"))
    os.environ.pop("CORE_SKIP_SSH_SCAN", None)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the children keep their .pyc files, as installed
    from devops_tasks import hostkeys, paths
    from devops_tasks.machine.disk import create_overlay
    from devops_tasks.manifest import ImageInfo, Manifest

    image = args.image
    if image is None:
        from devops_tasks.build import build_image

        image = build_image(output=work / "built.qcow2", log=lambda m: print(m, file=sys.stderr)).path
    image = image.absolute()
    paths.images_dir().mkdir(parents=True)
    paths.image_path().symlink_to(image)
    manifest = Manifest(paths.manifest_path())
    manifest.set(paths.image_name(), ImageInfo(version="bench", source="build", guest_contract=1))
    manifest.save()
    paths.core_home().mkdir(parents=True, exist_ok=True)
    paths.config_path().write_text(f"vm:\n  ssh_port: {free_port()}\n")

    plain = work / "plain"
    plain.mkdir()
    create_overlay(image, plain / "overlay.qcow2")
    hostkeys.ensure_login_key()
    hostkeys.ensure_key(plain / "hostkey", "bench")

    print("status rounds (one boot)...", file=sys.stderr)
    timed([INV, "vm.boot", "--memory", str(args.memory), "--cpus", str(args.cpus)])
    status_running = status_round(args.status_runs)
    timed([INV, "vm.stop"])
    status_stopped = status_round(args.status_runs)
    if args.status_only:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        print_status("running", status_running)
        print_status("stopped", status_stopped)
        return

    print("warm-up (first boot makes the tool's overlay and keys)...", file=sys.stderr)
    tool_boot_stop(args.memory, args.cpus)
    plain_boot_stop(plain, image, args.memory, args.cpus)

    tool_boot, tool_stop, plain_boot, plain_stop = [], [], [], []
    for run in range(args.runs):  # interleaved, alternating order: load from other work hits both
        if run % 2:
            pb, ps = plain_boot_stop(plain, image, args.memory, args.cpus)
        b, s = tool_boot_stop(args.memory, args.cpus)
        if not run % 2:
            pb, ps = plain_boot_stop(plain, image, args.memory, args.cpus)
        tool_boot.append(b), tool_stop.append(s)
        plain_boot.append(pb), plain_stop.append(ps)
        print(f"run {run + 1}: tool boot {b:.2f}s stop {s:.2f}s | plain boot {pb:.2f}s stop {ps:.2f}s",
              file=sys.stderr)
    import shutil

    shutil.rmtree(work, ignore_errors=True)

    print(f"machine load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for label, pick in (("median", median), ("best", min)):
        tb, pb = pick(tool_boot), pick(plain_boot)
        print(f"boot to ready ({label})  inv vm.boot {tb:.2f}s  plain QEMU + ssh poll {pb:.2f}s  "
              f"ratio {tb / pb:.3f} (goal <= 1.05)  difference {1000 * (tb - pb):+.0f} ms (goal < 300)")
    print(f"inv vm.boot start to QEMU start (Python, Invoke, config, lock, port, overlay check, argv): "
          f"median {1000 * median(PRE_QEMU[1:]):.0f} ms (clock ticks of 10 ms)")
    ts, ps = median(tool_stop), median(plain_stop)
    print(f"stop            inv vm.stop {ts:.2f}s  QMP system_powerdown + wait {ps:.2f}s  ratio {ts / ps:.2f}")
    print_status("running", status_running)
    print_status("stopped", status_stopped)


if __name__ == "__main__":
    main()
