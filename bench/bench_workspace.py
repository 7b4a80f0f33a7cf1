#!/usr/bin/env python3
"""shell, the /app mount and test, each against a plain-OpenSSH baseline measured in the same run.

    .venv/bin/python bench/bench_workspace.py [--image PATH] [--runs 5] [--mib 32] [--files 5000]

Boots one VM (TCG here) with ``CORE_HOME`` in a temp dir. Without ``--image`` the default recipe
is built, or reused from the test build cache. Medians of interleaved runs:

* shell: ``devops shell -- true`` run outside a project (a new process: Python, the config, the VM
  record, then ``ssh`` over the VM's multiplexed master) vs ``ssh`` as a user types it
  (``ssh -p PORT -i KEY -o UserKnownHostsFile=FILE root@127.0.0.1 true``: no multiplexing) and vs
  that same ``ssh`` with its own ``ControlMaster``/``ControlPersist`` (like for like: both sides
  reuse a connection); ratios devops/ssh (goal <= 1.2 against the typed ssh). Shown too: the first
  ``devops shell`` of a VM (it starts the master), ``CORE_SSH_MULTIPLEX=0``, ``ssh`` with the
  tool's strict options and no multiplexing, and ``devops shell -- true`` in a project (which
  mounts it at /app for the command).
* mount: write and read of a ``--mib`` file and a ``find`` + ``stat`` walk over ``--files`` files,
  in the guest, through the tool's mount (``guest.Mount``: Paramiko channel, Python pumps,
  ``dcache_timeout=1``) vs ``ssh VM sshfs : /mnt -o slave`` piped straight to ``sftp-server``
  (OpenSSH, OS pipes, sshfs defaults); ratio tool/plain (time, lower is better).
* test: ``inv test`` of examples/hello-pytest (mount, pytest in /app, unmount; commands over the VM's
  OpenSSH master) vs ``ssh VM 'cd /root/hello && pytest'`` on a copy already in the guest's disk;
  then ``inv test`` with a kept mount (``vm.mount_idle_timeout``). ``--pypi more-itertools==11.2.1``
  adds that sdist's own suite (one run each, and ``--collect-only``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
INV = str(BIN / "inv")
DEVOPS = str(BIN / "devops")
EXAMPLE = REPO / "examples" / "hello-pytest"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(argv: list[str], env: dict, cwd: Path = REPO, check: bool = True) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if check and done.returncode != 0:
        raise SystemExit(f"{argv[:4]}... failed ({done.returncode}): {done.stderr[-500:]}")
    return elapsed


def median(values: list[float]) -> float:
    return statistics.median(values)


def image_path(args) -> Path:
    if args.image:
        return Path(args.image).resolve()
    from devops_tasks.build import build_image

    os.environ.setdefault("CORE_CACHE_DIR", "/var/tmp/devops-tasks-test-cache")
    out = Path(tempfile.mkdtemp(prefix="bench-ws-img-")) / "minimal.qcow2"
    print("building (or reusing) the default image...", file=sys.stderr)
    return build_image("minimal", output=out).path


def boot(image: Path, work: Path, mount_type: str = "virtiofs") -> dict:
    from devops_tasks.manifest import ImageInfo, Manifest

    home, images = work / "core", work / "images"
    home.mkdir()
    images.mkdir()
    port = free_port()
    (home / "config.yaml").write_text(f"vm:\n  ssh_port: {port}\n  memory: 1024\n  cpus: 2\n  boot_timeout: 180\n"
                                      f"  mount_type: {mount_type}\n")
    (images / "core-devops-linux-amd64.qcow2").symlink_to(image)
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="bench", source="build", guest_contract=1))
    manifest.save()
    env = {**os.environ, "CORE_HOME": str(home), "CORE_IMAGES_DIR": str(images)}
    env.pop("SSH_AUTH_SOCK", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # the tool's processes keep their .pyc files, as installed
    os.environ.update(CORE_HOME=env["CORE_HOME"], CORE_IMAGES_DIR=env["CORE_IMAGES_DIR"])
    os.environ.pop("SSH_AUTH_SOCK", None)
    timed([INV, "vm.boot"], env)
    return env


# --------------------------------------------------------------------------- shell


def typed_ssh(target, command: list[str], master: str = "") -> list[str]:
    """``ssh`` as a user types it for this VM: port, key, known_hosts, nothing else (``master``: a
    ControlPath, then with its own ControlMaster, as a user's ``~/.ssh/config`` would set it up)."""
    argv = ["ssh", "-p", str(target.port), "-i", str(target.identity), "-o", f"UserKnownHostsFile={target.known_hosts}"]
    if master:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={master}", "-o", "ControlPersist=120"]
    return [*argv, "root@127.0.0.1", *command]


def bench_shell(env: dict, target, runs: int) -> dict:
    from devops_tasks import guest

    outside = Path(tempfile.mkdtemp(prefix="bench-ws-noproject-"))  # not a project: nothing is mounted
    master = str(outside / "cm-%C")
    variants = {
        "devops shell -- true": ([DEVOPS, "shell", "--", "true"], env, outside),
        "ssh -p P -i KEY -o UserKnownHostsFile=F root@127.0.0.1 true": (typed_ssh(target, ["true"]), env, outside),
        "the same ssh with its own ControlMaster": (typed_ssh(target, ["true"], master), env, outside),
        "devops shell -- true, CORE_SSH_MULTIPLEX=0": ([DEVOPS, "shell", "--", "true"],
                                                       {**env, "CORE_SSH_MULTIPLEX": "0"}, outside),
        "ssh with the tool's strict options, no multiplexing": (
            guest.ssh_argv(target, ["true"], forward_agent=False, multiplex=False), env, outside),
        "devops shell -- true in a project (mounts it at /app)": ([DEVOPS, "shell", "--", "true"], env, EXAMPLE),
    }
    first = timed(variants["devops shell -- true"][0], env, cwd=outside)  # starts this VM's master
    for argv, venv, cwd in variants.values():  # warm-up: the typed ssh's master, page cache, .pyc files
        timed(argv, venv, cwd=cwd)
    times: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)
    for run in range(runs):  # interleaved; the order rotates each round
        for label in labels[run % len(labels):] + labels[:run % len(labels)]:
            argv, venv, cwd = variants[label]
            times[label].append(timed(argv, venv, cwd=cwd))
    subprocess.run(["ssh", "-o", f"ControlPath={master}", "-O", "exit", "root@127.0.0.1"], capture_output=True)
    shutil.rmtree(outside, ignore_errors=True)
    out = {label: median(values) for label, values in times.items()}
    tool = out["devops shell -- true"]
    out["first devops shell of the VM (starts its master)"] = first
    out["ratio devops shell / typed ssh (goal <= 1.2)"] = tool / out[labels[1]]
    out["ratio devops shell / ssh with its own ControlMaster"] = tool / out[labels[2]]
    out["ratio CORE_SSH_MULTIPLEX=0 / typed ssh"] = out[labels[3]] / out[labels[1]]
    return out


