"""npm packages in recipes: registry look-up, sha512 integrity, the tarball cache and unpacking.

A real HTTP server on a free loopback port stands in for the registry (the per-version route, the
package document and the tarball), serving a tarball these tests make.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import stat
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from devops_tasks.build import builder, npm
from devops_tasks.build.apt import Package
from devops_tasks.build.recipe import NpmPackage, parse_recipe
from devops_tasks.errors import ImageError

NAME = "@acme/tool-linux-x64"
VERSION = "1.2.3"


def make_tarball(entries: list[tuple[str, bytes | None, int]], links: tuple[str, ...] = ()) -> bytes:
    """A gzipped npm-style tarball: (name, data or None for a folder, mode), plus symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 499162500  # what npm writes (1985-10-26)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/shadow"
            tar.addfile(info)
    return buf.getvalue()


GOOD_TARBALL = make_tarball([
    ("package/tool", b"\x7fELF fake binary", 0o755),
    ("package/package.json", json.dumps({"name": NAME, "version": VERSION}).encode(), 0o644),
    ("package/lib", None, 0o700),
    ("package/lib/helper.js", b"module.exports = 1\n", 0o664),
    ("package/lib/deep/run.sh", b"#!/bin/sh\n", 0o775),
], links=("package/lib/escape",))


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


class Registry:
    """What the fake registry serves; every request path is recorded."""

    def __init__(self):
        self.tarball = GOOD_TARBALL
        self.integrity = sri(GOOD_TARBALL)
        self.per_version_route = True
        self.requests: list[str] = []
        self.url = ""

    def version_doc(self) -> dict:
        return {"name": NAME, "version": VERSION,
                "dist": {"integrity": self.integrity, "shasum": "0" * 40,
                         "tarball": f"{self.url}/{NAME}/-/tool-linux-x64-{VERSION}.tgz"}}


@pytest.fixture
def registry():
    state = Registry()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, code: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = unquote(self.path)
            state.requests.append(path)
            if path.endswith(".tgz") and path.startswith(f"/{NAME}/-/"):
                return self.send(200, state.tarball, "application/octet-stream")
            if path == f"/{NAME}/{VERSION}" and state.per_version_route:
                return self.send(200, json.dumps(state.version_doc()).encode())
            if path == f"/{NAME}":
                doc = {"name": NAME, "dist-tags": {"latest": VERSION}, "versions": {VERSION: state.version_doc()}}
                return self.send(200, json.dumps(doc).encode())
            return self.send(404, b'{"error":"Not found"}')

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def package(files=(("tool", "/usr/local/bin/tool"),), integrity: str = "", version: str = VERSION) -> NpmPackage:
    return NpmPackage(NAME, version, tuple(files), integrity)


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "npm").iterdir()) if (cache / "npm").exists() else []


# -- integrity -------------------------------------------------------------------------------------
def test_integrity_is_npm_sri_sha512(tmp_path):
    path = tmp_path / "t.tgz"
    path.write_bytes(GOOD_TARBALL)
    expected = "sha512-" + base64.b64encode(hashlib.sha512(GOOD_TARBALL).digest()).decode()
    assert npm.integrity_of(path) == expected == npm.sha512_integrity(GOOD_TARBALL)
    assert len(expected) == len("sha512-") + 88


# -- registry and cache ----------------------------------------------------------------------------
def test_resolve_download_and_cache(registry, tmp_path):
    client = npm.Npm(registry.url, tmp_path)
    pin = client.resolve(package())
    assert (pin.name, pin.version, pin.integrity) == (NAME, VERSION, sri(GOOD_TARBALL))
    assert pin.pin() == f"{NAME}@{VERSION} {sri(GOOD_TARBALL)}"
    tarball = client.download(pin)
    assert tarball == tmp_path / "npm" / f"@acme+tool-linux-x64-{VERSION}.tgz"
    assert tarball.read_bytes() == GOOD_TARBALL
    assert cache_files(tmp_path) == [tarball.name, tarball.name + ".json"]
    asked = len(registry.requests)
    # a second build: the look-up is remembered and the tarball cached: no request at all
    again = npm.Npm(registry.url, tmp_path)
    assert again.download(again.resolve(package())) == tarball
    assert len(registry.requests) == asked


