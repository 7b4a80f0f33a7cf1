#!/usr/bin/env python3
"""Image builder timings against a baseline doing the same packaging work: cold and warm builds,
image size, boot-to-SSH of the built image.

    .venv/bin/python bench/bench_build.py [--recipe minimal] [--runs 3] [--build-runs 2] [--no-scratch]

* scratch: empty cache (package lists + every .deb fetched, then built) -- skipped by --no-scratch;
* cold: .debs cached, image rebuilt (``force``): the time a recipe change costs;
* baseline (interleaved with the cold builds, same cache): ``mmdebstrap --variant=extract`` of the
  exact package list the build resolved (same versions; the cached .debs and package lists are
  handed in, so nothing is downloaded, and no maintainer script runs, as in the build; the kernel
  package is unpacked by ``dpkg-deb -x`` in a hook, as apt would add its dependencies), the recipe's ``exclude`` paths removed, ``mkfs.ext4 -d`` of an image of the recipe's disk
  size, and ``qemu-img convert -c`` (zstd) to qcow2, as the build does. Ratio cold/baseline. The
  baseline does *less* than the build: no boot partition, kernel command line, initramfs or
  syslinux, none of the builder's fix-ups (users, CA bundle, alternatives, init scripts, keys
  contract), no reproducibility passes, so its image does not boot; but it unpacks the whole
  kernel package into the root (the build unpacks it once into its cache and copies the kernel and
  the recipe's modules). Both images' sizes are printed. Without ``mmdebstrap`` (``apt-get install mmdebstrap``) the script says there is
  no baseline and prints the tool's times alone;
* warm: unchanged recipe and package versions: the cached image is reused (goal < 10 s; no
  baseline: nothing else skips a build whose inputs did not change);
* boot: plain QEMU (TCG unless vmx/svm + /dev/kvm, or ``CORE_ACCEL``) on an overlay with the
  guest contract's fw_cfg keys; seconds to the ``devops-tasks: ssh ready`` line and to the first
  strict ``ssh ... true`` (goal under TCG: <= ~6.5 s). The load average is printed: other work on
  the machine slows TCG guests roughly in proportion.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
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


def baseline_inputs(recipe_name: str, work: Path) -> tuple[list[str], Path, Path, object]:
    """The build's resolved packages (``name=version``, the kernel last), a folder of their cached
    .debs (hard links), the cached apt lists, and the recipe and its apt source: what mmdebstrap is
    handed."""
    from devops_tasks.build import builder, load_recipe

    os.environ["CORE_CACHE_DIR"] = SHARED_CACHE
    recipe = load_recipe(recipe_name)
    plan = builder.plan(recipe)
    packages = [*plan.packages, plan.kernel]
    debs = work / "baseline-debs"
    debs.mkdir(exist_ok=True)
    for package in packages:
        source, link = plan.apt.debs / package.filename, debs / package.filename
        if not link.exists():
            try:
                os.link(source, link)
            except OSError:
                shutil.copy2(source, link)
    return [package.pin() for package in packages], debs, plan.apt.root / "lists", (recipe, plan.apt.source)


def baseline_build(pins: list[str], debs: Path, lists: Path, recipe_and_source, work: Path) -> tuple[float, int]:
    """mmdebstrap (extract) + exclusions + mkfs.ext4 -d + qemu-img convert -c: (seconds, qcow2 bytes)."""
    recipe, source = recipe_and_source
    *packages, kernel = pins
    kernel_deb = next(debs.glob(f"{kernel.split('=')[0]}_*.deb"))
    root, raw, out = work / "baseline-root", work / "baseline.raw", work / "baseline.qcow2"
    for leftover in (raw, out):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    comps = " ".join(source.components)
    lines = [f"deb [arch={source.architecture}] {source.mirror} {source.suite} {comps}",
             f"deb [arch={source.architecture}] {source.mirror} {source.suite}-updates {comps}"]
    if source.security_mirror:
        lines.append(f"deb [arch={source.architecture}] {source.security_mirror} {source.suite}-security {comps}")
    excluded = " ".join(f'"$1"{pattern}' for pattern in recipe.exclude)  # globs, expanded by sh
    start = time.perf_counter()
    steps = [
        ["mmdebstrap", "--quiet", "--variant=extract", f"--architectures={source.architecture}",
         f"--include={','.join(packages)}", "--skip=update", "--skip=download/empty",
         "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ \"$1\"/var/lib/apt/lists/",
         f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
         f"--setup-hook=sync-in {lists} /var/lib/apt/lists/",
         # the kernel package unpacked as the build does, without its dependencies (initramfs-tools,
         # udev, kmod...: apt would add them, and they are neither in the image nor in the cache)
         f"--customize-hook=dpkg-deb -x {kernel_deb} \"$1\"",
         *([f"--customize-hook=rm -rf {excluded}"] if excluded else []),
         source.suite, str(root), *lines],
        ["truncate", "-s", str(recipe.disk_size), str(raw)],
        ["mkfs.ext4", "-q", "-F", "-t", "ext4", "-d", str(root),
         "-E", "root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(raw)],
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
         str(raw), str(out)],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            sys.exit(f"baseline step failed: {argv[0]}: {(done.stderr or done.stdout).strip()[-1500:]}")
    with open(out, "rb+") as handle:  # durable, as the build's image
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - start
    size = out.stat().st_size
    shutil.rmtree(root, ignore_errors=True)
    raw.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    return seconds, size


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
    parser.add_argument("--build-runs", type=int, default=2, help="cold builds and baseline builds (interleaved)")
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
        have_baseline = shutil.which("mmdebstrap") is not None and os.geteuid() == 0
        if not have_baseline:
            print("NO BASELINE: mmdebstrap is not installed (apt-get install mmdebstrap) or this is not root; "
                  "the build times below are the tool's alone")
        colds, baselines, baseline_size = [], [], 0
        inputs = None
        for index in range(max(1, args.build_runs)):  # interleaved, alternating which goes first
            if have_baseline and inputs is None:
                build(args.recipe, SHARED_CACHE, work / "cold.qcow2")  # the .debs and lists in the cache
                inputs = baseline_inputs(args.recipe, work)
            if have_baseline and index % 2:
                seconds, baseline_size = baseline_build(*inputs, work)
                baselines.append(seconds)
            cold = build(args.recipe, SHARED_CACHE, work / "cold.qcow2", force=True)
            colds.append(cold.seconds)
            if have_baseline and not index % 2:
                seconds, baseline_size = baseline_build(*inputs, work)
                baselines.append(seconds)
        med = statistics.median
        print(f"cold build (.debs cached):                        {med(colds):6.1f} s  "
              f"(runs {', '.join(f'{s:.1f}' for s in colds)})")
        if have_baseline:
            print(f"baseline mmdebstrap + mkfs.ext4 -d + qemu-img:    {med(baselines):6.1f} s  "
                  f"(runs {', '.join(f'{s:.1f}' for s in baselines)}; {baseline_size / 1e6:.1f} MB qcow2, "
                  f"not bootable)")
            print(f"ratio cold build / baseline: {med(colds) / med(baselines):.2f} "
                  f"(the build also makes the boot partition, initramfs and fix-ups)")
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
