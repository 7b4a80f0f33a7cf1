"""The resumable, verified download against a misbehaving loopback server, through the CDN source
and the ImageManager: cuts, ignored ranges, 416, wrong Content-Range, wrong sha256, 404, 500,
stalls, Ctrl-C -- each a clean recovery or a clear error with the old image and manifest intact.
And what a hostile server tries: a qcow2 that names a host file, an image without a checksum,
plain http, an endless manifest.json."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading

import pytest
import yaml

from devops_tasks import paths
from devops_tasks.config import Config
from devops_tasks.errors import ChecksumError, ImageError, SourceError
from devops_tasks.images import ImageManager, UpdateCheckError
from devops_tasks.manifest import Manifest
from devops_tasks.sources.download import download_file, part_meta_path, part_path

from servers import FileServer, crafted_qcow2, qcow2_image

pytestmark = pytest.mark.e2e

NAME = paths.image_name()
MiB = 1 << 20
CAP = 4 * MiB  # the size cap on answers that are not the image


@pytest.fixture(autouse=True)
def core_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    monkeypatch.setenv("CORE_HTTP_CONNECT_TIMEOUT", "2")
    monkeypatch.setenv("CORE_HTTP_READ_TIMEOUT", "5")
    for name in ("GH_TOKEN", "GITHUB_TOKEN", "CORE_DOWNLOAD_RETRIES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


def publish(server: FileServer, version: str, data: bytes, sha: str | None = None, manifest: bool = True):
    server.put(f"/images/{NAME}", data)
    if manifest:
        entry = {"version": version, "sha256": sha if sha is not None else hashlib.sha256(data).hexdigest()}
        server.put_json("/images/manifest.json", {"images": {NAME: entry}})
    else:
        server.files.pop("/images/manifest.json", None)


def manager(server: FileServer, require_checksum: bool = True) -> ImageManager:
    config = Config.from_dict({"images": {"source": "cdn", "cdn": {"url": f"{server.url}/images"},
                                          "require_checksum": require_checksum}})
    return ImageManager(config, echo=lambda _: None, quiet=True)


def image_sent(server: FileServer) -> int:
    return server.sent_by.get(f"/images/{NAME}", 0)


def installed_state():
    return paths.image_path().read_bytes(), paths.manifest_path().read_bytes()


@pytest.fixture
def v1_installed(server):
    """v1 installed from the server; returns (image bytes, manifest bytes)."""
    publish(server, "v1", qcow2_image(os.urandom(MiB)))
    manager(server).install()
    server.sent_by.clear()
    server.log.clear()
    return installed_state()


def no_leftovers():
    image = paths.image_path()
    return not part_path(image).exists() and not part_meta_path(image).exists()


# -- recoveries ---------------------------------------------------------------------------------
def test_many_cuts_resume_and_resend_only_missing_bytes(server):
    data = qcow2_image(os.urandom(8 * MiB + 12345))
    size = len(data)
    publish(server, "v1", data)
    rng = random.Random(7)
    server.cuts = sorted(rng.sample(range(1, size), 12))
    seen = []
    info = manager(server).install(progress=lambda done, total: seen.append((done, total)))

    assert paths.image_path().read_bytes() == data
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.version == "v1"
    assert server.cuts == []  # every cut happened
    assert image_sent(server) == size  # only the missing bytes were sent again
    ranges = [h.get("Range") for h in server.requests_for(f"/images/{NAME}")]
    assert len(ranges) == 13 and ranges[0] is None and all(r.startswith("bytes=") for r in ranges[1:])
    assert all(h.get("If-Range") for h in server.requests_for(f"/images/{NAME}")[1:])
    assert seen[-1] == (size, size)
    assert no_leftovers()


def test_server_ignoring_range_restarts_from_zero(server):
    data = qcow2_image(os.urandom(3 * MiB))
    publish(server, "v1", data)
    server.cuts = [MiB + 17]
    server.ignore_range = True
    manager(server).install()
    assert paths.image_path().read_bytes() == data
    assert image_sent(server) == len(data) + MiB + 17


def test_changed_file_invalidates_the_part(server):
    """If-Range with an old ETag: the server sends the new file whole (200), nothing is mixed."""
    old, new = os.urandom(2 * MiB), os.urandom(2 * MiB)
    publish(server, "v1", old)
    server.cuts = [MiB]
    with pytest.raises(SourceError):  # one attempt only, so the cut is final
        download_file(f"{server.url}/images/{NAME}", paths.image_path(), retries=0, quiet=True)
    assert part_path(paths.image_path()).stat().st_size == MiB
    publish(server, "v2", new)
    result = download_file(f"{server.url}/images/{NAME}", paths.image_path(), quiet=True)
    assert paths.image_path().read_bytes() == new
    assert result.sha256 == hashlib.sha256(new).hexdigest()


def test_416_discards_the_part_and_restarts_once(server):
    data = qcow2_image(os.urandom(2 * MiB))
    publish(server, "v1", data)
    server.cuts = [MiB // 2]
    server.answer_416 = 1
    manager(server).install()
    assert paths.image_path().read_bytes() == data
    assert image_sent(server) == len(data) + MiB // 2


def test_416_every_time_is_an_error(server, v1_installed):
    """After a 416 the download restarts from zero once; a second 416 (after another cut) ends it."""
    publish(server, "v2", os.urandom(2 * MiB))
    server.cuts = [MiB, MiB + MiB // 2]
    server.answer_416 = 100
    with pytest.raises(SourceError, match=r"refused the byte range \(HTTP 416\)"):
        manager(server).install()
    assert installed_state() == v1_installed


def test_complete_part_is_verified_without_download(server):
    data = os.urandom(MiB)
    publish(server, "v1", data)
    url = f"{server.url}/images/{NAME}"
    calls = []

    def stop_at_end(done, total):
        if done == total:
            calls.append(done)
            raise KeyboardInterrupt  # killed after the last byte, before the rename

    with pytest.raises(KeyboardInterrupt):
        download_file(url, paths.image_path(), expected_sha256=hashlib.sha256(data).hexdigest(),
                      progress=stop_at_end, quiet=True)
    assert not paths.image_path().exists() and part_path(paths.image_path()).stat().st_size == MiB
    result = download_file(url, paths.image_path(), expected_sha256=hashlib.sha256(data).hexdigest(), quiet=True)
    assert result.received == 0 and paths.image_path().read_bytes() == data
    assert image_sent(server) == MiB


def test_ctrl_c_keeps_the_part_for_the_next_try(server):
    data = qcow2_image(os.urandom(4 * MiB))
    publish(server, "v1", data)

    def interrupt(done, total):
        if done >= 2 * MiB:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        manager(server).install(progress=interrupt)
    assert not paths.image_path().exists()
    assert not paths.manifest_path().exists()
    assert part_path(paths.image_path()).stat().st_size >= 2 * MiB
    assert not manager(server).is_installed()
    kept = part_path(paths.image_path()).stat().st_size
    assert kept < len(data)
    server.sent_by.clear()
    manager(server).install()
    assert paths.image_path().read_bytes() == data
    assert image_sent(server) == len(data) - kept  # the second run fetched only the rest


def test_stall_past_read_timeout_recovers(server, monkeypatch):
    monkeypatch.setenv("CORE_HTTP_READ_TIMEOUT", "0.5")
    data = qcow2_image(os.urandom(2 * MiB))
    publish(server, "v1", data)
    server.stall = [MiB, 3.0, 1]
    server.stall_path = f"/images/{NAME}"
    manager(server).install()
    assert paths.image_path().read_bytes() == data


def test_stalling_server_is_a_clear_error(server, v1_installed, monkeypatch):
    monkeypatch.setenv("CORE_HTTP_READ_TIMEOUT", "0.3")
    publish(server, "v2", os.urandom(2 * MiB))
    server.stall = [0, 2.0, 100]
    server.stall_path = f"/images/{NAME}"
    with pytest.raises(SourceError, match="timed out waiting for data"):
        manager(server).install()
    assert installed_state() == v1_installed


# -- errors, with the installed image and manifest untouched -------------------------------------
def test_wrong_content_range_is_refused(server, v1_installed):
    publish(server, "v2", os.urandom(2 * MiB))
    server.cuts = [MiB]
    server.bad_content_range = True
    with pytest.raises(SourceError, match=r"asked for bytes 1048576- but the server sent Content-Range bytes 1048577-"):
        manager(server).install()
    assert installed_state() == v1_installed
    assert no_leftovers()


def test_wrong_sha256(server, v1_installed):
    publish(server, "v2", os.urandom(MiB), sha="0" * 64)
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        manager(server).install()
    assert f"{server.url}/images/{NAME}" in str(err.value)
    assert installed_state() == v1_installed
    assert no_leftovers()


def test_not_found(server, v1_installed):
    server.status[f"/images/{NAME}"] = 404
    with pytest.raises(SourceError, match=rf"{server.url}/images/{NAME}: not found \(HTTP 404\)"):
        manager(server).install()
    assert installed_state() == v1_installed


def test_server_error_is_retried_then_reported(server, v1_installed):
    publish(server, "v2", os.urandom(MiB))
    server.status[f"/images/{NAME}"] = 500
    with pytest.raises(SourceError, match=rf"download failed after 3 attempts: {server.url}/images/{NAME}: HTTP 500"):
        manager(server).install()
    assert installed_state() == v1_installed
    assert len(server.requests_for(f"/images/{NAME}")) == 3


def test_manifest_json_error(server):
    server.status["/images/manifest.json"] = 500
    with pytest.raises(SourceError, match=r"^failed to get latest version: .*/images/manifest.json: HTTP 500"):
        manager(server).install()
    assert not paths.manifest_path().exists()


def test_connection_refused(tmp_path):
    from servers import free_port

    config = Config.from_dict({"images": {"source": "cdn", "cdn": {"url": f"http://127.0.0.1:{free_port()}/x"}}})
    with pytest.raises(SourceError, match="connection refused"):
        ImageManager(config, echo=lambda _: None, quiet=True).install()


def test_size_mismatch_is_refused(server):
    publish(server, "v1", os.urandom(1000))
    with pytest.raises(SourceError, match="sends 1000 bytes but 999 were expected"):
        download_file(f"{server.url}/images/{NAME}", paths.image_path(), size=999, quiet=True)
    assert no_leftovers()


# -- CDN versions and check-update --------------------------------------------------------------
def test_cdn_manifest_check_update(server):
    publish(server, "v1", qcow2_image(b"one" * 1000))
    manager(server).install()
    assert manager(server).check_update() == ("v1", "v1", False)
    publish(server, "v2", qcow2_image(b"two" * 1000))
    assert manager(server).check_update() == ("v1", "v2", True)
    entry = Manifest.load().get(NAME)
    assert entry.version == "v1" and entry.source == "cdn"


def test_cdn_manifest_file_entry(server):
    data = qcow2_image(os.urandom(5000))
    server.put("/images/v3/custom.qcow2", data)
    server.put_json("/images/manifest.json", {"images": {NAME: {"version": "v3", "file": "v3/custom.qcow2",
                                                                 "sha256": hashlib.sha256(data).hexdigest()}}})
    assert manager(server).install().version == "v3"
    assert paths.image_path().read_bytes() == data


def test_cdn_etag_fallback(server):
    """Without manifest.json (hence without a published sha256: installed only when allowed)."""
    first = qcow2_image(b"first" * 100)
    publish(server, "", first, manifest=False)
    info = manager(server, require_checksum=False).install()
    etag = server.etag_of(f"/images/{NAME}").strip('"')
    assert info.version == etag and info.version != "latest"
    assert info.sha256 == hashlib.sha256(first).hexdigest() and info.verified is False
    assert manager(server).check_update() == (etag, etag, False)
    publish(server, "", qcow2_image(b"second" * 100), manifest=False)
    current, latest, has_update = manager(server).check_update()
    assert (current, has_update) == (etag, True) and latest == server.etag_of(f"/images/{NAME}").strip('"')


def test_cdn_last_modified_fallback(server):
    server.etag = False
    publish(server, "", qcow2_image(b"first" * 100), manifest=False)
    info = manager(server, require_checksum=False).install()
    assert info.version.endswith("Z") and info.version[:2] == "20"
    server.put(f"/images/{NAME}", qcow2_image(b"later" * 100))
    server.mtimes[f"/images/{NAME}"] += 3600
    assert manager(server).check_update()[2] is True


def test_cdn_without_any_version_is_an_error(server):
    server.etag = server.last_modified = False
    publish(server, "", b"x", manifest=False)
    with pytest.raises(SourceError, match="cannot tell the version"):
        manager(server).install()


def test_check_update_keeps_current_when_cdn_fails(server):
    publish(server, "v1", qcow2_image(b"one"))
    manager(server).install()
    server.status["/images/manifest.json"] = 503
    with pytest.raises(UpdateCheckError) as err:
        manager(server).check_update()
    assert err.value.current == "v1"


def test_one_download_per_image_at_a_time(server):
    """Two concurrent installs: the lock serialises them; both end with the right file."""
    data = qcow2_image(os.urandom(4 * MiB))
    publish(server, "v1", data)
    errors = []

    def run():
        try:
            manager(server).install()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert paths.image_path().read_bytes() == data
    assert no_leftovers()


# -- a hostile image server ---------------------------------------------------------------------
def run_inv(*args: str, images: dict) -> subprocess.CompletedProcess:
    """``inv ARGS`` as a user runs it from a project of their own (a tasks.py importing the
    collections), with ``images`` in ~/.core/config.yaml."""
    project = paths.core_home().parent / "project"
    project.mkdir(exist_ok=True)
    (project / "tasks.py").write_text("from devops_tasks.tasks import ns  # noqa: F401\n")
    paths.config_path().parent.mkdir(parents=True, exist_ok=True)
    paths.config_path().write_text(yaml.safe_dump({"images": images}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_")}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)


def test_install_refuses_an_image_whose_backing_file_is_a_host_file(server, tmp_path):
    """The published sha256 matches: only the header check stands between the image and the
    host file QEMU would read into the guest."""
    secret = tmp_path / "secret.txt"
    secret.write_text("host-only secret\n")
    publish(server, "v1", crafted_qcow2(tmp_path, backing=secret))
    done = run_inv("image.install", "--quiet", images={"source": "cdn", "cdn": {"url": f"{server.url}/images"}})
    assert done.returncode == 1, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()
    assert error == [f"Error: cdn: {NAME} names a backing file '{secret}' (QEMU would read that host file "
                     "into the guest): refused, nothing was installed"], done.stderr
    assert image_sent(server) > 0  # it was downloaded and verified, then refused
    assert not paths.image_path().exists() and not paths.manifest_path().exists()
    assert no_leftovers()


def test_update_to_an_image_with_a_data_file_keeps_the_old_image(server, v1_installed, tmp_path):
    data_file = tmp_path / "host-data"
    crafted = crafted_qcow2(tmp_path, data_file=data_file)
    data_file.write_text("host-only data\n")
    publish(server, "v2", crafted)
    with pytest.raises(ImageError, match=f"names an external data file '{data_file}'.*refused, nothing was installed"):
        manager(server).update()
    assert installed_state() == v1_installed
    assert no_leftovers()


def test_an_image_without_a_published_checksum_is_refused(server, v1_installed):
    publish(server, "v2", qcow2_image(b"two"), manifest=False)
    with pytest.raises(ImageError, match=rf"^cdn publishes no sha256 for {NAME} \S+: refusing an unverified image"):
        manager(server).update()
    server.put_json("/images/manifest.json", {"images": {NAME: {"version": "v2"}}})  # an entry without sha256
    with pytest.raises(ImageError, match=rf"^cdn publishes no sha256 for {NAME} v2: refusing"):
        manager(server).update()
    assert image_sent(server) == 0  # refused before a byte of the image was fetched
    assert installed_state() == v1_installed


def test_opting_out_installs_unverified_and_says_so(server):
    data = qcow2_image(b"unpublished")
    server.put(f"/images/{NAME}", data)
    server.put_json("/images/manifest.json", {"images": {NAME: {"version": "v5"}}})
    images = {"source": "cdn", "cdn": {"url": f"{server.url}/images"}, "require_checksum": False}
    done = run_inv("image.install", "--quiet", images=images)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Warning: cdn publishes no sha256 for {NAME} v5; installing it unverified" in done.stdout
    entry = json.loads(paths.manifest_path().read_text())["images"][NAME]
    assert entry["verified"] is False and entry["sha256"] == hashlib.sha256(data).hexdigest()
    listed = run_inv("image.list", images=images)
    assert "  Verified: no (no published checksum)" in listed.stdout.splitlines(), listed.stdout
    rows = json.loads(run_inv("image.list", "--json", images=images).stdout)
    assert [row["verified"] for row in rows] == [False]


def test_plain_http_is_refused_off_loopback(server):
    config = Config.from_dict({"images": {"source": "cdn", "cdn": {"url": "http://192.0.2.10/images"}}})
    with pytest.raises(SourceError, match=r"http://192.0.2.10/images: plain http is refused for images except on "
                                          r"loopback \(127.0.0.0/8, ::1, localhost\): use https; fix images.cdn.url"):
        ImageManager(config, echo=lambda _: None, quiet=True).install()
    # a loopback server cannot send the client to plain http elsewhere either
    publish(server, "v1", qcow2_image(b"one"))
    server.routes["/images/manifest.json"] = lambda h: FileServer._plain(
        h, 302, b"", {"Location": "http://192.0.2.10/images/manifest.json"})
    with pytest.raises(SourceError, match="http://192.0.2.10/images/manifest.json: plain http is refused"):
        manager(server).install()
    del server.routes["/images/manifest.json"]
    server.routes[f"/images/{NAME}"] = lambda h: FileServer._plain(
        h, 302, b"", {"Location": f"http://192.0.2.10/images/{NAME}"})
    with pytest.raises(SourceError, match=f"http://192.0.2.10/images/{NAME}: plain http is refused"):
        manager(server).install()
    assert not paths.image_path().exists() and not paths.manifest_path().exists()


@pytest.mark.parametrize("declare_length", [False, True], ids=["streamed", "declared"])
def test_an_endless_manifest_json_is_cut_off(server, declare_length):
    server.oversized("/images/manifest.json", 64 * MiB, declare_length=declare_length)
    with pytest.raises(SourceError, match=rf"^failed to get latest version: {server.url}/images/manifest.json: "
                                          r"the answer is larger than 4 MiB; refusing to read it$"):
        manager(server).install()
    assert server.sent_by.get("/images/manifest.json", 0) < CAP + 16 * MiB  # it stopped reading
