from pathlib import Path

import pytest

from devops_tasks import image_name, image_path, images_dir, paths


@pytest.mark.parametrize(
    "system,machine,expected",
    [
        ("linux", "x86_64", "core-devops-linux-amd64.qcow2"),
        ("linux", "aarch64", "core-devops-linux-arm64.qcow2"),
        ("darwin", "arm64", "core-devops-darwin-arm64.qcow2"),
        ("darwin", "x86_64", "core-devops-darwin-amd64.qcow2"),
        ("win32", "AMD64", "core-devops-windows-amd64.qcow2"),
    ],
)
def test_image_name_uses_go_spellings(system, machine, expected):
    assert image_name(system, machine) == expected


def test_image_name_for_this_machine_is_well_formed():
    name = image_name()
    assert name.startswith("core-devops-") and name.endswith(".qcow2")
    assert name.count("-") == 3


def test_core_home_follows_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CORE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.core_home() == tmp_path / ".core"
    assert paths.config_path() == tmp_path / ".core" / "config.yaml"
    assert images_dir() == tmp_path / ".core" / "images"


def test_core_home_override(monkeypatch, tmp_path):
    monkeypatch.setenv("CORE_HOME", str(tmp_path / "elsewhere"))
    assert paths.known_hosts_path() == tmp_path / "elsewhere" / "known_hosts"
    assert images_dir() == tmp_path / "elsewhere" / "images"


def test_images_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CORE_IMAGES_DIR", str(tmp_path / "imgs"))
    assert images_dir() == tmp_path / "imgs"
    assert image_path() == tmp_path / "imgs" / image_name()
    assert paths.manifest_path() == tmp_path / "imgs" / "manifest.json"


def test_empty_images_dir_env_means_default(monkeypatch, isolated_core_home):
    monkeypatch.setenv("CORE_IMAGES_DIR", "")
    assert images_dir() == Path(isolated_core_home) / "images"
