#!/usr/bin/env python3
"""The /app mount backends (virtiofs, sshfs) against a guest-local copy of the same files, one run.

    .venv/bin/python bench/bench_mount.py [--image PATH] [--runs 3] [--mib 100] [--files 5000] [--sdist DIR]

Boots one VM (TCG here, ``vm.mount_type: virtiofs``: shared memory) with ``CORE_HOME`` in a temp
dir. The project: ``--files`` small files in 50 folders, plus more-itertools 11.2.1's sdist
(``pip download more-itertools==11.2.1 --no-deps --no-binary :all:`` on the host; the guest has no
internet). Each backend mounts it at /app through the tool's own classes (``VirtiofsMount``:
hot-plugged virtiofsd; ``Mount``: reverse sshfs); the baseline is a copy of the same tree on the
guest's disk (``vm.cp``). The guest times each workload itself (medians of ``--runs``; the guest's
page cache is dropped before each one, so every backend starts cold in the guest):

* walk: ``find DIR/tree -type f | xargs stat``
* write+read: ``dd`` of ``--mib`` MB with fsync, caches dropped, ``dd`` back
* collect: ``python3 -m pytest --collect-only -q`` in more-itertools

Ratios are backend/local (time, lower is better; the goal for virtiofs: walk and write+read <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_workspace import boot, image_path  # noqa: E402

SDIST = "more-itertools==11.2.1"


def guest_time(run, script: str) -> float:
    timer = ("import subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(['sh', '-c', sys.argv[1]], stdout=subprocess.DEVNULL).returncode; "
             "print(time.perf_counter() - t); sys.exit(rc)")
    code, out, err = run(f"sync; echo 3 > /proc/sys/vm/drop_caches; python3 -c {shlex.quote(timer)} {shlex.quote(script)}")
    if code != 0:
        raise SystemExit(f"guest script failed ({code}): {script}: {err[-500:]}")
    return float(out.strip().splitlines()[-1])


def workloads(run, point: str, mib: int, runs: int) -> dict:
    walk, rw, collect = [], [], []
    for _ in range(runs):
        walk.append(guest_time(run, f"find {point}/tree -type f | xargs stat >/dev/null"))
        write = guest_time(run, f"dd if=/dev/zero of={point}/big.bin bs=1M count={mib} conv=fsync 2>/dev/null")
        read = guest_time(run, f"dd if={point}/big.bin of=/dev/null bs=1M 2>/dev/null")
        run(f"rm -f {point}/big.bin")
        rw.append(write + read)
        collect.append(guest_time(run, f"cd {point}/more-itertools && python3 -m pytest --collect-only -q "
                                       "-p no:cacheprovider"))
    return {"walk": statistics.median(walk), "write+read": statistics.median(rw),
            "collect": statistics.median(collect)}


def make_project(root: Path, files: int, sdist_dir: Path | None) -> None:
    tree = root / "tree"
    for i in range(files):
        folder = tree / f"d{i % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}.txt").write_text(f"file {i}\n")
    if sdist_dir is None:
        sdist_dir = Path(tempfile.mkdtemp(prefix="bench-mount-sdist-"))
        subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                        "-d", str(sdist_dir), "-q"], check=True)
    archive = next(sdist_dir.glob("more_itertools-11.2.1.tar.gz"), None) or next(sdist_dir.glob("more*11.2.1*"))
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    extracted = next(p for p in root.iterdir() if p.name.lower().startswith("more") and p.is_dir())
    extracted.rename(root / "more-itertools")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--sdist", help="a folder holding more_itertools-11.2.1.tar.gz (else pip download)")
    args = parser.parse_args()
    image = image_path(args)
    work = Path(tempfile.mkdtemp(prefix="bench-mount-"))
    project = work / "project"
    project.mkdir()
    make_project(project, args.files, Path(args.sdist) if args.sdist else None)
    env = boot(image, work)
    from devops_tasks import guest
    from devops_tasks.devops import DevOps
    from devops_tasks.guest.virtiofs import VirtiofsMount

    d = DevOps()
    results = {}
    try:
        target = d.vm.target()
        with guest.session(target) as conn:
            run = lambda script: guest.capture(conn, script, timeout=1800)  # noqa: E731
            t = time.perf_counter()
            guest.copy_to_guest(conn, project, "/root/local")
            print(f"copied the project into the guest in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            results["local"] = workloads(run, "/root/local", args.mib, args.runs)
            with VirtiofsMount(conn, project, d.vm.qmp, Path(d.vm.qmp_socket()).parent, "/app"):
                results["virtiofs"] = workloads(run, "/app", args.mib, args.runs)
            with guest.Mount(conn, project, "/app"):
                results["sshfs"] = workloads(run, "/app", args.mib, args.runs)
    finally:
        subprocess.run([str(Path(sys.executable).parent / "inv"), "vm.stop"], env=env, capture_output=True)
    local = results["local"]
    print(f"{'workload':<12} {'local s':>9} {'virtiofs s':>11} {'ratio':>6} {'sshfs s':>9} {'ratio':>6}")
    for key in ("walk", "write+read", "collect"):
        v, s = results["virtiofs"][key], results["sshfs"][key]
        print(f"{key:<12} {local[key]:>9.2f} {v:>11.2f} {v / local[key]:>5.2f}x {s:>9.2f} {s / local[key]:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
