#!/usr/bin/env python3
"""``inv vm.list`` with many VM folders vs ``inv --version``, both new processes, in the same run.

    .venv/bin/python bench/bench_vm_list.py [--vms 10] [--runs 15]

Makes ``--vms`` VM folders in a temporary ``CORE_HOME`` (each a real qcow2 overlay of 8 GiB with
a last-boot record, as a stopped VM leaves them; no QEMU runs), then times, interleaved:

* ``inv vm.list`` and ``inv vm.list --json`` (Python, Invoke, the tasks, every folder read);
* ``inv --version`` (Python and Invoke only: the floor of any task);
* ``inv vm.status --name vm-00`` (one VM: what any task costs to start, for reference).

Prints the medians and the ratio vm.list / --version (goal <= 1.3). No assertion on times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INV = str(Path(sys.executable).parent / "inv")


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return elapsed


def make_vms(home: Path, count: int) -> None:
    for index in range(count):
        folder = home / "vms" / f"vm-{index:02d}"
        folder.mkdir(parents=True, mode=0o700)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(folder / "overlay.qcow2"), "8G"], check=True)
        (folder / "last_boot.json").write_text(json.dumps({
            "memory": 1024, "cpus": 2, "ssh_port": 2222 + index, "network": "open",
            "image_version": "minimal-0123456789abcdef", "booted_at": "2026-01-01T00:00:00Z"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vm-list-") as tmp:
        home = Path(tmp) / "core"
        make_vms(home, args.vms)
        env = {**os.environ, "CORE_HOME": str(home), "CORE_IMAGES_DIR": str(Path(tmp) / "images")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # with their .pyc files, as an installed package
        listed = subprocess.run([INV, "vm.list", "--json"], cwd=REPO, env=env, capture_output=True, text=True)
        assert len(json.loads(listed.stdout)) == args.vms, listed.stdout + listed.stderr
        for argv in ([INV, "--version"], [INV, "vm.list"]):  # warm the page cache and .pyc files
            timed(argv, env)
        version, text, as_json, status = [], [], [], []
        rounds = [(version, [INV, "--version"]), (text, [INV, "vm.list"]), (as_json, [INV, "vm.list", "--json"]),
                  (status, [INV, "vm.status", "--name", "vm-00"])]
        for run in range(args.runs):  # the order rotates each round: load from other work hits each alike
            for times, argv in rounds[run % len(rounds):] + rounds[:run % len(rounds)]:
                times.append(timed(argv, env))
    med = statistics.median
    print(f"VM folders: {args.vms}, runs: {args.runs} (medians)")
    print(f"  inv --version        {med(version) * 1000:7.1f} ms")
    print(f"  inv vm.list          {med(text) * 1000:7.1f} ms")
    print(f"  inv vm.list --json   {med(as_json) * 1000:7.1f} ms")
    print(f"  inv vm.status        {med(status) * 1000:7.1f} ms  (one VM, for reference)")
    print(f"ratio vm.list / --version: {med(text) / med(version):.2f} (goal <= 1.3)")
    print(f"ratio vm.list --json / --version: {med(as_json) / med(version):.2f}")
    print(f"ratio vm.status / --version: {med(status) / med(version):.2f}")


if __name__ == "__main__":
    main()
