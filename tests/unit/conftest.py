"""Unit tests never touch the real home: ``~/.core`` and the images dir point into tmp."""

import pytest


@pytest.fixture(autouse=True)
def isolated_core_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CORE_HOME", str(home / ".core"))
    monkeypatch.delenv("CORE_IMAGES_DIR", raising=False)
    monkeypatch.delenv("CORE_CACHE_DIR", raising=False)
    return home / ".core"
