#!/usr/bin/env python3
"""Image builder timings: cold and warm builds, image size, boot-to-SSH of the built image.

    .venv/bin/python bench/bench_build.py [--recipe minimal] [--runs 3] [--no-scratch]

* scratch: empty cache (package lists + every .deb fetched, then built) -- skipped by --no-scratch;
* cold: .debs cached, image rebuilt (``force``): the time a recipe change costs;
* warm: unchanged recipe and package versions: the cached image is reused (goal < 10 s);
* boot: plain QEMU (TCG unless vmx/svm + /dev/kvm, or ``CORE_ACCEL``) on an overlay with the
  guest contract's fw_cfg keys; seconds to the ``devops-tasks: ssh ready`` line and to the first
  strict ``ssh ... true`` (goal under TCG: <= ~6.5 s). The load average is printed: other work on
  the machine slows TCG guests roughly in proportion.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from devops_tasks.build import build_image  # noqa: E402
from plainvm import PlainVM, accel_args  # noqa: E402

SHARED_CACHE = os.environ.get("CORE_CACHE_DIR") or "/var/tmp/devops-tasks-test-cache"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def build(recipe: str, cache: str, out: Path, force: bool = False):
    os.environ["CORE_CACHE_DIR"] = cache
    return build_image(recipe, output=out, force=force)


def boot_times(image: Path, runs: int, work: Path) -> tuple[list[float], list[float]]:
    ready, first_ssh = [], []
    for index in range(runs):
        vm = PlainVM(image, work / f"vm{index}")
        try:
            vm.start()
            ready.append(vm.wait_ready())
            result = vm.ssh("true")
            if result.returncode != 0:
                sys.exit(f"ssh failed: {result.stderr.strip()}")
            first_ssh.append(time.monotonic() - vm.started)
        finally:
            vm.cleanup()
    return ready, first_ssh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="minimal")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-scratch", action="store_true", help="skip the empty-cache build")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CORE_HOME", str(work / "core"))
        os.environ["CORE_IMAGES_DIR"] = str(work / "images")
        print(f"recipe {args.recipe}; accel {' '.join(accel_args()[1:2])}; load {load()}")
        if not args.no_scratch:
            result = build(args.recipe, str(work / "scratch-cache"), work / "scratch.qcow2")
            print(f"scratch build (empty cache, fetch lists + .debs): {result.seconds:6.1f} s")
        cold = build(args.recipe, SHARED_CACHE, work / "cold.qcow2", force=True)
        print(f"cold build (.debs cached):                        {cold.seconds:6.1f} s")
        warm = build(args.recipe, SHARED_CACHE, work / "warm.qcow2")
        print(f"warm rebuild (unchanged, reused):                 {warm.seconds:6.1f} s  (goal < 10 s)")
        same = "identical" if warm.sha256 == cold.sha256 else "DIFFERENT"
        print(f"image {cold.version}: {cold.size / 1e6:.1f} MB qcow2, sha256 {cold.sha256[:16]}... ({same} on rebuild)")
        print(f"load before boots {load()}")
        ready, first_ssh = boot_times(work / "cold.qcow2", args.runs, work)
        print(f"boot to 'ssh ready' line: median {statistics.median(ready):.2f} s, min {min(ready):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in ready)})")
        print(f"boot to first SSH command: median {statistics.median(first_ssh):.2f} s, min {min(first_ssh):.2f} s "
              f"(goal under TCG <= ~6.5 s); load {load()}")


if __name__ == "__main__":
    main()
