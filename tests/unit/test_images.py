"""ImageManager with fake sources: selection, fallback, errors, check-update, manifest safety."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from invoke import Config as InvokeConfig
from invoke import Context
from invoke.exceptions import Exit

from devops_tasks import paths
from devops_tasks.config import Config
from devops_tasks.errors import ChecksumError, ConfigError, ImageError, SourceError
from devops_tasks.fsutil import file_lock
from devops_tasks.images import ImageManager, UpdateCheckError
from devops_tasks.clock import format_time, now_utc
from devops_tasks.machine.records import VMDir, VMRecord, proc_info
from devops_tasks.manifest import ImageInfo, Manifest
from devops_tasks.sources import ImageSource


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "core"))
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "images"))
    monkeypatch.delenv("GH_TOKEN", raising=False)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    return tmp_path


class FakeSource(ImageSource):
    """A source that publishes the sha256 of its bytes unless ``published=False``."""

    def __init__(self, name, version="v1", data=None, available=True, latest_error=None,
                 download_error=None, guest_contract=0, published=True):
        super().__init__()
        self.kind = name
        self.version = version
        self.data = data if data is not None else f"{name}-{version}".encode()
        self._available = available
        self.latest_error = latest_error
        self.download_error = download_error
        self.guest_contract = guest_contract
        self.published = published
        self.unavailable_reason = "" if available else f"{name} is switched off"
        self.calls = []

    def available(self):
        self.calls.append("available")
        return self._available

    def latest_version(self):
        self.calls.append("latest_version")
        if self.latest_error:
            raise self.latest_error
        self.expected_sha256 = hashlib.sha256(self.data).hexdigest() if self.published else ""
        return self.version

    def download(self, dest, progress=None):
        self.calls.append("download")
        if self.download_error:
            raise self.download_error
        tmp = Path(str(dest) + ".part")
        tmp.write_bytes(self.data)
        os.replace(tmp, dest)
        if progress:
            progress(len(self.data), len(self.data))
        return hashlib.sha256(self.data).hexdigest()


@pytest.fixture
def running_vm():
    """``start(name, image)`` records a VM whose process really runs (a sleeping Python with the
    record's pidfile on its command line, as QEMU has) on ``image`` (default: the installed one).
    Every process started is killed by its PID afterwards."""
    procs = []

    def start(name="core-dev", image=None):
        vm = VMDir(name)
        vm.ensure()
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(vm.pidfile)])
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not ((info := proc_info(proc.pid)) and str(vm.pidfile) in info.cmdline):
            assert time.monotonic() < deadline, "the stand-in VM process did not start"
            time.sleep(0.01)
        vm.save(VMRecord(id="0123abcd", name=name, image=str(image or paths.image_path()), pid=proc.pid,
                         process_start=info.start, started_at=format_time(now_utc()), ssh_port=2222,
                         memory=512, cpus=1, status="running", pidfile=str(vm.pidfile)))
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def manager(sources, source="auto", echo=None, require_checksum=True):
    config = Config.from_dict({"images": {"source": source, "require_checksum": require_checksum}})
    lines = [] if echo is None else echo
    return ImageManager(config, sources=sources, echo=lines.append)


def read_manifest():
    return json.loads(paths.manifest_path().read_text())


# -- install ------------------------------------------------------------------------------------
def test_install_uses_first_available_source_and_records_manifest():
    gh = FakeSource("github", available=False)
    cdn = FakeSource("cdn", version="v1.2.0")
    reg = FakeSource("registry")
    lines = []
    seen = []
    images = ImageManager(Config(), sources=[gh, cdn, reg], echo=lines.append)
    info = images.install(progress=lambda done, total: seen.append((done, total)))

    assert paths.image_path().read_bytes() == b"cdn-v1.2.0"
    assert info.version == "v1.2.0" and info.source == "cdn"
    assert info.sha256 == hashlib.sha256(b"cdn-v1.2.0").hexdigest()
    entry = read_manifest()["images"][paths.image_name()]
    assert entry["version"] == "v1.2.0"
    assert entry["source"] == "cdn"
    assert entry["sha256"] == info.sha256
    assert entry["downloaded"].endswith("Z")
    assert "download" not in gh.calls and "download" not in reg.calls
    assert lines == [f"Downloading {paths.image_name()} from cdn..."]
    assert seen == [(10, 10)]
    assert images.is_installed()


def test_no_available_source_is_an_error_naming_each():
    images = manager([FakeSource("github", available=False), FakeSource("cdn", available=False)])
    with pytest.raises(SourceError, match="no image source available") as err:
        images.install()
    assert "github: not available (github is switched off)" in str(err.value)
    assert "cdn: not available" in str(err.value)
    assert not paths.manifest_path().exists()


def test_no_sources_at_all():
    with pytest.raises(SourceError, match="^no image source available$"):
        manager([]).install()


@pytest.mark.parametrize("kind", ["github", "cdn", "registry", "build"])
def test_config_selects_one_source(kind):
    fakes = [FakeSource(n) for n in ("github", "cdn", "registry", "build")]
    info = manager(fakes, source=kind).install()
    assert info.source == kind
    for fake in fakes:
        assert ("download" in fake.calls) == (fake.name() == kind)


def test_install_source_argument_overrides_config():
    fakes = [FakeSource("github"), FakeSource("cdn")]
    assert manager(fakes, source="github").install(source="cdn").source == "cdn"


def test_selected_source_unavailable():
    fakes = [FakeSource("github"), FakeSource("cdn", available=False)]
    with pytest.raises(SourceError, match="no image source available.*cdn is switched off"):
        manager(fakes, source="cdn").install()


def test_unknown_source_in_config_is_a_config_error():
    with pytest.raises(ConfigError, match="images.source: unknown source 'ftp'"):
        Config.from_dict({"images": {"source": "ftp"}})


def test_unknown_source_argument():
    with pytest.raises(ImageError, match="unknown image source 'ftp' .*valid: auto, github, cdn, registry, build"):
        manager([FakeSource("github")]).install(source="ftp")


def test_single_source_latest_version_error_propagates():
    fake = FakeSource("cdn", latest_error=SourceError("https://cdn.example/manifest.json: HTTP 500"))
    with pytest.raises(SourceError, match=r"^failed to get latest version: https://cdn.example/manifest.json: HTTP 500$"):
        manager([fake], source="cdn").install()
    assert not paths.manifest_path().exists()


def test_single_source_download_error_keeps_its_type():
    fake = FakeSource("github", download_error=ChecksumError("sha256 mismatch"))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        manager([fake], source="github").install()
    assert not paths.manifest_path().exists()


def test_auto_falls_through_to_the_next_source():
    gh = FakeSource("github", latest_error=SourceError("rate limit exceeded"))
    cdn = FakeSource("cdn", download_error=SourceError("connection refused"))
    reg = FakeSource("registry", version="v3")
    info = manager([gh, cdn, reg]).install()
    assert info.source == "registry" and info.version == "v3"
    assert read_manifest()["images"][paths.image_name()]["source"] == "registry"


def test_auto_all_fail_lists_every_source_and_says_it_builds():
    lines = []
    fakes = [
        FakeSource("github", available=False),
        FakeSource("cdn", latest_error=SourceError("no manifest")),
        FakeSource("registry", download_error=ChecksumError("digest mismatch")),
        FakeSource("build", download_error=ImageError("qemu-img missing")),
    ]
    with pytest.raises(SourceError) as err:
        manager(fakes, echo=lines).install()
    text = str(err.value)
    assert text.startswith("every image source failed: ")
    assert "github: not available (github is switched off)" in text
    assert "cdn: failed to get latest version: no manifest" in text
    assert "registry: digest mismatch" in text
    assert "build: qemu-img missing" in text
    assert text.index("github") < text.index("cdn") < text.index("registry") < text.index("build")
    assert "No download source worked; building the image locally instead" in lines
    assert not paths.manifest_path().exists()


def test_failed_install_leaves_image_and_manifest_untouched():
    manager([FakeSource("cdn", version="v1")]).install()
    image_before = paths.image_path().read_bytes()
    manifest_before = paths.manifest_path().read_bytes()
    for fake in (
        FakeSource("cdn", version="v2", latest_error=SourceError("down")),
        FakeSource("cdn", version="v2", download_error=ChecksumError("bad sha")),
    ):
        with pytest.raises(ImageError):
            manager([fake]).install()
    assert paths.image_path().read_bytes() == image_before
    assert paths.manifest_path().read_bytes() == manifest_before


def test_an_image_without_a_published_checksum_is_refused():
    unpublished = FakeSource("cdn", version="v1", published=False)
    with pytest.raises(ImageError, match=r"^cdn publishes no sha256 for \S+ v1: refusing an unverified image "
                                         r"\(publish a checksum, or set images.require_checksum: false"):
        manager([unpublished]).install()
    assert "download" not in unpublished.calls
    assert not paths.image_path().exists() and not paths.manifest_path().exists()


def test_auto_skips_a_source_without_checksum_to_one_with():
    gh = FakeSource("github", published=False)
    info = manager([gh, FakeSource("cdn", version="v2")]).install()
    assert info.source == "cdn" and info.verified and "download" not in gh.calls


def test_opting_out_records_the_image_as_unverified(monkeypatch):
    from devops_tasks.tasks import image as image_tasks

    lines = []
    info = manager([FakeSource("cdn", version="v1", published=False)], echo=lines, require_checksum=False).install()
    assert info.verified is False
    assert any(line.startswith("Warning: cdn publishes no sha256") for line in lines)
    entry = read_manifest()["images"][paths.image_name()]
    assert entry["verified"] is False and len(entry["sha256"]) == 64
    assert Manifest.load().get(paths.image_name()).verified is False
    assert manager([]).list()[0]["verified"] is False
    assert "  Verified: no (no published checksum)" in run_task(monkeypatch, image_tasks.list_, []).splitlines()
    assert json.loads(run_task(monkeypatch, image_tasks.list_, [], json_=True))[0]["verified"] is False

    manager([FakeSource("cdn", version="v2")]).update()  # a verified update clears the mark
    assert "verified" not in read_manifest()["images"][paths.image_name()]
    assert "  Verified: yes" in run_task(monkeypatch, image_tasks.list_, []).splitlines()


def test_a_local_build_needs_no_published_checksum():
    class LocalBuild(FakeSource):
        local = True

    info = manager([LocalBuild("build", published=False)], source="build").install()
    assert info.verified and "verified" not in read_manifest()["images"][paths.image_name()]


def test_require_checksum_config_values():
    assert Config().images.require_checksum is True
    assert Config.from_dict({"images": {"require_checksum": False}}).images.require_checksum is False
    assert Config.from_dict({"images": {"require_checksum": "off"}}).images.require_checksum is False
    with pytest.raises(ConfigError, match="images.require_checksum: expected true or false, got 'maybe'"):
        Config.from_dict({"images": {"require_checksum": "maybe"}})


def test_guest_contract_is_copied():
    manager([FakeSource("build", guest_contract=1)]).install()
    assert read_manifest()["images"][paths.image_name()]["guest_contract"] == 1
    assert Manifest.load().get(paths.image_name()).guest_contract == 1


def test_manifest_keeps_other_images():
    other = Manifest.load()
    other.set("core-devops-darwin-arm64.qcow2", ImageInfo(version="v0", source="cdn"))
    other.save()
    manager([FakeSource("cdn")]).install()
    assert set(read_manifest()["images"]) == {"core-devops-darwin-arm64.qcow2", paths.image_name()}


def test_given_manifest_object_is_used():
    m = Manifest(paths.images_dir() / "other.json")
    images = ImageManager(Config(), sources=[FakeSource("cdn")], manifest=m, echo=lambda _: None)
    images.install()
    assert m.get(paths.image_name()).source == "cdn"
    assert (paths.images_dir() / "other.json").exists()
    assert not paths.manifest_path().exists()


def test_part_file_does_not_count_as_installed():
    paths.images_dir().mkdir(parents=True)
    Path(str(paths.image_path()) + ".part").write_bytes(b"half")
    images = manager([FakeSource("cdn")])
    assert not images.is_installed()
    # a file without a manifest entry (crash before the manifest write) is not installed either
    paths.image_path().write_bytes(b"whole")
    assert not images.is_installed()


# -- check_update -------------------------------------------------------------------------------
def test_check_update_not_installed():
    with pytest.raises(ImageError, match="^image not installed"):
        manager([FakeSource("cdn")]).check_update()


def test_check_update_v1_to_v2_and_up_to_date():
    manager([FakeSource("cdn", version="v1")]).install()
    assert manager([FakeSource("cdn", version="v2")]).check_update() == ("v1", "v2", True)
    assert manager([FakeSource("cdn", version="v1")]).check_update() == ("v1", "v1", False)


def test_check_update_asks_the_source_the_image_came_from():
    manager([FakeSource("cdn", version="v1")]).install()
    gh = FakeSource("github", version="g9")
    cdn = FakeSource("cdn", version="v2")
    assert manager([gh, cdn]).check_update() == ("v1", "v2", True)
    assert "latest_version" not in gh.calls


def test_check_update_returns_current_when_the_source_fails():
    manager([FakeSource("cdn", version="v1")]).install()
    before = paths.manifest_path().read_bytes()
    failing = FakeSource("cdn", latest_error=SourceError("https://cdn.example/manifest.json: HTTP 503"))
    with pytest.raises(UpdateCheckError, match="^failed to get latest version: .*HTTP 503") as err:
        manager([failing]).check_update()
    assert err.value.current == "v1"
    assert isinstance(err.value, SourceError)
    assert paths.manifest_path().read_bytes() == before


def test_check_update_no_source_available_still_carries_current():
    manager([FakeSource("cdn", version="v1")]).install()
    with pytest.raises(UpdateCheckError, match="no image source available") as err:
        manager([FakeSource("cdn", available=False)]).check_update()
    assert err.value.current == "v1"


def test_update_installs_new_version():
    manager([FakeSource("cdn", version="v1")]).install()
    current, latest, info = manager([FakeSource("cdn", version="v2")]).update()
    assert (current, latest, info.version) == ("v1", "v2", "v2")
    assert paths.image_path().read_bytes() == b"cdn-v2"
    assert manager([FakeSource("cdn", version="v2")]).update()[2] is None


def test_update_refuses_while_a_vm_runs_on_the_image(running_vm):
    manager([FakeSource("cdn", version="v1")]).install()
    before = paths.image_path().read_bytes(), paths.manifest_path().read_bytes()
    vm = running_vm("core-dev")
    newer = FakeSource("cdn", version="v2")
    with pytest.raises(ImageError, match=r"^cannot replace \S+ while VM core-dev is running on it: "
                                         r"stop it first \(inv vm.stop --name core-dev\), then try again$"):
        manager([newer]).update()
    assert "download" not in newer.calls
    assert (paths.image_path().read_bytes(), paths.manifest_path().read_bytes()) == before
    with pytest.raises(ImageError, match="while VM core-dev is running on it"):
        manager([FakeSource("cdn", version="v2")]).install()
    assert (paths.image_path().read_bytes(), paths.manifest_path().read_bytes()) == before
    # up to date: nothing to replace, so no refusal
    assert manager([FakeSource("cdn", version="v1")]).update()[2] is None

    vm.kill()
    vm.wait()  # the record stays behind, stale: it no longer counts
    assert manager([FakeSource("cdn", version="v2")]).update()[2].version == "v2"


def test_a_vm_on_another_image_does_not_block_the_update(running_vm, tmp_path):
    manager([FakeSource("cdn", version="v1")]).install()
    other = tmp_path / "other.qcow2"
    other.write_bytes(b"other")
    running_vm("elsewhere", image=other)
    assert manager([FakeSource("cdn", version="v2")]).update()[2].version == "v2"


# -- list and prune -----------------------------------------------------------------------------
def test_list():
    manager([FakeSource("cdn", version="v1")]).install()
    m = Manifest.load()
    m.set("core-devops-darwin-arm64.qcow2", ImageInfo(version="v0", source="github"))
    m.save()
    rows = {row["name"]: row for row in manager([]).list()}
    mine = rows[paths.image_name()]
    assert mine["version"] == "v1" and mine["source"] == "cdn" and mine["size"] == 6
    assert mine["current"] and mine["installed"] and len(mine["sha256"]) == 64
    other = rows["core-devops-darwin-arm64.qcow2"]
    assert other["size"] is None and not other["installed"] and not other["current"]


def test_prune_removes_parts_and_unreferenced_images():
    d = paths.images_dir()
    d.mkdir(parents=True)
    (d / "old.qcow2").write_bytes(b"x" * 100)
    (d / "referenced.qcow2").write_bytes(b"r")
    (d / f"{paths.image_name()}").write_bytes(b"current, not in manifest yet")
    (d / f"{paths.image_name()}.part").write_bytes(b"p" * 10)
    (d / f"{paths.image_name()}.part.json").write_text("{}")
    (d / "busy.qcow2.part").write_bytes(b"b" * 7)
    (d / "notes.txt").write_text("keep")
    m = Manifest.load()
    m.set("referenced.qcow2", ImageInfo(version="v1", source="cdn"))
    m.save()
    with file_lock(d / "busy.qcow2.lock"):
        result = manager([]).prune()
    names = sorted(p.name for p in result.removed)
    assert names == sorted(["old.qcow2", f"{paths.image_name()}.part", f"{paths.image_name()}.part.json"])
    assert result.freed == 100 + 10 + 2
    assert any("busy.qcow2.part" in s for s in result.skipped)
    for kept in ("referenced.qcow2", paths.image_name(), "busy.qcow2.part", "notes.txt", "manifest.json"):
        assert (d / kept).exists()


def test_prune_without_images_dir():
    result = manager([]).prune()
    assert result.removed == [] and result.freed == 0


# -- tasks --------------------------------------------------------------------------------------
def run_task(monkeypatch, task, sources, **kwargs):
    from devops_tasks.tasks import image as image_tasks

    monkeypatch.setattr(
        image_tasks, "_manager", lambda c, quiet=False: ImageManager(Config(), sources=sources, echo=print)
    )
    ctx = Context(config=InvokeConfig(overrides={"core": Config().to_dict()}))
    out = io.StringIO()
    with redirect_stdout(out):
        task(ctx, **kwargs)
    return out.getvalue()


def test_install_task_output(monkeypatch):
    from devops_tasks.tasks.image import install

    out = run_task(monkeypatch, install, [FakeSource("cdn")])
    lines = out.splitlines()
    assert lines[0] == f"Image: {paths.image_name()}"
    assert lines[1] == "Downloading dev environment..."
    assert lines[-2].startswith("Installed in ") and lines[-2].endswith("s")
    assert lines[-1] == "Start with: inv vm.boot"
    again = run_task(monkeypatch, install, [FakeSource("cdn")])
    assert again.splitlines() == [f"Image: {paths.image_name()}", "Dev environment already installed"]


def test_install_task_error_is_one_line(monkeypatch):
    from devops_tasks.tasks.image import install

    with pytest.raises(Exit) as err:
        run_task(monkeypatch, install, [FakeSource("cdn", latest_error=SourceError("down"))])
    assert err.value.code == 1
    assert err.value.message == "Error: failed to get latest version: down"


def test_update_task(monkeypatch, running_vm):
    from devops_tasks.tasks import image as image_tasks

    manager([FakeSource("cdn", version="v1")]).install()
    out = run_task(monkeypatch, image_tasks.update, [FakeSource("cdn", version="v1")])
    assert out.splitlines() == ["Checking for updates...", "Current: v1", "Latest: v1", "Already up to date"]
    out = run_task(monkeypatch, image_tasks.update, [FakeSource("cdn", version="v2")])
    assert out.splitlines()[1:4] == ["Current: v1", "Latest: v2", "Update available"]
    assert Manifest.load().get(paths.image_name()).version == "v1"

    vm = running_vm("core-dev")
    with pytest.raises(Exit, match="VM core-dev is running.*stop it first"):
        run_task(monkeypatch, image_tasks.update, [FakeSource("cdn", version="v2")], apply=True)
    assert Manifest.load().get(paths.image_name()).version == "v1"

    vm.kill()
    vm.wait()
    out = run_task(monkeypatch, image_tasks.update, [FakeSource("cdn", version="v2")], apply=True)
    assert any(line.startswith("Updated in ") for line in out.splitlines())
    assert "recreated fresh on next boot" in out
    assert Manifest.load().get(paths.image_name()).version == "v2"


def test_update_task_source_failure_prints_current(monkeypatch):
    from devops_tasks.tasks.image import update

    manager([FakeSource("cdn", version="v1")]).install()
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(Exit, match="failed to get latest version: boom"):
        run_task(monkeypatch, update, [FakeSource("cdn", latest_error=SourceError("boom"))])


def test_list_and_prune_tasks(monkeypatch):
    from devops_tasks.tasks import image as image_tasks

    assert "No images installed" in run_task(monkeypatch, image_tasks.list_, [])
    manager([FakeSource("cdn", version="v7")]).install()
    out = run_task(monkeypatch, image_tasks.list_, [])
    assert "Version: v7" in out and "Source: cdn" in out
    data = json.loads(run_task(monkeypatch, image_tasks.list_, [], json_=True))
    assert data[0]["version"] == "v7"
    (paths.images_dir() / "stale.qcow2").write_bytes(b"z" * 2048)
    out = run_task(monkeypatch, image_tasks.prune, [])
    assert "stale.qcow2" in out and "Freed 2.0 KiB" in out


def test_go_duration():
    from devops_tasks.tasks.image import go_duration

    assert [go_duration(s) for s in (0, 0.4, 42, 90, 3723)] == ["0s", "0s", "42s", "1m30s", "1h2m3s"]


def test_auto_says_when_it_falls_back_to_building():
    lines = []
    fakes = [FakeSource("github", available=False), FakeSource("cdn", available=False), FakeSource("build")]
    assert manager(fakes, echo=lines).install().source == "build"
    assert lines[0] == "No download source worked; building the image locally instead"
    lines.clear()
    manager([FakeSource("build")], source="build", echo=lines).install()
    assert not any("building the image locally" in line for line in lines)


def test_real_sources_are_built_from_config(monkeypatch):
    """No fakes: auto builds GitHub, CDN, registry and build candidates from the config."""
    config = Config.from_dict({"images": {"cdn": {"url": "http://127.0.0.1:9/x"},
                                          "registry": {"image": "127.0.0.1:9/core/devops"}}})
    kinds = [s.name() for s in ImageManager(config).candidates()]
    assert kinds == ["github", "cdn", "registry", "build"]
    assert [s.name() for s in ImageManager(config).candidates("cdn")] == ["cdn"]
    cfg = ImageManager(config).source_config()
    assert cfg.cdn_url == "http://127.0.0.1:9/x" and cfg.image_name == paths.image_name()
    monkeypatch.setenv("CORE_HTTP_READ_TIMEOUT", "abc")
    with pytest.raises(ConfigError, match="CORE_HTTP_READ_TIMEOUT"):
        ImageManager(config).source_config()