# --------------------------------------------------------------------------- mount


def guest_time(run, script: str) -> float:
    """Seconds the guest itself reports for ``script`` (no SSH round trip counted)."""
    timer = ("import subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(['sh', '-c', sys.argv[1]]).returncode; "
             "print(time.perf_counter() - t); sys.exit(rc)")
    code, out, err = run(f"python3 -c {shlex.quote(timer)} {shlex.quote(script)}")
    if code != 0:
        raise SystemExit(f"guest script failed ({code}): {script}: {err[-500:]}")
    return float(out.strip().splitlines()[-1])


def mount_workload(run, point: str, mib: int) -> dict:
    run(f"rm -f {point}/w.bin")
    write = guest_time(run, f"dd if=/dev/zero of={point}/w.bin bs=1M count={mib} conv=fsync 2>/dev/null")
    read = guest_time(run, f"cat {point}/r.bin > /dev/null")  # pages are dropped on each open
    walk = guest_time(run, f"find {point}/tree -type f | xargs stat -c %s > /dev/null")
    run(f"rm -f {point}/w.bin")
    return {"write MB/s": mib * 1.048576 / write, "read MB/s": mib * 1.048576 / read, "find+stat s": walk}


class PlainSSHFS:
    """``ssh VM sshfs : POINT -o slave`` with its stdin/stdout wired to ``sftp-server`` by OS pipes."""

    def __init__(self, target, folder: Path, point: str):
        from devops_tasks import guest

        self.point = point
        a_read, b_write = os.pipe()
        b_read, a_write = os.pipe()
        self.server = subprocess.Popen([guest.find_sftp_server(), "-d", str(folder)], stdin=a_read, stdout=a_write)
        argv = guest.ssh_argv(target, ["sh", "-c", f"mkdir -p {point} && exec sshfs : {point} -f -o slave"],
                              forward_agent=False, multiplex=False)
        self.ssh = subprocess.Popen(argv, stdin=b_read, stdout=b_write)
        for fd in (a_read, a_write, b_read, b_write):
            os.close(fd)

    def close(self, run) -> None:
        run(f"umount {self.point}")
        for proc in (self.ssh, self.server):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench_mount(target, runs: int, mib: int, files: int) -> dict:
    from devops_tasks import guest

    folder = Path(tempfile.mkdtemp(prefix="bench-ws-mount-"))
    (folder / "r.bin").write_bytes(os.urandom(mib << 20))
    tree = folder / "tree"
    for i in range(files):
        sub = tree / f"d{i // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.txt").write_text(f"{i}\n")
    results: dict[str, list[dict]] = {"tool": [], "plain": []}
    with guest.session(target) as conn:
        def run(script: str):
            return guest.capture(conn, script, timeout=600)

        for _ in range(runs):
            with guest.Mount(conn, folder):
                results["tool"].append(mount_workload(run, "/app", mib))
            plain = PlainSSHFS(target, folder, "/mnt/plain")
            try:
                deadline = time.monotonic() + 30
                while run("grep -q ' /mnt/plain ' /proc/mounts")[0] != 0:
                    if time.monotonic() > deadline:
                        raise SystemExit("the plain sshfs mount did not appear")
                    time.sleep(0.05)
                results["plain"].append(mount_workload(run, "/mnt/plain", mib))
            finally:
                plain.close(run)
    shutil.rmtree(folder)
    out = {}
    for side, rows in results.items():
        for key in rows[0]:
            out[f"{side} {key}"] = median([row[key] for row in rows])
    out["ratio write time"] = out["plain write MB/s"] / out["tool write MB/s"]
    out["ratio read time"] = out["plain read MB/s"] / out["tool read MB/s"]
    out["ratio find+stat time"] = out["tool find+stat s"] / out["plain find+stat s"]
    return out