def test_wrong_integrity_is_one_line_and_nothing_is_cached(registry, tmp_path):
    registry.tarball = GOOD_TARBALL[:-1] + bytes([GOOD_TARBALL[-1] ^ 1])  # what a tampering proxy sends
    client = npm.Npm(registry.url, tmp_path)
    pin = client.resolve(package())
    with pytest.raises(ImageError) as err:
        client.download(pin)
    message = str(err.value)
    assert f"{NAME}@{VERSION}" in message and sri(GOOD_TARBALL) in message and "nothing was cached" in message
    assert "\n" not in message
    assert not any(name.endswith((".tgz", ".part", ".part.json")) for name in cache_files(tmp_path)), cache_files(tmp_path)


def test_damaged_cached_tarball_is_fetched_again(registry, tmp_path):
    client = npm.Npm(registry.url, tmp_path)
    pin = client.resolve(package())
    tarball = client.download(pin)
    tarball.write_bytes(b"bit rot")
    assert client.download(pin).read_bytes() == GOOD_TARBALL


def test_recipe_integrity_must_be_the_registrys(registry, tmp_path):
    other = sri(b"something else")
    with pytest.raises(ImageError, match=r"the registry's integrity sha512-\S+ is not the recipe's sha512-"):
        npm.Npm(registry.url, tmp_path).resolve(package(integrity=other))
    assert npm.Npm(registry.url, tmp_path).resolve(package(integrity=sri(GOOD_TARBALL))).integrity == sri(GOOD_TARBALL)


def test_registry_without_the_version_route_and_unknown_versions(registry, tmp_path):
    registry.per_version_route = False
    assert npm.Npm(registry.url, tmp_path).resolve(package()).integrity == sri(GOOD_TARBALL)
    with pytest.raises(ImageError, match=rf"'{NAME}' has no version 9.9.9 in .* \(latest: {VERSION}\)"):
        npm.Npm(registry.url, tmp_path).resolve(package(version="9.9.9"))
    with pytest.raises(ImageError, match=r"no npm package '@acme/nope'"):
        npm.Npm(registry.url, tmp_path).resolve(NpmPackage("@acme/nope", "1.0.0", (("x", "/x/y"),)))


def test_registry_without_sha512_is_refused(registry, tmp_path):
    registry.integrity = "sha1-" + base64.b64encode(hashlib.sha1(GOOD_TARBALL).digest()).decode()
    with pytest.raises(ImageError, match="no sha512 integrity"):
        npm.Npm(registry.url, tmp_path).resolve(package())


def test_unreachable_registry_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageError) as err:
        npm.Npm(f"http://127.0.0.1:{port}", tmp_path).resolve(package())
    message = str(err.value)
    assert f"cannot reach the npm registry http://127.0.0.1:{port}: Connection refused" in message
    assert "\n" not in message
    assert cache_files(tmp_path) == []


def test_scoped_name_is_one_path_segment(registry, tmp_path):
    npm.Npm(registry.url, tmp_path).resolve(package())
    assert registry.requests[0] == f"/{NAME}/{VERSION}"  # the server saw %2F, unquoted here


# -- where the registry is -------------------------------------------------------------------------
def test_registry_url_order(tmp_path, monkeypatch):
    assert npm.registry_url("https://mirror.example/npm/") == "https://mirror.example/npm"
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm
    monkeypatch.delenv("NPM_CONFIG_REGISTRY", raising=False)
    monkeypatch.delenv("npm_config_registry", raising=False)
    assert npm.registry_url() == npm.DEFAULT_REGISTRY
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", "https://env.example/")
    assert npm.registry_url() == "https://env.example"
    fake = tmp_path / "npm"
    fake.write_text("#!/bin/sh\n[ \"$*\" = 'config get registry' ] && echo https://npmrc.example/\n")
    fake.chmod(0o755)
    assert npm.registry_url() == "https://npmrc.example"


def test_ca_bundle_prefers_the_environment_then_the_system(tmp_path, monkeypatch):
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(var, raising=False)
    system = next((p for p in npm.SYSTEM_CA_BUNDLES if os.path.isfile(p)), True)
    assert npm.ca_bundle() == system
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert npm.ca_bundle() == str(bundle)


