#!/usr/bin/env python3
"""The restricted VM's way out (QEMU guestfwd → socat → the host proxy) against an open VM's direct
path, measured from the guest in the same run.

    .venv/bin/python bench/bench_network.py [--image PATH] [--runs 3] [--mib 100] [--small 100]

Boots one VM (TCG here) with ``CORE_HOME`` in a temp dir, first open, then restricted (same disk).
A host HTTP server (``python3 -m http.server``, its own process) on 127.0.0.1 serves a ``--mib``
MiB file and a small one. In the guest,
python3 (``http.client``, a new connection per request) measures:

* a ``--mib`` MiB download, and ``--small`` small requests one after another (latency);
* open VM: directly to ``10.0.2.2:PORT`` (QEMU user networking, the baseline);
* restricted VM: through the proxy as a plain ``http://`` request (absolute URI) and through a
  ``CONNECT`` tunnel (what https clients do), the allowlist holding ``127.0.0.1:PORT``.

Medians of ``--runs``; ratios proxy/direct of the time taken (lower is better, 1.0 = as fast).
Without ``--image`` the default recipe is built, or reused from the test build cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
INV = str(Path(sys.executable).parent / "inv")

GUEST = r'''
import http.client, json, sys, time
mode, port, mib, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def get(path):
    if mode == "direct":
        conn, target = http.client.HTTPConnection("10.0.2.2", port, timeout=300), path
    elif mode == "proxy":
        conn, target = http.client.HTTPConnection("10.0.2.100", 3128, timeout=300), f"http://127.0.0.1:{port}{path}"
    else:
        conn, target = http.client.HTTPConnection("10.0.2.100", 3128, timeout=300), path
        conn.set_tunnel("127.0.0.1", port)
    conn.request("GET", target)
    reply = conn.getresponse()
    assert reply.status == 200, reply.status
    total = 0
    while True:
        data = reply.read(1 << 20)
        if not data:
            break
        total += len(data)
    conn.close()
    return total
t = time.perf_counter()
size = get("/big")
big = time.perf_counter() - t
assert size == mib << 20, size
t = time.perf_counter()
for _ in range(small):
    get("/small")
print(json.dumps({"big": big, "small": time.perf_counter() - t}))
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Files:
    """``python3 -m http.server`` in its own process (so it does not share this process's GIL with
    the proxy) serving ``big`` (``mib`` MiB, sparse) and ``small`` from a temp folder."""

    def __init__(self, mib: int):
        self.folder = Path(tempfile.mkdtemp(prefix="bench-net-files-"))
        with open(self.folder / "big", "wb") as handle:
            handle.truncate(mib << 20)
        (self.folder / "small").write_bytes(b"ok")
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
                                      "--directory", str(self.folder)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("the file server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def image_path(args) -> Path:
    if args.image:
        return Path(args.image).resolve()
    from devops_tasks.build import build_image

    os.environ.setdefault("CORE_CACHE_DIR", "/var/tmp/devops-tasks-test-cache")
    out = Path(tempfile.mkdtemp(prefix="bench-net-img-")) / "minimal.qcow2"
    print("building (or reusing) the default image...", file=sys.stderr)
    return build_image("minimal", output=out).path


def setup(image: Path, work: Path) -> dict:
    from devops_tasks.manifest import ImageInfo, Manifest

    home, images = work / "core", work / "images"
    home.mkdir()
    images.mkdir()
    (home / "config.yaml").write_text(f"vm:\n  ssh_port: {free_port()}\n  memory: 1024\n  cpus: 2\n  boot_timeout: 180\n")
    (images / "core-devops-linux-amd64.qcow2").symlink_to(image)
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="bench", source="build", guest_contract=1))
    manifest.save()
    env = {**os.environ, "CORE_HOME": str(home), "CORE_IMAGES_DIR": str(images)}
    env.pop("SSH_AUTH_SOCK", None)
    os.environ.update(CORE_HOME=env["CORE_HOME"], CORE_IMAGES_DIR=env["CORE_IMAGES_DIR"])
    return env


def inv(env: dict, *words: str) -> None:
    done = subprocess.run([INV, *words], cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"inv {' '.join(words)} failed: {done.stderr[-500:]}")


def measure(mode: str, port: int, args) -> dict:
    from devops_tasks import guest
    from devops_tasks.lifecycle import VM

    with guest.session(VM("core-dev").target()) as conn:
        script = f"python3 -c {shlex.quote(GUEST)} {mode} {port} {args.mib} {args.small}"
        code, out, err = guest.capture(conn, script, timeout=1800)
    if code != 0:
        raise SystemExit(f"guest ({mode}) failed: {err[-800:]}")
    return json.loads(out.strip().splitlines()[-1])


def medians(samples: list[dict]) -> dict:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--small", type=int, default=100)
    args = parser.parse_args()
    image = image_path(args)
    files = Files(args.mib)
    work = Path(tempfile.mkdtemp(prefix="bench-net-"))
    env = setup(image, work)
    results: dict[str, dict] = {}
    try:
        inv(env, "vm.boot", "--network", "open")
        results["direct (open VM)"] = medians([measure("direct", files.port, args) for _ in range(args.runs)])
        inv(env, "vm.stop")
        inv(env, "vm.boot", "--network", "restricted")
        from devops_tasks.lifecycle import VM
        from devops_tasks.proxy.allowlist import Allowlist
        from devops_tasks.proxy.log import ProxyLog
        from devops_tasks.proxy.server import ProxyServer

        vm = VM("core-dev")
        log = ProxyLog(vm.dir.proxy_log)
        server = ProxyServer(Allowlist.parse([f"127.0.0.1:{files.port}"]), log)
        server.listen_unix(vm.dir.load().proxy_socket)
        with server:
            results["proxy, http:// (restricted VM)"] = medians([measure("proxy", files.port, args) for _ in range(args.runs)])
            results["proxy, CONNECT (restricted VM)"] = medians([measure("tunnel", files.port, args) for _ in range(args.runs)])
        log.close()
    finally:
        subprocess.run([INV, "vm.stop"], cwd=REPO, env=env, capture_output=True, stdin=subprocess.DEVNULL)
        files.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = results["direct (open VM)"]
    print(f"\n{args.mib} MiB download and {args.small} small requests from the guest (medians of {args.runs}):")
    print(f"{'path':34} {'download s':>11} {'MB/s':>8} {'small total s':>14} {'ms/request':>11} "
          f"{'ratio dl':>9} {'ratio small':>12}")
    for name, r in results.items():
        print(f"{name:34} {r['big']:11.2f} {args.mib * 1.048576 / r['big']:8.1f} {r['small']:14.2f} "
              f"{1000 * r['small'] / args.small:11.1f} {r['big'] / base['big']:9.2f} {r['small'] / base['small']:12.2f}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