# --------------------------------------------------------------------------- test


def bench_test(env: dict, target, runs: int) -> dict:
    from devops_tasks import guest

    project = Path(tempfile.mkdtemp(prefix="bench-ws-hello-")) / "hello"
    shutil.copytree(EXAMPLE, project)
    tar = subprocess.run(["tar", "-C", str(project), "-cf", "-", "."], capture_output=True, check=True).stdout
    copy_argv = guest.ssh_argv(target, ["sh", "-c", "rm -rf /root/hello && mkdir /root/hello && tar -C /root/hello -xf -"],
                               forward_agent=False, multiplex=False)
    subprocess.run(copy_argv, input=tar, check=True, capture_output=True)
    # the same command with the same env as `inv test` (test.yaml's env, then detection: pytest)
    plain = guest.ssh_argv(target, ["sh", "-c", "cd /root/hello && HELLO_GREETING='hello from .core/test.yaml' "
                                    "PYTHONDONTWRITEBYTECODE=1 pytest"], forward_agent=False, multiplex=False)
    tool, kept, ssh = [], [], []
    for _ in range(runs):
        tool.append(timed([INV, "test"], env, cwd=project))
        ssh.append(timed(plain, env))
    with kept_mounts(env, 300):
        timed([INV, "test"], env, cwd=project)  # starts the keeper: later runs find the mount
        for _ in range(runs):
            kept.append(timed([INV, "test"], env, cwd=project))
    shutil.rmtree(project.parent)
    return {"inv test": median(tool), "ssh ... pytest (local copy)": median(ssh), "ratio": median(tool) / median(ssh),
            "inv test, kept mount (vm.mount_idle_timeout)": median(kept), "ratio kept": median(kept) / median(ssh)}


class kept_mounts:
    """``vm.mount_idle_timeout: SECONDS`` in the bench's config for the block; kept mounts end after it."""

    def __init__(self, env: dict, seconds: float):
        self.config = Path(env["CORE_HOME"]) / "config.yaml"
        self.seconds = seconds

    def __enter__(self):
        self.saved = self.config.read_text()
        self.config.write_text(self.saved + f"  mount_idle_timeout: {self.seconds}\n")

    def __exit__(self, *exc):
        from devops_tasks.devops import DevOps
        from devops_tasks import mount_keeper as keeper

        self.config.write_text(self.saved)
        keeper.stop_all(DevOps().vm.dir.path)


