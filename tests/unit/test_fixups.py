"""The builder's stand-ins for maintainer scripts, on a small root tree, and the CA bundle's place
in every image (made at boot in tmpfs)."""

from __future__ import annotations

import os
from pathlib import Path

from devops_tasks.build import builder, fixups, rootfs


def put(root: Path, rel: str, data: str = "", link: str = "") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if link:
        path.symlink_to(link)
    else:
        path.write_text(data)
    return path


def test_ca_bundle_is_every_shipped_certificate_in_order(tmp_path):
    put(tmp_path, "usr/share/ca-certificates/mozilla/B.crt", "B\n")
    put(tmp_path, "usr/share/ca-certificates/mozilla/A.crt", "A")  # no final newline
    put(tmp_path, "usr/share/ca-certificates/local/C.crt", "C\n")
    assert fixups.ca_bundle(tmp_path) == 3
    assert (tmp_path / "etc/ssl/certs/ca-certificates.crt").read_text() == "C\nA\nB\n"
    assert fixups.ca_bundle(tmp_path / "empty") == 0


def test_alternatives_link_what_is_installed_and_leave_packaged_paths(tmp_path):
    put(tmp_path, "usr/bin/gcc", "elf")
    put(tmp_path, "usr/bin/php8.1", "elf")
    put(tmp_path, "usr/bin/php8.2", "elf")
    put(tmp_path, "usr/bin/phar8.2", "elf")
    put(tmp_path, "usr/bin/phar.default", link="phar8.2")
    put(tmp_path, "usr/bin/c++", "a packaged file")
    made = fixups.alternatives(tmp_path)
    assert os.readlink(tmp_path / "usr/bin/cc") == "/usr/bin/gcc"
    assert os.readlink(tmp_path / "usr/bin/php") == "/usr/bin/php8.2", "the highest version"
    assert os.readlink(tmp_path / "usr/bin/phar") == "/usr/bin/phar.default", "the metapackage's choice first"
    assert (tmp_path / "usr/bin/c++").read_text() == "a packaged file"
    assert not os.path.lexists(tmp_path / "usr/bin/c99")
    assert made == ["cc -> /usr/bin/gcc", "php -> /usr/bin/php8.2", "phar -> /usr/bin/phar.default"]


def test_php_ini_and_every_extension_enabled_like_phpenmod(tmp_path):
    (tmp_path / "etc/php/8.2/cli/conf.d").mkdir(parents=True)
    put(tmp_path, "usr/lib/php/8.2/php.ini-production.cli", "memory_limit = -1\n")
    put(tmp_path, "usr/lib/php/8.2/php.ini-production", "memory_limit = 128M\n")
    put(tmp_path, "usr/share/php8.2-common/common/ctype.ini", "; priority=20\nextension=ctype.so\n")
    put(tmp_path, "usr/share/php8.2-opcache/opcache/opcache.ini", "; priority=10\nzend_extension=opcache.so\n")
    put(tmp_path, "usr/share/php8.2-xml/xml/dom.ini", "extension=dom.so\n")  # no priority line: 20
    put(tmp_path, "usr/share/php-common/not-an-extension.ini", "x")
    assert fixups.php(tmp_path) == ["ctype", "dom", "opcache"]
    assert (tmp_path / "etc/php/8.2/cli/php.ini").read_text() == "memory_limit = -1\n"
    conf = tmp_path / "etc/php/8.2/cli/conf.d"
    assert sorted(os.listdir(conf)) == ["10-opcache.ini", "20-ctype.ini", "20-dom.ini"]
    assert os.readlink(conf / "10-opcache.ini") == "/etc/php/8.2/mods-available/opcache.ini"
    assert (tmp_path / "etc/php/8.2/mods-available/opcache.ini").read_text().endswith("zend_extension=opcache.so\n")


def test_apply_on_a_tree_without_those_packages_does_nothing(tmp_path):
    root = tmp_path / "root"
    put(root, "usr/bin/python3", "elf")
    assert fixups.apply(root) == []
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["usr", "usr/bin", "usr/bin/python3"]


def test_the_system_bundle_points_to_tmpfs_and_the_image_keeps_its_own(tmp_path):
    put(tmp_path, "etc/ssl/certs/ca-certificates.crt", "debian's\n")
    rootfs.ca_bundle_at_boot(tmp_path)
    assert os.readlink(tmp_path / "etc/ssl/certs/ca-certificates.crt") == "/run/host/ca-certificates.crt"
    assert (tmp_path / "usr/lib/devops-tasks/ca-certificates.crt").read_text() == "debian's\n"
    bare = tmp_path / "bare"
    bare.mkdir()
    rootfs.ca_bundle_at_boot(bare)  # an image without a bundle (minimal): the host's alone
    assert os.readlink(bare / "etc/ssl/certs/ca-certificates.crt") == "/run/host/ca-certificates.crt"
    assert not (bare / "usr/lib/devops-tasks/ca-certificates.crt").exists()


def test_compile_python_picks_the_interpreter_not_its_config_script(tmp_path, monkeypatch):
    for name in ("python3.11", "python3.11-config", "python3.9"):
        put(tmp_path, f"usr/bin/{name}", "x")
    put(tmp_path, "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "x")
    seen = []
    monkeypatch.setattr(rootfs, "run", lambda args, *a, **k: seen.append(args))
    rootfs.compile_python(tmp_path)
    assert seen[0][3].endswith("/usr/bin/python3.11")


def test_prune_keeps_each_recipes_newest_builds(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = ["minimal-a", "minimal-b", "minimal-c", "claude-stub-a", "dev-a"]
    for age, name in enumerate(names):
        path = images / f"{name}.qcow2"
        path.write_text(name)
        os.utime(path, (1000 + age, 1000 + age))
    builder._prune(images, "dev-a")
    builder._prune(images, "minimal-c")
    assert sorted(p.stem for p in images.glob("*.qcow2")) == ["claude-stub-a", "dev-a", "minimal-b", "minimal-c"]
