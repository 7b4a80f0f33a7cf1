#!/usr/bin/env python3
"""Install throughput, memory and resume cost of the verified download, against ``curl -o``.

    .venv/bin/python bench/bench_download.py [--size-mib 1024] [--runs 3] [--dir /dev/shm]

A local server started by the bench (its own process, ``sendfile``, Range + ETag) serves one random
file. Both sides are timed the same way, as a user waits for them: from spawning the process to its
exit. Measured, interleaved:

* throughput: ``devops image.install --source cdn --quiet`` (a new process: Python, Invoke, the
  config, then the download, sha256 verified, fsync, rename, manifest) vs ``curl -s -f -o`` of the
  same file (a new process too); ratio = curl time / install time (goal >= 0.9). ``curl -o`` plus
  the ``fsync`` a durable install needs is shown as well;
* start-up: ``devops image.install`` when the image is already installed (nothing downloaded) vs
  ``curl`` of the small manifest file: the fixed cost each side pays per run;
* peak memory: ``ru_maxrss`` of the install process (``wait4``);
* resume: the server cuts the connection once at 50%; bytes it sends after the cut / the remainder
  (goal <= 1.01).
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

NAME_ENV = "BENCH_IMAGE_NAME"
DEVOPS = str(Path(sys.executable).parent / "devops")


# -- the server (runs in its own process: `bench_download.py serve FILE PORTFILE`) --------------
def serve(path: str, portfile: str) -> None:
    size = os.path.getsize(path)
    etag = f'"{os.stat(path).st_mtime_ns:x}-{size:x}"'
    state = {"sent": 0, "cut": -1, "requests": 0}
    lock = threading.Lock()
    manifest = Path(path + ".manifest.json").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _small(self, body: bytes, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # /cut?offset=N arms one cut; /reset zeroes the counters
            if self.path.startswith("/cut"):
                with lock:
                    state["cut"] = int(self.path.split("=", 1)[1])
            elif self.path == "/reset":
                with lock:
                    state.update(sent=0, cut=-1, requests=0)
            self._small(b"ok")

        def do_GET(self):
            if self.path == "/stats":
                with lock:
                    self._small(json.dumps(state).encode())
                return
            if self.path.endswith("/manifest.json"):
                self._small(manifest)
                return
            with lock:
                state["requests"] += 1
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and self.headers.get("If-Range", etag) == etag:
                start, status = int(rng.split("=")[1].split("-")[0]), 206
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.flush()
            with lock:
                cut = state["cut"] if state["cut"] > start else -1
                if cut > 0:
                    state["cut"] = -1
            end = cut if cut > 0 else size
            out = self.connection.fileno()
            offset = start
            with open(path, "rb") as handle:
                try:
                    while offset < end:
                        n = os.sendfile(out, handle.fileno(), offset, min(end - offset, 8 << 20))
                        if n == 0:
                            break
                        offset += n
                except OSError:
                    pass
            with lock:
                state["sent"] += offset - start
            if cut > 0:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    Path(portfile + ".tmp").write_text(str(httpd.server_address[1]))
    os.replace(portfile + ".tmp", portfile)
    httpd.serve_forever()


# -- the bench ----------------------------------------------------------------------------------
def make_file(path: Path, size: int) -> str:
    """A ``size``-byte file the install accepts: a small qcow2 (the install checks the format with
    ``qemu-img info``) followed by random bytes up to ``size``; its sha256."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    digest = hashlib.sha256(path.read_bytes())
    block = 16 << 20
    with open(path, "ab") as handle:
        left = size - path.stat().st_size
        while left > 0:
            chunk = os.urandom(min(block, left))
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def http(method: str, url: str) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the served file and the downloads go "
                        "(default: the system temp dir; /dev/shm measures the software path without the disk)")
    args = parser.parse_args()

    curl = shutil.which("curl")
    if not curl:
        print("curl is not installed (apt-get install curl)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from devops_tasks.paths import image_name

    name = image_name()
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.dir))
    print(f"working in {work}", file=sys.stderr)
    server = None
    try:
        src_dir = work / "www"
        src_dir.mkdir()
        src = src_dir / name
        print(f"making a {args.size_mib} MiB file...", file=sys.stderr)
        sha = make_file(src, size)
        manifest_text = json.dumps({"images": {name: {"version": "bench", "sha256": sha}}})
        (src_dir / (name + ".manifest.json")).write_text(manifest_text)
        portfile = work / "port"
        server = subprocess.Popen([sys.executable, __file__, "serve", str(src), str(portfile)])
        deadline = time.monotonic() + 10
        while not portfile.exists():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the bench server did not start")
            time.sleep(0.02)
        base = f"http://127.0.0.1:{portfile.read_text()}"
        url = f"{base}/images"

        curl_cpu: list[float] = []

        def run_curl() -> tuple[float, float]:
            """(curl -o alone, curl -o plus the fsync a durable install needs), from spawn."""
            out = work / "curl.out"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run([curl, "-s", "-f", "-o", str(out), f"{url}/{name}"], check=True)
            elapsed = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            curl_cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            synced = time.perf_counter() - t
            assert out.stat().st_size == size
            out.unlink()
            return elapsed, synced

        home = work / "core"
        home.mkdir()
        (home / "config.yaml").write_text(f"images:\n  source: cdn\n  cdn:\n    url: {url}\n")
        images = work / "images"
        env = {key: value for key, value in os.environ.items() if not key.startswith("INVOKE_")}
        env.update(CORE_HOME=str(home), CORE_IMAGES_DIR=str(images))
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its .pyc files
        install_argv = [DEVOPS, "image.install", "--source", "cdn", "--quiet"]

        def spawn(argv: list[str]) -> dict:
            """Run ``argv`` from spawn to exit: wall seconds, and its CPU seconds and peak RSS (wait4)."""
            errors = work / "spawn.stderr"
            t = time.perf_counter()
            with open(errors, "wb") as err:
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=err)
                _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(argv)} failed: {errors.read_text(errors='replace').strip()[-2000:]}")
            return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kib": usage.ru_maxrss}

        def run_install() -> dict:
            shutil.rmtree(images, ignore_errors=True)
            result = spawn(install_argv)
            installed = json.loads((images / "manifest.json").read_text())["images"][name]
            assert installed["sha256"] == sha, installed
            return result

        curl_times, synced_times, install_times, install_cpu, rss = [], [], [], [], []
        run_curl()  # warm the page cache
        run_install()  # and the .pyc files
        # the fixed cost per run, before the big writes (their writeback slows everything after):
        # the image already installed (the tool checks and exits) vs curl of a small file
        noop_install, tiny_curl = [], []
        for _ in range(max(5, args.runs)):
            noop_install.append(spawn(install_argv)["wall"])
            tiny_curl.append(spawn([curl, "-s", "-f", "-o", "/dev/null", f"{url}/manifest.json"])["wall"])
        curl_cpu.clear()
        for index in range(args.runs):  # interleaved, alternating which goes first
            if index % 2:
                result = run_install()
            plain, synced = run_curl()
            if not index % 2:
                result = run_install()
            curl_times.append(plain)
            synced_times.append(synced)
            install_times.append(result["wall"])
            install_cpu.append(result["cpu"])
            rss.append(result["maxrss_kib"])
        best_curl, best_synced, best_install = min(curl_times), min(synced_times), min(install_times)
        mib = size / (1 << 20)

        def line(label: str, times: list[float]) -> str:
            best = min(times)
            runs = ", ".join(f"{t:.2f}" for t in times)
            return f"{label:<26} best {best:6.2f}s ({mib / best:5.0f} MiB/s)  runs {runs}"

        print(line("curl -o:", curl_times))
        print(line("curl -o + fsync:", synced_times))
        print(line("devops image.install:", install_times))
        print(f"throughput ratio vs curl -o:         {best_curl / best_install:.2f}  (goal >= 0.9)")
        print(f"throughput ratio vs curl -o + fsync: {best_synced / best_install:.2f}")
        med = statistics.median
        print(f"the same ratios of the medians: {med(curl_times) / med(install_times):.2f} and "
              f"{med(synced_times) / med(install_times):.2f}")
        print(f"CPU seconds per GiB: curl {min(curl_cpu) / (mib / 1024):.2f}, install {min(install_cpu) / (mib / 1024):.2f} "
              "(the install also hashes every byte, and starts Python)")
        print(f"start-up per run (median): devops image.install, already installed {1000 * med(noop_install):.0f} ms; "
              f"curl of the {len(manifest_text)}-byte manifest {1000 * med(tiny_curl):.0f} ms")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"machine load average during the bench: {load:.1f} on {os.cpu_count()} CPUs")
        print(f"peak memory of the install process: {max(rss) / 1024:.0f} MiB (file {mib:.0f} MiB)")

        # resume after a cut at 50%
        http("POST", f"{base}/reset")
        cut = size // 2
        http("POST", f"{base}/cut?offset={cut}")
        run_install()
        stats = json.loads(http("GET", f"{base}/stats"))
        after_cut = stats["sent"] - cut
        remainder = size - cut
        print(
            f"resume after a cut at 50%: {stats['requests']} requests, {after_cut} bytes sent after the cut "
            f"for a remainder of {remainder}: ratio {after_cut / remainder:.4f}  (goal <= 1.01)"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