def bench_pypi_test(env: dict, target, requirement: str) -> dict:
    """One run each of ``inv test -- python3 -m pytest -q`` (mount per command, then kept) and of
    the same pytest over plain ssh on a guest-local copy, for a PyPI sdist's own test suite."""
    from devops_tasks import guest

    work = Path(tempfile.mkdtemp(prefix="bench-ws-pypi-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(work),
                    requirement], check=True, capture_output=True)
    [sdist] = work.glob("*.tar.gz")
    subprocess.run(["tar", "-C", str(work), "-xzf", str(sdist)], check=True)
    [project] = [p for p in work.iterdir() if p.is_dir()]
    tar = subprocess.run(["tar", "-C", str(project), "-cf", "-", "."], capture_output=True, check=True).stdout
    copy_argv = guest.ssh_argv(target, ["sh", "-c", "rm -rf /root/pypi && mkdir /root/pypi && tar -C /root/pypi -xf -"],
                               forward_agent=False, multiplex=False)
    subprocess.run(copy_argv, input=tar, check=True, capture_output=True)
    command = ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    plain = guest.ssh_argv(target, ["sh", "-c", "cd /root/pypi && PYTHONDONTWRITEBYTECODE=1 " + shlex.join(command)],
                           forward_agent=False, multiplex=False)
    collect = guest.ssh_argv(target, ["sh", "-c", "cd /root/pypi && PYTHONDONTWRITEBYTECODE=1 "
                                      + shlex.join(command + ["--collect-only"])], forward_agent=False, multiplex=False)
    timed([INV, "test", "--", "true"], env, cwd=project)  # the project's setup, if any, runs here: not timed
    tool = timed([INV, "test", "--", *command], env, cwd=project, check=False)
    tool_collect = timed([INV, "test", "--", *command, "--collect-only"], env, cwd=project, check=False)
    ssh = timed(plain, env, check=False)
    ssh_collect = timed(collect, env, check=False)
    with kept_mounts(env, 600):
        timed([INV, "test", "--", "true"], env, cwd=project)
        kept = timed([INV, "test", "--", *command], env, cwd=project, check=False)
    shutil.rmtree(work)
    return {f"inv test ({requirement})": tool, "ssh ... pytest (local copy)": ssh, "ratio": tool / ssh,
            "inv test, kept mount": kept, "ratio kept": kept / ssh,
            "collect-only: inv test": tool_collect, "collect-only: ssh (local copy)": ssh_collect,
            "ratio collect": tool_collect / ssh_collect}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="a bootable image (default: build or reuse the default recipe)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=32, help="size of the read and write files")
    parser.add_argument("--files", type=int, default=5000, help="files in the find+stat walk")
    parser.add_argument("--only", choices=["shell", "mount", "test"], action="append")
    parser.add_argument("--mount-type", choices=["virtiofs", "sshfs"], default="virtiofs",
                        help="the VM's /app backend (vm.mount_type) for the test section")
    parser.add_argument("--pypi", metavar="REQUIREMENT",
                        help="also run this sdist's test suite (e.g. more-itertools==11.2.1: minutes under TCG)")
    args = parser.parse_args()
    only = set(args.only or ["shell", "mount", "test"])

    image = image_path(args)
    work = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    env = boot(image, work, args.mount_type)
    from devops_tasks import guest
    from devops_tasks.devops import DevOps

    report: dict[str, dict] = {}
    try:
        target = DevOps().vm.target()
        if "shell" in only:
            report["shell"] = show("shell", bench_shell(env, target, args.runs))
        if "mount" in only:
            report["mount"] = show("mount", bench_mount(target, max(1, args.runs // 2), args.mib, args.files))
        if "test" in only:
            report["test"] = show("test", bench_test(env, target, max(1, args.runs // 2)))
        if args.pypi:
            report["pypi"] = show("pypi", bench_pypi_test(env, target, args.pypi))
    finally:
        try:
            guest.close_master(DevOps().vm.target())
        except Exception:
            pass
        subprocess.run([INV, "vm.stop"], env=env, capture_output=True, stdin=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))
    return 0


def show(section: str, values: dict) -> dict:
    print(f"[{section}]")
    for key, value in values.items():
        unit = "" if ("ratio" in key or "MB/s" in key or key.endswith(" s")) else " s"
        print(f"  {key:62} {value:8.3f}{unit}", flush=True)
    return values


if __name__ == "__main__":
    sys.exit(main())
