#!/usr/bin/env python3
"""The review's copy in, diff and apply against ``rsync -a`` of the same tree both ways, in one run.

    .venv/bin/python bench/bench_review.py [--image PATH] [--files 10000] [--mb 200] [--edits 300]

Boots one VM (TCG here) with ``CORE_HOME`` in a temp dir, on ``bench/recipes/minimal-rsync.yaml``
(minimal plus rsync, built or reused from the test build cache) unless ``--image`` is given. The
project: ``--files`` files of random bytes, ``--mb`` MB in all, 100 to a folder. Then:

* copy in: ``ProjectCopy.copy_in`` (the listing, the hashing tar stream over OpenSSH, busybox tar
  and the lstat baseline in the guest) vs ``rsync -a`` of the tree into the VM over OpenSSH (the
  same key and options, no multiplexing);
* the "agent" edits a third of ``--edits`` files, adds a third and deletes a third (in the guest,
  not timed);
* diff: ``ProjectCopy.collect`` (the guest's lstat comparison, the changed files' bytes back, the
  review, its patch) vs ``rsync -a --delete`` of the VM's tree back to a copy of the project on the
  host;
* apply: ``apply_review`` into the project vs nothing more for rsync (its run back already wrote
  the files), so the last ratio compares diff + apply with rsync's way back.

Ratios are tool/rsync (time, lower is better). A local ``rsync -a`` of the tree (host to host) is
shown for scale.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
RECIPE = REPO / "bench" / "recipes" / "minimal-rsync.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_path(args) -> Path:
    if args.image:
        return Path(args.image).resolve()
    from devops_tasks.build import build_image

    os.environ.setdefault("CORE_CACHE_DIR", "/var/tmp/devops-tasks-test-cache")
    out = Path(tempfile.mkdtemp(prefix="bench-review-img-")) / "minimal-rsync.qcow2"
    print("building (or reusing) the minimal-rsync image...", file=sys.stderr)
    return build_image(RECIPE, output=out).path


def boot(image: Path, work: Path) -> None:
    from devops_tasks.devops import DevOps
    from devops_tasks.manifest import ImageInfo, Manifest

    home, images = work / "core", work / "images"
    home.mkdir()
    images.mkdir()
    (home / "config.yaml").write_text(f"vm:\n  ssh_port: {free_port()}\n  memory: 1024\n  cpus: 2\n"
                                      "  boot_timeout: 180\n")
    (images / "core-devops-linux-amd64.qcow2").symlink_to(image)
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="bench", source="build", guest_contract=1))
    manifest.save()
    os.environ.update(CORE_HOME=str(home), CORE_IMAGES_DIR=str(images))
    os.environ.pop("SSH_AUTH_SOCK", None)
    DevOps(echo=lambda _: None).boot()


def make_project(root: Path, files: int, mb: int) -> None:
    size = max(1, (mb << 20) // files)
    for i in range(files):
        folder = root / f"d{i // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:05d}.bin").write_bytes(os.urandom(size))


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])}... failed ({done.returncode}): {done.stderr[-800:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="a qcow2 with rsync (default: build bench/recipes/minimal-rsync.yaml)")
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--edits", type=int, default=300, help="files the agent edits, adds and deletes (a third each)")
    args = parser.parse_args()

    image = image_path(args)
    work = Path(tempfile.mkdtemp(prefix="bench-review-"))
    try:
        print(f"making a project of {args.files} files, {args.mb} MB...", file=sys.stderr)
        project = work / "project"
        make_project(project, args.files, args.mb)
        boot(image, work)
        measure(project, work, args)
    finally:
        from devops_tasks.devops import DevOps

        DevOps(echo=lambda _: None).stop()
        shutil.rmtree(work, ignore_errors=True)


def measure(project: Path, work: Path, args) -> None:
    from devops_tasks import guest
    from devops_tasks.devops import DevOps
    from devops_tasks.review import ProjectCopy, apply_review

    vm = DevOps(echo=lambda _: None).vm
    target = vm.target()
    ssh = shlex.join(["ssh", *guest.ssh_options(target, multiplex=False)])
    remote = f"{target.user}@{target.host}"
    third = max(1, args.edits // 3)
    edit = (f"cd {{app}} && i=0; for f in $(find . -name '*.bin' | sort | head -n {2 * third}); do "
            f"i=$((i+1)); if [ $i -le {third} ]; then printf 'edited' >> \"$f\"; else rm \"$f\"; fi; done; "
            f"mkdir -p new && j=0; while [ $j -lt {third} ]; do head -c 20000 /dev/urandom > new/n$j.bin; "
            "j=$((j+1)); done")
    results = {}
    with guest.session(target) as conn:
        def sh(script: str) -> None:
            code, _, err = guest.capture(conn, script, timeout=1800)
            if code != 0:
                raise SystemExit(f"guest: {script[:60]}... failed ({code}): {err[-500:]}")

        copy = ProjectCopy(project, vm.name, echo=lambda _: None, agent_user="dev", target=target)
        results["copy in: review"] = timed(lambda: copy.copy_in(conn))
        sh("rm -rf /srv/rsync && mkdir -p /srv/rsync")
        results["copy in: rsync -a"] = timed(lambda: run(["rsync", "-a", "-e", ssh, f"{project}/",
                                                          f"{remote}:/srv/rsync/"]))
        sh(edit.format(app="/app") + " && " + edit.format(app="/srv/rsync"))
        review = None

        def collect():
            nonlocal review
            review = copy.collect(conn)

        results["diff: review"] = timed(collect)
        back = work / "rsync-back"
        local = timed(lambda: run(["rsync", "-a", f"{project}/", f"{back}/"]))
        results["back: rsync -a --delete"] = timed(lambda: run(["rsync", "-a", "--delete", "-e", ssh,
                                                                f"{remote}:/srv/rsync/", f"{back}/"]))
        sh("rm -rf /srv/rsync")
    if review is None:
        raise SystemExit(f"no review: {copy.lost}")
    results["apply: review"] = timed(lambda: apply_review(review))
    results["local rsync -a (host to host, for scale)"] = local
    print(f"\nproject: {args.files} files, {args.mb} MB; the agent edited {third}, deleted {third}, added {third}"
          f" (review {review.changes} changes)")
    for name, seconds in results.items():
        print(f"  {name:<44} {seconds:8.2f} s")
    copy_in = results["copy in: review"] / results["copy in: rsync -a"]
    out = (results["diff: review"] + results["apply: review"]) / results["back: rsync -a --delete"]
    print(f"  ratio copy in (review / rsync)                {copy_in:8.2f}")
    print(f"  ratio diff + apply (review / rsync back)      {out:8.2f}")


if __name__ == "__main__":
    main()