# -- unpacking -------------------------------------------------------------------------------------
def _install(tmp_path: Path, files, data: bytes = GOOD_TARBALL) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tarball = tmp_path / "t.tgz"
    tarball.write_bytes(data)
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    npm.install(tarball, package(files=files), root)
    return root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_install_single_file_and_folder_with_fixed_modes(tmp_path):
    os.umask(0o077)  # the builder's umask must not leak into the image
    try:
        root = _install(tmp_path, (("tool", "/usr/local/bin/tool"), ("lib", "/opt/tool/lib")))
    finally:
        os.umask(0o022)
    assert (root / "usr/local/bin/tool").read_bytes() == b"\x7fELF fake binary"
    assert mode(root / "usr/local/bin/tool") == 0o755
    assert mode(root / "opt/tool/lib/helper.js") == 0o644  # 0664 in the tarball
    assert mode(root / "opt/tool/lib/deep/run.sh") == 0o755
    for folder in ("usr", "usr/local", "usr/local/bin", "opt/tool", "opt/tool/lib", "opt/tool/lib/deep"):
        assert mode(root / folder) == 0o755, folder
    assert not os.path.lexists(root / "opt/tool/lib/escape"), "links are skipped, as npm does"
    assert not (root / "opt/tool/package.json").exists()


def test_install_whole_package(tmp_path):
    root = _install(tmp_path, ((".", "/opt/tool"),))
    assert sorted(p.relative_to(root / "opt/tool").as_posix() for p in (root / "opt/tool").rglob("*")) == [
        "lib", "lib/deep", "lib/deep/run.sh", "lib/helper.js", "package.json", "tool"]


def test_install_replaces_a_packaged_file(tmp_path):
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/tool").write_text("old")
    assert _install(tmp_path, (("tool", "/usr/local/bin/tool"),)).joinpath("usr/local/bin/tool").read_bytes() != b"old"


def test_install_names_a_missing_path(tmp_path):
    with pytest.raises(ImageError, match=rf"npm package {NAME}@{VERSION} has no 'bin/nope'"):
        _install(tmp_path, (("tool", "/usr/local/bin/tool"), ("bin/nope", "/usr/local/bin/nope")))


def test_install_refuses_unsafe_paths_and_symlinked_targets(tmp_path):
    evil = make_tarball([("package/../../etc/passwd", b"x", 0o644)])
    with pytest.raises(ImageError, match="unsafe path"):
        _install(tmp_path / "a", ((".", "/opt/tool"),), evil)
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "b" / "root"
    root.mkdir(parents=True)
    (root / "opt").symlink_to(outside)
    with pytest.raises(ImageError, match="leaves the root file system"):
        _install(tmp_path / "b", (("tool", "/opt/tool"),))
    assert list(outside.iterdir()) == []


# -- the builder -----------------------------------------------------------------------------------
class FakeApt:
    """apt without a mirror: the builder's npm steps are what these tests exercise."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, refresh=None):
        pass

    def fingerprint(self):
        return "lists"

    def resolve(self, names):
        return [Package(name, "1.0", "amd64") for name in names]

    def kernel(self, name):
        return Package("linux-image-6.1.0-1-cloud-amd64", "6.1.1-1", "amd64")


def _recipe(tmp_path: Path, registry_url: str, integrity: str = ""):
    text = (f"kernel: linux-image-cloud-amd64\npackages: [busybox-static]\nnpm_registry: {registry_url}\n"
            f"npm:\n  - name: '{NAME}'\n    version: '{VERSION}'\n    files: {{tool: /usr/local/bin/tool}}\n")
    if integrity:
        text += f"    integrity: {integrity}\n"
    path = tmp_path / "withnpm.yaml"
    path.write_text(text)
    return parse_recipe(text, path)


def test_plan_puts_the_integrity_in_the_version(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("CORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(builder, "Apt", FakeApt)
    first = builder.plan(_recipe(tmp_path, registry.url))
    assert [p.integrity for p in first.npm] == [sri(GOOD_TARBALL)]
    assert builder.plan(_recipe(tmp_path, registry.url)).version == first.version
    other = make_tarball([("package/tool", b"v2", 0o755)])
    (tmp_path / "cache/build/npm" / f"@acme+tool-linux-x64-{VERSION}.tgz.json").unlink()  # forget the look-up
    registry.tarball, registry.integrity = other, sri(other)
    assert builder.plan(_recipe(tmp_path, registry.url)).version != first.version


def test_plan_error_names_the_recipe_file(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("CORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(builder, "Apt", FakeApt)
    with pytest.raises(ImageError) as err:
        builder.plan(_recipe(tmp_path, registry.url, integrity=sri(b"pinned elsewhere")))
    assert str(err.value).startswith(f"{tmp_path / 'withnpm.yaml'}: npm package {NAME}@{VERSION}: ")
