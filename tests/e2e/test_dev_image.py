"""The ``dev`` image runs real projects of every ecosystem ``inv test`` and ``inv serve`` detect,
their dependencies installed in the guest from the package indexes, under TCG.

* Python: pluggy 1.5.0's sdist from PyPI, its own suite with its ``testing`` extra (pytest and
  pytest-benchmark from PyPI) in a virtual environment made by detection; as many tests pass as on
  this machine.
* Node: json-stable-stringify-without-jsonify 1.0.1's tarball from the npm registry (its tests and
  ``tape test/*.js``), its devDependencies installed by npm in the guest; as many tests pass as on
  this machine (when it has npm); the second run skips the install.
* Go: ``go test`` of packages of Go's own standard library.
* PHP: composer/semver 3.4.4 (vendored: Packagist is out of reach) with a ``setup:`` of
  ``composer dump-autoload``, its PHPUnit suite, and ``inv serve`` of it reached from here.

Nothing here needs the internet beyond PyPI, the npm registry and Debian. The figures (image sizes,
boot to SSH, build and run times) are printed: run with ``-s``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from devops_tasks import guest
from devops_tasks.build import build_image
from devops_tasks.devops import DevOps
from devops_tasks.manifest import ImageInfo, Manifest

from helpers import free_port, wait_for
from plainvm import PlainVM

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
DEVOPS = str(BIN / "devops")
PROJECTS = Path(__file__).resolve().parent / "projects"
PLUGGY = ("pluggy", "1.5.0")
NODE_PACKAGE = ("json-stable-stringify-without-jsonify", "1.0.1")
GO_PACKAGES = ("container/list", "container/ring", "unicode/utf8", "path")
FIGURES: list[str] = []


def figure(line: str) -> None:
    FIGURES.append(line)
    print(f"\n[figure] {line}")


# -- fetching the projects (PyPI and npm, checked against their published hashes) --------------

def session() -> requests.Session:
    s = requests.Session()
    s.headers["User-Agent"] = "devops-tasks-tests"
    return s


def pypi_sdist(name: str, version: str, dest: Path) -> Path:
    """The project's sdist from PyPI, sha256-checked, unpacked into ``dest``; -> its folder."""
    s = session()
    index = s.get(f"https://pypi.org/simple/{name}/", timeout=60,
                  headers={"Accept": "application/vnd.pypi.simple.v1+json"})  # PEP 691
    index.raise_for_status()
    (sdist,) = [f for f in index.json()["files"] if f["filename"] == f"{name}-{version}.tar.gz"]
    data = s.get(sdist["url"], timeout=120).content
    assert hashlib.sha256(data).hexdigest() == sdist["hashes"]["sha256"]
    return unpack(data, dest)


def npm_tarball(name: str, version: str, dest: Path) -> Path:
    """The package's tarball from the npm registry, checked against its sha512 integrity."""
    s = session()
    meta = s.get(f"https://registry.npmjs.org/{name}/{version}", timeout=60)
    meta.raise_for_status()
    dist = meta.json()["dist"]
    data = s.get(dist["tarball"], timeout=120).content
    assert "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode() == dist["integrity"]
    return unpack(data, dest)


def unpack(data: bytes, dest: Path) -> Path:
    """Unpack a .tar.gz as this user (no owners or modes from the archive beyond rwx for us)."""
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    (top,) = list(dest.iterdir())
    for path in [top, *top.rglob("*")]:
        if not path.is_symlink():
            os.chown(path, os.getuid(), os.getgid())
            path.chmod(0o755 if path.is_dir() else 0o644)
    return top


# -- the guest -----------------------------------------------------------------------------------

