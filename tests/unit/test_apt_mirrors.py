"""Recipes without a mirror use the host's apt sources (one-line and deb822 formats)."""

import pytest

from devops_tasks.build.apt import host_mirrors, with_host_mirrors
from devops_tasks.build.recipe import AptSource
from devops_tasks.errors import ImageError


def test_deb822_and_one_line_sources(tmp_path):
    listd = tmp_path / "sources.list.d"
    listd.mkdir()
    (listd / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.test/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb-src\nURIs: http://src.test/debian\nSuites: trixie\n\n"
        "Types: deb\nURIs: http://off.test/debian\nSuites: sid\nEnabled: no\n\n"
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\n"
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text("# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://other.test/debian bullseye main\n")
    found = host_mirrors((one_line, listd))
    assert found == {
        "bullseye": "http://other.test/debian",
        "bookworm": "http://mirror.test/debian",
        "bookworm-updates": "http://mirror.test/debian",
        "bookworm-security": "http://mirror.test/debian-security",
    }
    source = with_host_mirrors(AptSource(), (one_line, listd))
    assert source.mirror == "http://mirror.test/debian"
    assert source.security_mirror == "http://mirror.test/debian-security"


def test_recipe_mirror_wins(tmp_path):
    source = AptSource(mirror="http://mine.test/debian", security_mirror="http://mine.test/sec")
    assert with_host_mirrors(source, (tmp_path / "none",)) == source


def test_no_mirror_for_the_suite_is_a_clear_error(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://other.test/debian bullseye main\n")
    with pytest.raises(ImageError, match="no Debian mirror for suite 'bookworm'.*apt.mirror"):
        with_host_mirrors(AptSource(), (tmp_path / "sources.list",))