class DevVM:
    def __init__(self, env: dict, home: Path):
        self.env = env
        self.home = home

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([DEVOPS, *args], cwd=cwd or self.home, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def test(self, project: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
        start = time.monotonic()
        result = self.run("test", *args, cwd=project, timeout=timeout)
        return result, time.monotonic() - start

    def guest(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run("shell", "--", "sh", "-c", script, timeout=timeout)


@pytest.fixture(scope="module")
def dev(dev_image, tmp_path_factory):
    base = tmp_path_factory.mktemp("dev")
    home, images = base / "core", base / "images"
    home.mkdir()
    images.mkdir()
    (home / "config.yaml").write_text(f"vm:\n  ssh_port: {free_port()}\n  memory: 2048\n  cpus: 2\n"
                                      "  boot_timeout: 300\n")
    (images / "core-devops-linux-amd64.qcow2").symlink_to(dev_image)
    manifest = Manifest(images / "manifest.json")
    manifest.set("core-devops-linux-amd64.qcow2", ImageInfo(version="v0-dev", source="build", guest_contract=1))
    manifest.save()
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env.update(CORE_HOME=str(home), CORE_IMAGES_DIR=str(images))
    machine = DevVM(env, base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORE_HOME", str(home))
        mp.setenv("CORE_IMAGES_DIR", str(images))
        try:
            boot = machine.run("vm.boot", timeout=400)
            assert boot.returncode == 0, boot.stdout + boot.stderr
            yield machine
        finally:
            try:
                guest.close_master(DevOps().vm.target())
            except Exception:
                pass
            machine.run("vm.stop", timeout=120)


def test_the_dev_image_has_every_toolchain(dev, tmp_path):
    versions = dev.guest("node --version; npm --version; php -r 'echo PHP_VERSION, \"\\n\";'; "
                         "composer --version 2>/dev/null | head -1; phpunit --version | head -1; go version; "
                         "python --version; python3 -m pip --version | cut -d' ' -f1-2; python3 -m venv --help >/dev/null "
                         "&& echo venv; curl --version | head -1 | cut -d' ' -f1; php -m | grep -c -x -i -E "
                         "'mbstring|xml|dom|curl|zip|pdo_sqlite|intl|tokenizer|ctype'")
    assert versions.returncode == 0, versions.stderr
    lines = versions.stdout.splitlines()
    assert lines[0] == "v24.22.3" and lines[1] == "11.21.2"
    assert lines[2].startswith("8.2.") and lines[3].startswith("Composer version 2.")
    assert lines[4].startswith("PHPUnit 9.6.") and lines[5].startswith("go version go1.19")
    assert lines[6].startswith("Python 3.11") and lines[7] == "pip 23.0.1" and lines[8:10] == ["venv", "curl"]
    assert lines[10] == "9", "PHP's extensions are enabled (the builder did what phpenmod does)"
    hello = dev.guest("cd /tmp && printf '#include <stdio.h>\\nint main(void){puts(\"cc ok\");return 0;}\\n' > h.c "
                      "&& cc -o h h.c && ./h && printf '#include <Python.h>\\n' | cc -E -I/usr/include/python3.11 - "
                      ">/dev/null && echo headers ok")
    assert hello.stdout.split("\n")[:2] == ["cc ok", "headers ok"], hello.stderr
    addon = dev.guest(NODE_ADDON, timeout=600)
    assert addon.returncode == 0 and addon.stdout.endswith("native ok\n"), addon.stdout[-2000:] + addon.stderr


# A Node-API addon built by npm's node-gyp against the headers in the image: no download from nodejs.org
NODE_ADDON = """set -e
mkdir -p /tmp/addon && cd /tmp/addon
echo '{"targets": [{"target_name": "hello", "sources": ["hello.c"]}]}' > binding.gyp
cat > hello.c <<'END'
#include <node_api.h>
static napi_value hi(napi_env env, napi_callback_info info) {
    napi_value s; napi_create_string_utf8(env, "native ok", NAPI_AUTO_LENGTH, &s); return s;
}
NAPI_MODULE_INIT() {
    napi_value f; napi_create_function(env, "hi", NAPI_AUTO_LENGTH, hi, NULL, &f);
    napi_set_named_property(env, exports, "hi", f); return exports;
}
END
node /usr/local/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js rebuild >/dev/null 2>&1
node -e 'console.log(require("./build/Release/hello.node").hi())'
"""


def test_python_sdist_from_pypi_with_its_test_extra(dev, tmp_path):
    host_copy = pypi_sdist(*PLUGGY, tmp_path / "host")
    guest_copy = pypi_sdist(*PLUGGY, tmp_path / "guest")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run([str(venv / "bin/pip"), "install", "-q", "-e", ".[testing]"], cwd=host_copy,
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    on_host = subprocess.run([str(venv / "bin/pytest"), "-q", "-p", "no:cacheprovider"], cwd=host_copy,
                             capture_output=True, text=True, timeout=600)
    host_passed = int(re.search(r"(\d+) passed", on_host.stdout).group(1))
    assert on_host.returncode == 0 and host_passed > 50, on_host.stdout[-2000:]

    first, first_time = dev.test(guest_copy)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Installing dependencies (first run): a virtual environment, pip install -e '.[testing]' pytest" in first.stdout
    passed = int(re.search(r"(\d+) passed", first.stdout).group(1))
    assert passed == host_passed
    assert "benchmark:" in first.stdout, "pytest-benchmark came from the index into the guest's venv"
    second, second_time = dev.test(guest_copy)
    assert second.returncode == 0 and "Dependencies up to date" in second.stdout
    assert int(re.search(r"(\d+) passed", second.stdout).group(1)) == host_passed
    figure(f"Python {'-'.join(PLUGGY)}: {passed} passed in the VM and on the host; inv test {first_time:.0f}s with "
           f"the venv from PyPI, {second_time:.0f}s after")


def tape_counts(output: str) -> tuple[int, int]:
    tests = int(re.search(r"^# tests (\d+)", output, re.M).group(1))
    passed = int(re.search(r"^# pass\s+(\d+)", output, re.M).group(1))
    return tests, passed


def test_node_package_from_npm_with_its_dev_dependencies(dev, tmp_path):
    project = npm_tarball(*NODE_PACKAGE, tmp_path / "guest")
    first, first_time = dev.test(project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Installing dependencies (no node_modules): npm install --no-package-lock" in first.stdout
    assert (project / "node_modules" / "tape" / "package.json").is_file(), "npm wrote devDependencies through /app"
    assert not (project / "package-lock.json").exists()
    tests, passed = tape_counts(first.stdout)
    assert tests == passed and tests > 10 and "# fail" not in first.stdout
    second, second_time = dev.test(project)
    assert second.returncode == 0
    assert "Dependencies up to date (package.json unchanged): npm install --no-package-lock" in second.stdout
    assert tape_counts(second.stdout) == (tests, passed)
    assert second_time < first_time
    host = "no npm on this machine"
    if shutil.which("npm"):
        copy = npm_tarball(*NODE_PACKAGE, tmp_path / "host")
        subprocess.run(["npm", "install", "--no-package-lock", "--no-audit", "--no-fund"], cwd=copy, check=True,
                       capture_output=True, timeout=600)
        on_host = subprocess.run(["npm", "test"], cwd=copy, capture_output=True, text=True, timeout=600)
        assert on_host.returncode == 0 and tape_counts(on_host.stdout) == (tests, passed)
        host = f"{tests} on the host too"
    figure(f"Node {'@'.join(NODE_PACKAGE)}: {passed}/{tests} passed in the VM ({host}); inv test {first_time:.0f}s "
           f"with npm install, {second_time:.0f}s for the second run (install skipped)")


def test_go_test_of_standard_library_packages(dev, tmp_path):
    project = tmp_path / "go"
    project.mkdir()
    result, seconds = dev.test(project, "--", "go", "test", "-count=1", "-v", *GO_PACKAGES)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for package in GO_PACKAGES:
        assert re.search(rf"^ok\s+{re.escape(package)}\s", result.stdout, re.M), package
    assert "FAIL" not in result.stdout
    passed = len(re.findall(r"^--- PASS: ", result.stdout, re.M))
    assert passed > 20
    figure(f"Go: go test of {' '.join(GO_PACKAGES)}: {passed} tests passed in {seconds:.0f}s (no Go on the host)")


INDEX_PHP = """<?php
require __DIR__ . '/../vendor/autoload.php';
use Composer\\Semver\\Comparator;
use Composer\\Semver\\Semver;
echo Comparator::greaterThan('1.25.0', '1.24.0') ? "1.25.0 > 1.24.0\\n" : "wrong\\n";
echo implode(' ', Semver::sort(['2.0.0', '1.10.0', '1.2.0'])), "\\n";
"""


def test_php_phpunit_and_serve_of_a_composer_project(dev, tmp_path):
    project = tmp_path / "composer-semver"
    shutil.copytree(PROJECTS / "composer-semver", project)
    (project / ".core").mkdir()
    (project / ".core" / "test.yaml").write_text("setup: composer dump-autoload\ncommand: phpunit\n")
    result, seconds = dev.test(project)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Installing dependencies (first run): composer dump-autoload" in result.stdout
    match = re.search(r"^OK \((\d+) tests, (\d+) assertions\)", result.stdout, re.M)
    assert match and int(match.group(1)) > 1000, result.stdout[-2000:]
    figure(f"PHP composer/semver 3.4.4: PHPUnit OK ({match.group(1)} tests) in the VM in {seconds:.0f}s "
           "(no PHP on the host)")

    (project / "public").mkdir()
    (project / "public" / "index.php").write_text(INDEX_PHP)
    port = free_port()
    server = subprocess.Popen([DEVOPS, "serve", "--port", str(port), "--path", "public"], cwd=project, env=dev.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        def page():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.php", timeout=5) as response:
                    return response.read().decode()
            except OSError:
                return ""

        body = wait_for(page, 240, "the PHP page through inv serve")
        assert body == "1.25.0 > 1.24.0\n1.2.0 1.10.0 2.0.0\n"
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
    assert "Note: FrankenPHP is not in this image: serving with PHP's built-in server (php -S)" in out
    assert f"Serving /app/public with: php -S 0.0.0.0:{port}" in out


def test_caches_survive_stop_and_boot(dev):
    """npm's and Go's caches (filled by the tests above) are on the VM's disk; so is pip's (which
    keeps nothing here: the index's answers through this machine's gateway carry no cache headers)."""
    filled = dev.guest(f"npm cache add {'@'.join(NODE_PACKAGE)} >/dev/null 2>&1 && cd /tmp && "
                       "printf 'package main\\nfunc main() {}\\n' > m.go && go build -o m m.go", timeout=600)
    assert filled.returncode == 0, filled.stderr
    look = ("du -sk /root/.npm/_cacache /root/.cache/go-build | cut -f2; python3 -m pip cache dir; "
            "awk '$2 == \"/\" { print $3 }' /proc/mounts")
    before = dev.guest(look)
    assert before.stdout.split() == ["/root/.npm/_cacache", "/root/.cache/go-build", "/root/.cache/pip", "ext4"], \
        before.stdout + before.stderr
    assert dev.run("vm.stop").returncode == 0
    boot = dev.run("vm.boot", timeout=400)
    assert boot.returncode == 0, boot.stdout + boot.stderr
    assert dev.guest(look).stdout == before.stdout


def test_figures_size_and_boot_time_dev_vs_minimal(dev_build, built_image, tmp_path, monkeypatch, build_cache_dir):
    times: dict[str, float] = {}
    for attempt in range(2):  # alternately, best of two: this machine's load varies
        for name, image in (("minimal", built_image), ("dev", dev_build.path)):
            machine = PlainVM(image, tmp_path / f"{name}{attempt}", memory=2048)
            try:
                machine.start()
                ready = machine.wait_ready(timeout=300)
                assert machine.ssh("true").returncode == 0
            finally:
                machine.cleanup()
            times[name] = min(times.get(name, ready), ready)
    sizes = {"minimal": built_image.stat().st_size, "dev": dev_build.path.stat().st_size}
    figure(f"image size: dev {sizes['dev'] / 1e6:.0f} MB, minimal {sizes['minimal'] / 1e6:.0f} MB (qcow2); boot to "
           f"SSH ready: dev {times['dev']:.1f}s, minimal {times['minimal']:.1f}s (TCG)")
    monkeypatch.setenv("CORE_CACHE_DIR", build_cache_dir)
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    warm = build_image("dev", output=tmp_path / "again.qcow2")
    assert warm.sha256 == dev_build.sha256, "the same recipe and packages: the same image"
    figure(f"dev build: {dev_build.seconds:.0f}s in this run ({'cached' if dev_build.cached else 'built'}), "
           f"again {warm.seconds:.1f}s ({'cached' if warm.cached else 'rebuilt: another build pruned it'})")
    assert times["dev"] < 60, "the dev image boots about as fast as minimal (its size is on disk, not in the boot)"
